"""The ``"sparse"`` training backend of :class:`sparsenn.Sparsifier` (``backend="sparse"``).

What the Sparsifier's layer swap (:mod:`sparsenn.train.layer_swap`) asks of a backend:
which masked layers it can take (:meth:`SparseLinearBackend.refusal`), whether one is faster
sparse at the batch it is trained with (:meth:`~SparseLinearBackend.measure`), and the moves
between a masked ``nn.Linear`` and a :class:`.layer.SparseTrainingLinear` holding only the
active values (:meth:`~SparseLinearBackend.to_sparse`, :meth:`~SparseLinearBackend.write_back`,
:meth:`~SparseLinearBackend.gather`, :meth:`~SparseLinearBackend.scatter`). Registered in
:data:`sparsenn.train.backends.TRAINING_BACKENDS` on import (the train layer does not import
this one).

The measurement (SparseProp, Nikdan et al. 2023, swaps a layer only where its sparse
backward is faster, too) times one masked-dense training step of the layer against the
sparse one on the layer's recorded input: forward, backward (the input gradient where the
input needs one), and what the masked path does besides, zeroing the gradient at masked
positions and writing the masked weights back to zero after the optimizer step, plus a
momentum-SGD-like update over the weight's elements (dense: every element; sparse: the
active ones). Timed interleaved (:func:`..runtime.timing.interleaved_medians`); the layer
goes sparse if its median is below ``margin`` times the dense one.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ...core.zeroing import zero_masked_
from ...train.backends import TRAINING_BACKENDS
from ..runtime.timing import interleaved_medians
from .layer import SparseTrainingLinear


def _step_call(forward, params: list[torch.Tensor], x: torch.Tensor, dy: torch.Tensor, masked=None):
    """One training step of a layer in isolation: forward, backward, the masked path's zeroing, a momentum update."""
    bufs = [torch.zeros_like(p) for p in params]

    def call():
        x.grad = None
        for p in params:
            p.grad = None
        forward(x).backward(dy)
        with torch.no_grad():
            if masked is not None:
                weight, mask = masked
                zero_masked_(weight.grad, mask)
            for p, b in zip(params, bufs):
                b.mul_(0.9).add_(p.grad)
                p.add_(b, alpha=-1e-9)  # moves the weights by nothing that matters; costs what a step costs
            if masked is not None:
                zero_masked_(weight, mask)
    return call


class SparseLinearBackend:
    """``nn.Linear`` (float32, CPU) <-> :class:`.layer.SparseTrainingLinear`."""

    name = "sparse"
    layer_type = SparseTrainingLinear

    def refusal(self, module: nn.Module, attr: str) -> str | None:
        """Why ``module.<attr>`` cannot be trained sparse, or ``None`` if it can."""
        if type(module) is not nn.Linear:
            return f"a {type(module).__name__}, not an nn.Linear"
        if attr != "weight":
            return f"the {attr!r} of an nn.Linear (only the weight is stored sparse)"
        w = module.weight
        if w.dtype != torch.float32 or w.device.type != "cpu":
            return f"a {w.dtype} weight on {w.device} (the kernels take float32 on the CPU)"
        if module._forward_hooks or module._forward_pre_hooks or module._backward_hooks \
                or getattr(module, "_backward_pre_hooks", None):
            return "it has module hooks (they would not follow the swap)"
        if w._post_accumulate_grad_hooks and len(w._post_accumulate_grad_hooks) > 1:
            return "its weight has gradient hooks besides the Sparsifier's"
        return None

    @torch.no_grad()
    def to_sparse(self, module: nn.Linear, mask: torch.Tensor) -> SparseTrainingLinear:
        """A sparse layer holding ``module``'s weight at ``mask``'s active positions; shares ``module``'s bias
        parameter (the very object, so optimizers and users holding it still hold the layer's bias)."""
        layer = SparseTrainingLinear.from_linear(module, mask)
        if module.bias is not None:
            layer.bias = module.bias
        layer.train(module.training)
        return layer

    @torch.no_grad()
    def write_back(self, layer: SparseTrainingLinear, module: nn.Linear) -> None:
        """``module.weight`` := the layer's dense weight (exact zeros off the active positions), in place."""
        module.weight.data = layer.dense_weight().to(module.weight.dtype)

    def gather(self, layer: SparseTrainingLinear, dense: torch.Tensor) -> torch.Tensor:
        """The ``(nnz,)`` entries of an ``(out, in)`` tensor at the layer's active positions, in its values' order."""
        return torch.from_numpy(layer.structure.gather(dense.detach().to(torch.float32).contiguous().numpy())) \
            .to(dense.dtype)

    def scatter(self, layer: SparseTrainingLinear, values: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """An ``(out, in)`` tensor with ``values (nnz,)`` at the active positions, ``fill`` elsewhere."""
        dense = torch.from_numpy(layer.structure.to_dense(values.detach().to(torch.float32).contiguous().numpy()))
        if fill != 0.0:
            dense = dense.masked_fill(~layer.mask(), fill)
        return dense.to(values.dtype)

    def measure(self, module: nn.Linear, mask: torch.Tensor, x: torch.Tensor, *, needs_input_grad: bool,
                budget: float = 0.05) -> dict[str, float]:
        """``{"dense": s, "sparse": s}``: median seconds of one training step of the layer (see the module) on
        input ``x``, masked-dense vs sparse. Works on copies: ``module`` is not touched."""
        x = x.detach().reshape(-1, module.in_features).to(torch.float32).clone().requires_grad_(needs_input_grad)
        g = torch.Generator().manual_seed(0)
        dy = torch.randn(x.shape[0], module.out_features, generator=g)
        weight = module.weight.detach().clone().requires_grad_(True)
        bias = None if module.bias is None else module.bias.detach().clone().requires_grad_(True)
        mask = mask.to(torch.bool)
        dense_params = [weight] + ([bias] if bias is not None else [])
        dense = _step_call(lambda t: F.linear(t, weight, bias), dense_params, x, dy, masked=(weight, mask))
        layer = SparseTrainingLinear.from_linear(module, mask)
        sparse = _step_call(layer, list(layer.parameters()), x, dy)
        return interleaved_medians({"dense": dense, "sparse": sparse}, budget=budget, min_repeats=5, block=2)


TRAINING_BACKENDS.register("sparse", SparseLinearBackend())

__all__ = ["SparseLinearBackend"]
