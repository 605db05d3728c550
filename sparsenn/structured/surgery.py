"""Surgery: physically remove channels from every member of a dependency group.

Given the channels each group keeps (:class:`~.graph.DependencyGraph`), producers lose
output rows (and bias entries; a depthwise convolution also its groups), BatchNorms
their entries (affine parameters and running statistics), and consumers the input
columns that read the removed channels (``repeat`` columns per channel after a
``flatten``). The modules stay plain ``nn.Conv2d`` / ``nn.Linear`` / ``nn.BatchNorm``
with updated sizes. :func:`plan_columns` computes every change first, so a plan that
cannot be applied raises before any module is touched.
"""

from __future__ import annotations

import torch
from torch import nn

from .graph import DependencyGraph


class ShrinkError(ValueError):
    """A plan that cannot shrink the model consistently (the group or module is named)."""


def plan_columns(model: nn.Module, graph: DependencyGraph, keep: dict[int, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{consumer module: input columns it keeps}`` for the kept channels ``keep`` (``{group root: indices}``)."""
    modules = dict(model.named_modules())
    drop: dict[str, set[int]] = {}
    for g in graph.groups:
        if g.root not in keep:
            continue
        kept = set(keep[g.root].tolist())
        gone = [c for c in range(g.size) if c not in kept]
        for mod, offset, repeat in g.consumers:
            cols = drop.setdefault(mod, set())
            cols.update(offset + c * repeat + r for c in gone for r in range(repeat))
    out = {}
    for mod, cols in drop.items():
        m = modules[mod]
        width = m.in_channels if isinstance(m, nn.Conv2d) else m.in_features
        if cols and max(cols) >= width:
            raise ShrinkError(f"{mod}: the plan removes input column {max(cols)} of {width}")
        if len(cols) == width:
            raise ShrinkError(f"{mod}: the plan removes every input column")
        out[mod] = torch.tensor([c for c in range(width) if c not in cols], dtype=torch.long)
    return out


def _param(t: torch.Tensor, idx: torch.Tensor, dim: int) -> nn.Parameter:
    return nn.Parameter(t.detach().index_select(dim, idx).clone(), requires_grad=t.requires_grad)


@torch.no_grad()
def keep_rows(m: nn.Module, idx: torch.Tensor) -> None:
    """A Conv2d's or Linear's output channels ``idx`` only (weight rows, bias; a depthwise convolution
    also its input channels and groups)."""
    m.weight = _param(m.weight, idx, 0)
    if m.bias is not None:
        m.bias = _param(m.bias, idx, 0)
    if isinstance(m, nn.Conv2d):
        if m.groups > 1:  # depthwise: one filter per channel
            m.groups = m.in_channels = len(idx)
        m.out_channels = len(idx)
    else:
        m.out_features = len(idx)


@torch.no_grad()
def keep_columns(m: nn.Module, cols: torch.Tensor) -> None:
    """A Conv2d's or Linear's input columns ``cols`` only."""
    m.weight = _param(m.weight, cols, 1)
    if isinstance(m, nn.Conv2d):
        m.in_channels = len(cols)
    else:
        m.in_features = len(cols)


@torch.no_grad()
def apply_plan(model: nn.Module, graph: DependencyGraph, keep: dict[int, torch.Tensor]) -> None:
    """Shrink ``model`` in place: every group in ``keep`` keeps those channel indices (sorted)."""
    columns = plan_columns(model, graph, keep)  # raises before anything changes
    modules = dict(model.named_modules())
    for g in graph.groups:
        if g.root not in keep:
            continue
        idx = keep[g.root]
        for mod in g.producers:
            keep_rows(modules[mod], idx)
        for mod in g.norms:
            m = modules[mod]
            if m.weight is not None:
                m.weight = _param(m.weight, idx, 0)
                m.bias = _param(m.bias, idx, 0)
            for name in ("running_mean", "running_var"):
                buf = getattr(m, name)
                if buf is not None:
                    setattr(m, name, buf.index_select(0, idx).clone())
            m.num_features = len(idx)
    for mod, cols in columns.items():
        keep_columns(modules[mod], cols)


__all__ = ["ShrinkError", "apply_plan", "keep_columns", "keep_rows", "plan_columns"]
