"""``sn.shrink``: a physically smaller copy of a model, channels removed group by group.

The dependency graph (:mod:`.graph`) says which channels must go together; an
importance per group decides which go; surgery (:mod:`.surgery`) removes them.

Importance of a group's channel: :mod:`.importance` (``l1``, ``l2``, ``bn_scale``,
``random``, ``wanda``, ``apoz``, ``taylor``, ``flap``; the Sparsifier's ``l1_filter`` and
``bn_gamma`` as aliases).

Per group or global: by default every prunable group loses ``ratio`` of its channels.
``global_ratio`` ranks the channels of all groups together instead (Torch-Pruning's
``global_pruning``), so that ``ratio`` is of all channels and groups whose channels matter
less lose more: with ``"mean"`` (or ``True``) each group's scores are divided by the
group's mean first (a channel is judged against its own group's average: groups with a
long tail of weak channels lose more, a group whose channels are alike loses little; the
criterion's scale, which differs between layers of different fan-in, drops out); with
``"raw"`` the scores are compared as measured (the members averaged, not normalised), which
is meaningful where the criterion's units are the same in every layer: ``taylor`` (an
estimate of the loss change; Molchanov et al. 2019 rank globally), ``bn_scale`` (Network
Slimming's global threshold), ``flap`` (FLAP ranks across layers), ``apoz``; with ``l1``
a layer whose rows are uniformly small loses more. No group loses more than
``max_group_ratio`` of its channels (default 0.9): channels beyond the cap go to the next
lowest elsewhere.

With ``ratio=None`` no importance is used: the channels removed are those whose output is
exactly zero already (see :func:`zero_channels`), which is what a ``Sparsifier`` with
``pattern="channel"`` leaves after ``couple_batchnorm`` (layers followed by a BatchNorm)
and ``couple_bias`` (the others) where all coupled layers agree - so the shrunk model
computes exactly what the masked one does.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
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
from .importance import ALIASES, IMPORTANCE, group_importance, taylor_gradients
from .surgery import ShrinkError, apply_plan

GLOBAL = ("mean", "raw")  #: ``global_ratio`` normalisations (``True`` means ``"mean"``)
MAX_GROUP_RATIO = 0.9  #: under ``global_ratio``, the most of its channels one group may lose (by default)


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


def _global_counts(sizes: list[int], scores: list[torch.Tensor], ratio: float, cap: float) -> list[int]:
    """Channels each group loses when the ``int(ratio * total)`` lowest ``scores`` of all groups go,
    no group losing more than ``int(cap * size)`` (the next lowest elsewhere go instead)."""
    target = int(ratio * sum(sizes))
    limit = [int(cap * n) for n in sizes]
    if target > sum(limit):
        raise ShrinkError(f"global ratio={ratio} removes {target} channels, but max_group_ratio={cap} lets the "
                          f"groups lose only {sum(limit)}: raise max_group_ratio or lower ratio")
    owner = torch.cat([torch.full((n,), i) for i, n in enumerate(sizes)])
    order = torch.argsort(torch.cat(scores), stable=True)
    lost = [0] * len(sizes)
    removed = 0
    for i in owner[order].tolist():
        if removed == target:
            break
        if lost[i] < limit[i]:
            lost[i] += 1
            removed += 1
    return lost


def plan(model: nn.Module, graph: DependencyGraph, ratio: float | None, importance: str, round_to: int,
         ignore: set[str], global_ratio: str | None = None, max_group_ratio: float = MAX_GROUP_RATIO) -> dict[int, torch.Tensor]:
    """``{group root: sorted channel indices to keep}`` for the prunable groups not ignored
    (``global_ratio``: ``None`` per group, else one of :data:`GLOBAL`)."""
    groups = [g for g in graph.prunable() if not set(g.producers) & ignore]  # an ignored layer keeps its
    keep = {}  # output channels (its inputs may shrink)
    if ratio is None:
        for g in groups:
            kept = (~zero_channels(model, g)).nonzero().flatten()
            if len(kept) == 0:
                raise ShrinkError(f"every channel of the group produced by {g.producers} is zero: "
                                  "removing them all would disconnect the network")
            if len(kept) < g.size:
                keep[g.root] = kept
        return keep
    if global_ratio is None:
        counts = [_kept_count(g.size, ratio, round_to) for g in groups]
        scores = [group_importance(model, g, importance, graph) if n < g.size else None
                  for g, n in zip(groups, counts)]
    else:
        scores = [group_importance(model, g, importance, graph, normalise=global_ratio == "mean") for g in groups]
        if global_ratio == "mean":
            scores = [s / s.mean() if s.mean() > 0 else s for s in scores]
        lost = _global_counts([g.size for g in groups], scores, ratio, max_group_ratio)
        counts = [min(g.size, -(-(g.size - n) // round_to) * round_to) for g, n in zip(groups, lost)]
    for g, n, score in zip(groups, counts, scores):
        if n <= 0:
            raise ShrinkError(f"ratio={ratio} removes every channel of the group produced by {g.producers}")
        if n < g.size:
            keep[g.root] = torch.topk(score, n, largest=True, sorted=False).indices.sort().values
    return keep


def _shrink_attention(model: nn.Module, ratio: float | None, importance: str, mode: str, skip: set[str],
                      graph: DependencyGraph) -> None:
    for name, m in attention_modules(model):
        if mode == "none" or name in skip:
            continue
        o_proj = f"{name}.o_proj" if name else "o_proj"
        kept = zero_heads_kept(m) if ratio is None else plan_heads(
            m, ratio, importance, mode, o_norms=graph.input_norms.get(o_proj), o_vars=graph.input_vars.get(o_proj))
        if kept is None:
            continue
        if len(kept) == 0:
            raise ShrinkError(f"{name}: every attention head is zero; removing them all would disconnect the layer")
        try:
            shrink_heads(m, kept)
        except ValueError as e:
            raise ShrinkError(f"{name}: {e} (kept heads {kept.tolist()})") from None


def _check(ratio, importance, attention, round_to, loss_fn, global_ratio, max_group_ratio) -> tuple[str | None, float]:
    """Validate ``shrink``'s arguments; the canonical ``global_ratio`` (``None``: per group) and the cap."""
    if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1):
        raise ValueError(f"ratio must be a number in [0, 1) or None, got {ratio!r}")
    if importance not in IMPORTANCE:
        raise ValueError(f"unknown importance {importance!r}; valid: {', '.join(IMPORTANCE)} "
                         f"(or {', '.join(ALIASES)})")
    if attention not in ATTENTION:
        raise ValueError(f"unknown attention {attention!r}; valid: {', '.join(ATTENTION)}")
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise ValueError(f"round_to must be a positive integer, got {round_to!r}")
    if loss_fn is not None and importance != "taylor":
        raise ValueError(f"loss_fn is used by importance='taylor' only, not by importance={importance!r}")
    if global_ratio is True:
        global_ratio = "mean"
    elif global_ratio is False or global_ratio is None:
        global_ratio = None
    elif global_ratio not in GLOBAL:
        raise ValueError(f"global_ratio must be False, True or one of {', '.join(map(repr, GLOBAL))}, "
                         f"got {global_ratio!r}")
    if global_ratio is not None and ratio is None:
        raise ValueError("global_ratio ranks channels for a ratio: pass ratio= (ratio=None removes zero channels)")
    if max_group_ratio is not None:
        if global_ratio is None:
            raise ValueError("max_group_ratio caps what each group loses under global_ratio; pass global_ratio=True")
        if isinstance(max_group_ratio, bool) or not isinstance(max_group_ratio, (int, float)) \
                or not 0 < max_group_ratio < 1:
            raise ValueError(f"max_group_ratio must be a number in (0, 1), got {max_group_ratio!r}")
    cap = MAX_GROUP_RATIO if max_group_ratio is None else max_group_ratio
    if global_ratio is not None and ratio > cap:
        raise ValueError(f"ratio={ratio} is more than max_group_ratio={cap}: the groups cannot lose that many "
                         "channels")
    return global_ratio, cap


def _gradients(model: nn.Module, out: nn.Module, example_inputs: Any, loss_fn) -> None:
    """Give the copy ``out`` the gradients Taylor importance reads: from ``loss_fn`` (one run on the copy)
    or, without it, copies of the ``.grad`` the user's ``loss.backward()`` left on ``model``."""
    if loss_fn is not None:
        taylor_gradients(out, example_inputs, loss_fn)
        return
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    for n, p in out.named_parameters():
        if n in grads:
            p.grad = grads[n].detach().clone()


def shrink(model: nn.Module, example_inputs: Any, ratio: float | None = None, importance: str = "l1",
           round_to: int = 1, ignore: Sequence[Any] = (), *, attention: str = "query",
           loss_fn: Callable[[Any], torch.Tensor] | None = None, global_ratio: bool | str = False,
           max_group_ratio: float | None = None) -> nn.Module:
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

    ``importance="taylor"`` (Molchanov et al. 2019) reads gradients: with ``loss_fn`` (a
    callable taking the model's output and returning a scalar loss), one eval-mode forward
    and backward pass on ``example_inputs`` on the copy; without it, the ``.grad`` the
    parameters already hold (the user ran ``loss.backward()``). Either way ``model`` and its
    ``.grad`` are left as they were.

    ``global_ratio``: ``False`` (each group loses ``ratio`` of its channels), ``True`` /
    ``"mean"`` or ``"raw"`` (``ratio`` of all channels of the prunable groups not ignored,
    ranked together; see the module docstring); ``max_group_ratio`` (global only, default
    0.9): the most any group loses (a ratio the caps cannot reach raises :class:`ShrinkError`).
    ``round_to`` then rounds each group's kept count up, so slightly fewer channels than
    ``int(ratio * total)`` may go. Attention heads are ranked per module either way.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    importance = ALIASES.get(importance, importance)
    global_ratio, cap = _check(ratio, importance, attention, round_to, loss_fn, global_ratio, max_group_ratio)
    skip = _names(model, ignore)
    taylor = importance == "taylor" and ratio is not None
    if taylor and loss_fn is None and all(p.grad is None for p in model.parameters()):
        raise ValueError("importance='taylor' needs gradients: call loss.backward() on the model first, or pass "
                         "loss_fn= (a callable taking the model's output and returning a scalar loss) for one "
                         "forward/backward pass on example_inputs")
    out = copy.deepcopy(model)
    if taylor:
        _gradients(model, out, example_inputs, loss_fn)
    remove_masks(out)  # masked weights hold their zeros; the graph sees the modules' own parameters
    graph = build_graph(out, example_inputs)
    intermediate = intermediate_layers(out)
    keep = plan(out, graph, ratio, importance, round_to, skip, global_ratio, cap)
    apply_plan(out, graph, keep)
    _shrink_attention(out, ratio, importance, attention, skip, graph)
    for p in out.parameters():
        p.grad = None  # gradients of the unshrunk shapes (Taylor's) would not fit
    why = update_config(out, intermediate)
    out.shrink_notes = list(graph.notes) + ([why] if why else [])
    out.shrink_graph = graph
    out.shrink_kept = {g.producers[0]: keep[g.root].tolist() for g in graph.groups if g.root in keep}
    return out


__all__ = ["GLOBAL", "IMPORTANCE", "ShrinkError", "group_importance", "shrink", "zero_channels"]
