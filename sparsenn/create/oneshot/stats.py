"""Input statistics of a Linear over calibration tokens: ``X^T X`` or the squared column norms.

Accumulated in float64 from float32 products, only over real tokens (padding excluded by
the batch's attention mask), with a check that the activations are finite.
"""

from __future__ import annotations

import torch
from torch import nn

from .blocks import OneShotError

__all__ = ["InputStats", "record_inputs"]

KINDS = ("hessian", "norms")


class InputStats:
    """``hessian``: ``H = sum_t x_t x_t^T``; ``norms``: ``sum_t x_t^2`` (the diagonal of ``H``);
    ``tokens``: how many rows were seen."""

    def __init__(self, name: str, features: int, kind: str):
        if kind not in KINDS:
            raise ValueError(f"statistics kind must be one of {', '.join(KINDS)}, got {kind!r}")
        self.name, self.kind, self.tokens = name, kind, 0
        self.hessian = torch.zeros(features, features, dtype=torch.float64) if kind == "hessian" else None
        self.norms = torch.zeros(features, dtype=torch.float64)

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
        if not torch.isfinite(x).all():
            raise OneShotError(f"{self.name}: the calibration activations reaching this layer hold NaN or Inf "
                               "(check the model's dtype and the calibration inputs)")
        self.tokens += x.shape[0]
        self.norms += (x * x).sum(0, dtype=torch.float64)
        if self.hessian is not None:
            self.hessian += (x.T @ x).to(torch.float64)


class record_inputs:
    """Context manager: forward hooks that feed every Linear's input to its :class:`InputStats`.

    Layers that receive the same input tensor in a forward pass (the query, key and value
    projections; a LLaMA MLP's gate and up projections) share one :class:`InputStats`: it is
    accumulated once (``X^T X`` is most of the statistics' cost). ``token_mask``: a callable
    returning the current batch's boolean mask of real tokens (``None``: all), applied to
    inputs whose leading dimensions are (batch, sequence). Call :meth:`next_batch` before
    each batch's forward pass.
    """

    def __init__(self, layers: dict[str, nn.Linear], kind: str, token_mask=lambda: None):
        self.layers, self.kind, self.token_mask = layers, kind, token_mask
        self.stats: dict[str, InputStats] = {}
        self._owner: dict[str, str] = {}  # layer -> the layer whose statistics it shares
        # this batch: (input tensor, first layer that saw it); holding the tensors keeps their memory from
        # being reused by another layer's input within the pass (an address is not an identity)
        self._seen: list[tuple[torch.Tensor, str]] = []
        self._batches = 0
        self._handles: list = []

    def __enter__(self) -> "record_inputs":
        for name, module in self.layers.items():
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def next_batch(self) -> None:
        self._seen.clear()
        self._batches += 1

    def groups(self) -> list[list[str]]:
        """Layers grouped by shared statistics, in module order."""
        out: dict[str, list[str]] = {}
        for name in self.layers:
            if name in self._owner:
                out.setdefault(self._owner[name], []).append(name)
        return list(out.values())

    def _hook(self, name: str):
        def hook(module, args, output):
            x = args[0]
            first = next((n for t, n in self._seen if t is x), None)
            if first is None:
                self._seen.append((x, name))
                first = name
            if self._batches <= 1 and name not in self._owner:
                self._owner[name] = self._owner.get(first, first)
                if self._owner[name] == name:
                    self.stats[name] = InputStats(name, module.in_features, self.kind)
            elif self._owner.get(name) != self._owner.get(first, first):
                raise OneShotError(f"{name}: its input was shared with {self._owner.get(name)} in the first "
                                   "calibration batch but not in this one; the block's data flow changed between "
                                   "batches")
            if self._owner[name] != name:
                return  # the owner of this input accumulates it
            mask = self.token_mask()
            if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
                x = x[mask.to(x.device)]
            self.stats[name].add(x)
        return hook

    def seen(self, name: str) -> bool:
        """Whether ``name`` was called in the recorded passes."""
        return name in self._owner

    def of(self, name: str) -> InputStats:
        """The statistics of ``name``'s input (possibly shared with another layer)."""
        return self.stats[self._owner[name]]

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._seen.clear()
