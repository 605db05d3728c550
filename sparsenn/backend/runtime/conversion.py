"""``sparsenn.convert``: a pruned model -> an inference model, sparse where that is measured faster.

Steps (all on a deep copy; the model passed in is never changed):

1. Masks are removed (masked weights hold exact zeros already; torch parametrizations
   and ``torch.nn.utils.prune`` are read through ``module.weight``, the effective weight).
2. One eval-mode forward pass records the input of every ``nn.Linear`` and ``nn.Conv2d``
   (:mod:`.survey`); layers the runtime cannot convert keep their dense module, with a note.
3. Each convertible layer's weight is packed for every kernel that fits it
   (:mod:`.candidates`), and a cost model (:mod:`.cost`, rates of this CPU measured once
   per process on small probes) predicts, per batch size, the dense layer's time and
   each kernel's; only kernels predicted within ``SLACK`` (2x) of dense are timed
   (``screen=False`` times them all).
4. Per layer and batch size ``b`` the dense layer and the plausible kernels are timed on
   the recorded input tiled to ``b`` (:mod:`.selection`): interleaved medians, at most
   ``budget`` seconds, stopping early when no kernel can win. A kernel is chosen at
   ``b`` when its median is at least ``margin`` below dense and it agrees with the dense
   layer (``allclose``); otherwise dense. Products of at most ``SPMV_MAX_ROWS`` rows are
   timed with a cold cache when the layers' weights exceed the last-level cache
   (:mod:`.cache`: decoding a large model reads each weight from memory); the plan
   of each layer's fewest-bytes kernel is then timed against those choices on the whole
   model and kept if faster (:mod:`.streaming`). The choice is per batch size; other
   batch sizes use the nearest measured one (log scale). A layer dense at every batch
   size stays the original module.
5. With ``verify=True`` (default), the whole-model check (:mod:`.verification`): same
   output as the dense model, and at each batch size where some layer runs sparse the
   converted model must measure faster than the dense one, or every layer runs dense
   there.

Time: ``budget`` caps the timing of one layer at one batch size (a layer whose
comparison needs more than that stays dense at that batch size, noted). ``time_limit``
caps the whole conversion: the expected cost of the whole-model check is set aside
first (estimated from the recording pass; a batch size whose check cannot fit is not
timed at all, its layers stay dense), then layers are timed in model order until the
rest is spent; layers not reached stay dense and the summary says so. Preparing the
layers (recording, packing, the cost model's probes) and the output check are not cut
short. ``progress=True`` shows a bar per layer on stderr (off in quiet mode,
:mod:`sparsenn.core.progress`).

Bad inputs: a sparse kernel never reads an input it cannot take: the sparse layers
check dtype and feature shape first (TypeError / ValueError naming the layer, the
expected and the given). On a converted layer's dense path PyTorch's error is re-raised
as that same TypeError / ValueError; layers kept as PyTorch modules (and a result with
no sparse layer, which is the dense model) raise PyTorch's own errors, as the dense
model does. ``check_inputs=True`` adds a model-level forward pre-hook that rejects
inputs whose dtype or non-batch shape differ from ``example_input``'s (:mod:`.inputs`).

The result is the converted copy with a ``conversion_summary`` attribute
(:class:`~.summary.ConversionSummary`).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ...core.masks import get_pattern, masked_parameters
from ...core.plain import plain_copy
from ...core.progress import Bar
from .. import kernels as K
from ..kernels._tiles import SPMV_MAX_ROWS
from . import fusion
from . import inputs as I
from .accuracy import output_change, perplexity, token_ids
from .attention import ATTENTIONS_ATTR, fuse_attentions
from .decoder_layer import LAYERS_ATTR, fuse_decoder_layers
from .cache import last_level_cache_bytes
from .candidates import WEIGHTS, kernel_key
from .cost import COST_MODEL, SLACK, Product, plausible
from .gated_mlp import MLPS_ATTR, fuse_gated_mlps
from .inputs import INPUT_CHECK_ATTR, INPUT_SPEC_ATTR, attach_input_check  # noqa: F401  (re-exported)
from .layers import DENSE, SEMI_STRUCTURED
from .linear_activation import ACTIVATIONS_ATTR, fuse_linear_activations
from .residual_norm import RESIDUAL_NORMS_ATTR, fuse_residual_norms
from .norms import NORMS_ATTR, fuse_rms_norms
from .pooling import POOLS_ATTR, compile_pools, faster_pools
from .replace import _replace, held_bytes, replace_module  # noqa: F401  (_replace re-exported)
from .selection import Clock, LayerWork, agrees, choose, predict, prepare_layer
from .siblings import SIBLINGS_ATTR, SiblingGroup, find_siblings
from .siblings import fuse_siblings as fuse_sibling_groups
from .streaming import stream_plan
from .summary import ConversionSummary
from .survey import record_layers, rows_at, unconverted_modules
from .verification import check_seconds, dense_copy
from .verification import verify as verify_model

FOLDED_ATTR = "folded_batchnorm"  #: on a converted model: the ``(conv, batchnorm)`` pairs folded

__all__ = ["FOLDED_ATTR", "INPUT_SPEC_ATTR", "attach_input_check", "convert", "kernel_key"]

DEFAULT_TOLERANCE = {"fp32": None, "bf16": 0.02, "int8": 0.1}  # largest relative change of a layer's output


@torch.no_grad()
def convert(model: nn.Module, example_input: Any, batch_sizes: Sequence[int] = (1, 64), *,
            weights: str = "fp32", tolerance: float | None = None, text: Any = None,
            kernels: Sequence[str] | None = None, margin: float = 0.05, budget: float = 0.2,
            verify: bool = True, check_inputs: bool = False, force: str | None = None,
            time_limit: float | None = 60.0, screen: bool = True, progress: bool = False,
            fold_batchnorm: bool = True, fuse_norms: bool = True, fuse_siblings: bool = True) -> nn.Module:
    """An inference copy of ``model`` whose Linear/Conv2d layers run sparse kernels where measured faster.

    ``example_input``: a tensor (``model(x)``), a tuple/list (``model(*x)``) or a dict
    (``model(**x)``, e.g. ``input_ids`` and ``attention_mask`` of a ``transformers``
    model) whose tensors have the batch in dim 0. ``batch_sizes``: the model batch sizes
    to measure and choose for; for a text generator (a model with ``generate`` given
    ``input_ids`` of one sequence) they count *tokens*: 1 is a step of token-by-token
    decoding, 64 a 64-token prompt (:func:`.inputs.token_count`). ``weights``: the precision of
    the stored weights, ``"fp32"`` (the float32 kernels), ``"bf16"`` (bfloat16 values, rounded to
    nearest) or ``"int8"`` (symmetric per-output-channel scales); values are converted to float32 in registers, so
    activations and sums stay float32. With ``"bf16"``/``"int8"`` every convertible layer,
    sparse or not, is offered the bitmask kernel and the dense kernel of that precision;
    a layer whose rounded weight changes its output by more than ``tolerance`` (relative
    to its largest output; default 0.02 for bf16, 0.1 for int8) raises
    :class:`~.errors.ConversionError` naming it. ``text``: token ids (1-D tensor) on which
    the summary reports the perplexity of the dense and converted models. ``kernels``: restrict the sparse candidates
    to these names (:func:`sparsenn.backend.kernels.list_kernels`). ``margin``: how much faster
    (fraction of the dense time) a kernel must be to be chosen. ``budget``: the most
    seconds of timing for one layer at one batch size. ``time_limit``: the most seconds
    for the whole conversion (``None``: no limit); see the module docstring for what it
    cuts. ``screen``: time only the kernels the cost model predicts could win
    (``False``: time every candidate). ``force``: skip the measurements and run this
    kernel (or ``"semi_structured"`` on CUDA) at every batch size wherever it fits (for
    tests and experiments: the "never slower" guarantee then does not hold).
    ``check_inputs``: add the model-level input check (the layers check their own inputs
    either way). ``progress``: a progress bar per layer on stderr. ``fold_batchnorm`` /
    ``fuse_norms``: fold eval-mode BatchNorm2d into the convolution before it where safe
    (:mod:`.fusion`) / run RMSNorm modules as one ``F.rms_norm`` call where exact (:mod:`.norms`);
    ``fuse_siblings``: Linear layers always reading the same input (q/k/v, gate/up) run as one
    product over their stacked weights (:mod:`.siblings`, :mod:`.gated_mlp`); the dense model timed
    against is rewritten alike. A sparse Linear followed by GELU applies it in the kernel's epilogue
    (:mod:`.linear_activation`). Returns the converted copy (``eval()``) with a ``conversion_summary``.
    """
    clock = Clock(_check_limits(budget, time_limit))
    batch_sizes, batch0 = _check_args(model, example_input, batch_sizes, margin, kernels, force)
    weights, tolerance = _check_weights(weights, tolerance)
    ids = None if text is None else token_ids(text)
    tokens = I.token_count(model, example_input)
    batch0 = batch0 if tokens is None else tokens
    patterns = {mp.name: get_pattern(mp.module, mp.attr) for mp in masked_parameters(model)}
    converted = plain_copy(model).eval()  # torch.nn.utils.prune / parametrizations resolved, masks removed
    summary = ConversionSummary(batch_sizes, K.sync_threads(), float(margin), time_limit=time_limit,
                                weights=weights, tokens=tokens is not None)
    survey, rewrites = _rewrite(converted, example_input, patterns, summary, fold_batchnorm, fuse_norms,
                                fuse_siblings)
    dense = functools.cache(lambda: _dense_reference(model, *rewrites))  # rewritten alike; made when first needed
    summary.layers.extend(unconverted_modules(converted, survey))
    work = _prepare_layers(survey, summary, batch_sizes, batch0, kernels, patterns, force, screen, progress,
                           weights, tolerance)
    _cold_one_row(work, batch_sizes, summary)
    if force is None:
        _set_aside_model_check(converted, example_input, work, batch_sizes, batch0, budget, verify, clock, summary)
    converted = _choose_kernels(converted, work, batch_sizes, batch0, margin, budget, force, clock, progress)
    for b in batch_sizes if force is None else ():  # weights larger than the cache: settled on the whole model
        converted = stream_plan(converted, work, b, batch0, example_input, tokens is not None, budget, clock, summary)
    _fuse_before_check(converted, example_input, batch_sizes, summary, force is None)
    _note_time_limit(work, summary, clock)
    _sort_rows(converted, summary)
    if verify:
        clock.reserved = 0.0
        with Bar(len(batch_sizes), "convert: whole-model check", unit="batch", enabled=progress) as bar:
            converted = verify_model(converted, model, example_input, survey.reference, batch_sizes, batch0, summary,
                                     budget, clock, timing_on=force is None, progress=bar, tokens=tokens is not None,
                                     exact=weights == "fp32", dense=dense)
    _finish(converted, summary)
    _measure_accuracy(converted, dense, example_input, survey.reference, ids, summary, batch_sizes, batch0,
                      tokens is not None)
    summary.seconds = clock.elapsed()
    if check_inputs:
        attach_input_check(converted, I.input_spec(example_input))
    return converted


# ------------------------------------------------------------------ steps


def _rewrite(converted: nn.Module, example_input: Any, patterns: dict[str, str | None], summary: ConversionSummary,
             fold: bool, norms: bool, siblings: bool) -> tuple[Any, tuple[list, ...]]:
    """Record the layers and the reference output (the model as given), then the structural rewrites: BatchNorm
    folding, fused RMSNorms, sibling products, the gated MLPs, attentions and decoder layers over them. Returns the survey
    of the layers as they now are (the reference output kept) and the rewrites, which the dense
    reference repeats."""
    survey = record_layers(converted, example_input)
    pairs = _fold(converted, example_input, summary, fold)
    names = _fuse_norms(converted, summary, norms)
    groups, mlps, attentions, layers = _fuse_siblings(converted, example_input, survey, patterns, summary, siblings)
    if groups:
        survey = dataclasses.replace(record_layers(converted, example_input), reference=survey.reference)
    return survey, (pairs, names, groups, mlps, attentions, layers)


def _dense_reference(model: nn.Module, pairs: list[tuple[str, str]], norms: list[str],
                     siblings: list[SiblingGroup] = (), mlps: list[str] = (),
                     attentions: list[str] = (), layers: list[str] = ()) -> nn.Module:
    """The dense model the converted one is timed and checked against: ``model`` without masks, with
    the BatchNorm ``pairs`` folded, the RMSNorm modules ``norms``, the ``siblings``, the gated ``mlps``, the
    ``attentions`` and decoder ``layers`` fused as in the converted model (so the whole-model check measures the sparse layers, not those)."""
    out = dense_copy(model)
    fusion.fold_pairs(out, pairs)
    fuse_rms_norms(out, norms)
    fuse_sibling_groups(out, list(siblings))
    fuse_gated_mlps(out, list(mlps))
    fuse_attentions(out, list(attentions))
    fuse_decoder_layers(out, list(layers))
    return out


def _fuse_siblings(converted: nn.Module, example_input: Any, survey, patterns: dict[str, str | None],
                   summary: ConversionSummary, fuse: bool) -> tuple[list[SiblingGroup], list[str], ...]:
    """Linear layers reading the same input as one product each (:mod:`.siblings`); a group's stacked
    weight keeps its members' mask pattern where they agree. Then the gated MLPs over a stacked
    gate/up product (:mod:`.gated_mlp`) and the attentions over a stacked q/k/v product
    (:mod:`.attention`) call it directly. All are kept for save/load."""
    if not isinstance(fuse, bool):
        raise TypeError(f"fuse_siblings must be True or False, got {fuse!r}")
    groups = []
    if fuse:
        names = {n for n, m in survey.layers if type(m) is nn.Linear}
        groups = find_siblings(converted, example_input, names)
        fuse_sibling_groups(converted, groups)
    converted.__dict__[SIBLINGS_ATTR] = groups
    for g in groups:
        found = {patterns.get(f"{n}.weight") for n in g.members}
        if len(found) == 1:
            patterns[f"{g.fused}.linear.weight"] = found.pop()
    if groups:
        summary.notes.append(f"{len(groups)} groups of Linear layers reading the same input run as one product "
                             f"each (e.g. {', '.join(repr(n) for n in groups[0].members)} as "
                             f"{groups[0].fused + '.linear'!r}); the dense model is timed with them too")
    mlps = fuse_gated_mlps(converted) if groups else []
    attentions = fuse_attentions(converted) if groups else []
    layers = fuse_decoder_layers(converted) if mlps and attentions else []
    for attr, names, what in ((MLPS_ATTR, mlps, "gated MLPs call their stacked gate/up product directly"),
                              (ATTENTIONS_ATTR, attentions, "attention modules call their stacked q/k/v product "
                               "directly (LLaMA-style: rotary embedding fused; BERT-style: q/k/v as views, not copies)"),
                              (LAYERS_ATTR, layers, "decoder layers decode a token at batch 1 in nine calls")):
        converted.__dict__[attr] = names
        if names:
            summary.notes.append(f"{len(names)} {what} (e.g. {names[0]!r})")
    return groups, mlps, attentions, layers


def _fuse_before_check(converted: nn.Module, example_input: Any, batch_sizes: tuple[int, ...],
                       summary: ConversionSummary, timed: bool) -> None:
    """GELU in the epilogue of the sparse Linear before it (:mod:`.linear_activation`), residual add + LayerNorm after
    one in one pass (:mod:`.residual_norm`), max pools compiled where faster (:mod:`.pooling`; not with ``force``,
    which times nothing): before the whole-model check times and checks the model; all kept for save/load."""
    pools = compile_pools(converted, faster_pools(converted, example_input, batch_sizes)) if timed else []
    for names, attr, what in ((fuse_linear_activations(converted), ACTIVATIONS_ATTR, "sparse Linear layers apply the "
                               "GELU after them as they write their outputs; the whole-model check includes it"),
                              (fuse_residual_norms(converted), RESIDUAL_NORMS_ATTR, "residual adds and the LayerNorm "
                               "after them run as one compiled pass; the whole-model check includes it"),
                              (pools, POOLS_ATTR, "max pool(s) run the compiled kernel, faster than PyTorch's on the "
                               "example")):
        converted.__dict__[attr] = names
        if names:
            summary.notes.append(f"{len(names)} {what} (e.g. {names[0]!r})")


def _fuse_norms(converted: nn.Module, summary: ConversionSummary, fuse: bool) -> list[str]:
    """RMSNorm modules as one ``F.rms_norm`` call each (:mod:`.norms`); the names are kept for save/load."""
    if not isinstance(fuse, bool):
        raise TypeError(f"fuse_norms must be True or False, got {fuse!r}")
    names = fuse_rms_norms(converted) if fuse else []
    converted.__dict__[NORMS_ATTR] = names
    if names:
        summary.notes.append(f"{len(names)} RMSNorm modules run as one F.rms_norm call each (e.g. {names[0]!r}); "
                             "the dense model is timed with them too")
    return names


def _fold(converted: nn.Module, example_input: Any, summary: ConversionSummary, fold: bool) -> list[tuple[str, str]]:
    """Fold BatchNorms (if ``fold``); the pairs are kept on the model: save/load rebuild the structure from them."""
    pairs, why = fusion.fold_batchnorm(converted, example_input) if fold else ([], None)
    converted.__dict__[FOLDED_ATTR] = pairs
    if pairs:
        summary.notes.append(f"{len(pairs)} BatchNorm2d folded into the convolution before it "
                             f"(e.g. {pairs[0][1]!r} into {pairs[0][0]!r}); the dense model is timed folded too")
    if why:
        summary.notes.append(why)
    return pairs


def _check_limits(budget: Any, time_limit: Any) -> float | None:
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget < float("inf"):
        raise ValueError(f"budget must be a positive number of seconds, got {budget!r}")
    if time_limit is not None and (isinstance(time_limit, bool) or not isinstance(time_limit, (int, float))
                                   or not 0 < time_limit):
        raise ValueError(f"time_limit must be a positive number of seconds or None (no limit), got {time_limit!r}")
    return None if time_limit is None else float(time_limit)


def _check_args(model, example_input, batch_sizes, margin, kernels, force) -> tuple[tuple[int, ...], int]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    tensors = I.tensors_of(example_input)
    if not tensors:
        raise TypeError("example_input must be a tensor, a tuple/list of arguments or a dict of keyword "
                        f"arguments holding at least one tensor, got {type(example_input).__name__}")
    first = tensors[0][1]
    if first.dim() == 0:
        raise ValueError("example_input's first tensor must have a batch dimension (dim 0), got a scalar")
    if isinstance(batch_sizes, int) or not isinstance(batch_sizes, Sequence) or not batch_sizes:
        raise ValueError(f"batch_sizes must be a non-empty sequence of positive integers, got {batch_sizes!r}")
    for b in batch_sizes:
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise ValueError(f"batch_sizes must hold positive integers, got {b!r} in {tuple(batch_sizes)}")
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 <= margin < 1:
        raise ValueError(f"margin must be a number in [0, 1), got {margin!r}")
    if kernels is not None:
        unknown = [k for k in kernels if k not in K.KERNELS]
        if unknown:
            raise ValueError(f"unknown kernels {unknown}; valid kernels: {', '.join(K.list_kernels())}")
    if force is not None and force not in K.KERNELS and force != SEMI_STRUCTURED:
        raise ValueError(f"unknown kernel {force!r} to force; valid kernels: "
                         f"{', '.join([*K.list_kernels(), SEMI_STRUCTURED])}")
    return tuple(sorted(set(batch_sizes))), int(first.shape[0])


def _check_weights(weights: Any, tolerance: Any) -> tuple[str, float | None]:
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {', '.join(map(repr, WEIGHTS))}, got {weights!r}")
    if tolerance is None:
        return weights, DEFAULT_TOLERANCE[weights]
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 < tolerance < float("inf"):
        raise ValueError(f"tolerance must be a positive number (a relative output change), got {tolerance!r}")
    return weights, float(tolerance)


def _measure_accuracy(converted: nn.Module, dense: Callable[[], nn.Module], example_input: Any, reference: Any,
                      ids: torch.Tensor | None, summary: ConversionSummary, batch_sizes: tuple[int, ...],
                      batch0: int, tokens: bool) -> None:
    """The whole model's output change on the example (and, where a layer's plan differs there, at each
    measured batch size: e.g. one token, where a decoder runs its one-row kernels), and the
    perplexity of both models on ``ids``."""
    summary.accuracy = output_change(converted, example_input, reference)
    for b in batch_sizes:
        if b == batch0 or not summary.sparse_at(b):
            continue
        xb = I.at_batch(example_input, b, batch0, tokens)
        change = output_change(converted, xb, I.call_model(dense(), xb))
        for k, v in change.items():
            summary.accuracy[k] = max(summary.accuracy[k], v)
    if ids is not None:
        summary.accuracy["perplexity_dense"] = perplexity(dense(), ids)
        summary.accuracy["perplexity_converted"] = perplexity(converted, ids)


def _prepare_layers(survey, summary: ConversionSummary, batch_sizes: tuple[int, ...], batch0: int,
                    kernels: Sequence[str] | None, patterns: dict[str, str | None], force: str | None, screen: bool,
                    progress: bool, weights: str = "fp32", tolerance: float | None = None) -> list[LayerWork]:
    """A summary row per convertible layer; for those that can be converted, packed candidates and predictions."""
    work = []
    with Bar(len(survey.layers), "convert: pack and predict", unit="layer", enabled=progress) as bar:
        for name, module in survey.layers:
            row, w = prepare_layer(name, module, survey, kernels, patterns.get(f"{name}.weight"), force, weights,
                                   tolerance)
            summary.layers.append(row)
            if w is not None:
                predict(w, batch_sizes, batch0, screen=screen and force is None)
                work.append(w)
            bar.update()
    return work


def _cold_one_row(work: list[LayerWork], batch_sizes: tuple[int, ...], summary: ConversionSummary) -> None:
    """Time one-row products with a cold cache when the layers' weights do not fit in the last-level cache.

    Decoding reads every weight once per token: a model larger than the cache finds each
    weight in memory, which a layer timed in a loop (its weight cached) does not show.
    """
    total = sum(w.weight.numel() * w.weight.element_size() for w in work if w.weight.device.type == "cpu")
    llc = last_level_cache_bytes()
    one_row = [b for b in batch_sizes if any(0 < w.row.rows.get(b, 0) <= SPMV_MAX_ROWS for w in work)]
    if total <= llc or not one_row:
        return
    for w in work:
        w.cold = True
        for b in one_row:  # bitmask kernels cost per weight, not per nonzero: the (warm) cost model cannot screen them
            extra = [k for k in w.kinds if k.startswith("bitmask") and k not in w.worth_timing.get(b, [])]
            if extra and b in w.worth_timing:
                w.worth_timing[b] = [*w.worth_timing[b], *extra]
    summary.notes.append(f"the layers' weights ({total / 2**20:.0f} MiB) exceed the last-level cache "
                         f"({llc / 2**20:.0f} MiB): products of at most {SPMV_MAX_ROWS} rows (batch "
                         f"{', '.join(map(str, one_row))}) were timed with a cold cache, as decoding runs them")


def _choose_kernels(converted: nn.Module, work: list[LayerWork], batch_sizes: tuple[int, ...], batch0: int,
                    margin: float, budget: float, force: str | None, clock: Clock, progress: bool) -> nn.Module:
    """Time and choose layer by layer, in model order (a progress bar per layer)."""
    with Bar(len(work), "convert", unit="layer", enabled=progress) as bar:
        for w in work:
            bar.set_postfix(layer=w.name)
            converted = _convert_layer(converted, w, batch_sizes, batch0, margin, budget, force, clock)
            bar.update()
    return converted


def _set_aside_model_check(converted: nn.Module, example_input: Any, work: list[LayerWork],
                           batch_sizes: tuple[int, ...], batch0: int, budget: float, verify: bool, clock: Clock,
                           summary: ConversionSummary) -> None:
    """Reserve the whole-model check's expected time; drop batch sizes whose check cannot fit in the limit.

    The model's time at ``b``: one more (warm) forward pass at the example's batch size,
    scaled by the cost model's dense time of the layers at ``b`` over that at ``batch0``.
    """
    timed = [b for b in batch_sizes if any(w.worth_timing.get(b) for w in work)]
    if not verify or clock.limit is None or not timed:
        return
    t0 = time.perf_counter()
    I.call_model(converted, example_input)
    forward = time.perf_counter() - t0
    cost = {b: check_seconds(forward * _scale(work, b, batch0), budget) for b in timed}
    while timed and sum(cost[b] for b in timed) > clock.left():
        drop = max(timed, key=cost.get)
        timed.remove(drop)
        for w in work:
            w.worth_timing[drop] = []
        summary.notes.append(f"batch {drop}: not timed: the whole-model check there would take about "
                             f"{cost[drop]:.1f} s, more than the time limit ({clock.limit:g} s) leaves; "
                             "every layer runs dense at this batch size")
    clock.reserved = sum(cost[b] for b in timed)


def _scale(work: list[LayerWork], b: int, batch0: int) -> float:
    """The model's time at batch ``b`` over its time at ``batch0``: the cost model's dense time of the
    CPU layers, else proportional to the batch size (never below 1 for ``b < batch0``: fixed costs)."""
    at_b = at_0 = 0.0
    for w in work:
        if w.weight.device.type != "cpu":
            continue
        w2d = w.weight.reshape(w.weight.shape[0], -1)
        conv = isinstance(w.module, nn.Conv2d)
        for bb in (b, batch0):
            t = COST_MODEL.dense(Product(rows_at(w.x0, w.module, bb, batch0), w2d.shape[1], w2d.shape[0], conv))
            if bb == b:
                at_b += t
            if bb == batch0:
                at_0 += t
    return at_b / at_0 if at_0 > 0 else max(1.0, b / batch0)


def _convert_layer(converted: nn.Module, w: LayerWork, batch_sizes: tuple[int, ...], batch0: int, margin: float,
                   budget: float, force: str | None, clock: Clock) -> nn.Module:
    """Choose the layer's kernel at every batch size; swap in a sparse layer if some batch size runs sparse."""
    chosen = {}
    for b in batch_sizes:
        kind = w.kinds[0] if force is not None else choose(w, b, batch0, margin=margin, budget=budget, clock=clock)
        chosen[b] = kind if kind == DENSE or agrees(w, kind, b, batch0) else DENSE
    w.row.choice = dict(chosen)
    if all(k == DENSE for k in chosen.values()):
        timed = [b for b in batch_sizes if w.row.times.get(b)]
        if force is None and len(timed) == len(batch_sizes):
            w.notes.append("dense was faster at every batch size; kept dense")
        elif force is None and timed:
            w.notes.append(f"dense was faster where timed (batch {', '.join(map(str, timed))}); kept dense")
        elif force is None and w.row.predicted and all(not plausible(p) for p in w.row.predicted.values()):
            w.notes.append(f"every kernel predicted more than {SLACK:g}x dense's time at every batch size; "
                           "kept dense (not timed)")
        else:
            w.notes.append("kept dense")
        w.row.note = "; ".join(w.notes)
        return converted
    w.row.note = "; ".join(w.notes)
    return replace_module(converted, w.name, w.layer(chosen))


def _sort_rows(converted: nn.Module, summary: ConversionSummary) -> None:
    """The summary's layer rows in the model's module order."""
    order = {n: i for i, (n, _) in enumerate(converted.named_modules())}
    summary.layers.sort(key=lambda r: order.get(r.name, len(order)))


def _note_time_limit(work: list[LayerWork], summary: ConversionSummary, clock: Clock) -> None:
    cut = [w.name for w in work if any("time limit reached" in n for n in w.notes)]
    if cut:
        summary.notes.append(f"time limit ({clock.limit:g} s) reached: {len(cut)} of {len(work)} layers were not "
                             f"(fully) timed and run dense there (first: {cut[0]!r})")


def _finish(converted: nn.Module, summary: ConversionSummary) -> None:
    """Drop packed arrays no plan uses; record what every layer holds; attach the summary."""
    modules = dict(converted.named_modules())
    for row in summary.layers:
        module = modules.get(row.name)
        if module is None:
            continue
        if hasattr(module, "drop_unused"):
            module.drop_unused()
        if not row.held:
            row.held = held_bytes(module)
    converted.eval()
    converted.conversion_summary = summary
