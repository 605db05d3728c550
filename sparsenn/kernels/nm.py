"""N:M weights (at most N nonzeros in every M consecutive columns of a row): no pointers.

Layout (:func:`pack`): ``val (out, G*N)`` float32 and ``off (out, G*N)`` uint8, for the
``G = in / M`` groups of each row: slot ``g*N + q`` holds the ``q``-th kept value of
group ``g`` and its column within the group (a group with fewer than ``N`` nonzeros
pads with zeros at offset 0). This is the layout of NVIDIA's 2:4 sparse tensor cores
(Mishra et al. 2021, "Accelerating sparse deep neural networks") with one byte per
offset instead of ``log2(M)`` bits.

The regularity is what the kernels use: every row has the same number of slots, the
column of slot ``g*N + q`` is ``g*M + off`` (no row pointers, no wide indices), and the
loops over the ``N`` slots of a group and over groups are compiled for the pattern's
constant ``N`` and ``M`` (one compiled kernel per pattern). Batched products use the
tiles and register accumulators of :mod:`.csr`, with the columns visited in panels of
``256 // M`` groups so that a panel's activations stay in cache.
"""

from __future__ import annotations

import numpy as np
from numba import carray, prange

from ._jit import jit, sync_threads
from ._simd import LANES, stack_alloc, vadd, vfma, vzero
from ._tiles import SPMV_MAX_ROWS, pack_tiles, tile_width

ROWS = 128
PANEL_COLUMNS = 256


def check_nm(weight: np.ndarray, n: int, m: int) -> str | None:
    """Why ``weight`` is not N:M sparse along its rows (``None`` if it is)."""
    if not (isinstance(n, int) and isinstance(m, int)) or not 0 < n < m <= 256:
        return f"N:M needs integers 0 < n < m <= 256, got {n}:{m}"
    rows, cols = weight.shape
    if cols % m:
        return f"{cols} columns are not a multiple of m={m}"
    most = int((weight.reshape(rows, cols // m, m) != 0).sum(-1).max(initial=0))
    if most > n:
        return f"a group of {m} columns holds {most} nonzeros (> n={n})"
    return None


def pack(weight: np.ndarray, n: int, m: int) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """``(arrays, meta)`` of a float32 ``(out, in)`` N:M matrix (ValueError if it is not N:M)."""
    w = np.ascontiguousarray(weight, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"weight must be a 2-D (out, in) matrix, got shape {w.shape}")
    why = check_nm(w, n, m)
    if why is not None:
        raise ValueError(f"weight is not {n}:{m} sparse: {why}")
    out, cols = w.shape
    groups = w.reshape(out, cols // m, m)
    # positions of the kept values first (stable: in column order), zeros after
    order = np.argsort(groups == 0, axis=-1, kind="stable")[..., :n]
    val = np.take_along_axis(groups, order, axis=-1)
    off = np.where(val != 0, order, 0).astype(np.uint8)
    arrays = {"val": np.ascontiguousarray(val.reshape(out, -1)), "off": np.ascontiguousarray(off.reshape(out, -1))}
    return arrays, {"out": out, "in": cols, "n": n, "m": m}


def unpack(arrays: dict[str, np.ndarray], meta: dict[str, int]) -> np.ndarray:
    """The dense ``(out, in)`` matrix back (for tests and checks)."""
    out, cols, n, m = meta["out"], meta["in"], meta["n"], meta["m"]
    val = arrays["val"].reshape(out, cols // m, n)
    off = arrays["off"].reshape(out, cols // m, n).astype(np.int64)
    w = np.zeros((out, cols // m, m), dtype=np.float32)
    r, g, q = np.nonzero(val)
    w[r, g, off[r, g, q]] = val[r, g, q]
    return w.reshape(out, cols)


_CACHE: dict[tuple, object] = {}


def _make_spmm(n: int, m: int, width: int):
    C = width // LANES
    GU = max(1, (8 // C) // n)  # groups per step: at least 8 accumulators in flight where possible
    SLOTS = GU * n
    ACC = SLOTS * width
    BUF = ROWS * width
    GPP = max(1, PANEL_COLUMNS // m)  # groups per panel

    @jit
    def spmm(val, off, bias, xp, y):
        rows, out = y.shape
        ntiles, cols, _ = xp.shape
        ngroups = val.shape[1] // n
        nblocks = (out + ROWS - 1) // ROWS
        xf = xp.reshape(-1)
        for job in prange(nblocks * ntiles):
            blk = job // ntiles
            tile = job % ntiles
            i0 = blk * ROWS
            nr = min(ROWS, out - i0)
            buf = carray(stack_alloc(BUF), (BUF,))
            acc = carray(stack_alloc(ACC), (ACC,))
            for q in range(BUF // LANES):
                vzero(buf, q * LANES)
            xt = tile * cols * width
            for g0 in range(0, ngroups, GPP):
                g1 = min(ngroups, g0 + GPP)
                for r in range(nr):
                    vr = val[i0 + r]
                    orow = off[i0 + r]
                    for q in range(ACC // LANES):
                        vzero(acc, q * LANES)
                    g = g0
                    while g + GU <= g1:
                        for gu in range(GU):
                            for q in range(n):
                                k = (g + gu) * n + q
                                j = xt + ((g + gu) * m + np.intp(orow[k])) * width
                                w = vr[k]
                                for c in range(C):
                                    vfma(acc, (gu * n + q) * width + c * LANES, w, xf, j + c * LANES)
                        g += GU
                    while g < g1:
                        for q in range(n):
                            k = g * n + q
                            j = xt + (g * m + np.intp(orow[k])) * width
                            w = vr[k]
                            for c in range(C):
                                vfma(acc, q * width + c * LANES, w, xf, j + c * LANES)
                        g += 1
                    for s in range(SLOTS):
                        for c in range(C):
                            vadd(buf, r * width + c * LANES, acc, s * width + c * LANES)
            b0 = tile * width
            for t in range(min(width, rows - b0)):
                for r in range(nr):
                    y[b0 + t, i0 + r] = buf[r * width + t] + bias[i0 + r]

    return spmm


def _make_spmv(n: int, m: int):
    GU = max(1, 8 // n)  # groups per step: 8 scalar accumulators in flight
    ACC = GU * n

    @jit
    def spmv(val, off, bias, x, y):
        out = y.shape[0]
        ngroups = val.shape[1] // n
        for i in prange(out):
            vr = val[i]
            orow = off[i]
            acc = carray(stack_alloc(ACC), (ACC,))
            for a in range(ACC):
                acc[a] = 0.0
            g = 0
            while g + GU <= ngroups:
                for gu in range(GU):
                    for q in range(n):
                        k = (g + gu) * n + q
                        acc[gu * n + q] += vr[k] * x[(g + gu) * m + np.intp(orow[k])]
                g += GU
            while g < ngroups:
                for q in range(n):
                    k = g * n + q
                    acc[q] += vr[k] * x[g * m + np.intp(orow[k])]
                g += 1
            s = bias[i]
            for a in range(ACC):
                s += acc[a]
            y[i] = s

    return spmv


def _kernel(kind: str, n: int, m: int, width: int = 0):
    key = (kind, n, m, width)
    if key not in _CACHE:
        _CACHE[key] = _make_spmm(n, m, width) if kind == "spmm" else _make_spmv(n, m)
    return _CACHE[key]


def matmul(arrays: dict[str, np.ndarray], meta: dict[str, int], x: np.ndarray, bias: np.ndarray,
           y: np.ndarray) -> None:
    """``y[:] = x @ W.T + bias`` for float32 ``x (B, in)``, ``bias (out,)``, C-contiguous ``y (B, out)``."""
    sync_threads()
    n, m = meta["n"], meta["m"]
    val, off = arrays["val"], arrays["off"]
    rows = x.shape[0]
    if rows <= SPMV_MAX_ROWS:
        spmv = _kernel("spmv", n, m)
        for b in range(rows):
            spmv(val, off, bias, x[b], y[b])
        return
    width = tile_width(rows)
    _kernel("spmm", n, m, width)(val, off, bias, pack_tiles(x, width), y)
