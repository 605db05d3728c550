"""Surgery: physically remove channels from every member of a dependency group.

Given the channels each group keeps (:class:`~.graph.DependencyGraph`), producers lose
output rows (and bias entries; a depthwise convolution also its groups), Embeddings
weight columns, BatchNorms and GroupNorms their entries (affine parameters and running
statistics), LayerNorms/RMSNorms their weight and bias entries (an RMSNorm's weight and
epsilon are rescaled so that it stays exact: :func:`.norms.resize_norm`), and consumers
the input columns that read the removed channels (``repeat`` columns per channel after a
``flatten``). The modules stay plain ``nn.Conv2d`` / ``nn.Linear`` / ``nn.Embedding`` /
norms with updated sizes.

Every tensor is cut once, along each of its dimensions, and the result is given to every
module holding it: a Linear that produces one group and consumes another loses rows and
columns, and an LM head tied to the input embedding (one Parameter, read as the
Embedding's columns and the head's input columns) stays tied. :func:`plan_cuts` computes
every change first, so a plan that cannot be applied (a consumer losing every column, one
tensor cut two ways, a tensor shared with a module the plan leaves alone) raises
:class:`ShrinkError` before any module is touched.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .graph import DependencyGraph
from .norms import norm_kind, resize_norm


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


@dataclass
class Cut:
    """One tensor's kept indices along each cut dimension (``{dim: (indices, who asked)}``), and the
    ``(module, attribute)`` pairs that hold it."""

    tensor: torch.Tensor
    dims: dict[int, tuple[torch.Tensor, str]] = field(default_factory=dict)
    holders: list[tuple[str, str]] = field(default_factory=list)


def plan_cuts(model: nn.Module, graph: DependencyGraph, keep: dict[int, torch.Tensor]) -> list[Cut]:
    """Every tensor the plan ``keep`` (``{group root: kept indices}``) cuts, checked (:class:`ShrinkError`
    naming the modules) before anything changes."""
    columns = plan_columns(model, graph, keep)
    modules = dict(model.named_modules())
    cuts: dict[int, Cut] = {}

    def cut(mod: str, attr: str, dim: int, idx: torch.Tensor) -> None:
        t = getattr(modules[mod], attr, None)
        if not isinstance(t, torch.Tensor):
            return
        c = cuts.setdefault(id(t), Cut(t))
        who = f"{mod}.{attr}"
        if dim in c.dims and not torch.equal(c.dims[dim][0], idx):
            raise ShrinkError(f"{who} and {c.dims[dim][1]} are one tensor, but the plan keeps different channels "
                              f"of its dimension {dim} for each")
        c.dims.setdefault(dim, (idx, who))
        if (mod, attr) not in c.holders:
            c.holders.append((mod, attr))

    for g in graph.groups:
        if g.root not in keep:
            continue
        idx = keep[g.root]
        for mod in g.producers:
            cut(mod, "weight", 0, idx)
            cut(mod, "bias", 0, idx)
        for mod in g.embeddings:
            cut(mod, "weight", 1, idx)
        for mod in g.norms + g.layer_norms:
            for attr in ("weight", "bias", "running_mean", "running_var"):
                cut(mod, attr, 0, idx)
    for mod, cols in columns.items():
        cut(mod, "weight", 1, cols)
    for name, m in modules.items():  # a tensor also held elsewhere must be cut there too
        for attr, t in list(m._parameters.items()) + list(m._buffers.items()):
            if t is not None and id(t) in cuts and (name, attr) not in cuts[id(t)].holders:
                c = cuts[id(t)]
                raise ShrinkError(f"{name}.{attr} is the same tensor as {c.holders[0][0]}.{c.holders[0][1]}, which "
                                  f"the plan shrinks, but {name} is not part of that group: pass one of them in "
                                  "ignore=")
    for g in graph.groups:  # an RMSNorm's weight is rescaled in place: it must be its own
        for mod in g.layer_norms if g.root in keep else ():
            w = getattr(modules[mod], "weight", None)
            others = [h for h, _ in cuts[id(w)].holders if h != mod] if w is not None else []
            if others and norm_kind(modules[mod]) == "rms":
                raise ShrinkError(f"{mod}.weight is shared with {others[0]}: an RMSNorm's weight is rescaled when "
                                  f"the group produced by {g.producers + g.embeddings} shrinks, so it must be its "
                                  "own")
    return list(cuts.values())


def _resize(m: nn.Module) -> None:
    """A Conv2d's, Linear's, Embedding's or BatchNorm's/GroupNorm's sizes from its (cut) tensors."""
    if isinstance(m, nn.Linear):
        m.out_features, m.in_features = m.weight.shape
    elif isinstance(m, nn.Conv2d):
        if m.groups > 1:  # depthwise: one filter per channel
            m.groups = m.in_channels = m.out_channels = m.weight.shape[0]
        else:
            m.out_channels, m.in_channels = m.weight.shape[:2]
    elif isinstance(m, nn.Embedding):
        m.embedding_dim = m.weight.shape[1]
    elif isinstance(m, nn.modules.batchnorm._BatchNorm):
        m.num_features = (m.weight if m.weight is not None else m.running_mean).shape[0]
    elif isinstance(m, nn.GroupNorm):
        m.num_groups = m.num_channels = m.weight.shape[0]


@torch.no_grad()
def apply_plan(model: nn.Module, graph: DependencyGraph, keep: dict[int, torch.Tensor]) -> None:
    """Shrink ``model`` in place: every group in ``keep`` keeps those channel indices (sorted)."""
    cuts = plan_cuts(model, graph, keep)  # raises before anything changes
    modules = dict(model.named_modules())
    for c in cuts:
        t = c.tensor.detach()
        for dim, (idx, _) in sorted(c.dims.items()):
            t = t.index_select(dim, idx)
        new = nn.Parameter(t.clone(), requires_grad=c.tensor.requires_grad) if isinstance(c.tensor, nn.Parameter) \
            else t.clone()
        for mod, attr in c.holders:
            setattr(modules[mod], attr, new)
    for mod in {mod for c in cuts for mod, _ in c.holders}:
        _resize(modules[mod])
    for g in graph.groups:
        if g.root in keep:
            for mod in g.layer_norms:
                resize_norm(modules[mod], len(keep[g.root]), g.size, graph.norm_eps.get(mod))


__all__ = ["Cut", "ShrinkError", "apply_plan", "keep_columns", "keep_rows", "plan_columns", "plan_cuts"]
