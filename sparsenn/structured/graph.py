"""The channel dependency graph: which channels of which layers must be removed together.

DepGraph (Fang et al. 2023, "DepGraph: Towards Any Structural Pruning") groups the
parameters whose channels are coupled: a convolution's output channels with the
BatchNorm after it, the input channels of every layer that reads them, and, through a
residual addition, the output channels of every layer on both sides. Removing one
channel of a group means removing it everywhere in the group.

The graph is built from one recorded forward pass (no tracing, so input checks and
Python control flow in ``forward`` do not stop it): a ``TorchFunctionMode`` sees every
operation, and each tensor with a channel dimension carries its *layout*: the list of
channel *spaces* that make up that dimension, each channel repeated ``repeat`` times
(``flatten`` of ``C x H x W`` gives one space repeated ``H * W`` times; ``cat`` joins
layouts). A space is created by a producer (a ``Conv2d``'s or ``Linear``'s output
channels, an ``Embedding``'s columns) and merged with others (union-find) where
operations combine them (elementwise binary operations, a depthwise convolution's input
and output).

Operations understood (everything else *freezes* the spaces it reads: never pruned):
``conv2d`` (``groups`` 1, or depthwise; its weight may be zero-padded in the kernel dimensions first), ``linear``, ``embedding`` (an ``nn.Embedding``'s
weight, without ``max_norm``: its output channels are the weight's columns; a ``Linear``
tied to that weight, an LM head, reads them as a consumer), ``batch_norm``, ``group_norm``
with one group per channel, ``nn.LayerNorm`` / ``nn.RMSNorm`` / ``transformers``' RMSNorms
over the last dimension (seen as one operation each by forward hooks, after checking on
the recorded call that the module computes its formula; :mod:`.norms`), zero-preserving
elementwise operations (ReLU family, GELU, SiLU, tanh, hardswish, dropout), pooling,
padding, spatial reductions (``mean``/``sum``/``amax`` over non-channel dims), binary
elementwise operations of two channel tensors (residual additions, gating), operations
with scalars, basic indexing that keeps the channel dimension whole (``h[:, -1:, :]``),
``flatten``/``view``/``reshape`` of ``(N, C, H, W)`` to ``(N, C*H*W)``, and ``cat`` along
the channel dimension. The model's outputs freeze their spaces (the output shape must
not change); parameters used outside a ``Conv2d``/``Linear``/``Embedding``/``BatchNorm``/
``GroupNorm`` module or a followed norm are reported by name.

Only zero-preserving operations pass a space on, so a channel whose producers output
exactly zero stays exactly zero downstream: removing it changes nothing
(:mod:`.surgery` relies on it for the masked == shrunk equality). The norms whose
statistics span the channels are the exception: an RMSNorm is made exact by rescaling
its weight and epsilon, a LayerNorm is not exact (see :mod:`.norms`). Groups that reach
such a norm or come from an ``Embedding`` (in a transformer: the residual stream, the
hidden size) are marked :attr:`Group.hidden`; ``sn.shrink`` removes their channels only
when asked (``hidden=``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..core.metrics import call_model
from ..core.recording import METADATA, indexed_dim, operation_name, tensors_in
from .groups import DependencyGraph, Group, Layout, Segment, Use  # noqa: F401  (Use: re-exported)
from .norms import NormHooks, check_norm, group_norm_problem

# zero-preserving operations that keep the channel layout of their (first) tensor argument
_KEEP = {
    "relu", "relu_", "relu6", "hardtanh", "hardtanh_", "gelu", "silu", "silu_", "tanh", "tanh_", "leaky_relu",
    "leaky_relu_", "elu", "elu_", "hardswish", "hardswish_", "mish", "dropout", "dropout2d", "alpha_dropout",
    "feature_alpha_dropout", "clone", "contiguous", "detach", "max_pool2d", "_max_pool2d", "max_pool1d",
    "avg_pool2d", "avg_pool1d", "adaptive_avg_pool2d", "adaptive_max_pool2d", "adaptive_avg_pool1d",
    "_adaptive_max_pool2d", "max_pool2d_with_indices", "pad", "float", "to", "neg", "abs", "__neg__", "identity",
}
_BINARY = {"add", "add_", "__add__", "__iadd__", "__radd__", "sub", "sub_", "__sub__", "__isub__", "__rsub__",
           "mul", "mul_", "__mul__", "__imul__", "__rmul__", "div", "div_", "__truediv__", "__itruediv__"}
_RESHAPE = {"flatten", "view", "reshape"}
_REDUCE = {"mean", "sum", "amax", "amin"}
# besides metadata queries, what leaves the channel layout alone: autograd bookkeeping, printing, truth tests
_IGNORED = METADATA | {"__format__", "__bool__", "grad_fn", "_version", "is_leaf", "__repr__", "__str__", "dim_order"}


class _Recorder(TorchFunctionMode):
    def __init__(self, params: dict[int, list[tuple[str, str, nn.Module]]]):
        super().__init__()
        self.params = params  # id of a parameter or buffer -> every (module, attribute, module object) holding it
        self.layouts: dict[int, Layout] = {}
        self.alive: list[torch.Tensor] = []  # keeps recorded tensors alive, so their ids stay unique
        self.parent: list[int] = []
        self.sizes: list[int] = []
        self.frozen: dict[int, str] = {}
        self.produced: dict[str, int] = {}  # module -> its output space
        self.uses: dict[str, list[list[Segment]]] = {}
        self.norms: dict[str, list[Segment]] = {}
        self.notes: list[str] = []
        self.output_of: dict[int, str] = {}  # id of a Conv2d's output -> the module
        self.sq: dict[str, torch.Tensor] = {}  # module -> sum of squares of each input column
        self.zeros: dict[str, list] = {}  # module -> [zero count per input column, entries per column]
        self.moments: dict[str, tuple] = {}  # module -> (entries per column, mean, sum of squared deviations)
        self.norm_after: dict[str, str] = {}
        self.embedded: dict[str, int] = {}  # Embedding module -> the space of its columns
        self.width_norms: dict[str, list[Segment]] = {}  # LayerNorm/RMSNorm -> the channels it normalizes
        self.norm_eps: dict[str, float] = {}
        self.suspended = 0  # > 0 inside a followed norm module: its operations are not recorded
        self.norm_inputs: list[tuple[torch.Tensor, Layout] | None] = []

    # -- spaces (union-find)
    def new_space(self, size: int) -> int:
        self.parent.append(len(self.parent))
        self.sizes.append(size)
        return len(self.parent) - 1

    def find(self, s: int) -> int:
        while self.parent[s] != s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra
            if rb in self.frozen:
                self.frozen.setdefault(ra, self.frozen[rb])

    def freeze(self, segments: list[Segment], why: str) -> None:
        for s in segments:
            self.frozen.setdefault(self.find(s.space), why)

    def unite(self, a: list[Segment], b: list[Segment], why: str) -> bool:
        if len(a) == len(b) and all(x.count == y.count and x.repeat == y.repeat for x, y in zip(a, b)):
            for x, y in zip(a, b):
                self.union(x.space, y.space)
            return True
        self.freeze(a + b, why)
        return False

    # -- recording
    def layout(self, t: Any) -> Layout | None:
        return self.layouts.get(id(t)) if isinstance(t, torch.Tensor) else None

    def tag(self, t: Any, layout: Layout) -> None:
        if isinstance(t, torch.Tensor):
            self.layouts[id(t)] = layout
            self.alive.append(t)

    def owner(self, t: Any, cls: type | tuple[type, ...] | None = None) -> tuple[str, str, nn.Module] | None:
        """The module holding ``t`` (of type ``cls``; a tied parameter has several holders)."""
        holders = self.params.get(id(t), []) if isinstance(t, torch.Tensor) else []
        return next((h for h in reversed(holders) if cls is None or isinstance(h[2], cls)), None)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = operation_name(func)
        if name in _IGNORED or self.suspended:
            return out
        try:
            self.record(name, args, kwargs, out)
        except Exception as e:  # noqa: BLE001  (a recording failure freezes, never breaks the model)
            self.unknown(name, args, kwargs, f"{name} ({type(e).__name__}: {e})")
        return out

    def unknown(self, name: str, args, kwargs, why: str | None = None) -> None:
        for t in tensors_in((args, kwargs)):
            lay = self.layout(t)
            if lay is not None:
                self.freeze(lay.segments, why or f"read by {name}, which the graph does not follow")
            for mod, attr, _ in self.params.get(id(t), []):
                self.notes.append(f"{mod + '.' if mod else ''}{attr} is read by {name}, which the channel graph "
                                  "does not follow (not a Conv2d/Linear/BatchNorm parameter): its channels stay")
                for spaces in (self.produced, self.embedded):
                    if mod in spaces:
                        self.frozen.setdefault(self.find(spaces[mod]), f"{mod}.{attr} used by {name}")

    def record(self, name: str, args, kwargs, out) -> None:
        x = args[0] if args else None
        lay = self.layout(x)
        if name == "conv2d":
            self.conv(args, kwargs, out)
        elif name == "linear":
            self.linear(args, kwargs, out)
        elif name == "batch_norm":
            self.batch_norm(args, kwargs, out)
        elif name == "embedding":
            self.embedding(args, kwargs, out)
        elif name == "group_norm":
            self.group_norm(args, kwargs, out)
        elif name == "__getitem__" and lay is not None:
            d = indexed_dim(args[1], tuple(x.shape), lay.dim % x.dim())
            if d is None or not isinstance(out, torch.Tensor) or out.shape[d] != x.shape[lay.dim]:
                self.freeze(lay.segments, "indexing into their channel dimension")
            else:
                self.tag(out, Layout(d - out.dim() if lay.dim < 0 else d, lay.segments))
        elif name == "pad" and self.spatial_weight_pad(args, kwargs, out):
            pass
        elif name in _KEEP and isinstance(x, torch.Tensor):
            if lay is not None and isinstance(out, torch.Tensor) and out.dim() == x.dim() \
                    and out.shape[lay.dim] == x.shape[lay.dim]:
                self.tag(out, lay)
            elif isinstance(out, tuple) and lay is not None:  # max_pool2d_with_indices
                self.tag(out[0], lay)
            self.check_params(name, args, kwargs)
        elif name in _BINARY:
            self.binary(name, args, kwargs, out)
        elif name in _RESHAPE and lay is not None:
            self.reshape(name, x, lay, out, args, kwargs)
        elif name in _REDUCE and lay is not None:
            self.reduce(name, x, lay, out, args, kwargs)
        elif name in ("cat", "concat", "concatenate"):
            self.cat(args, kwargs, out)
        else:
            self.unknown(name, args, kwargs)

    def accumulate(self, mod: str, cols: torch.Tensor) -> None:
        """Add one call's input ``cols`` (``(columns, samples)``: a Linear's features, a Conv2d's channels
        over batch and positions) to ``mod``'s statistics: sums of squares, zero counts, and mean and
        variance merged across calls (Chan et al.'s pairwise update, in float64)."""
        n = cols.shape[1]
        sq, zeros = cols.pow(2).sum(1), cols.eq(0).sum(1)
        mean = cols.mean(1, dtype=torch.float64)
        m2 = (cols - mean.to(cols.dtype)[:, None]).pow(2).sum(1, dtype=torch.float64)
        if mod in self.sq and self.sq[mod].shape == sq.shape:
            self.sq[mod] += sq
            self.zeros[mod][0] += zeros
            n0, mean0, m20 = self.moments[mod]
            delta, total = mean - mean0, n0 + n
            self.moments[mod] = (total, mean0 + delta * n / total, m20 + m2 + delta.pow(2) * n0 * n / total)
            self.zeros[mod][1] += n
        else:
            self.sq[mod] = sq
            self.zeros[mod] = [zeros, n]
            self.moments[mod] = (n, mean, m2)

    def spatial_weight_pad(self, args, kwargs, out) -> bool:
        """A Conv2d weight zero-padded in its kernel dimensions only (TF "SAME" padding moved into the
        kernel, as ``sparsenn.models.efficientnet`` does) is still that module's weight: its output
        and input channels are unchanged. Anything else padded is not handled here."""
        p = _bind(args, kwargs, ("input", "pad", "mode", "value"))
        w, pad = p["input"], p.get("pad")
        owner = self.owner(w, nn.Conv2d)
        if owner is None or not isinstance(out, torch.Tensor) or w.dim() != 4 or pad is None or len(pad) > 4 \
                or p.get("mode", "constant") != "constant" or (p.get("value") or 0) != 0:
            return False
        self.params[id(out)] = self.params[id(w)]
        self.alive.append(out)
        return True

    def check_params(self, name, args, kwargs) -> None:
        for t in tensors_in((args, kwargs)):
            if self.owner(t) is not None:
                self.unknown(name, args, kwargs)
                return

    def conv(self, args, kwargs, out) -> None:
        p = _bind(args, kwargs, ("input", "weight", "bias", "stride", "padding", "dilation", "groups"))
        x, w, groups = p["input"], p["weight"], p.get("groups", 1) or 1
        owner = self.owner(w, nn.Conv2d)
        lay = self.layout(x)
        if owner is None or x.dim() != 4:
            self.unknown("conv2d", args, kwargs, "a conv2d whose weight is not a Conv2d module's")
            return
        mod = owner[0]
        cout, cin = w.shape[0], x.shape[1]
        self.accumulate(mod, x.detach().float().transpose(0, 1).reshape(cin, -1))
        if groups == 1:
            if lay is not None and lay.dim in (1, -3):
                self.uses.setdefault(mod, []).append(lay.segments)
            space = self.produced.get(mod)
            if space is None:
                space = self.produced[mod] = self.new_space(cout)
            self.tag(out, Layout(1, [Segment(space, cout)]))
            self.output_of[id(out)] = mod
        elif groups == cin == cout and lay is not None and len(lay.segments) == 1 and lay.segments[0].repeat == 1:
            space = lay.segments[0].space
            if mod in self.produced:
                self.union(self.produced[mod], space)
            self.produced[mod] = space
            self.tag(out, Layout(1, [Segment(space, cout)]))
            self.output_of[id(out)] = mod
        else:
            why = f"{mod}: grouped convolution (groups={groups})"
            if lay is not None:
                self.freeze(lay.segments, why)
            space = self.new_space(cout)
            self.frozen[space] = why
            self.produced.setdefault(mod, space)
            self.tag(out, Layout(1, [Segment(space, cout)]))

    def linear(self, args, kwargs, out) -> None:
        p = _bind(args, kwargs, ("input", "weight", "bias"))
        x, w = p["input"], p["weight"]
        owner = self.owner(w, nn.Linear)
        if owner is None:
            self.unknown("linear", args, kwargs, "a linear whose weight is not a Linear module's")
            return
        mod = owner[0]
        self.accumulate(mod, x.detach().float().reshape(-1, x.shape[-1]).t())
        lay = self.layout(x)
        if lay is not None and lay.dim in (-1, x.dim() - 1):
            self.uses.setdefault(mod, []).append(lay.segments)
        elif lay is not None:
            self.freeze(lay.segments, f"{mod} reads a dimension other than their channels")
        self.tie(mod, w, lay if lay is not None and lay.dim in (-1, x.dim() - 1) else None)
        space = self.produced.get(mod)
        if space is None:
            space = self.produced[mod] = self.new_space(w.shape[0])
        self.tag(out, Layout(-1, [Segment(space, w.shape[0])]))

    def tie(self, mod: str, w: torch.Tensor, lay: Layout | None) -> None:
        """A Linear whose weight is also an Embedding's (a tied LM head): its input columns are the
        Embedding's columns, so the channels it reads are the Embedding's channels."""
        emb = self.owner(w, nn.Embedding)
        if emb is None:
            return
        if emb[0] not in self.embedded:
            self.embedded[emb[0]] = self.new_space(w.shape[1])
        space = self.embedded[emb[0]]
        if lay is None:
            self.frozen.setdefault(self.find(space),
                                   f"{mod}, tied to {emb[0]}, reads channels the graph does not follow")
        else:
            self.unite([Segment(space, w.shape[1])], lay.segments, f"{mod} reads {emb[0]}'s tied weight")

    def batch_norm(self, args, kwargs, out) -> None:
        p = _bind(args, kwargs, ("input", "running_mean", "running_var", "weight", "bias"))
        x = p["input"]
        lay = self.layout(x)
        bn = nn.modules.batchnorm._BatchNorm
        owner = next((self.owner(p.get(k), bn) for k in ("weight", "running_mean") if self.owner(p.get(k), bn)), None)
        mod = owner[0] if owner is not None else None
        if lay is None:
            return
        if mod is None or lay.dim not in (1,):
            self.freeze(lay.segments, "a batch_norm outside a BatchNorm module")
            return
        self.per_channel_norm(mod, x, lay)
        self.tag(out, lay)

    def per_channel_norm(self, mod: str, x: torch.Tensor, lay: Layout) -> None:
        """``mod`` normalizes each channel of ``lay`` by itself (BatchNorm, GroupNorm with a group per channel)."""
        if mod in self.norms:
            self.unite(self.norms[mod], lay.segments, f"{mod} normalizes differently laid out inputs")
        self.norms[mod] = lay.segments
        if id(x) in self.output_of:
            self.norm_after[self.output_of[id(x)]] = mod

    def embedding(self, args, kwargs, out) -> None:
        p = _bind(args, kwargs, ("input", "weight", "padding_idx", "max_norm"))
        owner = self.owner(p.get("weight"), nn.Embedding)
        if owner is None or not isinstance(out, torch.Tensor):
            self.unknown("embedding", args, kwargs, "an embedding whose weight is not an Embedding module's")
            return
        mod, dim = owner[0], p["weight"].shape[1]
        if mod not in self.embedded:
            self.embedded[mod] = self.new_space(dim)
        if p.get("max_norm") is not None:
            self.frozen.setdefault(self.find(self.embedded[mod]),
                                   f"{mod}: an Embedding with max_norm renormalizes its rows over all their channels")
        self.tag(out, Layout(-1, [Segment(self.embedded[mod], dim)]))

    def group_norm(self, args, kwargs, out) -> None:
        p = _bind(args, kwargs, ("input", "num_groups", "weight", "bias", "eps"))
        x, groups = p["input"], p["num_groups"]
        lay = self.layout(x)
        owner = next((self.owner(p.get(k), nn.GroupNorm) for k in ("weight", "bias")
                      if self.owner(p.get(k), nn.GroupNorm)), None)
        mod = owner[0] if owner is not None else None
        if lay is None:
            return
        if lay.dim % x.dim() != 1:
            self.freeze(lay.segments, f"{mod or 'a group_norm'} normalizes a dimension other than their channels")
            return
        why = group_norm_problem(mod or "a group_norm", groups, x.shape[1])
        if why is None and mod is None and p.get("weight") is not None:
            why = "a group_norm whose weight is not a GroupNorm module's"
        if why is not None:
            self.freeze(lay.segments, why)
            return
        if mod is not None:  # one group per channel: a per-channel norm like a BatchNorm
            self.per_channel_norm(mod, x, lay)
        self.tag(out, lay)

    def norm_enter(self, name: str, m: nn.Module, args, kwargs) -> None:
        """A followed LayerNorm/RMSNorm module starts: remember its input, stop recording."""
        x = args[0] if args else next(tensors_in(kwargs), None)
        lay = self.layout(x)
        self.norm_inputs.append((x, lay) if self.suspended == 0 and lay is not None else None)
        self.suspended += 1

    def norm_exit(self, name: str, m: nn.Module, kind: str, args, kwargs, out) -> None:
        """It ends: check it computed its formula over the channels (:func:`.norms.check_norm`) and
        register it as a norm of the channels it read, or freeze them."""
        entry = self.norm_inputs.pop()
        try:
            if entry is None:
                return
            x, lay = entry
            if lay.dim % x.dim() != x.dim() - 1:
                self.freeze(lay.segments, f"{name} normalizes a dimension other than their channels")
                return
            if len(lay.segments) != 1 or lay.segments[0].repeat != 1:
                self.freeze(lay.segments, f"{name} normalizes several groups of channels together")
                return
            eps, why = check_norm(name, m, kind, x, out)
            if why is not None:
                self.freeze(lay.segments, why)
                self.notes.append(f"{why}: its channels stay")
                return
            if name in self.width_norms:
                self.unite(self.width_norms[name], lay.segments, f"{name} normalizes differently laid out inputs")
            self.width_norms[name] = lay.segments
            self.norm_eps[name] = eps
            self.tag(out, Layout(-1, lay.segments))
        finally:
            self.suspended -= 1

    def binary(self, name, args, kwargs, out) -> None:
        tensors = [a for a in args[:2] if isinstance(a, torch.Tensor)]
        lays = [self.layout(t) for t in tensors]
        tagged = [(t, lay) for t, lay in zip(tensors, lays) if lay is not None]
        if not tagged or not isinstance(out, torch.Tensor):
            self.check_params(name, args, kwargs)
            return
        t0, lay0 = tagged[0]
        dim0 = lay0.dim % t0.dim()
        for t, lay in tagged[1:]:
            if t.dim() != t0.dim() or lay.dim % t.dim() != dim0:
                self.freeze(lay.segments + lay0.segments, f"{name} of differently laid out tensors")
                return
            self.unite(lay0.segments, lay.segments, f"{name} of tensors with different channel layouts")
        others = [t for t in tensors if self.layout(t) is None]
        for t in others:  # a plain tensor broadcast over the channels (a scale per channel) would be a use
            if t.dim() >= t0.dim() - dim0 and t.dim() > 0 and t.shape[dim0 - (t0.dim() - t.dim())] != 1 \
                    and t.dim() - (t0.dim() - dim0) >= 0:
                self.freeze(lay0.segments, f"{name} with a per-channel tensor the graph does not own")
        if out.dim() == t0.dim() and out.shape[dim0] == t0.shape[dim0]:
            self.tag(out, Layout(lay0.dim, lay0.segments))

    def reshape(self, name, x, lay, out, args, kwargs) -> None:
        d = lay.dim % x.dim()
        if out.shape == x.shape:
            self.tag(out, lay)
        elif x.dim() >= 2 and d == 1 and out.dim() == 2 and out.shape[0] == x.shape[0] \
                and all(s.repeat == 1 for s in lay.segments):
            rest = int(torch.tensor(x.shape[2:]).prod()) if x.dim() > 2 else 1
            self.tag(out, Layout(-1, [Segment(s.space, s.count, rest) for s in lay.segments]))
        else:
            self.freeze(lay.segments, f"{name} to shape {tuple(out.shape)}")

    def reduce(self, name, x, lay, out, args, kwargs) -> None:
        d = lay.dim % x.dim()
        p = _bind(args, kwargs, ("input", "dim", "keepdim"))
        dims = p.get("dim")
        dims = () if dims is None else (dims,) if isinstance(dims, int) else tuple(dims)
        dims = {v % x.dim() for v in dims}
        if not dims or d in dims or not isinstance(out, torch.Tensor):
            self.freeze(lay.segments, f"{name} over their channel dimension")
            return
        new_d = d if p.get("keepdim") else d - sum(1 for v in dims if v < d)
        self.tag(out, Layout(new_d if new_d < out.dim() - 1 or lay.dim >= 0 else -1, lay.segments))

    def cat(self, args, kwargs, out) -> None:
        p = _bind(args, kwargs, ("tensors", "dim"))
        ts, dim = list(p["tensors"]), p.get("dim", 0) or 0
        lays = [self.layout(t) for t in ts]
        if not any(lays):
            return
        if any(lay is None for lay in lays):
            for lay in lays:
                if lay is not None:
                    self.freeze(lay.segments, "cat with a tensor the graph does not know")
            return
        d = dim % ts[0].dim()
        if all(lay.dim % t.dim() == d for lay, t in zip(lays, ts)):
            self.tag(out, Layout(lays[0].dim, [s for lay in lays for s in lay.segments]))
            return
        for lay in lays[1:]:
            self.unite(lays[0].segments, lay.segments, "cat of differently laid out tensors")
        self.tag(out, lays[0])


def _bind(args, kwargs, names) -> dict[str, Any]:
    out = dict(zip(names, args))
    out.update({k: v for k, v in kwargs.items() if k in names})
    return out


def build_graph(model: nn.Module, example_input: Any) -> DependencyGraph:
    """The dependency graph of ``model`` from one eval-mode, no-grad run on ``example_input``.

    ``example_input``: a tensor, a tuple of arguments or a dict of keyword arguments. The
    model's mode is restored afterwards; nothing of it changes.
    """
    params: dict[int, list[tuple[str, str, nn.Module]]] = {}
    for mname, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            params.setdefault(id(p), []).append((mname, pname, module))
        for bname, b in module.named_buffers(recurse=False):
            if b is not None:
                params.setdefault(id(b), []).append((mname, bname, module))
    rec = _Recorder(params)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), NormHooks(model, rec), rec:
            out = call_model(model, example_input)
    finally:
        model.train(was_training)
    for t in tensors_in(out):
        lay = rec.layout(t)
        if lay is not None:
            rec.freeze(lay.segments, "they are the model's output")
    return _groups(rec)


def _groups(rec: _Recorder) -> DependencyGraph:
    for mod, calls in rec.uses.items():  # a module called several times: one layout for its input
        for other in calls[1:]:
            rec.unite(calls[0], other, f"{mod} reads differently laid out inputs")
    groups: dict[int, Group] = {}

    def group(space: int) -> Group:
        root = rec.find(space)
        if root not in groups:
            groups[root] = Group(root, rec.sizes[root], frozen=rec.frozen.get(root))
        return groups[root]

    for mod, space in rec.produced.items():
        group(space).producers.append(mod)
        if mod in rec.norm_after:
            group(space).norm_after[mod] = rec.norm_after[mod]
    for mod, segments in rec.norms.items():
        for s in segments:
            group(s.space).norms.append(mod)
    for mod, space in rec.embedded.items():
        group(space).embeddings.append(mod)
    for mod, segments in rec.width_norms.items():
        group(segments[0].space).layer_norms.append(mod)
    for mod, calls in rec.uses.items():
        offset = 0
        for s in calls[0]:
            g = group(s.space)
            g.consumers.append((mod, offset, s.repeat))
            offset += s.count * s.repeat
    for g in groups.values():
        if len(set(g.norms)) != len(g.norms) or any(len(rec.norms[n]) != 1 for n in g.norms):
            g.frozen = g.frozen or "a BatchNorm over several groups"
        if not g.producers and not g.embeddings:
            g.frozen = g.frozen or "no layer produces them (the model's input)"
    return DependencyGraph(list(groups.values()), sorted(set(rec.notes)),
                           {m: sq.sqrt() for m, sq in rec.sq.items()},
                           {m: z.float() / max(n, 1) for m, (z, n) in rec.zeros.items()},
                           {m: (m2 / max(n, 1)).float() for m, (n, _, m2) in rec.moments.items()},
                           dict(rec.norm_eps))


__all__ = ["DependencyGraph", "Group", "build_graph"]
