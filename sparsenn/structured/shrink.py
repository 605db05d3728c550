"""``sn.shrink``: a physically smaller copy of a model, channels removed group by group.

The dependency graph (:mod:`.graph`) says which channels must go together; an
importance per group decides which go; surgery (:mod:`.surgery`) removes them.

Importance of a group's channel (summed over the group's members, each member's
scores divided by their mean so no layer dominates by scale, as Torch-Pruning's
``group_reduction="mean"`` normalises):

- ``"l1"`` / ``"l2"``: the norm of each producer's output row (Li et al. 2017, "Pruning
  Filters for Efficient ConvNets");
- ``"bn_scale"``: ``|gamma|`` of the group's BatchNorms (Liu et al. 2017, "Network
  Slimming"); a group without a BatchNorm falls back to ``"l1"``;
- ``"random"``: a seeded random order (the baseline every paper compares with);
- ``"wanda"``: activation-aware, from the recorded run on ``example_inputs`` (pass
  calibration data): for each layer reading the channel, ``||x_c|| * sum |W[:, c]|``
  (Wanda's ``|W| * ||x||`` score, Sun et al. 2023, summed over the channel's group as
  LLM-Pruner and FLAP sum over structures); groups nobody reads fall back to ``"l1"``;
- ``"apoz"``: one minus the Average Percentage of Zeros of the channel where layers read
  it in the recorded run (Hu et al. 2016, "Network Trimming"): a channel ReLU zeroes on
  most inputs matters least; groups nobody reads (and attention heads) fall back to ``"l1"``.

``"l1_filter"`` and ``"bn_gamma"`` (the Sparsifier's channel criteria) are accepted as
``"l1"`` and ``"bn_scale"``.

With ``ratio=None`` no importance is used: the channels removed are those whose output is
exactly zero already (see :func:`zero_channels`), which is what a ``Sparsifier`` with ``pattern="channel"`` leaves after
``couple_batchnorm`` where all coupled layers agree - so the shrunk model computes
exactly what the masked one does.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..core.masks import remove_masks
from .attention import (
    ATTENTION,
    attention_modules,
    intermediate_layers,
    plan_heads,
    shrink_heads,
    update_config,
    zero_heads_kept,
)
from .graph import DependencyGraph, Group, build_graph
from .surgery import ShrinkError, apply_plan

IMPORTANCE = ("l1", "l2", "bn_scale", "random", "wanda", "apoz")
#: the channel criteria of ``sparsenn.structured`` (Sparsifier methods) under their group-importance names
ALIASES = {"l1_filter": "l1", "bn_gamma": "bn_scale"}


def _norm(x: torch.Tensor) -> torch.Tensor:
    mean = x.mean()
    return x / mean if mean > 0 else x


def _apoz(g: Group, zeros: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """Per channel of ``g``: 1 - the mean fraction of zeros where consumers read it."""
    parts = [zeros[mod][offset:offset + g.size * repeat].reshape(g.size, repeat).mean(1)
             for mod, offset, repeat in g.consumers if mod in zeros]
    return 1 - torch.stack(parts).mean(0) if parts else None


def _wanda(modules: dict[str, nn.Module], g: Group, norms: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """Per channel of ``g``: ``sum over consumers of ||x_col|| * sum_rows |W[:, col]|`` over the channel's columns."""
    total = None
    for mod, offset, repeat in g.consumers:
        if mod not in norms:
            continue
        w = modules[mod].weight.detach().float()
        cols = w.abs().sum(0) if w.dim() == 2 else w.abs().sum((0, 2, 3))
        score = (cols * norms[mod])[offset:offset + g.size * repeat].reshape(g.size, repeat).sum(1)
        score = _norm(score)
        total = score if total is None else total + score
    return total


def group_importance(model: nn.Module, g: Group, importance: str, seed: int = 0,
                     norms: dict[str, torch.Tensor] | None = None,
                     zeros: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """One score per channel of ``g`` (higher: more important); ``norms`` / ``zeros``: the graph's
    ``input_norms`` / ``input_zeros``."""
    if importance == "apoz":
        score = _apoz(g, zeros or {})
        if score is not None:
            return score
        importance = "l1"
    modules = dict(model.named_modules())
    if importance == "random":
        return torch.rand(g.size, generator=torch.Generator().manual_seed(seed + g.root))
    if importance == "bn_scale" and g.norms:
        return sum(_norm(modules[n].weight.detach().abs().float()) for n in g.norms
                   if modules[n].weight is not None) if any(modules[n].weight is not None for n in g.norms) \
            else group_importance(model, g, "l1")
    if importance == "wanda":
        score = _wanda(modules, g, norms or {})
        if score is not None:
            return score
        importance = "l1"
    p = 1 if importance in ("l1", "bn_scale") else 2
    return sum(_norm(modules[m].weight.detach().float().flatten(1).norm(p=p, dim=1)) for m in g.producers)


def zero_channels(model: nn.Module, g: Group) -> torch.Tensor:
    """The channels of ``g`` whose output is exactly zero wherever it is read (a bool mask).

    Every term of every sum over the group must be zero: a producer followed by its own
    BatchNorm, when that BatchNorm's scale and shift are zero (its input then does not
    matter); any other producer, when its row and bias entry are zero; every other
    BatchNorm, when its scale and shift are zero (without affine parameters: its running
    mean zero)."""
    modules = dict(model.named_modules())
    zero = torch.ones(g.size, dtype=torch.bool)

    def norm_zero(m: nn.Module) -> torch.Tensor:
        if m.weight is not None:
            return m.weight.detach().eq(0) & m.bias.detach().eq(0)
        return m.running_mean.eq(0)

    for name in g.producers:
        if name in g.norm_after and modules[g.norm_after[name]].weight is not None:
            continue  # covered by its BatchNorm below
        m = modules[name]
        zero &= m.weight.detach().flatten(1).eq(0).all(1)
        if m.bias is not None:
            zero &= m.bias.detach().eq(0)
    for name in g.norms:
        zero &= norm_zero(modules[name])
    return zero


def _kept_count(n: int, ratio: float, round_to: int) -> int:
    keep = n - int(ratio * n)
    keep = -(-keep // round_to) * round_to  # up to a multiple of round_to
    return min(n, keep)


def _names(model: nn.Module, ignore: Sequence[Any]) -> set[str]:
    by_module = {m: n for n, m in model.named_modules()}
    names = set()
    for item in ignore:
        if isinstance(item, nn.Module):
            if item not in by_module:
                raise ValueError(f"ignore: {type(item).__name__} is not a module of the model")
            names.update(n for n, m in model.named_modules() if n == by_module[item] or
                         n.startswith(by_module[item] + "."))
        elif isinstance(item, str):
            if item not in dict(model.named_modules()):
                raise ValueError(f"ignore: {item!r} is not a module name of the model")
            names.update(n for n, _ in model.named_modules() if n == item or n.startswith(item + "."))
        else:
            raise TypeError(f"ignore takes modules or module names, got {type(item).__name__}")
    return names


def plan(model: nn.Module, graph: DependencyGraph, ratio: float | None, importance: str, round_to: int,
         ignore: set[str]) -> dict[int, torch.Tensor]:
    """``{group root: sorted channel indices to keep}`` for the prunable groups not ignored."""
    keep = {}
    for g in graph.prunable():
        if set(g.producers) & ignore:  # an ignored layer keeps its output channels (its inputs may shrink)
            continue
        if ratio is None:
            kept = (~zero_channels(model, g)).nonzero().flatten()
            if len(kept) == 0:
                raise ShrinkError(f"every channel of the group produced by {g.producers} is zero: "
                                  "removing them all would disconnect the network")
            if len(kept) < g.size:
                keep[g.root] = kept
            continue
        n = _kept_count(g.size, ratio, round_to)
        if n <= 0:
            raise ShrinkError(f"ratio={ratio} removes every channel of the group produced by {g.producers}")
        if n < g.size:
            scores = group_importance(model, g, importance, norms=graph.input_norms, zeros=graph.input_zeros)
            keep[g.root] = torch.topk(scores, n, largest=True, sorted=False).indices.sort().values
    return keep


def _shrink_attention(model: nn.Module, ratio: float | None, importance: str, mode: str, skip: set[str],
                      norms: dict[str, torch.Tensor]) -> None:
    for name, m in attention_modules(model):
        if mode == "none" or name in skip:
            continue
        o_norms = norms.get(f"{name}.o_proj" if name else "o_proj")
        kept = zero_heads_kept(m) if ratio is None else plan_heads(m, ratio, importance, mode, o_norms=o_norms)
        if kept is None:
            continue
        if len(kept) == 0:
            raise ShrinkError(f"{name}: every attention head is zero; removing them all would disconnect the layer")
        try:
            shrink_heads(m, kept)
        except ValueError as e:
            raise ShrinkError(f"{name}: {e} (kept heads {kept.tolist()})") from None


def shrink(model: nn.Module, example_inputs: Any, ratio: float | None = None, importance: str = "l1",
           round_to: int = 1, ignore: Sequence[Any] = (), *, attention: str = "query") -> nn.Module:
    """A physically smaller copy of ``model`` (the model passed in is not changed).

    ``example_inputs``: what the model is called with (a tensor, a tuple of arguments or
    a dict of keyword arguments), for one recorded run that builds the dependency graph.
    ``ratio``: the fraction of each prunable group's channels to remove (``[0, 1)``),
    ranked by ``importance`` (one of :data:`IMPORTANCE`); the kept count is rounded up to
    a multiple of ``round_to``. ``ratio=None``: remove the channels already exactly zero
    (the masks a channel ``Sparsifier`` attached; see the module docstring). ``ignore``:
    modules (or names, with everything inside them) whose output channels (and attention
    heads) stay; their input columns still follow the layers before them. ``attention``: how heads of attention modules
    with ``q/k/v/o_proj`` are removed (:mod:`.attention`): ``"query"`` (the same number of
    query heads from every key-value group), ``"kv_groups"`` (whole key-value groups) or
    ``"none"``; the same ``ratio`` applies, to heads instead of channels. A
    ``transformers`` model's config is updated (heads, ``intermediate_size``) so that
    ``save_pretrained`` / ``from_pretrained`` round-trip, where every layer has the same
    sizes (else ``shrink_notes`` says why not). The copy carries ``shrink_graph`` (the
    :class:`~.graph.DependencyGraph`: its groups, and why frozen ones were kept) and
    ``shrink_kept`` (``{first producer of a shrunk group: kept channel indices}``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1):
        raise ValueError(f"ratio must be a number in [0, 1) or None, got {ratio!r}")
    importance = ALIASES.get(importance, importance)
    if importance not in IMPORTANCE:
        raise ValueError(f"unknown importance {importance!r}; valid: {', '.join(IMPORTANCE)} "
                         f"(or {', '.join(ALIASES)})")
    if attention not in ATTENTION:
        raise ValueError(f"unknown attention {attention!r}; valid: {', '.join(ATTENTION)}")
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise ValueError(f"round_to must be a positive integer, got {round_to!r}")
    skip = _names(model, ignore)
    out = copy.deepcopy(model)
    remove_masks(out)  # masked weights hold their zeros; the graph sees the modules' own parameters
    graph = build_graph(out, example_inputs)
    intermediate = intermediate_layers(out)
    keep = plan(out, graph, ratio, importance, round_to, skip)
    apply_plan(out, graph, keep)
    _shrink_attention(out, ratio, importance, attention, skip, graph.input_norms)
    why = update_config(out, intermediate)
    out.shrink_notes = list(graph.notes) + ([why] if why else [])
    out.shrink_graph = graph
    out.shrink_kept = {g.producers[0]: keep[g.root].tolist() for g in graph.groups if g.root in keep}
    return out


__all__ = ["IMPORTANCE", "ShrinkError", "group_importance", "shrink", "zero_channels"]
