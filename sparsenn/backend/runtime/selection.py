"""Per layer and batch size: predict, time the plausible kernels under the budget, choose.

For each convertible layer (:func:`prepare_layer`) the weight is packed for every
candidate kernel (:mod:`.candidates`). :func:`predict` asks the cost model (:mod:`.cost`)
for the dense layer's and each candidate's time at every batch size and keeps the
candidates predicted within ``SLACK`` of dense. :func:`choose` times the dense layer
against those (interleaved medians, :mod:`.timing`), capped at ``budget`` seconds and by
the time left (:class:`Clock`); it stops early once no candidate can win. A kernel is
chosen at that batch size only when its median is at least ``margin`` below the dense
one (up to ``SPMV_MAX_ROWS`` rows, matrix-vector products bound by reading the weight,
only formats no larger than the dense weight compete; when the model's weights exceed the
last-level cache, each of those calls starts with a cold cache, :mod:`.cache`, as in
decoding), and it must then agree with
the dense layer on that input (``allclose``). When even three rounds do not fit in
``budget`` (large layers at large batches), a kernel at least ``QUICK_MARGIN`` (25%)
faster than dense on the one timed call each made so far is taken, with a note.
Whatever is not timed stays dense.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .. import kernels as K
from ..kernels._tiles import SPMV_MAX_ROWS
from . import timing
from .cache import evict
from .errors import ConversionError
from .candidates import candidate_kernels, pack_candidates
from .cost import COST_MODEL, Product, plausible
from .layers import DENSE, SEMI_STRUCTURED, SparseConv2d, SparseLinear
from .replace import build_sparse_layer
from .summary import LayerSummary
from .survey import Survey, layer_input, rows_at, why_not

QUICK_MARGIN = 0.25  # how much faster than dense a kernel timed by one call only must be (see _from_first_calls)
EXACT_ATOL = 1e-5  # a kernel's output against dense: allclose at rtol 1e-4 and this fraction of the largest |output|
QUANTIZED_ATOL = 1e-4  # the same for int8 / bfloat16 kernels against the dense layer with their rounded weight
LAYER_ROUNDS = 3  # fewest interleaved rounds behind a layer's choice (2 timed calls per kernel each)


class Clock:
    """Wall time of one conversion against its ``limit`` (seconds; ``None``: no limit).

    ``reserve(s)`` sets aside seconds for the whole-model check; :meth:`left_for_layers`
    is what the per-layer timing may still use.
    """

    def __init__(self, limit: float | None):
        self.start = time.perf_counter()
        self.limit = limit
        self.reserved = 0.0

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return math.inf if self.limit is None else self.limit - self.elapsed()

    def left_for_layers(self) -> float:
        return self.left() - self.reserved


@dataclass
class LayerWork:
    """One convertible layer on its way through prediction, timing and choice."""

    name: str
    module: nn.Module
    weight: torch.Tensor  #: the effective weight, detached
    row: LayerSummary
    x0: torch.Tensor  #: the input the recording pass saw
    packed: dict[str, K.Packed] = field(default_factory=dict)
    kinds: list[str] = field(default_factory=list)  #: every candidate key (2:4 on CUDA included)
    notes: list[str] = field(default_factory=list)
    worth_timing: dict[int, list[str]] = field(default_factory=dict)  #: per batch size
    tolerance: float | None = None  #: largest relative output change a rounded/quantized kernel may make
    cold: bool = False  #: time one-row products with a cold cache (the model's weights exceed the last-level cache)
    _probe: nn.Module | None = None

    @property
    def probe(self) -> SparseLinear | SparseConv2d:
        """A sparse layer holding every candidate, run with ``forced`` set (dense plan)."""
        if self._probe is None:
            self._probe = build_sparse_layer(self.module, self.name, {1: DENSE}, self.packed, self.weight)
        return self._probe

    def no_larger_than_dense(self, kinds) -> list[str]:
        """The kernels of ``kinds`` whose packed weight holds no more bytes than the dense weight."""
        dense_bytes = self.weight.numel() * self.weight.element_size()
        return [k for k in kinds if self.row.bytes.get(k, 0) <= dense_bytes]

    def layer(self, choice: dict[int, str]) -> SparseLinear | SparseConv2d:
        """The sparse layer running ``choice`` (``{batch size: kernel}``) with the packed weights it uses."""
        plan = {self.row.rows[b]: k for b, k in choice.items()}
        used = {k: self.packed[k] for k in set(choice.values()) if k in self.packed}
        return build_sparse_layer(self.module, self.name, plan, used, self.weight)

    def run(self, kind: str, x: torch.Tensor) -> torch.Tensor:
        """The layer's output for ``x`` with ``kind`` (``"dense"``: the original module)."""
        if kind == DENSE:
            return self.module(x)
        probe = self.probe
        probe.forced = kind
        try:
            return probe(x)
        finally:
            probe.forced = None


def prepare_layer(name: str, module: nn.Module, survey: Survey, kernels: Sequence[str] | None,
                  pattern: str | None, force: str | None, weights: str = "fp32",
                  tolerance: float | None = None) -> tuple[LayerSummary, LayerWork | None]:
    """The layer's summary row and, if it can be converted, its packed candidates (else a note says why)."""
    w = module.weight.detach()
    w2d = w.reshape(w.shape[0], -1)
    nnz = int(torch.count_nonzero(w2d))
    row = LayerSummary(name, type(module).__name__, tuple(w.shape), 1.0 - nnz / max(w2d.numel(), 1),
                       bytes={DENSE: w2d.numel() * w2d.element_size()})
    why = why_not(module, survey.inputs.get(name), survey.calls.get(name, 0))
    cands: list[tuple[str, dict[str, int]]] = []
    if why is None:
        conv = tuple(module.kernel_size) if isinstance(module, nn.Conv2d) else None
        cands = candidate_kernels(w2d, kernels, pattern, weights, conv)
        if force is not None:
            cands = [c for c in cands if c[0] == force][:1]
        if not cands:
            why = ("no sparse kernel fits this weight on its device; kept dense" if force is None else
                   f"the forced kernel {force!r} does not fit this weight on its device; kept dense")
    if why is not None:
        row.note = why
        return row, None
    packed = pack_candidates(w2d, cands)
    for key, p in packed.packed.items():
        row.formats[key] = p.describe()
        row.bytes[key] = p.nbytes
    if SEMI_STRUCTURED in packed.kinds:
        row.formats[SEMI_STRUCTURED] = "torch 2:4 semi-structured (CUDA)"
    if not packed.kinds:
        row.note = "; ".join([*packed.notes, "no kernel could pack this weight; kept dense"])
        return row, None
    return row, LayerWork(name, module, w, row, survey.inputs[name], packed.packed, list(packed.kinds),
                          list(packed.notes), tolerance=tolerance)


def predict(work: LayerWork, batch_sizes: Sequence[int], batch0: int, screen: bool) -> None:
    """Rows, predicted times and the candidates worth timing at every batch size (all of them unless ``screen``)."""
    w2d = work.weight.reshape(work.weight.shape[0], -1)
    conv = isinstance(work.module, nn.Conv2d)
    cpu = work.weight.device.type == "cpu"
    for b in batch_sizes:
        work.row.rows[b] = rows_at(work.x0, work.module, b, batch0)
        if not (screen and cpu):  # no cost model for CUDA: time every candidate
            work.worth_timing[b] = list(work.kinds)
            continue
        p = Product(work.row.rows[b], w2d.shape[1], w2d.shape[0], conv)
        predicted = {DENSE: COST_MODEL.dense(p)}
        predicted.update({k: COST_MODEL.sparse(p, k, packed) for k, packed in work.packed.items()})
        work.row.predicted[b] = predicted
        # bfloat16 / int8 kernels (two per layer) are always timed: their cost is per weight, not per
        # nonzero, which the probe (a 10%-dense weight) does not show
        work.worth_timing[b] = [k for k in work.kinds if k in plausible(predicted) or
                                (k in work.packed and work.packed[k].kernel in K.QUANTIZED)]


def choose(work: LayerWork, b: int, batch0: int, *, margin: float, budget: float, clock: Clock) -> str:
    """Time dense against the candidates worth timing at ``b``; the kernel to run there (``"dense"`` if none won)."""
    kinds = work.worth_timing.get(b, [])
    if not kinds:
        return DENSE
    left = clock.left_for_layers()
    if left <= 0:
        work.notes.append(f"batch {b}: not timed (time limit reached)")
        return DENSE
    xb = layer_input(work.x0, work.module, b, batch0)
    fns = {DENSE: (lambda: work.module(xb))}
    fns.update({k: (lambda k=k: work.run(k, xb)) for k in kinds})

    def hopeless(medians: dict[str, float]) -> bool:  # no candidate is even as fast as dense
        return all(t >= medians[DENSE] for k, t in medians.items() if k != DENSE)

    cap = min(budget, left)
    prepare = evict if work.cold and work.row.rows[b] <= SPMV_MAX_ROWS else None
    try:
        times = _time_candidates(fns, work, budget=budget, max_seconds=cap, stop=hopeless,
                                 device=work.weight.device, prepare=prepare)
    except timing.TimingCapReached as e:
        if cap < budget:
            work.notes.append(f"batch {b}: not (fully) timed (time limit reached)")
        else:
            slowest = max(e.estimate.values(), default=0.0)
            quick = _from_first_calls(e.estimate, fns, _competing(work, b, e.estimate))
            if quick is not None:
                work.row.times[b] = dict(e.estimate)
                work.notes.append(f"batch {b}: {quick} chosen from one timed call each, at least "
                                  f"{1 / (1 - QUICK_MARGIN):.2g}x faster than dense ({e}: budget={budget:g} s)")
                return quick
            work.notes.append(f"batch {b}: not timed within budget={budget:g} s ({e}; the slowest call took "
                              f"{slowest * 1e3:.3g} ms); dense used")
        return DENSE
    work.row.times[b] = times
    sparse = {k: times[k] for k in _competing(work, b, times)}
    best = min(sparse, key=sparse.get) if sparse else None
    return best if best is not None and sparse[best] < times[DENSE] * (1 - margin) else DENSE


def _competing(work: LayerWork, b: int, times: dict[str, float]) -> list[str]:
    """The timed kernels that may be chosen at ``b``.

    Up to SPMV_MAX_ROWS rows the kernels run matrix-vector products, bound by reading the
    weight: a format larger than the dense weight can only win by noise (a near-dense CSR at
    batch 1 once timed 7% faster at conversion and 24% slower a minute later)."""
    kinds = [k for k in times if k != DENSE]
    return work.no_larger_than_dense(kinds) if work.row.rows[b] <= SPMV_MAX_ROWS else kinds


def _from_first_calls(estimate: dict[str, float], fns: dict[str, Any], competing: list[str]) -> str | None:
    """A kernel clearly faster than dense on the calls made before the budget ran out (``None``: none).

    Large layers (a ResNet's 3x3 convolutions at batch 16: 20-60 ms a call; a language
    model's 49152x576 head: 10 ms a row) do not fit three rounds in a small budget, but one
    call of each is long enough to measure: a kernel is taken from it only when it beat
    dense by :data:`QUICK_MARGIN`.
    """
    if set(estimate) != set(fns) or DENSE not in estimate:
        return None
    sparse = {k: estimate[k] for k in competing}
    best = min(sparse, key=sparse.get) if sparse else None
    return best if best is not None and sparse[best] < estimate[DENSE] * (1 - QUICK_MARGIN) else None


def _time_candidates(fns: dict[str, Any], work: LayerWork, **kw: Any) -> dict[str, float]:
    """Interleaved medians of ``fns``; a candidate that raises (e.g. 2:4 unsupported for a shape) is dropped."""
    try:
        return timing.interleaved_medians(fns, min_repeats=LAYER_ROUNDS, **kw)
    except timing.TimingCapReached:
        raise
    except Exception as e:  # noqa: BLE001
        bad = _first_failing(fns)
        if bad is None or bad == DENSE:
            raise
        work.notes.append(f"{bad}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        fns = {k: f for k, f in fns.items() if k != bad}
        work.kinds = [k for k in work.kinds if k != bad]
        if len(fns) == 1:
            return timing.interleaved_medians(fns, min_repeats=LAYER_ROUNDS, **kw)
        return _time_candidates(fns, work, **kw)


def _first_failing(fns: dict[str, Any]) -> str | None:
    for name, fn in fns.items():
        try:
            fn()
        except Exception:  # noqa: BLE001
            return name
    return None


def agrees(work: LayerWork, kind: str, b: int, batch0: int) -> bool:
    """Whether ``kind`` matches the dense layer at batch ``b`` (``allclose``); a mismatch is noted.

    A bfloat16 / int8 kernel is compared with the dense layer holding its rounded weight
    (the kernel must compute exactly that product); how far the rounding moves the
    layer's output from the float32 layer's is checked against ``work.tolerance``
    (:class:`~.errors.ConversionError` naming the layer when it is exceeded).
    """
    xb = layer_input(work.x0, work.module, b, batch0)
    ref = work.module(xb)
    packed = work.packed.get(kind)
    if packed is not None and packed.kernel in K.QUANTIZED:
        rounded = torch.from_numpy(packed.to_dense()).reshape(work.module.weight.shape)
        exact = torch.func.functional_call(work.module, {"weight": rounded}, (xb,))  # no copy of the module
        change = relative_change(exact, ref)
        work.row.error[kind] = max(change, work.row.error.get(kind, 0.0))
        if work.tolerance is not None and change > work.tolerance:
            raise ConversionError(
                f"layer {work.name!r}: {K.QUANTIZED[packed.kernel]} weights ({kind}) change its output by "
                f"{change:.3g} of its largest value at batch {b}, more than tolerance={work.tolerance:g}; "
                f"convert with weights='fp32', raise the tolerance, or keep this layer out (kernels=...)")
        ref = exact
    # int8 one-row kernels round the activations to 24 bits (kernels/bitmask.py: an error of at most
    # 2^-23 max|x| per term), which with an outlier feature in x exceeds 1e-5 of the largest output
    # while staying 100x below the int8 rounding of the weight itself
    ok, worst = close(work.run(kind, xb), ref, atol_rel=QUANTIZED_ATOL if packed is not None and
                      packed.kernel in K.QUANTIZED else EXACT_ATOL)
    if not ok:
        work.notes.append(f"{kind} disagreed with the dense layer at batch {b} (max abs error {worst:.3g}); dense used")
    return ok


def relative_change(y: torch.Tensor, ref: torch.Tensor) -> float:
    """``max |y - ref| / max |ref|`` (0 for empty or all-zero outputs)."""
    if not ref.numel():
        return 0.0
    scale = float(ref.float().abs().max())
    return float((y.float() - ref.float()).abs().max()) / scale if scale > 0 else 0.0


def close(y: torch.Tensor, ref: torch.Tensor, atol_rel: float = EXACT_ATOL) -> tuple[bool, float]:
    """``(allclose at rtol 1e-4 and atol atol_rel of the largest |ref|, the largest absolute error)``."""
    err = (y.float() - ref.float()).abs()
    scale = ref.float().abs().max().clamp_min(1e-6) if ref.numel() else torch.tensor(1.0)
    worst = float(err.max()) if err.numel() else 0.0
    return bool(torch.allclose(y.float(), ref.float(), rtol=1e-4, atol=atol_rel * float(scale))), worst
