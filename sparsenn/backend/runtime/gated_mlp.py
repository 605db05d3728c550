"""The gated MLP of LLaMA-family decoders as one stacked product, one activation and one multiply.

``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` (Shazeer 2020, "GLU Variants Improve
Transformer"; LLaMA's SwiGLU) reads its input twice. Once :mod:`.siblings` has stacked
``gate_proj`` and ``up_proj`` into one product, the module still calls the two members
one after the other. :class:`GatedMLP` calls the stacked product directly and splits
its output, which saves two module calls and the sibling bookkeeping per block and
token (decoding, each is microseconds against a product of tens).

:func:`fuse_gated_mlps` replaces a module only when it is shown to compute exactly that:
it has ``gate_proj`` and ``up_proj`` that are members of one stacked product, a
``down_proj`` and an ``act_fn``, no hooks, and on a random input its output equals
:class:`GatedMLP`'s. The new module keeps the same children under the same names, so the
state dict is unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from .replace import adopt, has_forward_hooks, replace_checked
from .siblings import SiblingSlice

MLPS_ATTR = "fused_gated_mlps"  #: on a converted model: the names of the modules replaced (save/load rebuild them)


class GatedMLP(nn.Module):
    """``down_proj(act_fn(g) * u)`` with ``g, u`` split from one product of the stacked gate and up weights."""

    def __init__(self, original: nn.Module):
        super().__init__()
        adopt(self, original)
        if "act_fn" not in self._modules:  # an activation that is a plain function
            self.act_fn = original.act_fn
        self.__dict__["stacked"] = original.gate_proj.fused  # a FusedSiblings child already: not registered twice
        self.gate, self.up = original.gate_proj.index, original.up_proj.index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = self.stacked.outputs(x)
        return self.down_proj(self.act_fn(parts[self.gate]) * parts[self.up])

    def extra_repr(self) -> str:
        return f"replaces {self.original}"


def _shape_ok(m: nn.Module) -> bool:
    g, u = getattr(m, "gate_proj", None), getattr(m, "up_proj", None)
    if not (isinstance(g, SiblingSlice) and isinstance(u, SiblingSlice) and g.fused is u.fused):
        return False
    if len(g.fused.sizes) != 2 or g.index == u.index or g.fused.sizes[g.index] != g.fused.sizes[u.index]:
        return False
    if not isinstance(getattr(m, "down_proj", None), nn.Module) or not callable(getattr(m, "act_fn", None)):
        return False
    return not has_forward_hooks(m)


@torch.no_grad()
def fusable(m: nn.Module) -> bool:
    """Whether ``m`` is a gated MLP over a stacked gate/up product whose output :class:`GatedMLP` reproduces."""
    if isinstance(m, GatedMLP) or not _shape_ok(m):
        return False
    lin = m.gate_proj.fused.linear
    w = getattr(lin, "weight", None)
    dtype = w.dtype if isinstance(w, torch.Tensor) else torch.float32
    x = torch.randn(2, 3, m.gate_proj.in_features, generator=torch.Generator().manual_seed(0)).to(dtype)
    try:
        want = m(x)
        got = GatedMLP(m)(x)
    except Exception:  # noqa: BLE001  (a module that cannot run on that input is not replaced)
        return False
    return isinstance(want, torch.Tensor) and isinstance(got, torch.Tensor) and got.shape == want.shape \
        and torch.allclose(got, want, rtol=1e-5, atol=1e-6)


def fuse_gated_mlps(model: nn.Module, names: list[str] | None = None) -> list[str]:
    """Replace the gated MLPs of ``model`` (in place) by :class:`GatedMLP`; the names replaced.

    ``names``: only these (each must pass :func:`fusable`, else ``ValueError`` naming it, and
    nothing changes); ``None``: every module that passes."""
    return replace_checked(model, names, fusable, GatedMLP, "gated MLPs over a stacked gate/up product")


__all__ = ["MLPS_ATTR", "GatedMLP", "fusable", "fuse_gated_mlps"]
