"""A small cost model: which sparse kernels could beat a layer's dense product, before timing any.

Timing every kernel on every layer is what made converting a ResNet-18 take minutes:
on 3x3 convolutions at 80% the sparse product (im2col + kernel) is several times
slower than PyTorch's dense convolution, and each timed call of a large layer costs
milliseconds. So :func:`sparsenn.convert` first *predicts* each candidate's time and
the dense layer's time from the product's shape and a few rates of this CPU, and times
only the candidates predicted to be within :data:`SLACK` of the dense layer.

The model is a roofline per engine, rows ``R``, ``K`` inputs, ``N`` outputs
(a convolution's product: ``R`` output pixels, ``K = in_channels * kh * kw``):

- dense (``F.linear`` / ``F.conv2d``): ``call + max(weight bytes / stream,
  R*K*N / madds)``; ``madds`` is measured at 16, 64 and 256 rows (small products
  run slower), separately for linear and convolution (oneDNN's direct convolution);
- direct sparse convolution (kernel ``conv``): dense's time x density x
  :data:`DIRECT_CONV_RATE` (it is not probed);
- sparse kernel: ``call + R * packed bytes / stream`` for ``R <= SPMV_MAX_ROWS``
  (matrix-vector products, bound by reading the weight), else ``call + R * stored
  values / rate + R*K * tile`` (the batched kernels first copy the input into
  transposed tiles); a convolution adds ``R*K * im2col`` for its patches (``F.unfold``
  and the copy that transposes them into ``(R, K)`` rows, the larger part; counted on
  one thread: one image is unfolded by one thread).

The rates are measured once per process, on one thread (a parallel region stalls
whenever a busy machine deschedules one of its threads; the model divides the work by
the thread count), on small probes (a 512x512
weight at 1, 16, 64 and 256 rows, and for the kernels at 1024 rows; a 128-channel 3x3
convolution on 4x4 to 16x16 maps; im2col of 64 channels on 32x32 and 64x64 maps and
2048 x 512 activations for the tiles, larger than L2 as real layers' inputs are), each the best of a few calls, so
a preempted call does not skew them: well under a second in all, plus each
kernel's first call (numba's compile or cache load, which timing would pay anyway).
A kernel family is probed only when some layer has it as a candidate. The model only
decides what is worth timing; the choice itself is always measured.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .. import kernels as K
from ..kernels._jit import sync_threads
from ..kernels._tiles import SPMV_MAX_ROWS, pack_tiles, tile_width
from .layers import DENSE, SparseConv2d, SparseLinear

#: the direct convolution's time per stored weight over dense ``F.conv2d``'s per weight (measured 2.1-3.1x
#: faster at 90% on ResNet-18's 3x3 layers, i.e. about 2.5-4.5; so at 2.5 it is timed below ~80% density)
DIRECT_CONV_RATE = 2.5
SLACK = 2.0  # a candidate is timed when predicted at most this many times the dense layer's time
_PROBE_OUT, _PROBE_IN, _PROBE_DENSITY = 512, 512, 0.1
_REPEATS = 7


@dataclass(frozen=True)
class Product:
    """A layer's matrix product at one batch size: ``rows x inputs`` times ``(outputs x inputs)^T``."""

    rows: int
    inputs: int
    outputs: int
    conv: bool = False


@dataclass(frozen=True)
class Rates:
    """Seconds per call, bytes/s streamed in matrix-vector products, multiply-adds/s of batched products.

    ``batched``: ``((rows, rate), ...)`` measured at increasing row counts; :meth:`seconds`
    interpolates the times they imply.
    """

    call: float
    stream: float
    batched: tuple[tuple[int, float], ...]

    def seconds(self, rows: int, per_row: float) -> float:
        """Seconds of ``rows`` rows of ``per_row`` units each: the measured times, made non-decreasing
        (a probe slowed by another job cannot make more rows look cheaper than fewer), interpolated
        linearly between measured row counts and proportionally outside them."""
        points, most = [], 0.0
        for measured, rate in self.batched:
            most = max(most, measured * per_row / rate)
            points.append((measured, most))
        if rows <= points[0][0]:
            return rows / points[0][0] * points[0][1]
        for (m0, t0), (m1, t1) in zip(points, points[1:]):
            if rows <= m1:
                return t0 + (t1 - t0) * (rows - m0) / (m1 - m0)
        return rows / points[-1][0] * points[-1][1]


def _best(fn: Callable[[], object], repeats: int = _REPEATS, max_seconds: float = 0.05) -> float:
    """The fastest of up to ``repeats`` calls after one untimed call (seconds); at least two calls are
    timed, and no further one starts after ``max_seconds``."""
    fn()
    best = float("inf")
    end = time.perf_counter() + max_seconds
    for i in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        if i >= 1 and t0 > end:
            break
    return max(best, 1e-9)


@contextmanager
def _one_thread():
    """Run the probes on one thread (torch's and numba's), then restore the thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    sync_threads()
    try:
        yield
    finally:
        torch.set_num_threads(before)
        sync_threads()


def _probe_weight(key: str, packed_meta: dict[str, int]) -> torch.Tensor:
    """A 512x512 float32 weight of the family of ``key``, about 10% dense."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(_PROBE_OUT, _PROBE_IN, generator=g)
    if key.startswith("bsr"):
        h, bw = packed_meta["h"], packed_meta["w"]
        keep = torch.rand(_PROBE_OUT // h, _PROBE_IN // bw, generator=g) < _PROBE_DENSITY
        return w * keep.repeat_interleave(h, 0).repeat_interleave(bw, 1)
    if key == "nm":
        n, m = packed_meta["n"], packed_meta["m"]
        scores = torch.rand(_PROBE_OUT, _PROBE_IN // m, m, generator=g)
        keep = scores >= scores.topk(n, dim=-1).values[..., -1:]
        return w * keep.reshape(_PROBE_OUT, _PROBE_IN)
    return w * (torch.rand(_PROBE_OUT, _PROBE_IN, generator=g) < _PROBE_DENSITY)


class CostModel:
    """Predicted seconds of a layer's dense product and of its sparse candidates (rates measured lazily)."""

    def __init__(self) -> None:
        self._rates: dict[str, Rates] = {}
        self._per_element: dict[str, tuple[tuple[int, float], ...]] = {}

    # -- rates, measured once per process and thread count
    def _dense(self, conv: bool) -> Rates:
        key = "conv" if conv else "linear"
        if key not in self._rates:
            with _one_thread():
                self._rates[key] = self._probe_conv() if conv else self._probe_linear()
        return self._rates[key]

    @torch.no_grad()
    def _probe_linear(self) -> Rates:
        w = torch.randn(_PROBE_OUT, _PROBE_IN)
        tiny = torch.randn(8, 8)
        call = _best(lambda: F.linear(torch.ones(1, 8), tiny))
        madds = _PROBE_OUT * _PROBE_IN
        x1 = torch.randn(1, _PROBE_IN)
        t1 = _best(lambda: F.linear(x1, w))
        batched = []
        for rows in (16, 64, 256):
            x = torch.randn(rows, _PROBE_IN)
            batched.append((rows, rows * madds / max(_best(lambda: F.linear(x, w)) - call, 1e-9)))
        return Rates(call, 4 * madds / max(t1 - call, 1e-9), tuple(batched))

    @torch.no_grad()
    def _probe_conv(self) -> Rates:
        linear = self._dense(False)
        w = torch.randn(128, 128, 3, 3)
        tiny = torch.randn(4, 4, 1, 1)
        call = _best(lambda: F.conv2d(torch.ones(1, 4, 2, 2), tiny))
        madds = 128 * 128 * 9
        batched = []
        for side in (4, 8, 16):  # 16, 64 and 256 output pixels
            x = torch.randn(1, 128, side, side)
            t = _best(lambda: F.conv2d(x, w, padding=1))
            batched.append((side * side, side * side * madds / max(t - call, 1e-9)))
        return Rates(call, linear.stream, tuple(batched))

    def _element_cost(self, what: str, elements: int = 0) -> float:
        """Seconds per input element of copying ``elements`` of them into kernel tiles (``"tiles"``) or
        im2col patches (``"im2col"``: measured on 0.6M and 2.4M elements; larger copies cost more per
        element, the transposition missing the caches)."""
        if what not in self._per_element:
            with _one_thread():
                self._per_element[what] = self._probe_copy(what)
        per = self._per_element[what]
        # a large copy never costs less per element than a small one (monotone total under noisy probes)
        return per[0][1] if elements < per[-1][0] else max(per[0][1], per[-1][1])

    @torch.no_grad()
    def _probe_copy(self, what: str) -> tuple[tuple[int, float], ...]:
        if what == "tiles":
            x = np.random.default_rng(0).standard_normal((2048, _PROBE_IN), dtype=np.float32)  # 4 MB: past L2
            return ((0, _best(lambda: pack_tiles(x, tile_width(2048))) / x.size),)
        layer = SparseConv2d.from_conv(torch.nn.Conv2d(64, 64, 3, padding=1), {1: DENSE})
        tiers = []
        for side in (32, 64):  # 2.4 and 9.4 MB of patches
            x = torch.randn(1, 64, side, side)
            # contiguous(): for one image the patches are a transposed view, copied by the kernel's input
            t = _best(lambda: layer.patches(x)[0].contiguous(), repeats=3)
            tiers.append((side * side * 64 * 9, t / (side * side * 64 * 9)))
        return tuple(tiers)

    def _kernel(self, key: str, meta: dict[str, int]) -> Rates:
        if key not in self._rates:
            with _one_thread():
                self._rates[key] = self._probe_kernel(key, meta)
        return self._rates[key]

    @torch.no_grad()
    def _probe_kernel(self, key: str, meta: dict[str, int]) -> Rates:
        kernel = "bsr" if key.startswith("bsr") else key
        options = {"h": meta["h"], "w": meta["w"]} if kernel == "bsr" else \
            {"n": meta["n"], "m": meta["m"]} if kernel == "nm" else {}
        w = _probe_weight(key, meta)
        packed = K.pack(w, kernel, **options)
        layer = SparseLinear(_PROBE_OUT, _PROBE_IN, {1: key}, {key: packed})
        tiny_w = torch.eye(16)  # a diagonal: 1 nonzero per row and group, divisible into every block
        tiny = SparseLinear(16, 16, {1: key}, {key: K.pack(tiny_w, kernel, **options)})
        x = torch.ones(1, 16)
        call = _best(lambda: tiny(x))
        stored = packed.arrays["val"].size
        x1 = torch.randn(1, _PROBE_IN)
        t1 = _best(lambda: layer.matmul_rows(x1, key))
        call = min(call, t1 / 2)
        tiles = self._element_cost("tiles")
        batched = []
        for rows in (16, 64, 1024):  # 1024 rows: 2 MB in and out, past L2
            x = torch.randn(rows, _PROBE_IN)
            t = _best(lambda: layer.matmul_rows(x, key)) - call - rows * _PROBE_IN * tiles
            batched.append((rows, rows * stored / max(t, 1e-9)))
        return Rates(call, packed.nbytes / max(t1 - call, 1e-9), tuple(batched))

    # -- predictions (the probes ran on one thread; batched work is spread over the threads)
    def dense(self, p: Product) -> float:
        """Predicted seconds of the dense layer (``F.linear`` / ``F.conv2d``)."""
        r = self._dense(p.conv)
        threads = torch.get_num_threads()
        weight_bytes = 4 * p.inputs * p.outputs
        if p.rows <= SPMV_MAX_ROWS and not p.conv:
            return r.call + weight_bytes / (r.stream * threads)
        return r.call + max(weight_bytes / r.stream, r.seconds(p.rows, p.inputs * p.outputs)) / threads

    def sparse(self, p: Product, key: str, packed: K.Packed) -> float:
        """Predicted seconds of ``packed`` (stored under ``key``) on this product, copies of the input included."""
        if packed.kernel == "conv":  # direct sparse convolution: per nonzero, DIRECT_CONV_RATE x dense's madd time
            density = packed.arrays["val"].size / max(p.inputs * p.outputs, 1)
            return self.dense(p) * density * DIRECT_CONV_RATE
        r = self._kernel(key, packed.meta)
        if p.rows <= SPMV_MAX_ROWS:
            work = p.rows * packed.nbytes / r.stream
        else:
            # at least the SpMV prediction at its largest row count: monotone across the switch
            work = max(r.seconds(p.rows, packed.arrays["val"].size), SPMV_MAX_ROWS * packed.nbytes / r.stream) \
                + p.rows * p.inputs * self._element_cost("tiles")
        # im2col (F.unfold and a transposing copy) is not counted as parallel: one image runs on one thread
        im2col = p.rows * p.inputs * self._element_cost("im2col", p.rows * p.inputs) if p.conv else 0.0
        return r.call + work / torch.get_num_threads() + im2col


COST_MODEL = CostModel()  # one per process: the rates of this CPU


def plausible(predicted: dict[str, float], slack: float = SLACK) -> list[str]:
    """The sparse kernels of ``predicted`` (``{kernel: seconds}``, ``"dense"`` included) worth timing."""
    dense = predicted[DENSE]
    return [k for k, t in predicted.items() if k != DENSE and t <= slack * dense]
