"""Max pooling of contiguous NCHW float32 activations (the stem of ResNet-style networks).

PyTorch's CPU ``max_pool2d`` on a contiguous NCHW tensor took 2.60 ms for ResNet-18's stem pool at
batch 1 (64 x 112 x 112, 3 x 3, stride 2) on two cores of a Xeon, more than any of the network's sparse
convolutions, and 42.1 ms at batch 16; on a channels-last copy 0.56 and 23.6 ms (copy included); this
kernel 0.216 and 5.07 ms (2026-12-07, ``bench/pooling.py``).
:func:`max_pool2d` takes each plane's output row in two passes that both read memory in order:
the maximum over the window's ``kh`` input rows, column by column (a vector loop), then over each
window's ``kw`` columns of that row. One parallel job per (image, channel) plane.

Results equal PyTorch's (a maximum is exact): NaN propagates as there (``v > m or v != v``);
positions in the padding are skipped. Dilation 1 and ``ceil_mode=False`` only (:func:`supported`).
"""

from __future__ import annotations

import numba
import numpy as np
from numba import prange

from ._jit import FASTMATH, jit, sync_threads

_NEG_INF = np.float32(-np.inf)


@numba.njit(inline="always", fastmath=set(FASTMATH))
def _pool_body(x, kh, kw, sh, sw, ph, pw, out):  # pragma: no cover  (compiled, inlined into the kernels below)
    n, c, h, w = x.shape
    ho, wo = out.shape[2], out.shape[3]
    xf = x.reshape(-1)
    of = out.reshape(-1)
    lo = min(wo, (pw + sw - 1) // sw)  # first output column whose window is inside the row
    hi = max(lo, min(wo, (w - kw + pw) // sw + 1))  # past the last one
    for plane in prange(n * c):
        row = np.empty(w, dtype=np.float32)
        for oy in range(ho):
            iy0 = oy * sh - ph
            first = True
            for ky in range(kh):
                iy = iy0 + ky
                if 0 <= iy < h:
                    src = xf[(plane * h + iy) * w:(plane * h + iy + 1) * w]
                    if first:
                        row[:] = src
                        first = False
                    else:
                        for ix in range(w):
                            v = src[ix]
                            m = row[ix]
                            row[ix] = v if (v > m or v != v) else m
            dst = of[(plane * ho + oy) * wo:(plane * ho + oy + 1) * wo]
            if first:  # no input row in this window (cannot happen with padding <= kernel / 2)
                dst[:] = _NEG_INF
                continue
            for ox in range(lo, hi):
                ix0 = ox * sw - pw
                m = row[ix0]
                for kx in range(1, kw):
                    v = row[ix0 + kx]
                    m = v if (v > m or v != v) else m
                dst[ox] = m
            for e in range(lo + wo - hi):  # the edge columns, whose windows reach into the padding
                ox = e if e < lo else hi + e - lo
                ix0 = ox * sw - pw
                m = _NEG_INF
                for kx in range(kw):
                    ix = ix0 + kx
                    if 0 <= ix < w:
                        v = row[ix]
                        m = v if (v > m or v != v) else m
                dst[ox] = m


@jit
def _pool(x, kh, kw, sh, sw, ph, pw, out):
    _pool_body(x, kh, kw, sh, sw, ph, pw, out)


# ResNet's stem pool, its window constant so that its loops unroll (6.5 -> 5.2 ms at batch 16, ad hoc)
@jit
def _pool_3x3_s2(x, ph, pw, out):
    _pool_body(x, 3, 3, 2, 2, ph, pw, out)


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def supported(kernel_size, stride, padding, dilation=1, ceil_mode: bool = False) -> bool:
    """Whether :func:`max_pool2d` computes ``F.max_pool2d`` with these settings: dilation 1, no ``ceil_mode``,
    a kernel of at most 16 x 16 and padding at most half of it (PyTorch's own limit)."""
    try:
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (_pair(v) for v in (kernel_size, stride or kernel_size, padding,
                                                                      dilation))
    except (TypeError, ValueError, IndexError):
        return False
    return (not ceil_mode and (dh, dw) == (1, 1) and 1 <= kh <= 16 and 1 <= kw <= 16 and sh >= 1 and sw >= 1
            and 0 <= ph <= kh // 2 and 0 <= pw <= kw // 2)


def output_size(h: int, w: int, kernel_size, stride, padding) -> tuple[int, int]:
    """The ``(rows, columns)`` of the output for an ``h x w`` input (``stride`` ``None``: the kernel size); below 1
    where the input is smaller than the kernel with its padding."""
    (kh, kw), (sh, sw), (ph, pw) = _pair(kernel_size), _pair(stride or kernel_size), _pair(padding)
    return (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1


def max_pool2d(x: np.ndarray, kernel_size, stride, padding) -> np.ndarray:
    """``F.max_pool2d(x, kernel_size, stride, padding)`` for a C-contiguous float32 ``x (N, C, H, W)``
    (``stride`` ``None``: the kernel size). ValueError for settings :func:`supported` refuses or an
    input smaller than the kernel."""
    if not supported(kernel_size, stride, padding):
        raise ValueError(f"unsupported max pooling: kernel {kernel_size}, stride {stride}, padding {padding} "
                         "(dilation 1, kernel at most 16, padding at most half the kernel)")
    if not (isinstance(x, np.ndarray) and x.dtype == np.float32 and x.ndim == 4 and x.flags.c_contiguous):
        raise ValueError("x must be a C-contiguous float32 (N, C, H, W) array")
    (kh, kw), (sh, sw), (ph, pw) = _pair(kernel_size), _pair(stride or kernel_size), _pair(padding)
    n, c, h, w = x.shape
    ho, wo = output_size(h, w, kernel_size, stride, padding)
    if ho < 1 or wo < 1:
        raise ValueError(f"input of {h} x {w} is smaller than the {kh} x {kw} kernel with padding {(ph, pw)}")
    out = np.empty((n, c, ho, wo), dtype=np.float32)
    sync_threads()
    if not out.size:
        return out
    if (kh, kw, sh, sw) == (3, 3, 2, 2):
        _pool_3x3_s2(x, ph, pw, out)
    else:
        _pool(x, kh, kw, sh, sw, ph, pw, out)
    return out


__all__ = ["max_pool2d", "output_size", "supported"]
