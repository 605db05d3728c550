"""RMSNorm in one call: ``torch.nn.functional.rms_norm`` (or, for a few rows, one compiled kernel) in place
of a module that computes it step by step.

RMSNorm (Zhang & Sennrich 2019) is ``x / sqrt(mean(x^2) + eps) * weight``. The
``transformers`` LLaMA-family modules (``LlamaRMSNorm``, ``Qwen2RMSNorm``,
``MistralRMSNorm``, ...) compute it in six to eight tensor operations. Decoding one token, each
is a dispatch of a few microseconds: 25 us per call against 11 us for ``F.rms_norm``
(1x576 float32, 2 threads), and SmolLM2-135M runs 61 of them per token.

:func:`fuse_rms_norms` replaces a module only when it is shown to compute exactly that:
it is an RMSNorm by :func:`sparsenn.structured.norms.norm_kind` (the structured graph's
test), has a float32 ``weight`` and a float ``variance_epsilon`` (or ``eps``), and on a
random input its output equals ``F.rms_norm`` with that weight and epsilon
(``allclose``). Up to :data:`COMPILED_MAX_ROWS` float32 rows without autograd (decoding),
:func:`sparsenn.backend.kernels.norms.rms_norm_rows` computes it in one call (7.7 us against
9.9 us for ``F.rms_norm`` on one 576-wide row, ``bench/decode_ops.py``). Modules that compute something else under the same name (Gemma's
``(1 + weight)``, a norm with a bias) fail the check and stay as they are. The new
module holds the same ``weight`` parameter, so the state dict is unchanged.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...structured.norms import eps_attribute, norm_kind
from ..kernels.norms import rms_norm_rows
from .replace import replace_checked

COMPILED_MAX_ROWS = 16  #: up to this many rows (decoding), without autograd, the compiled kernel runs it
NORMS_ATTR = "fused_rms_norms"  #: on a converted model: the names of the modules replaced (save/load rebuild them)


class FusedRMSNorm(nn.Module):
    """``F.rms_norm(x, (d,), weight, eps)``: one call for what an RMSNorm module computed in several."""

    def __init__(self, weight: nn.Parameter, eps: float, original: str = "RMSNorm"):
        super().__init__()
        self.weight = weight
        self.eps = float(eps)
        self.shape = (int(weight.shape[0]),)
        self.original = original  #: the class it replaced (shown in ``repr``)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, d = self.weight, self.shape[0]
        if x.dtype is not torch.float32 or x.device.type != "cpu" or x.numel() > COMPILED_MAX_ROWS * d \
                or x.dim() == 0 or x.shape[-1] != d or x.numel() == 0 or not x.is_contiguous() \
                or x.requires_grad or (torch.is_grad_enabled() and w.requires_grad):
            return F.rms_norm(x, self.shape, w, self.eps)
        wn = self._weight_array(w)
        if wn is None:
            return F.rms_norm(x, self.shape, w, self.eps)
        out = torch.empty_like(x)
        rms_norm_rows(x.numpy(), wn, self.eps, out.numpy())
        return out

    def _weight_array(self, w: torch.Tensor) -> np.ndarray | None:
        """The weight as a NumPy view, kept while the parameter and its storage stay the same
        (``.data`` assigned, or a new parameter, makes a new view); ``None`` if it is not a float32
        CPU vector."""
        c = self.__dict__.get("_array")
        if c is not None and c[0] is w and c[1] == w.data_ptr():
            return c[2]
        if w.dtype is not torch.float32 or w.device.type != "cpu" or w.dim() != 1 or not w.is_contiguous():
            return None
        arr = w.detach().numpy()
        self.__dict__["_array"] = (w, w.data_ptr(), arr)
        return arr

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_array", None)
        return state

    def extra_repr(self) -> str:
        return f"{self.shape[0]}, eps={self.eps:g}, replaces {self.original}"


def _epsilon(m: nn.Module) -> float | None:
    """The norm's epsilon (:func:`~sparsenn.structured.norms.eps_attribute`) if it is a float >= 0."""
    v = getattr(m, eps_attribute(m), None)
    return v if isinstance(v, float) and v >= 0 else None


@torch.no_grad()
def fusable(m: nn.Module) -> bool:
    """Whether ``m`` computes ``F.rms_norm(x, (d,), m.weight, eps)`` (checked on a random input)."""
    if isinstance(m, FusedRMSNorm) or norm_kind(m) != "rms":  # the structured graph's notion of an RMSNorm
        return False
    w, eps = getattr(m, "weight", None), _epsilon(m)
    if not isinstance(w, nn.Parameter) or w.dim() != 1 or w.dtype != torch.float32 or eps is None \
            or w.device.type != "cpu" or any(True for _ in m.children()):
        return False
    x = torch.randn(3, 2, w.shape[0], generator=torch.Generator().manual_seed(0)) * 3 + 0.5
    try:
        got = m(x)
    except Exception:  # noqa: BLE001  (a module that cannot even run on that input is not replaced)
        return False
    want = F.rms_norm(x, (w.shape[0],), w, eps)
    return isinstance(got, torch.Tensor) and got.shape == want.shape and torch.allclose(got, want, rtol=1e-5,
                                                                                        atol=1e-6)


def fuse_rms_norms(model: nn.Module, names: list[str] | None = None) -> list[str]:
    """Replace the RMSNorm modules of ``model`` (in place) by :class:`FusedRMSNorm`; the names replaced.

    ``names``: only these (each must pass :func:`fusable`, else ``ValueError`` naming it, and
    nothing changes); ``None``: every module that passes."""
    return replace_checked(model, names, fusable, lambda m: FusedRMSNorm(m.weight, _epsilon(m), type(m).__name__),
                           "RMSNorm modules that F.rms_norm computes exactly")


__all__ = ["NORMS_ATTR", "FusedRMSNorm", "fusable", "fuse_rms_norms"]
