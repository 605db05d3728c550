"""Bitmask weights with float32, bfloat16 or int8 values: bytes per weight that fall from 50% sparsity on.

CSR pays for every nonzero with an index (1-4 bytes) and saves nothing in bytes below
about 2/3 sparsity with float32 values. Here each row stores one bit per column and
its nonzero values, packed: at sparsity ``s`` a weight costs ``1/8 + (1 - s) * v`` bytes
(``v`` = 4, 2 or 1), e.g. 0.625 bytes at 50% with int8 values against 4 for the dense
float32 weight and 1 for a dense int8 one. The bitmask-plus-values layout is that of
SparseRT / DeepSparse-style CPU engines and of the "bitmask" sparse-compressor of
compressed-tensors; the matrix-vector product expands the packed values into vector
lanes with AVX-512's ``vexpandps`` / ``vpexpandb`` (Intel SDM, "VPEXPAND"), so it runs
at the rate of a dense product on a fraction of the bytes.

Layout (:func:`pack`). ``words = ceil(in / 64)``; row ``i`` has the 64-bit words
``mask[i*words:(i+1)*words]`` (column ``64*k + b`` is bit ``b`` of word ``k``; bits past
``in`` are 0) and its values ``val[ptr[i]:ptr[i+1]]`` in column order. ``ptr`` is int64
(``out + 1``). Values:

- ``float32``: the nonzeros as they are;
- ``bfloat16``: rounded to nearest-even bfloat16, stored as their ``uint16`` bits;
- ``int8``: ``round(w / scale)`` with a symmetric per-output-channel scale
  ``scale[i] = max_j |w_ij| / 127`` (float32 ``(out,)``); the product is
  ``scale[i] * sum_j q_ij x_j``: values are converted to float32 in registers (or multiplied
  as integers, below) and the scale applied once per row.

The *dense* variants (``dense_bf16``, ``dense_int8``) store every entry (``val`` of
``out * words * 64`` entries, zero-padded rows) and no mask: for layers that are not
sparse but should read fewer bytes (a language model's head).

Products (:func:`matmul`):

- up to ``SPMV_MAX_ROWS`` rows (token-by-token decoding), float32 and bfloat16 values (and int8 ones
  on CPUs without the instructions below): per row, four 16-lane accumulators over the row's 64-column
  words; each 16-column chunk is one expand-load of ``popcount`` values, converted to float32, times 16
  activations (one fused multiply-add). The start of every chunk's values comes from the row pointer
  plus ``popcount`` of the word's lower bits, so the four chunks of a word are independent. Parallel
  over rows. This is compute-bound (3-4 cycles per 16 columns whatever the sparsity: the
  conversions and multiplies of all 64 columns of a word), and for int8 values it was slower than the
  dense int8 product.
- the same with int8 values on x86-64 CPUs with AVX-512 VBMI2 and VNNI (:data:`._simd.INT8_DOT`: Ice
  Lake, Sapphire Rapids, Zen 4 and later), for bitmask and dense rows: integer arithmetic. The
  activations are quantized once per call to ``B = 8 * PLANES = 24``-bit integers ``X_j = round(x_j 2^e)``
  with one power-of-two scale (``max|x| 2^e`` in ``[2^22, 2^23)``), stored as three byte planes
  (:func:`_quantize_x`). Per 64-column word: one 64-byte load and one register ``vpexpandb`` of the row's
  values, then one ``vpdpbusd`` per plane (64 byte products summed in fours into 16 int32 lanes), where
  the float32 path converted and multiplied four vectors of 16; two rows at a time share the planes.
  The int32 sums are combined into exact int64 row totals ``T_i = sum_j q_ij X_j`` and
  ``y_i = float32(T_i 2^-e scale_i + bias_i)`` (in float64). About 2x faster than the float32 path at any
  sparsity with the weights in cache (1.7x for dense rows, which from memory are bandwidth-bound either
  way); a step takes two rows far apart (:func:`_gemv_i8_body`).

  What this computes: the exact product of the dequantized weight with ``x`` rounded to multiples of
  ``2^-e``, so with ``m = max_j |x_j|``

      ``|y_i - (scale_i sum_j q_ij x_j + bias_i)| <= scale_i * sum_j |q_ij| * m * 2^-23 + 2^-24 |y_i|``

  (plus float64 roundings, ``2^-52`` relative). The first term, the activations' rounding, is
  ``2^-22 sum_j |q_ij| <= 254 * in * 2^-23`` times the error bound the int8 weights already carry on the
  largest activation alone (``scale_i / 2 * m``): under 2% for ``in = 576``, 12% for 4096; in practice
  it is of the size of float32 accumulation error. Sums are exact integers, so results never
  depend on the thread count; they differ from the float32 path's in the last bits. Activations holding
  a NaN or an infinity, or whose largest entry is below ``2^-105``, go to the float32 path (NaNs
  propagate as there). 32-bit activations (four planes) would make the first term negligible for
  1.2x the time of the sparse product.
- more rows (prefill, batches): the weight is expanded to float32 in row blocks of at most ~4 MB (a
  buffer kept per thread) and multiplied with PyTorch's dense GEMM. The stored bytes are what the format
  says; the arithmetic is that of the dense product.

Except for the integer path above, results are those of the dequantized weight (float32 sums, fused
multiply-adds); for int8 the error against the float32 weight is at most ``scale/2`` per weight.
"""

from __future__ import annotations

import math
import threading

import numpy as np
import torch
from numba import carray, prange

from ..formats.quantized import bf16_bits, bf16_value, quantize_int8
from ._jit import jit, sync_threads
from ._layout import array_problem, meta_problem, names_problem, pointer_problem
from ._simd import (
    DOT_ACC,
    DOT_BLOCK,
    INT8_DOT,
    LANES,
    PLANES,
    X_PLANES,
    address,
    f32_pointer,
    popcount,
    stack_alloc,
    vdot_fold,
    vdot_totals,
    vexpand_dot,
    vexpand_fma,
    vexpand_store,
    vload_dot,
    vload_fma,
    vsum,
    vzero,
)
from ._tiles import SPMV_MAX_ROWS, float_matrix

WORD = 64  # columns per mask word
VALUES = ("float32", "bfloat16", "int8")  # meta["values"] is the index into this
_DTYPES = (np.float32, np.uint16, np.int8)
BLOCK_BYTES = 4 << 20  # float32 bytes of one expanded row block in the batched product


def pack(weight: np.ndarray, values: str = "float32", dense: bool = False) -> tuple[dict, dict]:
    """``(arrays, meta)`` of a float32 ``(out, in)`` matrix with ``values`` in :data:`VALUES`.

    ``dense=True`` (bfloat16 / int8 only) stores every entry and no mask.
    """
    if values not in VALUES:
        raise ValueError(f"values must be one of {', '.join(VALUES)}; got {values!r}")
    if dense and values == "float32":
        raise ValueError("a dense float32 weight is the dense layer itself; dense packing takes bfloat16 or int8")
    w = float_matrix(weight)
    out, cols = w.shape
    words = max(1, -(-cols // WORD))
    kind = VALUES.index(values)
    meta = {"out": out, "in": cols, "words": words, "values": kind, "dense": int(dense)}
    scale = None
    if values == "int8":
        q, scale = quantize_int8(w)
    elif values == "bfloat16":
        q = bf16_bits(w)
    else:
        q = w
    arrays: dict[str, np.ndarray] = {}
    if dense:
        val = np.zeros((out, words * WORD), dtype=_DTYPES[kind])
        val[:, :cols] = q
        arrays["val"] = val.reshape(-1)
    else:
        nz = w != 0
        padded = np.zeros((out, words * WORD), dtype=bool)
        padded[:, :cols] = nz
        arrays["mask"] = np.packbits(padded.reshape(out, words, WORD), axis=-1,
                                     bitorder="little").view(np.uint64).reshape(-1).copy()
        ptr = np.zeros(out + 1, dtype=np.int64)
        np.cumsum(nz.sum(axis=1), out=ptr[1:])
        arrays["ptr"] = ptr
        arrays["val"] = np.ascontiguousarray(q[nz])
    if scale is not None:
        arrays["scale"] = scale
    return arrays, meta


def _names(meta: dict) -> tuple[str, ...]:
    base = ("val",) if meta["dense"] else ("mask", "ptr", "val")
    return base + (("scale",) if meta["values"] == 2 else ())


def unpack(arrays: dict[str, np.ndarray], meta: dict[str, int]) -> np.ndarray:
    """The dense float32 ``(out, in)`` matrix the kernel multiplies with (dequantized)."""
    out, cols, words, kind = meta["out"], meta["in"], meta["words"], meta["values"]
    val = arrays["val"]
    v = bf16_value(val) if kind == 1 else val.astype(np.float32)
    if meta["dense"]:
        w = v.reshape(out, words * WORD)[:, :cols].copy()
    else:
        bits = np.unpackbits(arrays["mask"].view(np.uint8).reshape(out, words * 8), axis=1, bitorder="little")
        nz = bits[:, :cols].astype(bool)
        w = np.zeros((out, cols), dtype=np.float32)
        w[nz] = v
    if kind == 2:
        w *= arrays["scale"][:, None]
    return w


def check_packed(arrays: dict[str, np.ndarray], meta: dict[str, int]) -> str | None:
    """Why ``(arrays, meta)`` is not a layout :func:`pack` makes (``None`` if it is): names and dtypes,
    lengths from the metadata, ``ptr`` from 0 and non-decreasing, each row's pointer span equal to the
    number of its mask bits, no bits past ``in``, finite positive scales."""
    why = meta_problem(meta, ("out", "in", "words", "values", "dense"))
    if why:
        return why
    out, cols, words, kind, dense = (int(meta[k]) for k in ("out", "in", "words", "values", "dense"))
    if out < 1 or cols < 1:
        return f"needs at least one row and one column, got out={out}, in={cols}"
    if words != -(-cols // WORD):
        return f"metadata 'words' must be ceil(in / {WORD}) = {-(-cols // WORD)}, got {words}"
    if kind not in (0, 1, 2):
        return f"metadata 'values' must be 0 (float32), 1 (bfloat16) or 2 (int8), got {kind}"
    if dense not in (0, 1) or (dense and kind == 0):
        return f"metadata 'dense' must be 0, or 1 with bfloat16/int8 values; got {dense}"
    why = names_problem(arrays, _names(meta))
    if why:
        return why
    val = arrays["val"]
    if dense:
        why = array_problem(val, "val", _DTYPES[kind], (out * words * WORD,))
    else:
        mask, ptr = arrays["mask"], arrays["ptr"]
        why = (array_problem(mask, "mask", np.uint64, (out * words,)) or array_problem(ptr, "ptr", np.int64, (out + 1,))
               or array_problem(val, "val", _DTYPES[kind], (-1,)) or pointer_problem(ptr, val.size))
        if not why:
            counts = np.bitwise_count(mask).reshape(out, words).sum(axis=1, dtype=np.int64)
            bad = np.nonzero(counts != np.diff(ptr))[0]
            if bad.size:
                i = int(bad[0])
                why = f"row {i} has {int(counts[i])} mask bits but ptr spans {int(ptr[i + 1] - ptr[i])} values"
            elif cols % WORD and (mask.reshape(out, words)[:, -1] >> np.uint64(cols % WORD)).any():
                why = f"mask bits set past in={cols}"
    if not why and kind == 2:
        scale = arrays["scale"]
        why = array_problem(scale, "scale", np.float32, (out,))
        if not why and not (np.isfinite(scale).all() and (scale > 0).all()):
            why = "scale must hold finite positive numbers"
    return why


def _spmv_body(mask, ptr, val, scale, words, x, bias, y):
    """``y = scale * (W x) + bias`` for one row ``x`` (padded to ``words * 64``)."""
    out = y.shape[0]
    for i in prange(out):
        acc = carray(stack_alloc(64), (64,))
        for u in range(4):
            vzero(acc, u * LANES)
        p = np.intp(ptr[i])
        m0 = i * words
        for k in range(words):
            wd = np.intp(mask[m0 + k])
            xo = k * 64
            vexpand_fma(acc, 0, val, p, wd & 0xFFFF, x, xo)
            vexpand_fma(acc, 16, val, p + popcount(wd & 0xFFFF), (wd >> 16) & 0xFFFF, x, xo + 16)
            vexpand_fma(acc, 32, val, p + popcount(wd & 0xFFFFFFFF), (wd >> 32) & 0xFFFF, x, xo + 32)
            vexpand_fma(acc, 48, val, p + popcount(wd & 0xFFFFFFFFFFFF), (wd >> 48) & 0xFFFF, x, xo + 48)
            p += popcount(wd)
        s = (vsum(acc, 0) + vsum(acc, 16)) + (vsum(acc, 32) + vsum(acc, 48))
        y[i] = s * scale[i] + bias[i]


def _gemv_body(val, scale, words, x, bias, y):
    """``y = scale * (W x) + bias`` for a dense bfloat16 / int8 weight, one row ``x`` (padded)."""
    out = y.shape[0]
    width = words * 64
    for i in prange(out):
        acc = carray(stack_alloc(64), (64,))
        for u in range(4):
            vzero(acc, u * LANES)
        base = i * width
        for k in range(words):
            xo = k * 64
            vload_fma(acc, 0, val, base + xo, x, xo)
            vload_fma(acc, 16, val, base + xo + 16, x, xo + 16)
            vload_fma(acc, 32, val, base + xo + 32, x, xo + 32)
            vload_fma(acc, 48, val, base + xo + 48, x, xo + 48)
        s = (vsum(acc, 0) + vsum(acc, 16)) + (vsum(acc, 32) + vsum(acc, 48))
        y[i] = s * scale[i] + bias[i]


_XBITS = 8 * PLANES  # bits of a quantized activation
_XMAX = (1 << (_XBITS - 1)) - 1
_XCORRECTION = 8 * (PLANES - 1) + 7  # the top plane's products carry an extra 128 * 2^(8 (PLANES - 1))


@jit(parallel=False)
def _quantize_x(x, xq):
    """``x`` (``words * 64`` float32) as ``X_j = round(x_j * 2^e)``, :data:`._simd.PLANES` bytes each, with
    ``e`` such that ``max|x| * 2^e`` lies in ``[2^(B-2), 2^(B-1))`` (``B = 8 * PLANES``): ``|X_j| < 2^(B-1)``
    and ``|X_j 2^-e - x_j| <= 2^-(e+1) <= max|x| 2^-(B-1)``. Written to ``xq`` (``words * X_PLANES`` bytes)
    as byte planes per 64-column word: ``xq[X_PLANES k + 64 c + j]`` is byte ``c`` (0 lowest) of
    ``X_{64k+j}``. Returns ``(ok, e, top)``, ``top`` the sum of the top bytes as signed numbers; ``ok`` is
    false (nothing written) if ``x`` holds a NaN or an infinity, or ``max|x|`` is below ``2^(B-129)``
    (``2^e`` would not be a float32)."""
    n = x.shape[0]
    bits = x.view(np.int32)
    big = np.int32(0)
    for j in range(n):  # max |x_j| through the bits: an integer max reduction, which vectorizes
        big = max(big, bits[j] & np.int32(0x7FFFFFFF))
    if big == 0:
        xq[:] = 0
        return True, 0, 0
    # max|x| in [2^(E-127), 2^(E-126)) for the exponent field E (0 for subnormals)
    e = _XBITS - 1 - ((big >> 23) - 126)
    if big >= np.int32(0x7F800000) or e > 127:
        return False, 0, 0
    sc = np.float32(math.ldexp(1.0, e))
    top = 0
    for k in range(n // 64):
        for j in range(64):
            v = min(np.int32(np.rint(x[64 * k + j] * sc)), np.int32(_XMAX))  # exact product; 2^(B-1) - 1/2 rounds up
            b = X_PLANES * k + j
            for c in range(PLANES):
                xq[b + 64 * c] = np.uint8((v >> (8 * c)) & 255)
            top += v >> (_XBITS - 8)
    return True, e, top


@jit(parallel=False)
def _planes(words):
    """A 64-byte aligned ``uint8`` buffer of ``words * X_PLANES`` bytes."""
    buf = np.empty(words * X_PLANES + 64, dtype=np.uint8)
    o = (64 - address(buf) % 64) % 64
    return buf[o:o + words * X_PLANES]


@jit(parallel=False)
def _finish(total, offset, e, scale, bias, y):
    """``y = float32((total - offset) * 2^-e * scale + bias)``, in float64 (after the parallel loop: it
    vectorizes there, where two rows at a time in the loop cost 10% of a 576-column product)."""
    step = math.ldexp(1.0, -e)
    for i in range(y.shape[0]):
        y[i] = np.float32(np.float64(total[i] - offset) * (np.float64(scale[i]) * step) + np.float64(bias[i]))


ROWS = 2  # output rows per step of the integer kernels (the activation planes are loaded once for both)
_ACC = ROWS * DOT_ACC  # float32 slots of their accumulators


def _spmv_i8_body(mask, ptr, val, scale, words, x, bias, y):
    """``y = scale * (W x) + bias`` for int8 bitmask rows in integer arithmetic (module docstring); ``False``
    (``y`` untouched) where :func:`_quantize_x` declines ``x``. A step takes rows ``g`` and ``g + ceil(out / 2)``
    (see :func:`_gemv_i8_body`)."""
    xq = _planes(words)
    ok, e, top = _quantize_x(x, xq)
    if not ok:
        return False
    offset = np.int64(top) << _XCORRECTION
    out = y.shape[0]
    half = (out + 1) // 2
    total = np.empty(out, dtype=np.int64)
    for g in prange(half):
        acc = carray(stack_alloc(_ACC), (_ACC,))
        for u in range(_ACC // LANES):
            vzero(acc, u * LANES)
        i0 = g
        i1 = min(g + half, out - 1)  # odd out: the last step redoes row out - 1 (same value written twice)
        p = (np.intp(ptr[i0]), np.intp(ptr[i1]))
        m = (np.uintp(i0 * words), np.uintp(i1 * words))  # unsigned: no negative-index wraparound code
        for k in range(words):
            wd = (np.intp(mask[m[0] + np.uintp(k)]), np.intp(mask[m[1] + np.uintp(k)]))
            vexpand_dot(acc, val, p, wd, xq, k * X_PLANES)
            p = (p[0] + popcount(wd[0]), p[1] + popcount(wd[1]))
            if k % DOT_BLOCK == DOT_BLOCK - 1:
                vdot_fold(acc, ROWS)
        vdot_fold(acc, ROWS)
        t = vdot_totals(acc, ROWS)
        total[i0] = t[0]
        total[i1] = t[1]
    _finish(total, offset, e, scale, bias, y)
    return True


def _gemv_i8_body(val, scale, words, x, bias, y):
    """:func:`_spmv_i8_body` for a dense int8 weight. A step takes rows ``g`` and ``g + ceil(out / 2)``: two
    sequential streams. Adjacent rows, read word by word in turn, ran 2-3x slower from memory (Zen 4) when
    they were 512 bytes or more apart."""
    xq = _planes(words)
    ok, e, top = _quantize_x(x, xq)
    if not ok:
        return False
    offset = np.int64(top) << _XCORRECTION
    out = y.shape[0]
    half = (out + 1) // 2
    width = words * 64
    total = np.empty(out, dtype=np.int64)
    for g in prange(half):
        acc = carray(stack_alloc(_ACC), (_ACC,))
        for u in range(_ACC // LANES):
            vzero(acc, u * LANES)
        i0 = g
        i1 = min(g + half, out - 1)  # odd out: the last step redoes row out - 1 (same value written twice)
        for k in range(words):
            vload_dot(acc, val, (i0 * width + k * 64, i1 * width + k * 64), xq, k * X_PLANES)
            if k % DOT_BLOCK == DOT_BLOCK - 1:
                vdot_fold(acc, ROWS)
        vdot_fold(acc, ROWS)
        t = vdot_totals(acc, ROWS)
        total[i0] = t[0]
        total[i1] = t[1]
    _finish(total, offset, e, scale, bias, y)
    return True


# the *_serial kernels are for small layers, which should not start a parallel region (2-4 us; on a busy
# machine a parallel region whose second thread is not scheduled waits for the next tick, 4 ms)
_spmv_i8 = jit(_spmv_i8_body)
_spmv_i8_serial = jit(parallel=False)(_spmv_i8_body)
_gemv_i8 = jit(_gemv_i8_body)
_gemv_i8_serial = jit(parallel=False)(_gemv_i8_body)
_spmv = jit(_spmv_body)
_spmv_serial = jit(parallel=False)(_spmv_body)
_gemv = jit(_gemv_body)
_gemv_serial = jit(parallel=False)(_gemv_body)


def _checked(fn, fallback, sparse: bool):
    """``fn`` (an integer kernel), then ``fallback`` (the float32 one) where ``fn`` declines ``x``."""
    if sparse:
        def run(mask, ptr, val, scale, words, x, bias, y):
            if not fn(mask, ptr, val, scale, words, x, bias, y):
                fallback(mask, ptr, val, scale, words, x, bias, y)
    else:
        def run(val, scale, words, x, bias, y):
            if not fn(val, scale, words, x, bias, y):
                fallback(val, scale, words, x, bias, y)
    return jit(parallel=False)(run)


def _at(fn, sparse: bool):
    """``fn`` taking the addresses of ``x`` (``words * 64`` floats) and ``y`` (``out`` floats) instead of arrays."""
    if sparse:
        def at(mask, ptr, val, scale, words, xaddr, yaddr, bias):
            fn(mask, ptr, val, scale, words, carray(f32_pointer(xaddr), (words * 64,)), bias,
               carray(f32_pointer(yaddr), (bias.shape[0],)))
    else:
        def at(val, scale, words, xaddr, yaddr, bias):
            fn(val, scale, words, carray(f32_pointer(xaddr), (words * 64,)), bias,
               carray(f32_pointer(yaddr), (bias.shape[0],)))
    return jit(parallel=False)(at)


_FLOAT = {(True, False): _spmv, (True, True): _spmv_serial, (False, False): _gemv, (False, True): _gemv_serial}
_INT = {(True, False): _spmv_i8, (True, True): _spmv_i8_serial, (False, False): _gemv_i8, (False, True): _gemv_i8_serial}
# one-row products by (sparse, small, integer): small layers run on one thread; integer for int8 values on
# CPUs with INT8_DOT
_ROW = {**{k + (False,): f for k, f in _FLOAT.items()},
        **{k + (True,): _checked(_INT[k], _FLOAT[k], k[0]) for k in _INT}}
_AT = {k: _at(f, k[0]) for k, f in _ROW.items()}
SERIAL_BELOW = 1 << 16  # weights (out * words * 64) under which a one-row product runs on one thread


def _integer(meta: dict) -> bool:
    """Whether the one-row product of this weight runs in integers (int8 values on a CPU with INT8_DOT)."""
    return INT8_DOT and meta["values"] == 2


@jit
def _expand_rows(mask, ptr, val, scale, words, dense, r0, w):
    """``w[r] = `` row ``r0 + r`` of the dequantized weight, zero-padded to ``words * 64`` columns."""
    nr, width = w.shape
    wf = w.reshape(-1)
    for r in prange(nr):
        i = r0 + r
        s = scale[i]
        if dense:
            base = i * width
            for j in range(width):
                wf[r * width + j] = np.float32(val[base + j]) * s
            continue
        p = np.intp(ptr[i])
        for k in range(words):
            wd = np.intp(mask[i * words + k])
            o = r * width + k * 64
            vexpand_store(wf, o, val, p, wd & 0xFFFF)
            vexpand_store(wf, o + 16, val, p + popcount(wd & 0xFFFF), (wd >> 16) & 0xFFFF)
            vexpand_store(wf, o + 32, val, p + popcount(wd & 0xFFFFFFFF), (wd >> 32) & 0xFFFF)
            vexpand_store(wf, o + 48, val, p + popcount(wd & 0xFFFFFFFFFFFF), (wd >> 48) & 0xFFFF)
            p += popcount(wd)
        if s != 1.0:
            for j in range(width):
                wf[r * width + j] *= s


_LOCAL = threading.local()  # per Python thread: scratch buffers by shape
_EMPTY_U64 = np.zeros(0, dtype=np.uint64)  # mask/ptr stand-ins for the dense variants (never read)
_EMPTY_I64 = np.zeros(1, dtype=np.int64)


def _scratch(name: str, shape: tuple[int, ...]) -> np.ndarray:
    buffers = getattr(_LOCAL, "buffers", None)
    if buffers is None:
        buffers = _LOCAL.buffers = {}
    key = (name, shape)
    b = buffers.get(key)
    if b is None:
        if len(buffers) >= 16:
            buffers.pop(next(iter(buffers)))
        b = buffers[key] = np.zeros(shape, dtype=np.float32)
    return b


def _scale_of(arrays: dict, meta: dict) -> np.ndarray:
    s = arrays.get("scale")
    if s is not None:
        return s
    ones = getattr(_LOCAL, "ones", None)
    if ones is None or ones.shape[0] < meta["out"]:
        ones = _LOCAL.ones = np.ones(max(meta["out"], 1024), dtype=np.float32)
    return ones


def matmul(arrays: dict[str, np.ndarray], meta: dict[str, int], x: np.ndarray, bias: np.ndarray,
           y: np.ndarray) -> None:
    """``y[:] = x @ W.T + bias`` for float32 ``x (B, in)``, ``bias (out,)``, C-contiguous ``y (B, out)``."""
    if not y.flags.c_contiguous:
        raise ValueError("y must be C-contiguous")
    sync_threads()
    out, cols, words, dense = meta["out"], meta["in"], meta["words"], meta["dense"]
    scale = _scale_of(arrays, meta)
    val = arrays["val"]
    rows = x.shape[0]
    width = words * WORD
    if rows <= SPMV_MAX_ROWS:
        fn = _ROW[(not dense, out * width < SERIAL_BELOW, _integer(meta))]
        for b in range(rows):
            xb = x[b]
            if cols != width or not xb.flags.c_contiguous:
                xp = _scratch("x", (width,))  # shared by all widths' layers: zero what another left past `in`
                xp[:cols] = xb
                xp[cols:] = 0
                xb = xp
            if dense:
                fn(val, scale, words, xb, bias, y[b])
            else:
                fn(arrays["mask"], arrays["ptr"], val, scale, words, xb, bias, y[b])
        return
    mask = arrays.get("mask", _EMPTY_U64)
    ptr = arrays.get("ptr", _EMPTY_I64)
    step = max(1, min(out, BLOCK_BYTES // (4 * width)))
    xt = torch.from_numpy(np.ascontiguousarray(x))
    yt = torch.from_numpy(y)
    bt = torch.from_numpy(bias)
    for r0 in range(0, out, step):
        nr = min(step, out - r0)
        block = _scratch("w", (step, width))[:nr]
        if dense and val.dtype == np.uint16:
            bits = val.reshape(out, width)[r0:r0 + nr]
            block[:] = (bits.astype(np.uint32) << 16).view(np.float32)
        else:
            _expand_rows(mask, ptr, val, scale, words, dense, r0, block)
        wt = torch.from_numpy(block)[:, :cols]
        if nr == out:
            torch.addmm(bt, xt, wt.t(), out=yt)
        else:
            yt[:, r0:r0 + nr] = torch.addmm(bt[r0:r0 + nr], xt, wt.t())


def row_product(arrays: dict[str, np.ndarray], meta: dict[str, int], bias: np.ndarray):
    """A function ``f(x, y)`` computing ``y = W x + bias`` for one row: ``x`` a C-contiguous float32 CPU tensor
    of ``in`` elements, ``y`` one of ``out`` (the caller checks both), with everything else bound
    once: the path of token-by-token decoding, where a layer's product takes a few
    microseconds and each one of Python matters (the tensors' memory is passed by address,
    :func:`._simd.f32_pointer`, rather than through NumPy views)."""
    out, cols, words, dense = meta["out"], meta["in"], meta["words"], meta["dense"]
    scale = _scale_of(arrays, meta)
    val = arrays["val"]
    fn = _AT[(not dense, out * words * WORD < SERIAL_BELOW, _integer(meta))]
    args = (val, scale, words) if dense else (arrays["mask"], arrays["ptr"], val, scale, words)
    width = words * WORD
    if cols == width:
        def product(x, y):
            sync_threads()
            fn(*args, x.data_ptr(), y.data_ptr(), bias)
    else:
        def product(x, y):
            sync_threads()
            xp = _scratch("row", (width,))  # this thread's padded copy (threads may share the layer)
            xp[:cols] = x.reshape(-1).numpy()
            xp[cols:] = 0.0
            fn(*args, xp.ctypes.data, y.data_ptr(), bias)
    return product



def describe(meta: dict[str, int]) -> str:
    values = VALUES[meta["values"]]
    extra = ", per-row scales" if meta["values"] == 2 else ""
    return f"dense {values}{extra}" if meta["dense"] else f"bitmask + {values} values{extra}"
