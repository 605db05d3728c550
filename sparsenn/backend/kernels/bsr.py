"""Block-sparse weights: block compressed rows (BSR) with ``h x w`` dense blocks.

Layout (:func:`pack`): ``ptr`` (int32, one entry per block row + 1), ``col`` (the block
column, uint16 where the block columns fit, int32 otherwise) and ``val (blocks, h, w)``
float32: the kept blocks, zeros inside them included. ``h`` must be 1, 2, 4, 8 or 16
(a pattern's taller blocks are stacks of these, see :func:`kernel_block`); ``w`` is
any divisor of the columns.

The regularity is what the kernels use: in the batched product every activation row
``x[j, :]`` read from memory feeds ``h`` fused multiply-adds (one per row of the block)
instead of one, and one index is read per ``h * w`` weights. The kernel is compiled
for its constant ``h`` (accumulators for ``h`` rows x ``T`` batch columns stay in
vector registers: ``T = 64`` for ``h <= 4``, 16 for taller blocks).
"""

from __future__ import annotations

import numpy as np
from numba import carray, prange

from ._jit import jit, sync_threads
from ._layout import array_problem, meta_problem, names_problem, pointer_problem, sorted_problem
from ._simd import LANES, stack_alloc, vfma, vzero
from ._tiles import SPMV_MAX_ROWS, float_matrix, tile_width, tiles_in_order

HEIGHTS = (1, 2, 4, 8, 16)


def kernel_block(h: int, w: int) -> tuple[int, int]:
    """The block a kernel runs for a pattern's ``h x w`` blocks: the tallest of
    :data:`HEIGHTS` dividing ``h``, and ``w`` unchanged."""
    return max(k for k in HEIGHTS if h % k == 0), w


def check_blocks(weight: np.ndarray, h: int, w: int) -> str | None:
    """Why ``weight`` cannot be stored in ``h x w`` blocks by these kernels (``None`` if it can)."""
    if h not in HEIGHTS:
        return f"block height must be one of {HEIGHTS}, got {h}"
    if not isinstance(w, int) or w < 1:
        return f"block width must be a positive integer, got {w!r}"
    rows, cols = weight.shape
    if rows % h or cols % w:
        return f"a {rows}x{cols} matrix is not divisible into {h}x{w} blocks"
    return None


def block_fill(weight: np.ndarray, h: int, w: int) -> float:
    """Nonzeros / (kept blocks * h * w): 1.0 when every kept block is full (1.0 for an all-zero weight)."""
    rows, cols = weight.shape
    nz = weight.reshape(rows // h, h, cols // w, w) != 0
    kept = int(nz.any(axis=(1, 3)).sum())
    return 1.0 if kept == 0 else float(nz.sum()) / (kept * h * w)


def pack(weight: np.ndarray, h: int, w: int) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """``(arrays, meta)`` of a float32 ``(out, in)`` matrix in ``h x w`` blocks (ValueError if impossible)."""
    a = float_matrix(weight)
    why = check_blocks(a, h, w)
    if why is not None:
        raise ValueError(why)
    rows, cols = a.shape
    blocks = a.reshape(rows // h, h, cols // w, w).transpose(0, 2, 1, 3)  # (block row, block col, h, w)
    keep = (blocks != 0).any(axis=(2, 3))
    br, bc = np.nonzero(keep)  # block-row-major
    if len(br) >= 2**31:
        raise ValueError(f"{len(br)} blocks do not fit int32 pointers")
    ptr = np.zeros(rows // h + 1, dtype=np.int32)
    np.cumsum(keep.sum(1), out=ptr[1:])
    col = bc.astype(np.uint16 if cols // w <= 65536 else np.int32)
    arrays = {"ptr": ptr, "col": col, "val": np.ascontiguousarray(blocks[br, bc])}
    return arrays, {"out": rows, "in": cols, "h": h, "w": w}


def unpack(arrays: dict[str, np.ndarray], meta: dict[str, int]) -> np.ndarray:
    """The dense ``(out, in)`` matrix back (for tests and checks)."""
    rows, cols, h, w = meta["out"], meta["in"], meta["h"], meta["w"]
    blocks = np.zeros((rows // h, cols // w, h, w), dtype=np.float32)
    br = np.repeat(np.arange(rows // h), np.diff(arrays["ptr"].astype(np.int64)))
    blocks[br, arrays["col"].astype(np.int64)] = arrays["val"]
    return blocks.transpose(0, 2, 1, 3).reshape(rows, cols)


def check_packed(arrays: dict[str, np.ndarray], meta: dict[str, int]) -> str | None:
    """Why ``(arrays, meta)`` is not a layout :func:`pack` makes (``None`` if it is): a block
    height the kernels are compiled for, blocks that tile the matrix, one pointer per
    block row (in range, non-decreasing), block columns inside the matrix and strictly
    increasing within a block row, ``val`` of shape ``(blocks, h, w)``."""
    why = names_problem(arrays, ("ptr", "col", "val")) or meta_problem(meta, ("out", "in", "h", "w"))
    if why:
        return why
    rows, cols, h, w = (int(meta[k]) for k in ("out", "in", "h", "w"))
    if rows < 1 or cols < 1:
        return f"needs at least one row and one column, got out={rows}, in={cols}"
    if h not in HEIGHTS:
        return f"block height must be one of {HEIGHTS}, got {h}"
    if w < 1:
        return f"block width must be a positive integer, got {w}"
    if rows % h or cols % w:
        return f"a {rows}x{cols} matrix is not divisible into {h}x{w} blocks"
    ptr, col, val = arrays["ptr"], arrays["col"], arrays["val"]
    why = (array_problem(ptr, "ptr", np.int32, (rows // h + 1,))
           or array_problem(col, "col", np.uint16 if cols // w <= 65536 else np.int32, (-1,))
           or array_problem(val, "val", np.float32, (col.size, h, w))
           or pointer_problem(ptr, col.size))
    if why:
        return why
    if col.size and (int(col.min()) < 0 or int(col.max()) >= cols // w):
        bad = int(col.min()) if int(col.min()) < 0 else int(col.max())
        return f"col holds block column {bad}, outside [0, {cols // w})"
    return sorted_problem(col, ptr, "col")


_CACHE: dict[tuple, object] = {}


def _width(h: int, rows: int) -> int:
    return tile_width(rows) if h <= 4 else 16


def _make_spmm(H: int, width: int):
    C = width // LANES
    ACC = H * width

    @jit
    def spmm(ptr, col, val, bias, xp, y, by_tile):
        rows = y.shape[0]
        ntiles, cols, _ = xp.shape
        bw = val.shape[2]
        nbr = ptr.shape[0] - 1
        xf = xp.reshape(-1)
        for job in prange(nbr * ntiles):
            br, tile = (job % nbr, job // nbr) if by_tile else (job // ntiles, job % ntiles)
            acc = carray(stack_alloc(ACC), (ACC,))
            for q in range(ACC // LANES):
                vzero(acc, q * LANES)
            xt = tile * cols * width
            for blk in range(ptr[br], ptr[br + 1]):
                j0 = xt + np.intp(col[blk]) * bw * width
                for c in range(bw):
                    j = j0 + c * width
                    for r in range(H):
                        wv = val[blk, r, c]
                        for cc in range(C):
                            vfma(acc, r * width + cc * LANES, wv, xf, j + cc * LANES)
            b0 = tile * width
            i0 = br * H
            for t in range(min(width, rows - b0)):
                for r in range(H):
                    y[b0 + t, i0 + r] = acc[r * width + t] + bias[i0 + r]

    return spmm


def _make_spmv(H: int):
    ACC = 2 * H  # two blocks in flight

    @jit
    def spmv(ptr, col, val, bias, x, y):
        bw = val.shape[2]
        for br in prange(ptr.shape[0] - 1):
            acc = carray(stack_alloc(ACC), (ACC,))
            for a in range(ACC):
                acc[a] = 0.0
            blk = ptr[br]
            e = ptr[br + 1]
            while blk + 2 <= e:
                j0 = np.intp(col[blk]) * bw
                j1 = np.intp(col[blk + 1]) * bw
                for c in range(bw):
                    x0 = x[j0 + c]
                    x1 = x[j1 + c]
                    for r in range(H):
                        acc[r] += val[blk, r, c] * x0
                        acc[H + r] += val[blk + 1, r, c] * x1
                blk += 2
            if blk < e:
                j0 = np.intp(col[blk]) * bw
                for c in range(bw):
                    x0 = x[j0 + c]
                    for r in range(H):
                        acc[r] += val[blk, r, c] * x0
            for r in range(H):
                y[br * H + r] = bias[br * H + r] + (acc[r] + acc[H + r])

    return spmv


def _kernel(kind: str, h: int, width: int = 0):
    key = (kind, h, width)
    if key not in _CACHE:
        _CACHE[key] = _make_spmm(h, width) if kind == "spmm" else _make_spmv(h)
    return _CACHE[key]


def matmul(arrays: dict[str, np.ndarray], meta: dict[str, int], x: np.ndarray, bias: np.ndarray,
           y: np.ndarray) -> None:
    """``y[:] = x @ W.T + bias`` for float32 ``x (B, in)``, ``bias (out,)``, C-contiguous ``y (B, out)``."""
    sync_threads()
    h = meta["h"]
    ptr, col, val = arrays["ptr"], arrays["col"], arrays["val"]
    rows = x.shape[0]
    if rows <= SPMV_MAX_ROWS:
        spmv = _kernel("spmv", h)
        for b in range(rows):
            spmv(ptr, col, val, bias, x[b], y[b])
        return
    width = _width(h, rows)
    xp, by_tile = tiles_in_order(x, width, ptr.shape[0] - 1, val.nbytes + col.nbytes)
    _kernel("spmm", h, width)(ptr, col, val, bias, xp, y, by_tile)
