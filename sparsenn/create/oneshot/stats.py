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

    ``token_mask``: a callable returning the current batch's boolean mask of real tokens
    (``None``: all), applied to inputs whose leading dimensions are (batch, sequence)."""

    def __init__(self, layers: dict[str, nn.Linear], kind: str, token_mask=lambda: None):
        self.layers, self.kind, self.token_mask = layers, kind, token_mask
        self.stats = {n: InputStats(n, m.in_features, kind) for n, m in layers.items()}
        self._handles: list = []

    def __enter__(self) -> dict[str, InputStats]:
        for name, module in self.layers.items():
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self.stats

    def _hook(self, name: str):
        def hook(module, args, output):
            x = args[0]
            mask = self.token_mask()
            if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
                x = x[mask.to(x.device)]
            self.stats[name].add(x)
        return hook

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
