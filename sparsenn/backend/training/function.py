"""``SparseLinearFunction``: ``y = x W^T + b`` with a sparse ``W`` given by its values, differentiable.

Forward, input gradient and weight gradient are the kernels of :mod:`.kernels`; the weight
gradient is a ``(nnz,)`` vector in the values' order (no dense ``(out, in)`` gradient is
ever made), the bias gradient ``dY.sum(0)``. Float32 CPU tensors only. The activations'
batch tiles made by the forward pass are kept for the weight gradient (one transposed copy
of ``x``) when ``values`` needs a gradient.
"""

from __future__ import annotations

import numpy as np
import torch

from . import kernels as K


def _check(x: torch.Tensor, values: torch.Tensor, bias: torch.Tensor | None, s: K.SparseStructure) -> None:
    if not isinstance(s, K.SparseStructure):
        raise TypeError(f"structure must be a SparseStructure, got {type(s).__name__}")
    for name, t in (("x", x), ("values", values), ("bias", bias)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.dtype != torch.float32 or t.device.type != "cpu":
            raise TypeError(f"the sparse training kernels take float32 CPU tensors; {name} is {t.dtype} on {t.device}")
    if x.dim() < 1 or x.shape[-1] != s.in_features:
        raise ValueError(f"x must have {s.in_features} features in its last dimension, got shape {tuple(x.shape)}")
    if values.shape != (s.nnz,):
        raise ValueError(f"values must have shape ({s.nnz},), got {tuple(values.shape)}")
    if bias is not None and bias.shape != (s.out_features,):
        raise ValueError(f"bias must have shape ({s.out_features},), got {tuple(bias.shape)}")


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().contiguous().numpy()


class SparseLinearFunction(torch.autograd.Function):
    """``SparseLinearFunction.apply(x, values, bias, structure) -> y`` (``bias`` may be ``None``).

    ``x (..., in)``; ``values (nnz,)`` in ``structure``'s CSR order; ``y (..., out)``. Backward:
    ``dx``, ``dvalues (nnz,)``, ``dbias``, each only where needed. Not twice differentiable.
    """

    @staticmethod
    def forward(ctx, x, values, bias, structure):
        _check(x, values, bias, structure)
        lead = x.shape[:-1]
        x2 = x.detach().reshape(-1, structure.in_features)
        batch = x2.shape[0]
        xp = K.tiles(x2.contiguous().numpy(), reuse=not ctx.needs_input_grad[1])
        y = torch.empty(batch, structure.out_features, dtype=torch.float32)
        K.forward(structure, _numpy(values), xp, None if bias is None else _numpy(bias), y.numpy())
        ctx.structure = structure
        ctx.xp = xp if ctx.needs_input_grad[1] else None
        ctx.x_shape = x.shape
        ctx.save_for_backward(values)
        return y.reshape(*lead, structure.out_features)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        s = ctx.structure
        (values,) = ctx.saved_tensors
        need_x, need_v, need_b = ctx.needs_input_grad[:3]
        dy = grad_y.reshape(-1, s.out_features).to(torch.float32).contiguous()
        dx = dv = db = None
        if need_x or need_v or need_b:
            dyp = K.tiles(dy.numpy(), reuse=True)
            if need_x:
                dx = torch.empty(dy.shape[0], s.in_features, dtype=torch.float32)
                K.input_grad(s, _numpy(values), dyp, dx.numpy())
                dx = dx.reshape(ctx.x_shape)
            if need_v:
                dv = torch.empty(s.nnz, dtype=torch.float32)
                K.weight_grad(s, dyp, ctx.xp, dv.numpy())
            if need_b:  # not dy.sum(0): PyTorch's threads would then spin while numba's run the next kernels
                db = torch.empty(s.out_features, dtype=torch.float32)
                K.bias_grad(dyp, db.numpy())
        return dx, dv, db, None


def sparse_linear(x: torch.Tensor, values: torch.Tensor, bias: torch.Tensor | None,
                  structure: K.SparseStructure) -> torch.Tensor:
    """``SparseLinearFunction.apply(x, values, bias, structure)``."""
    return SparseLinearFunction.apply(x, values, bias, structure)


__all__ = ["SparseLinearFunction", "sparse_linear"]
