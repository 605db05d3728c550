"""``sn.shrink``: a physically smaller copy of a model, channels removed group by group.

The dependency graph (:mod:`.graph`) says which channels must go together; an
importance per group decides which go; surgery (:mod:`.surgery`) removes them.

Importance of a group's channel: :mod:`.importance` (``l1``, ``l2``: the group's weights in every
member; ``filter_l1``, ``filter_l2``: the producers' rows only; ``bn_scale``, ``random``, ``wanda``,
``apoz``, ``taylor``, ``flap``; DepGraph's ``group_l1``/``group_l2`` and the Sparsifier's
``l1_filter`` and ``bn_gamma`` as aliases).

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

The hidden size (``hidden=``): groups that come from an ``Embedding`` or reach a
LayerNorm/RMSNorm (:attr:`~.graph.Group.hidden`: a transformer's residual stream, read by
every layer) are shrunk only when asked, since every layer's weights and the embeddings
lose columns at once; by default a transformer loses MLP channels and heads, as before.
An RMSNorm over the hidden size is rescaled so that the shrunk model equals the masked one
(the removed channels zeroed in the embeddings, every producer and every norm weight); a
LayerNorm's statistics are taken over the kept channels (not exact; :mod:`.norms`). For a
``transformers`` model the kept hidden size is rounded up to a multiple of the (shrunk)
number of attention heads too, which ``LlamaConfig`` requires, and ``hidden_size``,
``head_dim`` and ``rms_norm_eps`` are written to the config. With ``ratio=None`` a group
with a LayerNorm is never shrunk (no removal is exact there).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..core.masks import remove_masks
from .attention import (
    ATTENTION,
    _heads,
    attention_modules,
    plan_heads,
    shrink_heads,
    zero_heads_kept,
)
from .config import config_layers, update_config
from .graph import DependencyGraph, Group, build_graph
from .importance import ALIASES, IMPORTANCE, group_importance, taylor_gradients
from .surgery import ShrinkError, apply_plan

GLOBAL = ("mean", "raw")  #: ``global_ratio`` normalisations (``True`` means ``"mean"``)
MAX_GROUP_RATIO = 0.9  #: under ``global_ratio``, the most of its channels one group may lose (by default)


def zero_channels(model: nn.Module, g: Group) -> torch.Tensor:
    """The channels of ``g`` whose output is exactly zero wherever it is read (a bool mask).

    Every term of every sum over the group must be zero: a producer followed by its own
    BatchNorm, when that BatchNorm's scale and shift are zero (its input then does not
    matter); any other producer, when its row and bias entry are zero; an Embedding, when
    its column is zero; every other BatchNorm, when its scale and shift are zero (without
    affine parameters: its running mean zero). LayerNorms/RMSNorms do not zero a channel
    (an RMSNorm maps zero to zero, and is rescaled when channels go; see :mod:`.norms`)."""
    modules = dict(model.named_modules())
    zero = torch.ones(g.size, dtype=torch.bool)

    def norm_zero(m: nn.Module) -> torch.Tensor:
        if m.weight is not None:
            return m.weight.detach().eq(0) & m.bias.detach().eq(0)
        running = getattr(m, "running_mean", None)
        return running.eq(0) if running is not None else torch.ones(g.size, dtype=torch.bool)

    for name in g.producers:
        if name in g.norm_after and modules[g.norm_after[name]].weight is not None:
            continue  # covered by its BatchNorm below
        m = modules[name]
        zero &= m.weight.detach().flatten(1).eq(0).all(1)
        if m.bias is not None:
            zero &= m.bias.detach().eq(0)
    for name in g.embeddings:
        zero &= modules[name].weight.detach().eq(0).all(0)
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


def _describe(g: Group) -> str:
    return f"the group produced by {g.producers + g.embeddings}"


def _short(g: Group) -> str:
    names = g.embeddings + g.producers
    return f"{names[0]} and {len(names) - 1} more" if len(names) > 2 else " and ".join(names)


def plan(model: nn.Module, graph: DependencyGraph, ratio: float | None, importance: str, round_to: int,
         ignore: set[str], global_ratio: str | None = None, max_group_ratio: float = MAX_GROUP_RATIO,
         hidden: bool | float = False, multiples: dict[int, int] | None = None,
         notes: list[str] | None = None) -> dict[int, torch.Tensor]:
    """``{group root: sorted channel indices to keep}`` for the prunable groups not ignored
    (``global_ratio``: ``None`` per group, else one of :data:`GLOBAL`). ``hidden``: also the
    :attr:`~.graph.Group.hidden` groups (``True``: like the others; a number: each at that ratio,
    outside a global ranking); ``multiples``: ``{group root: n}``, kept counts rounded up to a
    multiple of ``n`` as well; ``notes`` collects why prunable groups were left alone."""
    multiples, notes = multiples or {}, notes if notes is not None else []
    groups = []  # an ignored layer keeps its output channels (its inputs may shrink)
    for g in graph.prunable():
        if set(g.producers + g.embeddings + g.layer_norms) & ignore:
            continue
        if g.hidden and hidden is False:
            if ratio is not None:
                notes.append(f"the hidden size ({g.size} channels of {_short(g)}) is kept: pass hidden=True to "
                             "shrink it")
            continue
        groups.append(g)
    keep = {}
    if ratio is None:
        modules = dict(model.named_modules())
        for g in groups:
            layer_norms = [n for n in g.layer_norms if isinstance(modules[n], nn.LayerNorm)]
            if layer_norms:
                notes.append(f"{_describe(g)} is kept: LayerNorm {layer_norms[0]} takes its statistics over every "
                             "channel, zero or not, so removing one is never exact")
                continue
            zero = zero_channels(model, g)
            kept = (~zero).nonzero().flatten()
            if len(kept) == 0:
                raise ShrinkError(f"every channel of {_describe(g)} is zero: "
                                  "removing them all would disconnect the network")
            short = -len(kept) % multiples.get(g.root, 1)  # keep a few zero channels to reach the multiple
            kept = torch.cat([kept, zero.nonzero().flatten()[:short]]).sort().values
            if len(kept) < g.size:
                keep[g.root] = kept
        return keep
    own = None if isinstance(hidden, bool) else float(hidden)  # the hidden groups' own ratio
    step = {g.root: math.lcm(round_to, multiples.get(g.root, 1)) for g in groups}
    ranked = [g for g in groups if own is None or not g.hidden]
    counts: dict[int, int] = {}
    scores: dict[int, torch.Tensor | None] = {}
    for g in groups:
        if own is not None and g.hidden or global_ratio is None:
            counts[g.root] = _kept_count(g.size, own if own is not None and g.hidden else ratio, step[g.root])
            scores[g.root] = group_importance(model, g, importance, graph) if counts[g.root] < g.size else None
    if global_ratio is not None and ranked:
        ranked_scores = [group_importance(model, g, importance, graph, normalise=global_ratio == "mean")
                         for g in ranked]
        if global_ratio == "mean":
            ranked_scores = [s / s.mean() if s.mean() > 0 else s for s in ranked_scores]
        lost = _global_counts([g.size for g in ranked], ranked_scores, ratio, max_group_ratio)
        for g, n, score in zip(ranked, lost, ranked_scores):
            counts[g.root] = min(g.size, -(-(g.size - n) // step[g.root]) * step[g.root])
            scores[g.root] = score
    for g in groups:
        n = counts[g.root]
        if n <= 0:
            raise ShrinkError(f"ratio={ratio} removes every channel of {_describe(g)}")
        if n < g.size:
            keep[g.root] = torch.topk(scores[g.root], n, largest=True, sorted=False).indices.sort().values
    return keep


def _plan_attention(model: nn.Module, ratio: float | None, importance: str, mode: str, skip: set[str],
                    graph: DependencyGraph) -> list[tuple[str, nn.Module, torch.Tensor | None]]:
    """``(name, attention module, kept query heads or None)``, scored on the model before any surgery."""
    heads = []
    for name, m in attention_modules(model):
        if mode == "none" or name in skip:
            heads.append((name, m, None))
            continue
        o_proj = f"{name}.o_proj" if name else "o_proj"
        kept = zero_heads_kept(m) if ratio is None else plan_heads(
            m, ratio, importance, mode, o_norms=graph.input_norms.get(o_proj), o_vars=graph.input_vars.get(o_proj))
        if kept is not None and len(kept) == 0:
            raise ShrinkError(f"{name}: every attention head is zero; removing them all would disconnect the layer")
        heads.append((name, m, kept))
    return heads


def _shrink_attention(heads: list[tuple[str, nn.Module, torch.Tensor | None]]) -> None:
    for name, m, kept in heads:
        if kept is None:
            continue
        try:
            shrink_heads(m, kept)
        except ValueError as e:
            raise ShrinkError(f"{name}: {e} (kept heads {kept.tolist()})") from None


def _multiples(model: nn.Module, graph: DependencyGraph, heads: list) -> dict[int, int]:
    """A ``transformers`` hidden size must stay a multiple of the number of attention heads (``LlamaConfig``
    validates it): ``{root of the hidden group of config.hidden_size channels: heads after shrinking}``."""
    config = getattr(model, "config", None)
    count, hidden = getattr(config, "num_attention_heads", None), getattr(config, "hidden_size", None)
    if not isinstance(count, int) or not isinstance(hidden, int):
        return {}
    try:
        after = {len(kept) if kept is not None else _heads(m)[0] for _, m, kept in heads} or {count}
    except ValueError:  # projections that do not split into heads: no multiple to keep
        return {}
    if len(after) != 1:
        return {}  # layers differ: the config cannot describe the model anyway
    return {g.root: after.pop() for g in graph.groups if g.hidden and g.size == hidden}


def _check(ratio, importance, attention, round_to, loss_fn, global_ratio, max_group_ratio,
           hidden=False) -> tuple[str | None, float]:
    """Validate ``shrink``'s arguments; the canonical ``global_ratio`` (``None``: per group) and the cap."""
    if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1):
        raise ValueError(f"ratio must be a number in [0, 1) or None, got {ratio!r}")
    if not isinstance(hidden, bool):
        if not isinstance(hidden, (int, float)) or not 0 <= hidden < 1:
            raise ValueError(f"hidden must be False, True or a ratio in [0, 1), got {hidden!r}")
        if ratio is None:
            raise ValueError(f"hidden={hidden!r} is a ratio for the hidden size and needs ratio= for the other "
                             "channels (ratio=0 keeps them); ratio=None removes zero channels: pass hidden=True")
    if importance not in IMPORTANCE and importance not in ALIASES:
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
           max_group_ratio: float | None = None, hidden: bool | float = False) -> nn.Module:
    """A physically smaller copy of ``model`` (the model passed in is not changed).

    ``example_inputs``: what the model is called with (a tensor, a tuple of arguments or
    a dict of keyword arguments), for one recorded run that builds the dependency graph.
    ``ratio``: the fraction of each prunable group's channels to remove (``[0, 1)``),
    ranked by ``importance`` (one of :data:`IMPORTANCE`); the kept count is rounded up to
    a multiple of ``round_to``. ``ratio=None``: remove the channels already exactly zero
    (the masks a channel ``Sparsifier`` attached; see the module docstring). ``ignore``:
    modules (or names, with everything inside them) whose output channels (and attention
    heads) stay; their input columns still follow the layers before them (an ignored
    Embedding or LayerNorm/RMSNorm keeps the whole hidden size). ``attention``: how heads
    of attention modules with ``q/k/v/o_proj`` are removed (:mod:`.attention`): ``"query"``
    (the same number of query heads from every key-value group), ``"kv_groups"`` (whole
    key-value groups) or ``"none"``; the same ``ratio`` applies, to heads instead of
    channels. A ``transformers`` model's config is updated (heads, ``head_dim``,
    ``intermediate_size``, ``hidden_size``, ``rms_norm_eps``) so that ``save_pretrained`` /
    ``from_pretrained`` round-trip, where every layer has the same sizes and a model built
    from the config has the shrunk shapes (else ``shrink_notes`` says why not). The copy
    carries ``shrink_graph`` (the :class:`~.graph.DependencyGraph`: its groups, and why
    frozen ones were kept), ``shrink_kept`` (``{first producer (or embedding) of a shrunk
    group: kept channel indices}``) and ``shrink_notes``.

    ``hidden``: the hidden size, i.e. the channels that come from an ``Embedding`` or pass
    through a LayerNorm/RMSNorm (a transformer's residual stream: the embeddings, every
    attention output and MLP down projection, every norm, the LM head's input). ``False``
    (default): kept, so a transformer loses MLP channels and attention heads only, and a
    note says the hidden size was kept; ``True``: shrunk like every other group (at
    ``ratio``, or ranked with the others under ``global_ratio``); a number in ``[0, 1)``:
    shrunk at that ratio instead (per group, outside a global ranking), since removing
    residual channels costs more accuracy than MLP channels. RMSNorms are rescaled so that
    the shrunk model equals the masked one; LayerNorms then normalise over the kept
    channels (see the module docstring). A tied LM head stays tied.

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
    global_ratio, cap = _check(ratio, importance, attention, round_to, loss_fn, global_ratio, max_group_ratio,
                               hidden)
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
    layers = config_layers(out)
    heads = _plan_attention(out, ratio, importance, attention, skip, graph)  # scored before any surgery
    notes: list[str] = []
    keep = plan(out, graph, ratio, importance, round_to, skip, global_ratio, cap, hidden=hidden,
                multiples=_multiples(out, graph, heads) if hidden is not False else None, notes=notes)
    apply_plan(out, graph, keep)
    _shrink_attention(heads)
    for p in out.parameters():
        p.grad = None  # gradients of the unshrunk shapes (Taylor's) would not fit
    why = update_config(out, layers)
    out.shrink_notes = list(graph.notes) + notes + ([why] if why else [])
    out.shrink_graph = graph
    out.shrink_kept = {g.label: keep[g.root].tolist() for g in graph.groups if g.root in keep}
    return out


__all__ = ["GLOBAL", "IMPORTANCE", "ShrinkError", "group_importance", "shrink", "zero_channels"]
