"""Error feedback: what a compressor did not send is kept and added to the next update.

Residual accumulation (Seide et al. 2014, "1-Bit Stochastic Gradient Descent"; Stich et al.
2018, "Sparsified SGD with Memory"; Karimireddy et al. 2019, "Error Feedback Fixes SignSGD"),
as STC uses it on both sides (Sattler et al. 2019, Algorithm 2)::

    acc      = residual + update
    message  = compress(acc)
    residual = acc - decompress(message)

**Exact conservation.** After every call, ``sent + residual == acc`` holds bit for bit, where
``acc`` is ``old residual + update``: nothing is lost or created, only delayed. Residuals are
float64 while messages carry float32 values, because in float32 the identity fails for
ternary values: ``a - mu`` is often not representable (for heavy-tailed kept entries about half
of them, a quick check found), while in float64 the difference of a float32 value and a
float64 sum of a few float32 values is exact. Where it still is not (a kept entry more than
``2**29`` times smaller than STC's mean magnitude, or a residual whose bits span more than 53
binary places), those entries are excluded from the message and compressed again, so they stay
in the residual; after ``max_retries`` such rounds the tensor sends nothing this time. Sparsifiers
that send ``float32(acc)`` at their positions never need a retry: ``acc - float32(acc)`` is exact.
"""

from __future__ import annotations

from typing import Any

import torch

from .compressors import Compressor, make_compressor
from .messages import Message

__all__ = ["ErrorFeedback"]


class ErrorFeedback:
    """Per-tensor residuals (by name) around a compressor; ``compress`` returns the message to send."""

    def __init__(self, compressor: str | dict | Compressor, *, max_retries: int = 8):
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 1:
            raise ValueError(f"max_retries must be a positive integer, got {max_retries!r}")
        self.compressor = make_compressor(compressor)
        self.max_retries = max_retries
        self.residuals: dict[str, torch.Tensor] = {}
        self.retries = 0  # compressions repeated to keep the conservation exact (0 for sparsifiers)

    def residual(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """The float64 residual of ``name`` (zeros before the first call)."""
        r = self.residuals.get(name)
        if r is None:
            return torch.zeros(like.shape, dtype=torch.float64)
        if r.shape != like.shape:
            raise ValueError(f"update for {name!r} has shape {tuple(like.shape)}, its residual {tuple(r.shape)}")
        return r

    @torch.no_grad()
    def compress(self, name: str, update: torch.Tensor, *, mask: torch.Tensor | None = None) -> Message:
        """Compress ``residual + update`` and keep what was not sent; see the module doc for the guarantee."""
        if not isinstance(update, torch.Tensor) or not update.is_floating_point():
            raise TypeError(f"update for {name!r} must be a floating-point tensor, got {type(update).__name__}")
        acc = self.residual(name, update) + update.detach().cpu().double()
        exclude = None
        for _ in range(self.max_retries):
            message = self.compressor.compress(acc, mask=mask, exclude=exclude)
            sent = self.compressor.decompress(message, mask=mask).double()
            residual = acc - sent
            inexact = (sent + residual) != acc
            if not bool(inexact.any()):
                break
            self.retries += 1
            exclude = inexact if exclude is None else exclude | inexact
        else:  # send nothing for this tensor this time: the residual keeps all of acc
            message = self.compressor.compress(acc, mask=mask, exclude=torch.ones_like(acc, dtype=torch.bool))
            residual = acc - self.compressor.decompress(message, mask=mask).double()
        self.residuals[name] = residual
        return message

    def state_dict(self) -> dict[str, Any]:
        return {"residuals": {k: v.clone() for k, v in self.residuals.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        residuals = state.get("residuals") if isinstance(state, dict) else None
        if not isinstance(residuals, dict) or not all(
                isinstance(v, torch.Tensor) and v.dtype == torch.float64 for v in residuals.values()):
            raise ValueError("state must be {'residuals': {name: float64 tensor}}")
        self.residuals = {k: v.clone() for k, v in residuals.items()}
