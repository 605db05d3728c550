"""Unstructured sparse weights: row-blocked, column-panelled CSR with narrow indices.

Layout (:func:`pack`). Output rows are grouped in blocks of ``ROWS`` and input columns
in panels of ``panel`` columns; nonzeros are stored segment by segment in the order
(row block, panel, row, column): ``ptr`` (int32) has one entry per (row block, panel,
row) segment + 1, ``idx`` holds the column *within its panel* (uint8 when ``panel <=
256``, uint16 otherwise) and ``val`` the float32 values. With ``panel >= in`` this is
plain CSR with 16-bit column indices (kernel ``"csr"``); with 256-column panels
(kernel ``"csr_panel"``) the activations a panel touches (256 x 64 floats = 64 KB at
batch tile 64) stay in the first two cache levels while every row of the block reads
them, and each index is one byte. Sparse formats for GPUs and CPUs block the same way
(e.g. Buluc et al. 2009, "compressed sparse blocks"; the row/column tiling of Gale et
al. 2020, "Sparse GPU kernels for deep learning").

Products (``y = x W^T + b``, :func:`matmul`):

- batched: activations in tiles of ``T`` rows (:mod:`._tiles`); each parallel job is
  (row block, tile), taken in the order that reads fewer bytes (:func:`._tiles.tile_major`); for each row of a panel, the row's nonzeros are accumulated into
  ``T/16`` vector registers, ``U`` nonzeros at a time into separate registers (``U = 4``
  at ``T = 16``; ``U = 1`` at ``T = 64``, whose 4 independent chains measured 3-4%
  faster than ``U = 2`` on every BERT-FFN and MLP layer at batches 64 and 128: the loop
  is bound by loading the activations, not by the multiply-adds' latency); the block's
  partial outputs live in a stack buffer and are
  written once, transposed into ``y (B, out)`` 16 x 16 at a time in registers, with
  the bias (:func:`._tiles.write_block`).
- one row (``B < 4``): a matrix-vector product per row block with 8 scalar
  accumulators per segment.

Segments are read through slices (``val[s:e]``, indices from 0): numba then knows the
indices are not negative and drops its wraparound checks, which doubled the speed of
the matrix-vector product.
"""

from __future__ import annotations

import numpy as np
from numba import carray, prange

from ._activations import activate_rows
from ._jit import jit, sync_threads
from ._layout import array_problem, meta_problem, names_problem, pointer_problem, sorted_problem
from ._simd import LANES, stack_alloc, vadd, vfma, vzero
from ._tiles import SPMV_MAX_ROWS, float_matrix, tile_width, tiles_in_order, write_block

ROWS = 128  # output rows per block (one parallel job per block and batch tile)
PANEL = 256  # columns per panel of the "csr_panel" layout (uint8 indices)
MAX_PANEL = 65536  # widest panel a uint16 index can address


def pack(weight: np.ndarray, panel: int | None = None) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """``(arrays, meta)`` of a float32 ``(out, in)`` matrix; ``panel=None`` is one panel (plain CSR).

    ``meta``: ``out``, ``in``, ``panel``, ``rows`` (the row block). A weight with
    2**31 or more nonzeros does not fit the int32 pointers (ValueError).
    """
    w = float_matrix(weight)
    out, cols = w.shape
    panel = min(max(cols, 1), MAX_PANEL) if panel is None else int(panel)
    if not 1 <= panel <= MAX_PANEL:
        raise ValueError(f"panel must be in [1, {MAX_PANEL}], got {panel}")
    npanels = max(1, -(-cols // panel))
    nblocks = max(1, -(-out // ROWS))
    r, c = np.nonzero(w)  # row-major order
    if len(r) >= 2**31:
        raise ValueError(f"{len(r)} nonzeros do not fit int32 pointers (at most 2**31 - 1)")
    seg = ((r // ROWS) * npanels + c // panel) * ROWS + r % ROWS
    order = np.argsort(seg, kind="stable")  # stable: columns stay sorted within a segment
    ptr = np.zeros(nblocks * npanels * ROWS + 1, dtype=np.int32)
    np.cumsum(np.bincount(seg, minlength=nblocks * npanels * ROWS), out=ptr[1:])
    r, c = r[order], c[order]
    idx = (c % panel).astype(np.uint8 if panel <= 256 else np.uint16)
    arrays = {"ptr": ptr, "idx": idx, "val": w[r, c]}
    return arrays, {"out": out, "in": cols, "panel": panel, "rows": ROWS}


def unpack(arrays: dict[str, np.ndarray], meta: dict[str, int]) -> np.ndarray:
    """The dense ``(out, in)`` matrix back (for tests and checks)."""
    out, cols, panel, rows = meta["out"], meta["in"], meta["panel"], meta["rows"]
    npanels = max(1, -(-cols // panel))
    counts = np.diff(arrays["ptr"].astype(np.int64))
    seg = np.repeat(np.arange(len(counts)), counts)
    row = (seg // (npanels * rows)) * rows + seg % rows
    col = ((seg // rows) % npanels) * panel + arrays["idx"].astype(np.int64)
    w = np.zeros((out, cols), dtype=np.float32)
    w[row, col] = arrays["val"]
    return w


def check_packed(arrays: dict[str, np.ndarray], meta: dict[str, int]) -> str | None:
    """Why ``(arrays, meta)`` is not a layout :func:`pack` makes (``None`` if it is): every
    pointer in range and non-decreasing, one segment per (row block, panel, row), no
    entries in the last block's padding rows, indices inside their panel and the matrix
    and strictly increasing within a row, as many values as indices."""
    why = names_problem(arrays, ("ptr", "idx", "val")) or meta_problem(meta, ("out", "in", "panel", "rows"))
    if why:
        return why
    out, cols, panel, rows = (int(meta[k]) for k in ("out", "in", "panel", "rows"))
    if out < 1 or cols < 1:
        return f"needs at least one row and one column, got out={out}, in={cols}"
    if rows != ROWS:
        return f"metadata 'rows' must be {ROWS} (the kernels' row block), got {rows}"
    if not 1 <= panel <= MAX_PANEL:
        return f"panel must be in [1, {MAX_PANEL}], got {panel}"
    npanels, nblocks = -(-cols // panel), -(-out // ROWS)
    ptr, idx, val = arrays["ptr"], arrays["idx"], arrays["val"]
    why = (array_problem(ptr, "ptr", np.int32, (nblocks * npanels * ROWS + 1,))
           or array_problem(idx, "idx", np.uint8 if panel <= 256 else np.uint16, (-1,))
           or array_problem(val, "val", np.float32, (idx.size,))
           or pointer_problem(ptr, idx.size))
    if why:
        return why
    counts = np.diff(ptr).reshape(nblocks, npanels, ROWS)
    tail = out - (nblocks - 1) * ROWS  # rows of the last block
    if counts[-1, :, tail:].any():
        return f"entries stored for rows past out={out} (in the last row block's padding)"
    if idx.size and int(idx.max()) >= panel:
        return f"idx holds {int(idx.max())}, outside its {panel}-column panel"
    last = cols - (npanels - 1) * panel  # columns of the last panel
    if last < panel:
        in_last = np.repeat(np.tile(np.arange(npanels) == npanels - 1, nblocks), ROWS)
        mask = np.repeat(in_last, counts.reshape(-1))
        if mask.any() and int(idx[mask].max()) >= last:
            return f"a column index points past in={cols} (the last panel has {last} columns)"
    return sorted_problem(idx, ptr, "idx")


def _make_spmm(width: int, unroll: int):
    """The batched product for tiles of ``width`` rows, ``unroll`` nonzeros per step."""
    C = width // LANES
    ACC = unroll * width
    BUF = ROWS * width

    @jit
    def spmm(ptr, idx, val, panel, bias, xp, y, by_tile, act):
        out = y.shape[1]
        ntiles, cols, _ = xp.shape
        nblocks = (out + ROWS - 1) // ROWS
        npanels = (ptr.shape[0] - 1) // (nblocks * ROWS)
        xf = xp.reshape(-1)
        for job in prange(nblocks * ntiles):
            blk, tile = (job % nblocks, job // nblocks) if by_tile else (job // ntiles, job % ntiles)
            buf = carray(stack_alloc(BUF), (BUF,))
            acc = carray(stack_alloc(ACC), (ACC,))
            for q in range(BUF // LANES):
                vzero(buf, q * LANES)
            for p in range(npanels):
                base = (blk * npanels + p) * ROWS
                xo = (tile * cols + p * panel) * width
                for r in range(ROWS):
                    s = np.intp(ptr[base + r])
                    n = np.intp(ptr[base + r + 1]) - s
                    if n == 0:
                        continue
                    vs = val[s:s + n]  # slices: indices from 0 to n need no negative-index checks
                    js = idx[s:s + n]
                    for q in range(ACC // LANES):
                        vzero(acc, q * LANES)
                    k = 0
                    while k + unroll <= n:
                        for u in range(unroll):
                            j = xo + np.intp(js[k + u]) * width
                            w = vs[k + u]
                            for c in range(C):
                                vfma(acc, u * width + c * LANES, w, xf, j + c * LANES)
                        k += unroll
                    while k < n:
                        j = xo + np.intp(js[k]) * width
                        w = vs[k]
                        for c in range(C):
                            vfma(acc, c * LANES, w, xf, j + c * LANES)
                        k += 1
                    for u in range(unroll):
                        for c in range(C):
                            vadd(buf, r * width + c * LANES, acc, u * width + c * LANES)
            i0 = blk * ROWS
            write_block(buf, width, y, tile * width, i0, min(ROWS, out - i0), bias, act)

    return spmm


@jit
def _spmv(ptr, idx, val, panel, bias, x, y):
    """``y = W x + b`` for one row ``x (in,)``, ``y (out,)``: 8 scalar accumulators per segment."""
    out = y.shape[0]
    nblocks = (out + ROWS - 1) // ROWS
    npanels = (ptr.shape[0] - 1) // (nblocks * ROWS)
    for blk in prange(nblocks):
        i0 = blk * ROWS
        nr = min(ROWS, out - i0)
        for r in range(nr):
            y[i0 + r] = bias[i0 + r]
        for p in range(npanels):
            base = (blk * npanels + p) * ROWS
            xs = x[p * panel:]
            for r in range(nr):
                s = np.intp(ptr[base + r])
                n = np.intp(ptr[base + r + 1]) - s
                vs = val[s:s + n]
                js = idx[s:s + n]
                a0 = np.float32(0.0)
                a1 = np.float32(0.0)
                a2 = np.float32(0.0)
                a3 = np.float32(0.0)
                a4 = np.float32(0.0)
                a5 = np.float32(0.0)
                a6 = np.float32(0.0)
                a7 = np.float32(0.0)
                k = 0
                while k + 8 <= n:
                    a0 += vs[k] * xs[np.intp(js[k])]
                    a1 += vs[k + 1] * xs[np.intp(js[k + 1])]
                    a2 += vs[k + 2] * xs[np.intp(js[k + 2])]
                    a3 += vs[k + 3] * xs[np.intp(js[k + 3])]
                    a4 += vs[k + 4] * xs[np.intp(js[k + 4])]
                    a5 += vs[k + 5] * xs[np.intp(js[k + 5])]
                    a6 += vs[k + 6] * xs[np.intp(js[k + 6])]
                    a7 += vs[k + 7] * xs[np.intp(js[k + 7])]
                    k += 8
                while k < n:
                    a0 += vs[k] * xs[np.intp(js[k])]
                    k += 1
                y[i0 + r] += ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7))


_SPMM = {64: _make_spmm(64, 1), 16: _make_spmm(16, 4)}


def matmul(arrays: dict[str, np.ndarray], meta: dict[str, int], x: np.ndarray, bias: np.ndarray,
           y: np.ndarray, act: int = 0) -> None:
    """``y[:] = act(x @ W.T + bias)`` for float32 ``x (B, in)``, ``bias (out,)``, C-contiguous ``y (B, out)``;
    ``act`` a code of :data:`._activations.ACTIVATIONS` (0: none)."""
    if not y.flags.c_contiguous:
        raise ValueError("y must be C-contiguous")
    sync_threads()
    ptr, idx, val, panel = arrays["ptr"], arrays["idx"], arrays["val"], meta["panel"]
    rows = x.shape[0]
    if rows <= SPMV_MAX_ROWS:
        for b in range(rows):
            _spmv(ptr, idx, val, panel, bias, x[b], y[b])
        if act:
            activate_rows(y, act)
        return
    width = tile_width(rows)
    xp, by_tile = tiles_in_order(x, width, -(-y.shape[1] // ROWS), val.nbytes + idx.nbytes + ptr.nbytes)
    _SPMM[width](ptr, idx, val, panel, bias, xp, y, by_tile, act)
