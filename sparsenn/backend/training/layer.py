"""``SparseTrainingLinear``: a Linear layer trained with its weight stored sparse.

The parameter is ``values (nnz,)``, the weight's active entries in row-major order; the
positions are buffers (``indptr``, ``indices``, ``col_ptr``, ``row_idx``, ``perm``: see
:class:`.kernels.SparseStructure`), so the ``state_dict`` holds everything needed to
rebuild the layer. Buffers loaded from a ``state_dict`` are checked before the kernels read
them (ValueError saying what is wrong); a ``state_dict`` with a different number of
active positions replaces the buffers and the parameter (an optimizer holding the old
parameter must be rebuilt).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .function import SparseLinearFunction
from .kernels import SparseStructure

STRUCTURE = ("indptr", "indices", "col_ptr", "row_idx", "perm")


class SparseTrainingLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` zero outside a fixed boolean ``mask (out, in)`` (``True`` = active).

    ``values`` is initialised like ``nn.Linear``'s weight (Kaiming uniform of the dense
    fan-in) at the active positions; ``bias`` like ``nn.Linear``'s. :meth:`from_linear`
    copies a trained ``nn.Linear``.
    """

    def __init__(self, in_features: int, out_features: int, mask: torch.Tensor, bias: bool = True):
        super().__init__()
        mask = torch.as_tensor(mask)
        if tuple(mask.shape) != (out_features, in_features):
            raise ValueError(f"mask must have shape ({out_features}, {in_features}), got {tuple(mask.shape)}")
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        s = SparseStructure.from_mask(mask.to(torch.bool))
        for name in STRUCTURE:
            self.register_buffer(name, torch.from_numpy(getattr(s, name)))
        dense = torch.empty(out_features, in_features)
        nn.init.kaiming_uniform_(dense, a=math.sqrt(5))
        self.values = nn.Parameter(torch.from_numpy(s.gather(dense.numpy())))
        if bias:
            bound = 1 / math.sqrt(in_features) if in_features > 0 else 0.0
            self.bias = nn.Parameter(torch.empty(out_features).uniform_(-bound, bound))
        else:
            self.register_parameter("bias", None)
        self._structure: SparseStructure | None = s
        self._key = self._structure_key()

    @classmethod
    def from_linear(cls, linear: nn.Linear, mask: torch.Tensor | None = None) -> SparseTrainingLinear:
        """A layer holding ``linear``'s weight at ``mask``'s active positions (default: its nonzeros) and
        its bias (copies)."""
        w = linear.weight.detach()
        if w.dtype != torch.float32 or w.device.type != "cpu":
            raise TypeError(f"the sparse training kernels take float32 CPU weights, got {w.dtype} on {w.device}")
        mask = (w != 0) if mask is None else torch.as_tensor(mask).to(torch.bool)
        layer = cls(linear.in_features, linear.out_features, mask, bias=linear.bias is not None)
        with torch.no_grad():
            layer.values.copy_(torch.from_numpy(layer.structure.gather(w.contiguous().numpy())))
            if linear.bias is not None:
                layer.bias.copy_(linear.bias.detach())
        return layer

    def _structure_key(self):
        return tuple((b.data_ptr(), b._version, tuple(b.shape)) for b in (getattr(self, n) for n in STRUCTURE))

    @property
    def structure(self) -> SparseStructure:
        """The positions as a checked :class:`SparseStructure` (rebuilt and checked when a buffer changed)."""
        key = self._structure_key()
        if self._structure is None or key != self._key:
            self._structure = None
            self._structure = SparseStructure.from_arrays(self.out_features, self.in_features,
                                                          *(getattr(self, n) for n in STRUCTURE))
            self._key = key
        return self._structure

    @property
    def nnz(self) -> int:
        return int(self.indices.shape[0])

    def mask(self) -> torch.Tensor:
        """The boolean ``(out, in)`` mask of active positions."""
        return torch.from_numpy(self.structure.mask())

    def dense_weight(self) -> torch.Tensor:
        """The dense ``(out, in)`` weight: ``values`` at the active positions, exact zeros elsewhere (a copy)."""
        return torch.from_numpy(self.structure.to_dense(self.values.detach().cpu().numpy()))

    @property
    def weight(self) -> torch.Tensor:
        """The dense ``(out, in)`` weight as a differentiable view of ``values`` (a new tensor each call; its
        gradient flows into ``values``): code written for ``nn.Linear`` that reads ``layer.weight``, such as a
        penalty or a report, keeps working. Training itself never builds it."""
        s = self.structure
        rows = torch.repeat_interleave(torch.arange(self.out_features), torch.from_numpy(s.indptr).diff())
        flat = rows * self.in_features + torch.from_numpy(s.indices).to(torch.int64)
        dense = self.values.new_zeros(self.out_features * self.in_features).index_put((flat,), self.values)
        return dense.view(self.out_features, self.in_features)

    def to_linear(self) -> nn.Linear:
        """An ``nn.Linear`` with :meth:`dense_weight` and a copy of the bias."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        with torch.no_grad():
            lin.weight.copy_(self.dense_weight())
            if self.bias is not None:
                lin.bias.copy_(self.bias.detach())
        return lin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return SparseLinearFunction.apply(x, self.values, self.bias, self.structure)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # A different number of active positions: take the incoming shapes (copy_ would refuse them).
        for name in (*STRUCTURE, "values"):
            t = state_dict.get(prefix + name)
            cur = getattr(self, name)
            if isinstance(t, torch.Tensor) and t.shape != cur.shape and t.dim() == 1 and cur.dim() == 1:
                if name == "values":
                    self.values = nn.Parameter(torch.empty(t.shape, dtype=cur.dtype),
                                               requires_grad=cur.requires_grad)
                else:
                    setattr(self, name, torch.empty(t.shape, dtype=cur.dtype))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        try:
            self._structure = None
            _ = self.structure
        except ValueError as e:
            error_msgs.append(f"{prefix or 'SparseTrainingLinear'}: {e}")

    def extra_repr(self) -> str:
        size = self.out_features * self.in_features
        density = self.nnz / size if size else 0.0
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"nnz={self.nnz}, density={density:.4f}")


__all__ = ["SparseTrainingLinear"]
