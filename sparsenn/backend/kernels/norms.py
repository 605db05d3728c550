"""Normalizations in one compiled call: RMSNorm of a few rows (decoding: one row per token), and a
residual add followed by LayerNorm over many rows (encoders).

``F.rms_norm`` on a CPU float32 row of a few hundred values runs as six tensor operations
(square, mean, add, rsqrt, two multiplies): about 10 us of dispatch for well under 1 us of
arithmetic, and a LLaMA-style decoder normalizes twice per block and token (Zhang &
Sennrich 2019, "Root Mean Square Layer Normalization"). :func:`rms_norm_rows` does it in
one serial loop per row, the sum of squares accumulated in float64.

:func:`add_layer_norm_rows` is BERT's ``LayerNorm(h + residual)`` after every attention and
feed-forward block (Ba et al. 2016, "Layer Normalization"; Devlin et al. 2019) as one parallel
pass over rows: PyTorch computes the sum into a new tensor and then normalizes it, two passes
over 6 MB per call at batch 16 x 128 tokens. Each row's mean and variance are taken in two
passes over the sum (held in ``out``, in cache), each in 16 float32 lanes added by a fixed tree
(:func:`._simd.vsum`), so results do not depend on the thread count.
"""

from __future__ import annotations

import numpy as np
from numba import carray, prange, types
from numba.extending import intrinsic

from ._jit import jit, sync_threads
from ._simd import LANES, _check_f32, _vec_ptr, splat, stack_alloc, vadd, vsum, vzero


@jit(parallel=False)
def rms_norm_rows(x, weight, eps, out):  # pragma: no cover  (compiled)
    """``out[..., :] = x[..., :] / sqrt(mean(x[..., :]^2) + eps) * weight`` for each row of the C-contiguous
    ``x`` (any number of dimensions, the last one ``weight``'s length); ``out`` has ``x``'s shape."""
    d = weight.shape[0]
    flat, res = x.reshape(-1), out.reshape(-1)
    for i in range(flat.shape[0] // d):
        s = 0.0
        for j in range(i * d, i * d + d):
            v = np.float64(flat[j])
            s += v * v
        r = np.float32(1.0 / np.sqrt(s / d + eps))
        for j in range(d):
            res[i * d + j] = flat[i * d + j] * r * weight[j]


@intrinsic
def vsquared_deviation(typingctx, acc, aoff, x, xoff, mean):
    """``acc[aoff:aoff+16] += (x[xoff:xoff+16] - mean)^2``."""
    if not _check_f32(acc, x):
        return None
    sig = types.void(acc, types.intp, x, types.intp, types.float32)

    def codegen(context, builder, sig, args):
        pa = _vec_ptr(context, builder, sig.args[0], args[0], args[1])
        d = builder.fsub(builder.load(_vec_ptr(context, builder, sig.args[2], args[2], args[3]), align=4),
                         splat(builder, args[4]))
        builder.store(builder.fadd(builder.load(pa, align=4), builder.fmul(d, d)), pa, align=4)
        return context.get_dummy_value()

    return sig, codegen


@jit
def _add_layer_norm(h, residual, weight, bias, eps, out):  # pragma: no cover  (compiled)
    d = weight.shape[0]
    rows = h.shape[0] // d
    for i in prange(rows):
        acc = carray(stack_alloc(LANES), (LANES,))
        hs, rs, row = h[i * d:i * d + d], residual[i * d:i * d + d], out[i * d:i * d + d]  # slices: no wraparound
        for j in range(d):
            row[j] = hs[j] + rs[j]
        vzero(acc, 0)
        j = 0
        while j + LANES <= d:
            vadd(acc, 0, row, j)
            j += LANES
        total = vsum(acc, 0)
        for k in range(j, d):
            total += row[k]
        mean = np.float32(total / d)
        vzero(acc, 0)
        j = 0
        while j + LANES <= d:
            vsquared_deviation(acc, 0, row, j, mean)
            j += LANES
        squares = vsum(acc, 0)
        for k in range(j, d):
            squares += (row[k] - mean) * (row[k] - mean)
        rstd = np.float32(1.0 / np.sqrt(np.float64(squares) / d + eps))
        for j in range(d):
            row[j] = (row[j] - mean) * rstd * weight[j] + bias[j]


def add_layer_norm_rows(h: np.ndarray, residual: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float,
                        out: np.ndarray) -> None:
    """``out = layer_norm(h + residual) * weight + bias`` over the last dimension (``weight``'s length, > 0):
    float32 C-contiguous arrays, ``h``, ``residual`` and ``out`` of one shape; ``out`` may be ``h``."""
    arrays = (h, residual, weight, bias, out)
    if not all(isinstance(a, np.ndarray) and a.dtype == np.float32 and a.flags.c_contiguous for a in arrays):
        raise ValueError("add_layer_norm_rows takes float32 C-contiguous arrays")
    d = weight.shape[0] if weight.ndim == 1 else -1
    if d <= 0 or bias.shape != weight.shape or h.shape != residual.shape or h.shape != out.shape \
            or h.ndim == 0 or h.shape[-1] != d:
        raise ValueError(f"shapes do not fit: h {h.shape}, residual {residual.shape}, out {out.shape}, "
                         f"weight {weight.shape}, bias {bias.shape}")
    if h.size:
        sync_threads()  # as many threads as torch uses
        _add_layer_norm(h.reshape(-1), residual.reshape(-1), weight, bias, float(eps), out.reshape(-1))


__all__ = ["add_layer_norm_rows", "rms_norm_rows"]
