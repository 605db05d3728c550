"""Structured (channel / filter / neuron) pruning criteria and their BatchNorm plumbing.

Registered methods, all restricted to the ``"channel"`` pattern (whole output
rows/filters kept or zeroed; the pattern ranks a unit by the SUM of its element
scores, so a per-channel score is spread evenly over the unit's elements):

* ``l1_filter`` -- ``|w|``: the unit sum is the filter's L1 norm (Li et al., 2017,
  "Pruning Filters for Efficient ConvNets"). Equal to ``magnitude`` + ``channel``.
* ``apoz`` -- ``1 - APoZ``, the Average Percentage of Zeros of the channel's
  post-(BatchNorm)-ReLU activation on data (Hu et al., 2016, "Network Trimming").
* ``bn_gamma`` -- ``|gamma|`` of the BatchNorm after the layer (Liu et al., 2017,
  "Learning Efficient Convolutional Networks through Network Slimming").

Helpers: :func:`find_following_batchnorm` (layer -> BatchNorm pairing),
:class:`SlimmingPenalty` (Network Slimming's L1 penalty on BN scales),
:func:`couple_batchnorm` (zero and mask the BN scale/shift of pruned channels),
:func:`couple_bias` (the same for the bias of layers without a BatchNorm after them) and
:func:`structured_macs` (the MACs left after channel surgery).

Which BatchNorm follows a layer: with an example input, one eval-mode forward pass is
traced over leaf modules; the first module *called on the layer's output tensor* is
its BatchNorm if it is one with ``num_features`` equal to the layer's output
channels. Without an input the pairing is static: the first BatchNorm after the
layer in ``model.named_modules()`` order, before the next Conv/Linear, if its
``num_features`` matches (right for ``Sequential`` Conv-BN-ReLU stacks and for
modules that define ``convN`` before ``bnN``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..core.masks import attach_mask, has_mask, masked_parameters
from ..core.methods import ScoreContext, register_method
from ..core.metrics import call_model
from ..create.criteria import _Criterion, _draw, _to, preserved_model_state
from ..create.regularize.penalties import SlimmingPenalty
from ..train.sparsifier import Sparsifier

Tensor = torch.Tensor

__all__ = [
    "APoZ",
    "BNGamma",
    "L1Filter",
    "SlimmingPenalty",
    "couple_batchnorm",
    "couple_bias",
    "find_following_batchnorm",
    "structured_macs",
]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_LAYERS = (nn.Linear, *_CONVS)


# ----------------------------------------------------------------------------- tracing


def _out_channels(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def _first_tensor(value: Any) -> Tensor | None:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, (tuple, list)):
        return next((v for v in value if isinstance(v, Tensor)), None)
    return None


def _run(model: nn.Module, example_input: Any, modules: list[tuple[str, nn.Module]], hook) -> None:
    """One eval-mode, no-grad forward pass calling ``hook(name, module, input, output)`` after
    each call of ``modules``; mode, buffers and ``requires_grad`` restored, hooks removed."""
    handles = []
    with preserved_model_state(model):
        try:
            for name, module in modules:
                handles.append(module.register_forward_hook(
                    lambda mod, args, out, _n=name: hook(_n, mod, _first_tensor(args), _first_tensor(out))))
            model.eval()
            with torch.no_grad():
                call_model(model, example_input)
        finally:
            for h in handles:
                h.remove()


def _traced_pairs(model: nn.Module, example_input: Any) -> dict[str, str]:
    calls: list[tuple[str, nn.Module, Tensor | None, Tensor | None]] = []
    leaves = [(n, m) for n, m in model.named_modules() if next(m.children(), None) is None]
    _run(model, example_input, leaves, lambda n, m, x, y: calls.append((n, m, x, y)))
    pairs: dict[str, str] = {}
    seen: set[str] = set()
    for i, (name, module, _, out) in enumerate(calls):
        if not isinstance(module, _LAYERS) or name in seen or out is None:
            continue
        seen.add(name)
        nxt = next(((n, m) for n, m, x, _ in calls[i + 1:] if x is out), None)
        if nxt is not None and isinstance(nxt[1], _BatchNorm) and nxt[1].num_features == _out_channels(module):
            pairs[name] = nxt[0]
    return pairs


def _static_pairs(model: nn.Module) -> dict[str, str]:
    mods = list(model.named_modules())
    pairs: dict[str, str] = {}
    for i, (name, module) in enumerate(mods):
        if not isinstance(module, _LAYERS):
            continue
        for other_name, other in mods[i + 1:]:
            if isinstance(other, _LAYERS):
                break
            if isinstance(other, _BatchNorm):
                if other.num_features == _out_channels(module):
                    pairs[name] = other_name
                break
    return pairs


def find_following_batchnorm(model: nn.Module, example_input: Any = None) -> dict[str, str]:
    """``{Conv/Linear module name: name of the BatchNorm that normalizes its output}``.

    With ``example_input``: traced (the first module called on the layer's output, if a
    BatchNorm with matching ``num_features``). Without: static ``named_modules()`` order
    (the first BatchNorm after the layer, before the next Conv/Linear, if it matches).
    Layers without a following BatchNorm are absent.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    return _static_pairs(model) if example_input is None else _traced_pairs(model, example_input)


# ----------------------------------------------------------------------------- criteria


def _layers(ctx: ScoreContext, method: str) -> dict[str, tuple[str, nn.Module]]:
    """``{param name: (module name, module)}``; only the ``weight`` of Conv/Linear is accepted."""
    out = {}
    for pname in ctx.params:
        module_name, _, attr = pname.rpartition(".")
        module = ctx.model.get_submodule(module_name)
        if attr != "weight" or not isinstance(module, _LAYERS):
            raise ValueError(
                f"method {method!r} scores output channels of Conv1d/2d/3d and Linear weights; "
                f"got parameter {pname!r} of {type(module).__name__} (exclude it)"
            )
        out[pname] = (module_name, module)
    return out


def _spread(channel_scores: Tensor, weight: Tensor) -> Tensor:
    """Per-channel scores spread evenly over each output unit: the unit sum gives them back."""
    per_unit = weight.numel() // weight.shape[0]
    s = channel_scores.to(device=weight.device, dtype=torch.float32) / per_unit
    return s.reshape(-1, *([1] * (weight.dim() - 1))).expand(weight.shape).clone()


def _example_input(batch: Any) -> Any:
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise ValueError(f"each batch must be an (input, target) pair, got {type(batch).__name__}")
    return batch[0]


@register_method("l1_filter")
class L1Filter(_Criterion):
    """``|w|``; under the channel pattern a filter's score is its L1 norm (Li et al., 2017,
    "Pruning Filters for Efficient ConvNets")."""

    needs_data = False
    patterns = ("channel",)
    runs_model = False

    def _compute(self, ctx):
        return {n: p.detach().abs() for n, p in ctx.params.items()}


@register_method("apoz")
class APoZ(_Criterion):
    """Keep-score ``1 - APoZ`` per output channel (Hu et al., 2016, "Network Trimming").

    APoZ is the fraction of a channel's activations that are zero after the ReLU, i.e.
    of ``x <= 0`` where ``x`` is the layer's output passed through its following
    BatchNorm (if any; see :func:`find_following_batchnorm`, traced on the first
    batch), counted over all positions of every batch from ``ctx.batches()``. The
    passes run in eval mode (as at inference: dropout off, BatchNorm on running
    statistics); the model is left unchanged. The score is spread evenly over the
    channel's weights so the channel pattern's unit sum is ``1 - APoZ``.
    """

    needs_data = True
    patterns = ("channel",)

    def _compute(self, ctx):
        layers = _layers(ctx, self.name)
        device = next(iter(ctx.params.values())).device
        inputs = [_to(_example_input(b), device) for b in _draw(ctx, self.name)]
        pairs = _traced_pairs(ctx.model, inputs[0])
        modules = dict(ctx.model.named_modules())
        source = {}  # module whose output is the pre-ReLU activation -> param name
        for pname, (mname, _) in layers.items():
            src = pairs.get(mname, mname)
            source[src] = pname
        zeros: dict[str, Tensor] = {}
        totals: dict[str, int] = {}

        def hook(name, module, x, y):
            if y is None:
                return
            if isinstance(module, nn.Linear):
                dim = -1
            elif isinstance(module, _CONVS):
                dim = 1 if y.dim() == len(module.kernel_size) + 2 else 0
            else:  # BatchNorm: (N, C, ...)
                dim = 1
            v = (y <= 0).movedim(dim, 0).reshape(y.shape[dim], -1)
            pname = source[name]
            zeros[pname] = zeros.get(pname, 0) + v.sum(1).to(torch.float64)
            totals[pname] = totals.get(pname, 0) + v.shape[1]

        hooked = [(n, modules[n]) for n in source]
        for x in inputs:
            _run(ctx.model, x, hooked, hook)
        out = {}
        for pname, p in ctx.params.items():
            if pname not in zeros:
                raise ValueError(f"apoz: layer {layers[pname][0]!r} did not run in the forward pass")
            if zeros[pname].numel() != p.shape[0]:
                raise ValueError(
                    f"apoz: layer {layers[pname][0]!r} emits {zeros[pname].numel()} channels, "
                    f"its weight has {p.shape[0]} output units"
                )
            out[pname] = _spread(1.0 - zeros[pname] / totals[pname], p)
        return out


@register_method("bn_gamma")
class BNGamma(_Criterion):
    """Channel score ``|gamma|`` of the BatchNorm following the layer (Liu et al., 2017,
    "Learning Efficient Convolutional Networks through Network Slimming").

    The BatchNorm is found by tracing the first batch of ``ctx.data`` when data is
    given, else by the static ``named_modules()`` pairing (see
    :func:`find_following_batchnorm`). A scored layer with no following affine
    BatchNorm (e.g. a classifier) raises ``ValueError`` naming it: exclude it.
    Train with :class:`SlimmingPenalty` to make the scales sparse.
    """

    needs_batchnorm = True  # every masked layer must be followed by a BatchNorm

    needs_data = False
    patterns = ("channel",)
    runs_model = False  # the trace (if any) restores the model itself

    def _compute(self, ctx):
        layers = _layers(ctx, self.name)
        if ctx.data is not None:
            device = next(iter(ctx.params.values())).device
            pairs = _traced_pairs(ctx.model, _to(_example_input(_draw(ctx, self.name)[0]), device))
            how = "traced on the first batch"
        else:
            pairs = _static_pairs(ctx.model)
            how = "in named_modules() order (pass data= to trace the forward pass instead)"
        out = {}
        for pname, (mname, _) in layers.items():
            bn = ctx.model.get_submodule(pairs[mname]) if mname in pairs else None
            if bn is None or bn.weight is None:
                what = ("no BatchNorm follows it" if bn is None
                        else f"its BatchNorm {pairs[mname]!r} has no affine scale")
                raise ValueError(
                    f"bn_gamma: layer {mname!r}: {what} ({how}); exclude it, e.g. exclude=[{mname!r}]"
                )
            out[pname] = _spread(bn.weight.detach().abs(), ctx.params[pname])
        return out


def _model_names_masks(sparsifier_or_model: Sparsifier | nn.Module
                       ) -> tuple[nn.Module, set[str] | None, dict[str, torch.Tensor]]:
    """``(model, names the Sparsifier prunes or None for a bare model, {parameter name: mask})``."""
    if isinstance(sparsifier_or_model, Sparsifier):
        model, names = sparsifier_or_model.model, set(sparsifier_or_model.names)
    elif isinstance(sparsifier_or_model, nn.Module):
        model, names = sparsifier_or_model, None
    else:
        raise TypeError(f"expected a Sparsifier or an nn.Module, got {type(sparsifier_or_model).__name__}")
    return model, names, {mp.name: mp.mask for mp in masked_parameters(model)}


def _pruned_rows(layer: nn.Module, mask: torch.Tensor | None) -> torch.Tensor:
    """The output channels whose weight row is all masked (no mask: all zero)."""
    rows = mask if mask is not None else layer.weight.detach() != 0
    return ~rows.reshape(rows.shape[0], -1).any(1)


def couple_batchnorm(sparsifier_or_model: Sparsifier | nn.Module, example_input: Any = None) -> dict[str, int]:
    """Zero and mask the BatchNorm scale and shift of pruned output channels.

    A pruned conv/linear channel still leaves its BatchNorm emitting ``beta``; after
    coupling, ``gamma = beta = 0`` there (masks attached with pattern ``"channel"``), so
    the channel's post-BN(-ReLU) activation is exactly 0 in train and eval mode. A
    channel is pruned when its weight mask row is all False (a layer without a mask:
    when its weight row is all zero). BatchNorms are paired by
    :func:`find_following_batchnorm` (``example_input`` traces). Returns
    ``{BatchNorm name: channels zeroed}``.

    Call it again after masks change. Given a Sparsifier, the BatchNorm masks become
    its dependents (:meth:`Sparsifier.add_dependents`): its wrapped optimizer keeps them
    at zero and ``finalize()`` removes them. Given a bare model, call
    ``sn.apply_masks(model)`` after each training step yourself.
    """
    model, names, masked = _model_names_masks(sparsifier_or_model)
    pairs = find_following_batchnorm(model, example_input)
    plan = []
    for lname, bname in pairs.items():
        pname = f"{lname}.weight" if lname else "weight"
        if names is not None and pname not in names:
            continue
        layer, bn = model.get_submodule(lname), model.get_submodule(bname)
        pruned = _pruned_rows(layer, masked.get(pname))
        if not pruned.any() and not has_mask(bn, "weight"):
            continue
        if bn.weight is None or bn.bias is None:
            raise ValueError(f"BatchNorm {bname!r} after layer {lname!r} has no affine scale/shift to zero")
        plan.append((bname, bn, pruned))
    for _, bn, pruned in plan:  # validated first: an error above leaves the model unchanged
        attach_mask(bn, "weight", ~pruned, pattern="channel")
        attach_mask(bn, "bias", ~pruned, pattern="channel")
    if isinstance(sparsifier_or_model, Sparsifier):
        sparsifier_or_model.add_dependents(f"{b}.{a}" for b, _, _ in plan for a in ("weight", "bias"))
    return {bname: int(pruned.sum()) for bname, _, pruned in plan}


def couple_bias(sparsifier_or_model: Sparsifier | nn.Module) -> dict[str, int]:
    """Zero and mask the bias entries of pruned output channels: a layer's weight row all masked
    (a layer without a mask: all zero).

    A ``"channel"`` pattern masks weight rows; the bias still emits ``b_c``, so the channel is
    not zero and ``sn.shrink(model, x)`` (``ratio=None``: only exactly-zero channels go) has to
    keep it. After coupling, the pruned channel's output is exactly zero, so ``sn.shrink``
    removes it and the shrunk model computes what the masked one does. Layers followed by a
    BatchNorm need :func:`couple_batchnorm` instead (its shift would still be emitted). Given a
    Sparsifier, the bias masks become its dependents (kept at zero by its optimizer, removed by
    ``finalize()``); call it again after the masks change. Returns ``{layer name: entries zeroed}``.
    """
    model, names, masked = _model_names_masks(sparsifier_or_model)
    plan = []
    for lname, layer in model.named_modules():
        pname = f"{lname}.weight" if lname else "weight"
        if not isinstance(layer, _LAYERS) or layer.bias is None or (names is not None and pname not in names):
            continue
        pruned = _pruned_rows(layer, masked.get(pname))
        if pruned.any() or has_mask(layer, "bias"):
            plan.append((lname, layer, pruned))
    for _, layer, pruned in plan:
        attach_mask(layer, "bias", ~pruned, pattern="channel")
    if isinstance(sparsifier_or_model, Sparsifier):
        sparsifier_or_model.add_dependents(f"{n}.bias" if n else "bias" for n, _, _ in plan)
    return {n: int(pruned.sum()) for n, _, pruned in plan}


# ----------------------------------------------------------------------------- MACs


def structured_macs(model: nn.Module, example_input: Any) -> tuple[int, int]:
    """``(dense, effective)`` MACs of the Conv/Linear layers for one forward pass.

    Dense: ``positions * weight.numel()`` per call (``positions`` = batch * output
    positions for a conv, the input's leading dims for a linear). Effective: what the
    layer costs once surgery removes dead channels, ``positions * prod(kernel) *
    #{(o, i) in the same group: o live, i live}``; an output channel ``o`` is live
    if its weight row has a nonzero, an input channel ``i`` if it is nonzero somewhere
    in the example batch (the previous layer's channel was not pruned) and some weight
    reads it. One eval-mode, no-grad pass; the model is left unchanged.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    seen: dict[str, list] = {}  # name -> [module, positions, alive inputs]
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, _LAYERS)]

    def hook(name, module, x, y):
        if x is None or y is None:
            return
        if isinstance(module, nn.Linear):
            positions = x.numel() // module.in_features
            alive = (x != 0).reshape(-1, module.in_features).any(0)
        else:
            cdim = y.dim() - len(module.kernel_size) - 1
            positions = y.numel() // y.shape[cdim]
            alive = (x != 0).movedim(cdim, 0).reshape(x.shape[cdim], -1).any(1)
        entry = seen.setdefault(name, [module, 0, torch.zeros_like(alive)])
        entry[1] += positions
        entry[2] |= alive

    _run(model, example_input, layers, hook)
    dense = effective = 0
    for module, positions, alive in seen.values():
        w = module.weight.detach()
        groups = getattr(module, "groups", 1)
        out_ch, in_per_group = w.shape[0], w.shape[1]
        k = math.prod(w.shape[2:])
        nz = (w != 0).reshape(groups, out_ch // groups, in_per_group, k)
        live_out = nz.any(dim=(2, 3))  # (groups, out per group)
        live_in = nz.any(dim=(1, 3)) & alive.reshape(groups, in_per_group)  # (groups, in per group)
        dense += positions * w.numel()
        effective += positions * k * int((live_out.sum(1) * live_in.sum(1)).sum())
    return dense, effective
