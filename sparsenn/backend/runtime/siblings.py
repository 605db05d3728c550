"""Sibling projections: ``nn.Linear`` layers that read the same input, run as one product.

A transformer block reads its normalized hidden state three times (the query, key and
value projections) and its MLP input twice (gate and up projections). Decoding one
token, each of those products is a few microseconds of kernel plus a fixed cost per call
(Python dispatch, quantizing the activation for the int8 kernels, starting a parallel
region), and the key/value projections of a grouped-query model are small enough for
that fixed cost to dominate. Stacking the siblings' weights row-wise gives one layer whose
product is all of theirs (each output row is the same dot product; per-output-channel
int8 scales stay per row), computed once per input.

:func:`find_siblings` finds them in one recorded run: layers (exactly ``nn.Linear``,
without hooks or tied weights, under the same parent module, with the same input width,
dtype and device) that are only ever called on the very same tensor object as each
other, each once per tensor. :func:`fuse_siblings` then registers a
:class:`FusedSiblings` on the parent (``fused_<member>_<member>...``, holding the stacked
``nn.Linear`` that :func:`sparsenn.convert` converts like any other layer) and replaces
each member by a :class:`SiblingSlice` returning its columns of the stacked output.

The stacked product is computed when the first member is called on a tensor and kept
until every member has taken its part; a member called on another tensor, or twice on
the same one, computes again (so a model that calls its siblings differently from the
recorded run stays correct, only slower). A tensor changed in place between the siblings'
calls is detected by its version counter where it has one (tensors made under
``torch.inference_mode`` have none); :func:`sparsenn.convert` checks the converted
model's outputs against the dense model's either way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .inputs import call_model

SIBLINGS_ATTR = "fused_siblings"  #: on a converted model: the groups fused (save/load rebuild them)
PREFIX = "fused_"


@dataclass(frozen=True)
class SiblingGroup:
    """Layers ``members`` (full names, in the order their rows are stacked) under module ``parent``,
    run as one product by the :class:`FusedSiblings` registered there as ``name``."""

    parent: str
    name: str
    members: tuple[str, ...]

    @property
    def fused(self) -> str:
        """The full name of the :class:`FusedSiblings` module."""
        return f"{self.parent}.{self.name}" if self.parent else self.name

    def to_json(self) -> list:
        return [self.parent, self.name, list(self.members)]


def _version(x: torch.Tensor) -> int | None:
    """``x``'s version counter; ``None`` for an inference tensor, which has none (asked first: reading
    ``_version`` there raises, and the exception cost 7 us, per member call, per token)."""
    return None if x.is_inference() else x._version


class FusedSiblings(nn.Module):
    """The stacked product of sibling layers; ``linear`` holds their weights (rows in member order)."""

    def __init__(self, linear: nn.Module, sizes: list[int], members: list[str]):
        super().__init__()
        self.linear = linear
        self.sizes = [int(s) for s in sizes]
        self.members = list(members)
        self.offsets = [sum(self.sizes[:i]) for i in range(len(self.sizes) + 1)]
        self._others = [set(range(len(self.sizes))) - {i} for i in range(len(self.sizes))]
        self._cache: tuple[torch.Tensor, int | None, torch.Tensor, set[int]] | None = None

    def extra_repr(self) -> str:
        return f"members={self.members}, sizes={self.sizes}"

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_cache"] = None
        return state

    def part(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Member ``index``'s output for input ``x`` (the stacked product, computed once per input)."""
        c = self._cache
        if c is not None and c[0] is x and index in c[3] and c[1] == _version(x):
            parts = c[2]
            c[3].discard(index)
            if not c[3]:
                self._cache = None
        else:
            self._cache = None
            parts = self.outputs(x)
            if isinstance(x, torch.Tensor):
                self._cache = (x, _version(x), parts, self._others[index].copy())
        out = parts[index]
        return out if out.is_contiguous() else out.contiguous()

    def outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Every member's output for ``x``, views of one stacked product (one split: indexing
        ``y[..., a:b]`` per member cost 3-4 us each)."""
        return self.linear(x).split(self.sizes, dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Every member's output, stacked along the last dimension."""
        return self.linear(x)


class SiblingSlice(nn.Module):
    """Member ``index`` of a :class:`FusedSiblings` (held, not registered: its parent module owns it)."""

    def __init__(self, fused: FusedSiblings, index: int):
        super().__init__()
        self.__dict__["fused"] = fused  # not a submodule: state_dict holds the stacked weight once
        self.index = int(index)
        self.in_features = int(fused.linear.in_features)
        self.out_features = int(fused.sizes[index])

    def extra_repr(self) -> str:
        f = self.fused
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"outputs {f.offsets[self.index]}:{f.offsets[self.index + 1]} of the stacked product")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused.part(self.index, x)


def _candidates(model: nn.Module, names: set[str] | None) -> dict[str, nn.Linear]:
    """Plain ``nn.Linear`` layers without hooks whose weight (and bias) no other module holds."""
    holders: dict[int, int] = {}
    for m in model.modules():
        for p in list(m._parameters.values()) + list(m._buffers.values()):
            if p is not None:
                holders[id(p)] = holders.get(id(p), 0) + 1
    out = {}
    for n, m in model.named_modules():
        if type(m) is not nn.Linear or not n or (names is not None and n not in names):
            continue
        if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._forward_hooks_with_kwargs:
            continue
        if holders.get(id(m.weight), 0) != 1 or (m.bias is not None and holders.get(id(m.bias), 0) != 1):
            continue
        out[n] = m
    return out


@torch.no_grad()
def find_siblings(model: nn.Module, example_input: Any, names: set[str] | None = None) -> list[SiblingGroup]:
    """The groups of sibling layers in one run of ``model`` on ``example_input`` (see the module docstring);
    ``names``: only these layers may be grouped."""
    layers = _candidates(model, names)
    if len(layers) < 2:
        return []
    reads: dict[str, list[int]] = {n: [] for n in layers}
    readers: dict[int, list[str]] = {}
    alive: list[torch.Tensor] = []  # keeps the inputs alive, so their ids stay unique during the run
    handles = []
    for n, m in layers.items():
        def hook(mod, args, _n=n):
            x = args[0] if len(args) == 1 else None
            if isinstance(x, torch.Tensor):
                alive.append(x)
                reads[_n].append(id(x))
                readers.setdefault(id(x), []).append(_n)
            else:
                reads[_n].append(-1)
        handles.append(m.register_forward_pre_hook(hook))
    try:
        call_model(model, example_input)
    finally:
        for h in handles:
            h.remove()
    groups, seen = [], set()
    for who in readers.values():
        key = tuple(who)
        if len(who) < 2 or frozenset(who) in seen:
            continue
        seen.add(frozenset(who))
        members = set(who)
        if len(members) != len(who):  # a layer called twice on the same tensor
            continue
        # every call of every member reads a tensor that exactly these members read, once each
        if not all(i != -1 and sorted(readers[i]) == sorted(members) for n in members for i in reads[n]):
            continue
        g = SiblingGroup(key[0].rpartition(".")[0], PREFIX + "_".join(n.rpartition(".")[2] for n in key), key)
        if check_group(model, g) is None:  # one parent, one input width, dtype and device; a free name
            groups.append(g)
    return groups


def check_group(model: nn.Module, g: SiblingGroup) -> str | None:
    """Why ``g`` cannot be fused in ``model`` (``None``: it can)."""
    modules = dict(model.named_modules())
    parent = modules.get(g.parent)
    if parent is None:
        return f"no module {g.parent!r}"
    if not g.name.startswith(PREFIX) or "." in g.name or hasattr(parent, g.name):
        return f"{g.name!r} cannot be added to {g.parent or '(the model)'!r}"
    if len(g.members) < 2 or len(set(g.members)) != len(g.members):
        return "a group needs two or more distinct members"
    first = None
    for n in g.members:
        m = modules.get(n)
        if type(m) is not nn.Linear or n.rpartition(".")[0] != g.parent:
            return f"{n!r} is not an nn.Linear of {g.parent or '(the model)'!r}"
        if first is not None and (m.in_features != first.in_features or m.weight.dtype != first.weight.dtype
                                  or m.weight.device != first.weight.device):
            return f"{n!r} does not read what {g.members[0]!r} reads (in_features, dtype or device differ)"
        first = first or m
    return None


@torch.no_grad()
def fuse_siblings(model: nn.Module, groups: list[SiblingGroup]) -> None:
    """Register each group's :class:`FusedSiblings` (the members' weights stacked; a member without
    a bias contributes zeros where another has one) and replace the members by slices of it.
    Every group is checked first (``ValueError`` naming it); nothing changes if one fails."""
    for g in groups:
        why = check_group(model, g)
        if why is not None:
            raise ValueError(f"sibling group {g.members}: {why}")
    used = [n for g in groups for n in g.members]
    if len(set(used)) != len(used):
        raise ValueError("a layer is in two sibling groups")
    for g in groups:
        parent = model.get_submodule(g.parent) if g.parent else model
        layers = [model.get_submodule(n) for n in g.members]
        w = torch.cat([m.weight.detach() for m in layers])
        bias = None
        if any(m.bias is not None for m in layers):
            bias = torch.cat([m.bias.detach() if m.bias is not None else
                              torch.zeros(m.out_features, dtype=w.dtype, device=w.device) for m in layers])
        linear = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, dtype=w.dtype, device=w.device)
        linear.weight = nn.Parameter(w.clone(), requires_grad=any(m.weight.requires_grad for m in layers))
        if bias is not None:
            linear.bias = nn.Parameter(bias.clone(), requires_grad=linear.weight.requires_grad)
        fused = FusedSiblings(linear, [m.out_features for m in layers], list(g.members))
        parent.add_module(g.name, fused)
        first = g.members[0].rpartition(".")[2]
        order = [(k, v) for k, v in parent._modules.items() if k != g.name]
        parent._modules.clear()  # the stacked layer where its first member was: model order is kept
        for k, v in order:
            if k == first:
                parent._modules[g.name] = fused
            parent._modules[k] = v
        for i, n in enumerate(g.members):
            setattr(parent, n.rpartition(".")[2], SiblingSlice(fused, i))


__all__ = ["SIBLINGS_ATTR", "FusedSiblings", "SiblingGroup", "SiblingSlice", "check_group", "find_siblings",
           "fuse_siblings"]
