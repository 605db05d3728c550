"""Normalisation layers over the channels: which the channel graph follows, and how they shrink.

A BatchNorm normalises each channel by its own statistics, so removing a channel leaves
the others as they were. A norm whose statistics span the channels does not:

- **RMSNorm** (Zhang & Sennrich 2019, "Root Mean Square Layer Normalization"):
  ``y = x / sqrt(mean(x^2) + eps) * w``, the mean over the ``d`` channels of the last
  dimension. In the masked model the removed channels are exactly zero (their producers'
  rows and biases, embedding columns and norm weights are zeroed), so the sum of squares
  ``S`` over the ``d'`` kept channels is the same in both models, but the masked mean
  divides it by ``d``. With ``w' = w * sqrt(d / d')`` and ``eps' = eps * d / d'`` the shrunk
  norm gives, at every kept channel,
  ``x / sqrt(S / d' + eps d / d') * w sqrt(d / d') = x / (sqrt(d / d') sqrt(S / d + eps)) * w sqrt(d / d')
  = x / sqrt(S / d + eps) * w``: exactly the masked model's output (zero at the removed
  channels, which the shrunk model no longer has). :func:`resize_norm` writes ``w'`` and ``eps'``.
- **LayerNorm** (Ba et al. 2016, "Layer Normalization"):
  ``y = (x - mean(x)) / sqrt(var(x) + eps) * w + b``. The removed channels' zeros enter the
  mean and the variance, and no choice of ``w``, ``b``, ``eps`` reproduces them for every
  input, so a shrunk LayerNorm is not the masked one: it is *the LayerNorm of the kept
  channels* (statistics over the ``d'`` kept channels, the same ``eps``, the kept entries
  of ``w`` and ``b``).
- **GroupNorm** (Wu & He 2018, "Group Normalization"): with ``num_groups == num_channels``
  each channel is normalised by itself over the positions, like a BatchNorm, and is
  followed exactly; with fewer groups ``C / G`` channels share their statistics and
  removing one would change the others', so their channels are kept (frozen).

The graph follows ``nn.LayerNorm`` (over one dimension), ``nn.RMSNorm`` and the RMSNorm
classes of ``transformers`` (a module whose class name ends with ``RMSNorm``, with a 1-D
``weight`` and an ``eps`` or ``variance_epsilon``) as single operations (:class:`NormHooks`),
after checking on the recorded call that the module computes the formula above: Gemma's
``x / rms * (1 + w)``, or any other variant, is frozen with a note.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

_RMS = (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()
_FORMULA = {"rms": "x * rsqrt(mean(x^2) + eps) * weight",
            "layer": "(x - mean(x)) * rsqrt(var(x) + eps) * weight + bias"}


def norm_kind(m: nn.Module) -> str | None:
    """``"layer"`` (``nn.LayerNorm``), ``"rms"`` (``nn.RMSNorm``, or a class named ``...RMSNorm`` with a
    1-D ``weight``) or ``None``: the modules whose statistics span the last dimension that the graph follows."""
    if isinstance(m, nn.LayerNorm):
        return "layer"
    if _RMS and isinstance(m, _RMS):
        return "rms"
    w = getattr(m, "weight", None)
    if type(m).__name__.endswith("RMSNorm") and isinstance(w, torch.Tensor) and w.dim() == 1:
        return "rms"
    return None


def eps_attribute(m: nn.Module) -> str:
    """The attribute holding a norm's epsilon (``transformers``' RMSNorms: ``variance_epsilon``)."""
    return "variance_epsilon" if hasattr(m, "variance_epsilon") else "eps"


def _eps(m: nn.Module, x: torch.Tensor) -> float | None:
    v = getattr(m, eps_attribute(m), None)
    if v is None and _RMS and isinstance(m, _RMS):
        return torch.finfo(x.dtype).eps  # nn.RMSNorm(eps=None) uses the input's machine epsilon
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    return None


def reference(kind: str, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
              eps: float) -> torch.Tensor:
    """The norm's formula over the last dimension of ``x``, in float32."""
    x = x.float()
    if kind == "layer":
        return F.layer_norm(x, (x.shape[-1],), None if weight is None else weight.float(),
                            None if bias is None else bias.float(), eps)
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.float()


def check_norm(name: str, m: nn.Module, kind: str, x: torch.Tensor, out: object) -> tuple[float | None, str | None]:
    """``(eps, None)`` if ``m`` computed ``out`` from ``x`` by its formula over the last dimension, else
    ``(None, why)``."""
    d = x.shape[-1]
    what = f"{name} ({type(m).__name__})"
    shape = getattr(m, "normalized_shape", None)
    if shape is not None and tuple(shape) != (d,):
        return None, f"{what} normalizes over the last {len(tuple(shape))} dimensions, not their channels alone"
    w, b = getattr(m, "weight", None), getattr(m, "bias", None) if kind == "layer" else None
    if kind == "rms" and not isinstance(w, torch.Tensor):
        return None, f"{what} has no weight to rescale by sqrt(d / d') after removing channels"
    if any(isinstance(t, torch.Tensor) and tuple(t.shape) != (d,) for t in (w, b)):
        return None, f"{what}: its weight or bias is not of the channels' size {d}"
    eps = _eps(m, x)
    if eps is None:
        return None, f"{what} has no eps or variance_epsilon attribute"
    if not isinstance(out, torch.Tensor) or out.shape != x.shape:
        return None, f"{what} returns something other than one tensor of its input's shape"
    ref = reference(kind, x.detach(), w.detach() if w is not None else None,
                    b.detach() if isinstance(b, torch.Tensor) else None, eps)
    tol = 1e-2 if out.dtype in (torch.float16, torch.bfloat16) else 1e-4
    if out.numel() and float((out.detach().float() - ref).abs().max()) > tol * max(float(ref.abs().max()), 1e-6):
        return None, (f"{what} does not compute {_FORMULA[kind]} (Gemma's (1 + weight)?), so the graph cannot "
                      "say what removing a channel does to it")
    return eps, None


def group_norm_problem(name: str, groups: int, channels: int) -> str | None:
    """Why a GroupNorm's channels must stay (``None``: one group per channel, followed like a BatchNorm)."""
    if groups == channels:
        return None
    return (f"{name}: GroupNorm with {groups} groups of {channels} channels normalizes {channels // groups} channels "
            "together, so removing one would change the others' statistics (only num_groups == num_channels is "
            "followed)")


@torch.no_grad()
def resize_norm(m: nn.Module, kept: int, size: int, eps: float | None) -> None:
    """Sizes and constants of a LayerNorm/RMSNorm whose weight and bias were cut from ``size`` to ``kept``
    channels: ``normalized_shape``; an RMSNorm also ``w * sqrt(size / kept)`` and ``eps * size / kept``
    (``eps``: the one it used; see the module docstring). The weight must not be shared with another norm."""
    if hasattr(m, "normalized_shape"):
        m.normalized_shape = (kept,)
    if norm_kind(m) == "rms" and kept < size:
        m.weight.mul_(math.sqrt(size / kept))
        setattr(m, eps_attribute(m), eps * size / kept)


class NormHooks:
    """While active, every module :func:`norm_kind` names reaches ``recorder`` as one operation: a forward
    pre-hook calls ``recorder.norm_enter(name, module, args, kwargs)`` and a forward hook
    ``recorder.norm_exit(name, module, kind, args, kwargs, output)``; the recorder suspends its
    recording of the operations in between."""

    def __init__(self, model: nn.Module, recorder) -> None:
        self.model, self.recorder, self.handles = model, recorder, []

    def __enter__(self) -> None:
        rec = self.recorder
        for name, m in self.model.named_modules():
            kind = norm_kind(m)
            if kind is None:
                continue

            def enter(module, args, kwargs, _name=name):
                rec.norm_enter(_name, module, args, kwargs)

            def leave(module, args, kwargs, out, _name=name, _kind=kind):
                rec.norm_exit(_name, module, _kind, args, kwargs, out)

            self.handles.append(m.register_forward_pre_hook(enter, with_kwargs=True))
            self.handles.append(m.register_forward_hook(leave, with_kwargs=True, always_call=True))

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


__all__ = ["NormHooks", "check_norm", "eps_attribute", "group_norm_problem", "norm_kind", "reference", "resize_norm"]
