"""N:M weights (at most N nonzeros in every M consecutive columns of a row): no pointers.

Slots. Each row has ``G = in / M`` groups and ``G*N`` slots: slot ``g*N + q`` holds the
``q``-th kept value of group ``g`` and its column within the group (a group with fewer
than ``N`` nonzeros pads with zeros at offset 0), the layout of NVIDIA's 2:4 sparse
tensor cores (Mishra et al. 2021, "Accelerating sparse deep neural networks") with one
byte per offset instead of ``log2(M)`` bits.

Order (:func:`pack`): ``val`` (float32) and ``off`` (uint8) are flat arrays of every
slot, stored in the order the kernels read them: output rows in blocks of ``ROWS``,
columns in panels of ``GPP = 256 // M`` groups, and within a (block, panel) each row's
slots of that panel. So the weights stream sequentially through memory (a row-major
``(out, G*N)`` array read panel by panel jumps by a whole row every few hundred bytes,
which measured 25% slower), and the start of any (block, panel, row) segment is
arithmetic: no pointers, no wide indices.

The regularity is what the kernels use: every row has the same number of slots, the
column of slot ``g*N + q`` is ``g*M + off``, and the loops over the ``N`` slots of a
group and over groups are compiled for the pattern's constant ``N`` and ``M`` (one
compiled kernel per pattern). Batched products use the tiles and register accumulators
of :mod:`.csr`; a panel's activations (256 columns) stay in cache while the block's
rows read them.
"""

from __future__ import annotations

import numpy as np
from numba import carray, prange

from ._activations import activate_rows
from ._jit import jit, sync_threads
from ._layout import array_problem, meta_problem, names_problem
from ._simd import LANES, stack_alloc, vadd, vfma, vzero
from ._tiles import SPMV_MAX_ROWS, float_matrix, tile_width, tiles_in_order, write_block

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


def _order(out: int, groups: int, n: int, m: int) -> np.ndarray:
    """Flat position of slot ``(row, g*n + q)`` in the stored order (an ``(out, groups*n)`` array)."""
    gpp = max(1, PANEL_COLUMNS // m)
    slots = groups * n
    i = np.arange(out)[:, None]
    k = np.arange(slots)[None, :]
    blk, r = i // ROWS, i % ROWS
    nr = np.minimum(ROWS, out - blk * ROWS)
    g = k // n
    p = g // gpp
    ng = np.minimum(gpp, groups - p * gpp)
    return blk * ROWS * slots + nr * n * p * gpp + r * ng * n + (g % gpp) * n + k % n


def pack(weight: np.ndarray, n: int, m: int) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """``(arrays, meta)`` of a float32 ``(out, in)`` N:M matrix (ValueError if it is not N:M)."""
    w = float_matrix(weight)
    why = check_nm(w, n, m)
    if why is not None:
        raise ValueError(f"weight is not {n}:{m} sparse: {why}")
    out, cols = w.shape
    grouped = w.reshape(out, cols // m, m)
    # positions of the kept values first (stable: in column order), zeros after
    kept = np.argsort(grouped == 0, axis=-1, kind="stable")[..., :n]
    val = np.take_along_axis(grouped, kept, axis=-1).reshape(out, -1)
    off = np.where(val != 0, kept.reshape(out, -1), 0).astype(np.uint8)
    order = _order(out, cols // m, n, m)
    flat_val = np.empty(val.size, dtype=np.float32)
    flat_off = np.empty(off.size, dtype=np.uint8)
    flat_val[order] = val
    flat_off[order] = off
    return {"val": flat_val, "off": flat_off}, {"out": out, "in": cols, "n": n, "m": m}


def unpack(arrays: dict[str, np.ndarray], meta: dict[str, int]) -> np.ndarray:
    """The dense ``(out, in)`` matrix back (for tests and checks)."""
    out, cols, n, m = meta["out"], meta["in"], meta["n"], meta["m"]
    order = _order(out, cols // m, n, m)
    val = arrays["val"][order].reshape(out, cols // m, n)
    off = arrays["off"][order].reshape(out, cols // m, n).astype(np.int64)
    w = np.zeros((out, cols // m, m), dtype=np.float32)
    r, g, q = np.nonzero(val)
    w[r, g, off[r, g, q]] = val[r, g, q]
    return w.reshape(out, cols)


def check_packed(arrays: dict[str, np.ndarray], meta: dict[str, int]) -> str | None:
    """Why ``(arrays, meta)`` is not a layout :func:`pack` makes (``None`` if it is).

    Every run of ``n`` stored slots is one group (the stored order keeps a group's slots
    together), so the check needs no order array: offsets below ``m``; in each group the
    nonzero slots come first with strictly increasing offsets, the zero slots after them
    with offset 0.
    """
    why = names_problem(arrays, ("val", "off")) or meta_problem(meta, ("out", "in", "n", "m"))
    if why:
        return why
    out, cols, n, m = (int(meta[k]) for k in ("out", "in", "n", "m"))
    if out < 1 or cols < 1:
        return f"needs at least one row and one column, got out={out}, in={cols}"
    if not 0 < n < m <= 256:
        return f"N:M needs 0 < n < m <= 256, got {n}:{m}"
    if cols % m:
        return f"in={cols} is not a multiple of m={m}"
    slots = out * (cols // m) * n
    why = (array_problem(arrays["val"], "val", np.float32, (slots,))
           or array_problem(arrays["off"], "off", np.uint8, (slots,)))
    if why:
        return why
    off = arrays["off"].reshape(-1, n)
    nz = arrays["val"].reshape(-1, n) != 0
    if off.size and int(off.max()) >= m:
        return f"off holds {int(off.max())}, outside a group of m={m} columns"
    if (off[~nz] != 0).any():
        return "a zero (padding) slot has a nonzero offset"
    if n > 1:
        if (nz[:, 1:] & ~nz[:, :-1]).any():
            return "a group stores a nonzero slot after a zero (padding) slot"
        if (nz[:, 1:] & (off[:, 1:] <= off[:, :-1])).any():
            return "a group's offsets do not increase strictly (a column stored twice or out of order)"
    return None


_CACHE: dict[tuple, object] = {}


def _make_spmm(n: int, m: int, width: int):
    C = width // LANES
    GU = max(1, (8 // C) // n)  # groups per step: at least 8 accumulators in flight where possible
    SLOTS = GU * n
    ACC = SLOTS * width
    BUF = ROWS * width
    GPP = max(1, PANEL_COLUMNS // m)  # groups per panel

    @jit
    def spmm(val, off, bias, xp, y, by_tile, act):
        out = y.shape[1]
        ntiles, cols, _ = xp.shape
        ngroups = cols // m
        slots = ngroups * n
        nblocks = (out + ROWS - 1) // ROWS
        xf = xp.reshape(-1)
        for job in prange(nblocks * ntiles):
            blk, tile = (job % nblocks, job // nblocks) if by_tile else (job // ntiles, job % ntiles)
            i0 = blk * ROWS
            nr = min(ROWS, out - i0)
            buf = carray(stack_alloc(BUF), (BUF,))
            acc = carray(stack_alloc(ACC), (ACC,))
            for q in range(BUF // LANES):
                vzero(buf, q * LANES)
            xt = tile * cols * width
            for g0 in range(0, ngroups, GPP):
                ng = min(ngroups, g0 + GPP) - g0
                xo = xt + g0 * m * width
                base = i0 * slots + nr * n * g0
                for r in range(nr):
                    s = base + r * ng * n
                    vs = val[s:s + ng * n]  # slices: local indices from 0, no wraparound checks
                    os = off[s:s + ng * n]
                    for q in range(ACC // LANES):
                        vzero(acc, q * LANES)
                    g = 0
                    while g + GU <= ng:
                        for gu in range(GU):
                            for q in range(n):
                                k = (g + gu) * n + q
                                j = xo + ((g + gu) * m + np.intp(os[k])) * width
                                w = vs[k]
                                for c in range(C):
                                    vfma(acc, (gu * n + q) * width + c * LANES, w, xf, j + c * LANES)
                        g += GU
                    while g < ng:
                        for q in range(n):
                            k = g * n + q
                            j = xo + (g * m + np.intp(os[k])) * width
                            w = vs[k]
                            for c in range(C):
                                vfma(acc, q * width + c * LANES, w, xf, j + c * LANES)
                        g += 1
                    for a in range(SLOTS):
                        for c in range(C):
                            vadd(buf, r * width + c * LANES, acc, a * width + c * LANES)
            write_block(buf, width, y, tile * width, i0, nr, bias, act)

    return spmm


def _make_spmv(n: int, m: int):
    GU = max(1, 8 // n)  # groups per step: 8 scalar accumulators in flight
    ACC = GU * n
    GPP = max(1, PANEL_COLUMNS // m)

    @jit
    def spmv(val, off, bias, x, y):
        out = y.shape[0]
        ngroups = x.shape[0] // m
        slots = ngroups * n
        nblocks = (out + ROWS - 1) // ROWS
        for blk in prange(nblocks):
            i0 = blk * ROWS
            nr = min(ROWS, out - i0)
            for r in range(nr):
                y[i0 + r] = bias[i0 + r]
            acc = carray(stack_alloc(ACC), (ACC,))
            for g0 in range(0, ngroups, GPP):
                ng = min(ngroups, g0 + GPP) - g0
                xs = x[g0 * m:(g0 + ng) * m]
                base = i0 * slots + nr * n * g0
                for r in range(nr):
                    s = base + r * ng * n
                    vs = val[s:s + ng * n]
                    os = off[s:s + ng * n]
                    for a in range(ACC):
                        acc[a] = 0.0
                    g = 0
                    while g + GU <= ng:
                        for gu in range(GU):
                            for q in range(n):
                                k = (g + gu) * n + q
                                acc[gu * n + q] += vs[k] * xs[(g + gu) * m + np.intp(os[k])]
                        g += GU
                    while g < ng:
                        for q in range(n):
                            k = g * n + q
                            acc[q] += vs[k] * xs[g * m + np.intp(os[k])]
                        g += 1
                    t = np.float32(0.0)
                    for a in range(ACC):
                        t += acc[a]
                    y[i0 + r] += t

    return spmv


def _kernel(kind: str, n: int, m: int, width: int = 0):
    key = (kind, n, m, width)
    if key not in _CACHE:
        _CACHE[key] = _make_spmm(n, m, width) if kind == "spmm" else _make_spmv(n, m)
    return _CACHE[key]


def matmul(arrays: dict[str, np.ndarray], meta: dict[str, int], x: np.ndarray, bias: np.ndarray,
           y: np.ndarray, act: int = 0) -> None:
    """``y[:] = act(x @ W.T + bias)`` for float32 ``x (B, in)``, ``bias (out,)``, C-contiguous ``y (B, out)``;
    ``act`` a code of :data:`._activations.ACTIVATIONS` (0: none)."""
    if not y.flags.c_contiguous:
        raise ValueError("y must be C-contiguous")
    sync_threads()
    n, m = meta["n"], meta["m"]
    val, off = arrays["val"], arrays["off"]
    rows = x.shape[0]
    if rows <= SPMV_MAX_ROWS:
        spmv = _kernel("spmv", n, m)
        for b in range(rows):
            spmv(val, off, bias, x[b], y[b])
        if act:
            activate_rows(y, act)
        return
    width = tile_width(rows)
    xp, by_tile = tiles_in_order(x, width, -(-y.shape[1] // ROWS), val.nbytes + off.nbytes)
    _kernel("spmm", n, m, width)(val, off, bias, xp, y, by_tile, act)
