"""Activations in batch tiles: ``x (B, in)`` -> ``xp (tiles, in, T)``, zero-padded.

Every batched kernel multiplies one weight by ``T`` activation rows at once: for a
nonzero ``w_ij`` it adds ``w_ij * xp[tile, j, :]`` (``T`` contiguous floats, ``T/16``
vector registers) to output row ``i``. ``T`` is 64 for batches above 48 rows and 16
below (at most 15 padded rows of wasted work per call). Batches of at most
``SPMV_MAX_ROWS`` rows use the kernels' matrix-vector product once per row instead.
A C-contiguous ``x`` is transposed 16 x 16 at a time in registers
(:func:`._simd.vtranspose_store`, 4x faster than element by element).

Job order (:func:`tile_major`). A batched product is split into jobs of (block of
output rows, batch tile). Taken block by block, every block re-reads all the tiles;
taken tile by tile, every tile re-reads the whole weight. The kernels take the order
that reads fewer bytes: at BERT-base's 2,048 rows (batch 16 x 128 tokens) the tiles of
a 3,072-wide input are 25 MB, read 6 times block by block, against a 1.2 MB weight
(90% sparse) read 32 times tile by tile. The sums are the same either way (each output
is accumulated in the same order), so the choice changes only the speed. The rule ignores the
caches: with two tiles (65-128 rows), where it picks tile by tile and each thread then reads
the whole weight, both orders measured within 1% for weights of 1.2-14 MB (an ad hoc check,
2026-12-07; ``bench/encoder_batched.py`` measures the 2,048-row case).
"""

from __future__ import annotations

import threading

import numpy as np
from numba import prange

from ._activations import activate_span
from ._jit import jit
from ._simd import LANES, vtranspose_store

SPMV_MAX_ROWS = 3
_CHUNK = 256  # columns per parallel job when packing


#: ``None``: :func:`tile_major` decides; ``True``/``False``: force the order (benchmarks and tests)
FORCE_TILE_MAJOR: bool | None = None


def tile_major(ntiles: int, nblocks: int, tile_bytes: int, weight_bytes: int) -> bool:
    """Whether a batched product should take its jobs tile by tile (each tile's row blocks in
    turn) rather than block by block: ``True`` when re-reading the weight once per tile
    moves fewer bytes than re-reading every tile once per row block."""
    if FORCE_TILE_MAJOR is not None:
        return FORCE_TILE_MAJOR
    return ntiles * weight_bytes < nblocks * ntiles * tile_bytes


def tiles_in_order(x: np.ndarray, width: int, nblocks: int, weight_bytes: int) -> tuple[np.ndarray, bool]:
    """``(pack_tiles(x, width, reuse=True), tile_major(...))``: a batched product's activation tiles and
    its job order, for ``nblocks`` blocks of output rows over a packed weight of ``weight_bytes``."""
    xp = pack_tiles(x, width, reuse=True)
    return xp, tile_major(xp.shape[0], nblocks, xp[0].nbytes, weight_bytes)


def tile_width(rows: int) -> int:
    """``T`` for a batch of ``rows`` rows (64 above 48 rows, else 16)."""
    return 64 if rows > 48 else 16


@jit
def _pack(x, xp):
    rows, cols = x.shape
    ntiles, _, width = xp.shape
    nchunks = (cols + _CHUNK - 1) // _CHUNK
    for job in prange(ntiles * nchunks):
        tile = job // nchunks
        j0 = (job % nchunks) * _CHUNK
        j1 = min(cols, j0 + _CHUNK)
        for t in range(width):
            b = tile * width + t
            if b < rows:
                for j in range(j0, j1):
                    xp[tile, j, t] = x[b, j]
            else:
                for j in range(j0, j1):
                    xp[tile, j, t] = 0.0


def aligned_empty(shape: tuple[int, ...], align: int = 64) -> np.ndarray:
    """An uninitialized float32 C-contiguous array whose data starts on an ``align``-byte boundary.

    NumPy aligns to 16 bytes; a 64-byte vector load that straddles two cache lines costs
    two loads (measured: a third slower batched product).
    """
    n = int(np.prod(shape))
    buf = np.empty(n + align // 4, dtype=np.float32)
    start = (-buf.ctypes.data % align) // 4
    return buf[start:start + n].reshape(shape)


@jit
def _pack_contiguous(x, xp, zeros):
    rows, cols = x.shape
    ntiles, _, width = xp.shape
    nchunks = (cols + _CHUNK - 1) // _CHUNK
    for job in prange(ntiles * nchunks):
        tile = job // nchunks
        j0 = (job % nchunks) * _CHUNK
        j1 = min(cols, j0 + _CHUNK)
        for t0 in range(0, width, LANES):
            b0 = tile * width + t0
            if b0 + LANES <= rows:
                j = j0
                while j + LANES <= j1:  # xp[tile, j + c, t0 + r] = x[b0 + r, j + c]
                    vtranspose_store(x, b0 * cols + j, cols, xp, (tile * cols + j) * width + t0, width, zeros, 0)
                    j += LANES
                for jj in range(j, j1):
                    for t in range(LANES):
                        xp[tile, jj, t0 + t] = x[b0 + t, jj]
            else:
                for t in range(t0, t0 + LANES):
                    b = tile * width + t
                    for jj in range(j0, j1):
                        xp[tile, jj, t] = x[b, jj] if b < rows else np.float32(0.0)


_ZEROS = np.zeros(LANES, dtype=np.float32)


def float_matrix(weight: np.ndarray) -> np.ndarray:
    """``weight`` as the C-contiguous float32 ``(out, in)`` matrix every kernel's ``pack`` reads."""
    w = np.ascontiguousarray(weight, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"weight must be a 2-D (out, in) matrix, got shape {w.shape}")
    return w


_SCRATCH = threading.local()  # per Python thread: {shape: aligned buffer} for pack_tiles(reuse=True)
SCRATCH_MAX_BYTES = 128 << 20  #: larger tiles are allocated per call
SCRATCH_TOTAL_BYTES = 256 << 20  #: tile buffers kept per Python thread, in all (oldest shapes dropped first)
SCRATCH_SHAPES = 8  #: shapes kept per Python thread (a model's layers use a few)


def _scratch(shape: tuple[int, int, int]) -> np.ndarray | None:
    """This thread's kept buffer for tiles of ``shape`` (made now if new); ``None`` if too large to keep."""
    nbytes = shape[0] * shape[1] * shape[2] * 4
    if nbytes > min(SCRATCH_MAX_BYTES, SCRATCH_TOTAL_BYTES):
        return None
    buffers = getattr(_SCRATCH, "buffers", None)
    if buffers is None:
        buffers = _SCRATCH.buffers = {}
    xp = buffers.get(shape)
    if xp is None:
        while buffers and (len(buffers) >= SCRATCH_SHAPES
                           or sum(b.nbytes for b in buffers.values()) + nbytes > SCRATCH_TOTAL_BYTES):
            buffers.pop(next(iter(buffers)))  # the oldest shape
        xp = buffers[shape] = aligned_empty(shape)
    return xp


def release_scratch() -> None:
    """Free the tile buffers kept for the calling Python thread (:func:`pack_tiles`)."""
    _SCRATCH.buffers = {}


def pack_tiles(x: np.ndarray, width: int, reuse: bool = False) -> np.ndarray:
    """``x (B, in)`` float32 (any strides) as ``(ceil(B / width), in, width)`` tiles, zero-padded,
    64-byte aligned (so every tile row starts a cache line).

    ``reuse=True`` (the kernels' ``matmul``, which use the tiles before returning)
    writes into a buffer kept per Python thread and shape (:func:`_scratch`: at most
    :data:`SCRATCH_SHAPES` shapes and :data:`SCRATCH_TOTAL_BYTES` per thread, each at most
    :data:`SCRATCH_MAX_BYTES`; :func:`release_scratch` frees them) instead of a new one. For
    small tiles an aligned allocation costs a few microseconds of Python (several % of a
    100-200 us product); for large ones fresh memory costs page faults: BERT-base at batch
    16 x 128 tokens, whose tiles (6 and 25 MB) were allocated per call above 4 MB, took
    25-39 thousand page faults and 80-140 ms of system time per forward pass, and ran
    10-15% slower (measured on the 2-core Xeon, 2026-12-07). The reused buffer stays mapped
    and cached. The result is only valid until the next ``pack_tiles(..., reuse=True)``
    call with the same shape on the same thread.
    """
    rows, cols = x.shape
    shape = ((rows + width - 1) // width, cols, width)
    xp = _scratch(shape) if reuse else None
    if xp is None:
        xp = aligned_empty(shape)
    if x.flags.c_contiguous:
        _pack_contiguous(x, xp, _ZEROS)
    else:
        _pack(x, xp)
    return xp


@jit(parallel=False)
def write_block(buf, width, y, b0, i0, nr, bias, act):
    """``y[b0 + t, i0 + r] = act(buf[r * width + t] + bias[i0 + r])`` for the block's ``nr`` rows and
    the tile's valid batch rows: 16 x 16 chunks transposed in registers, the edges one by one; then
    the activation ``act`` (:mod:`._activations`, 0: none) over what was just written, still in cache."""
    rows, out = y.shape
    nb = min(width, rows - b0)
    for t0 in range(0, nb, LANES):
        if t0 + LANES <= nb:
            r0 = 0
            while r0 + LANES <= nr:
                vtranspose_store(buf, r0 * width + t0, width, y, (b0 + t0) * out + i0 + r0, out, bias, i0 + r0)
                r0 += LANES
            for t in range(t0, t0 + LANES):
                for r in range(r0, nr):
                    y[b0 + t, i0 + r] = buf[r * width + t] + bias[i0 + r]
        else:
            for t in range(t0, nb):
                for r in range(nr):
                    y[b0 + t, i0 + r] = buf[r * width + t] + bias[i0 + r]
    if act != 0:
        yf = y.reshape(-1)
        for t in range(nb):
            activate_span(yf, (b0 + t) * out + i0, nr, act)
