"""Kernels for training a Linear layer with a fixed sparse weight (SparseProp, Nikdan et al. 2023).

The weight ``W (out, in)`` has ``nnz`` active positions; its values are one float32 vector
``values (nnz,)`` in row-major (CSR) order. :class:`SparseStructure` holds the positions
twice, so that every product reads that same vector:

- CSR: ``indptr`` (int64, ``out + 1``), ``indices`` (int32 column of each value, sorted
  within a row);
- CSC: ``col_ptr`` (int64, ``in + 1``), ``row_idx`` (int32 row of each CSC entry, sorted
  within a column) and ``perm`` (int32): the CSC entry ``k`` is the value ``values[perm[k]]``.

The three products (:func:`forward`, :func:`input_grad`, :func:`weight_grad`):

- forward ``Y = X W^T + b``: one output row's nonzeros, each adding ``w * X^T[j, :]`` to
  the row's accumulators;
- input gradient ``dX = dY W``: the same over the CSC order, each input column's
  nonzeros adding ``W[i, j] * dY^T[i, :]`` (no dense or transposed copy of the weight);
- weight gradient ``dW[i, j] = sum_b dY[b, i] X[b, j]`` at the active positions only (a
  sampled dense-dense product, SDDMM), written into a ``(nnz,)`` vector in ``values``'
  order.

Layout: the activations (and ``dY``) are transposed once into batch tiles of ``T`` rows
(``(tiles, features, T)``, zero-padded, :func:`..kernels._tiles.pack_tiles`), so that a
nonzero reads ``T`` contiguous floats (``T / 16`` AVX-512 vectors) and multiplies them by
one broadcast weight. Forward and input-gradient jobs are (block of ``ROWS`` output rows
or input columns, tile); the block's accumulators are written once, transposed 16 x 16 in
registers (:func:`..kernels._tiles.write_block`). The weight gradient runs in parallel
over output rows; each nonzero is a dot product of two ``B``-long rows of the tiles.

Every output element is summed by one thread in a fixed order: results do not depend on
the number of threads. The structure is checked once (:meth:`SparseStructure.problem`);
the kernels then read without bounds checks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import carray, prange

from ..kernels._jit import jit, sync_threads
from ..kernels._simd import LANES, stack_alloc, vadd, vfma, vload_fma, vsum, vzero
from ..kernels._tiles import pack_tiles, write_block

ROWS = 64  # output rows (forward) or input columns (input gradient) per parallel job
WIDTHS = (16, 32, 64, 128)


def tile_width(batch: int) -> int:
    """``T``: batch rows per tile (64 above 48 rows, 32 above 16, else 16)."""
    return 64 if batch > 48 else 32 if batch > 16 else 16


# ------------------------------------------------------------------ the structure


@dataclass(frozen=True, eq=False)
class SparseStructure:
    """Active positions of an ``(out_features, in_features)`` weight, in CSR and CSC (see the module)."""

    out_features: int
    in_features: int
    indptr: np.ndarray  # int64 (out + 1,)
    indices: np.ndarray  # int32 (nnz,)
    col_ptr: np.ndarray  # int64 (in + 1,)
    row_idx: np.ndarray  # int32 (nnz,)
    perm: np.ndarray  # int32 (nnz,): CSC entry -> value index

    @property
    def nnz(self) -> int:
        return int(self.indices.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def density(self) -> float:
        size = self.out_features * self.in_features
        return self.nnz / size if size else 0.0

    @classmethod
    def from_mask(cls, mask) -> SparseStructure:
        """The structure of a boolean ``(out, in)`` mask (numpy or torch; ``True`` = active)."""
        m = mask.detach().cpu().numpy() if hasattr(mask, "detach") else np.asarray(mask)
        if m.ndim != 2:
            raise ValueError(f"mask must be 2-D (out, in), got shape {m.shape}")
        if m.dtype != np.bool_:
            raise TypeError(f"mask must be boolean, got {m.dtype}")
        out, cols = m.shape
        r, c = np.nonzero(m)  # row-major
        if len(r) >= 2**31:
            raise ValueError(f"{len(r)} active positions do not fit int32 indices")
        indptr = np.zeros(out + 1, dtype=np.int64)
        np.cumsum(np.bincount(r, minlength=out), out=indptr[1:])
        perm = np.argsort(c, kind="stable").astype(np.int32)  # stable: rows stay sorted within a column
        col_ptr = np.zeros(cols + 1, dtype=np.int64)
        np.cumsum(np.bincount(c, minlength=cols), out=col_ptr[1:])
        return cls(out, cols, indptr, c.astype(np.int32), col_ptr, r[perm].astype(np.int32), perm)

    @classmethod
    def from_arrays(cls, out_features: int, in_features: int, indptr, indices, col_ptr, row_idx,
                    perm) -> SparseStructure:
        """A structure from stored arrays (a ``state_dict``), checked: ValueError saying what is wrong."""
        arrays = [a.detach().cpu().numpy() if hasattr(a, "detach") else np.asarray(a)
                  for a in (indptr, indices, col_ptr, row_idx, perm)]
        s = cls(int(out_features), int(in_features), *arrays)
        why = s.problem()
        if why:
            raise ValueError(f"invalid sparse structure: {why}")
        return s

    def problem(self) -> str | None:
        """Why the kernels must not read this structure (``None``: it is one :meth:`from_mask` makes)."""
        out, cols = self.out_features, self.in_features
        if out < 0 or cols < 0 or out >= 2**31 or cols >= 2**31:
            return f"shape ({out}, {cols}) out of range"
        want = (("indptr", np.int64, out + 1), ("col_ptr", np.int64, cols + 1))
        for name, dtype, n in want:
            a = getattr(self, name)
            if not isinstance(a, np.ndarray) or a.dtype != dtype or a.shape != (n,) or not a.flags.c_contiguous:
                return f"{name} must be a C-contiguous {np.dtype(dtype)} array of shape ({n},)"
        nnz = self.indices.shape[0] if isinstance(self.indices, np.ndarray) and self.indices.ndim == 1 else -1
        for name, dtype in (("indices", np.int32), ("row_idx", np.int32), ("perm", np.int32)):
            a = getattr(self, name)
            if not isinstance(a, np.ndarray) or a.dtype != dtype or a.shape != (nnz,) or not a.flags.c_contiguous:
                return f"{name} must be a C-contiguous {np.dtype(dtype)} array of shape (nnz,), nnz = {nnz}"
        if nnz > out * cols:
            return f"{nnz} entries for {out * cols} positions"
        for name, ptr in (("indptr", self.indptr), ("col_ptr", self.col_ptr)):
            if ptr[0] != 0 or ptr[-1] != nnz or (ptr.size > 1 and np.diff(ptr).min() < 0):
                return f"{name} must rise from 0 to nnz = {nnz} without decreasing"
        if nnz == 0:
            return None
        if self.indices.min() < 0 or self.indices.max() >= cols:
            return f"indices must lie in [0, {cols})"
        if self.row_idx.min() < 0 or self.row_idx.max() >= out:
            return f"row_idx must lie in [0, {out})"
        rows = np.repeat(np.arange(out, dtype=np.int64), np.diff(self.indptr))
        key = rows * cols + self.indices  # linear positions in values' order: strictly increasing
        if np.any(key[1:] <= key[:-1]):
            return "indices must increase strictly within each row"
        if self.perm.min() < 0 or self.perm.max() >= nnz or np.any(np.bincount(self.perm, minlength=nnz) != 1):
            return "perm must be a permutation of range(nnz)"
        cols_csc = np.repeat(np.arange(cols, dtype=np.int64), np.diff(self.col_ptr))
        if np.any(self.indices[self.perm] != cols_csc) or np.any(rows[self.perm] != self.row_idx):
            return "the CSC arrays (col_ptr, row_idx, perm) do not describe the CSR positions"
        ckey = cols_csc * out + self.row_idx
        if np.any(ckey[1:] <= ckey[:-1]):
            return "row_idx must increase strictly within each column"
        return None

    def mask(self) -> np.ndarray:
        """The boolean ``(out, in)`` mask."""
        m = np.zeros(self.shape, dtype=bool)
        m[np.repeat(np.arange(self.out_features), np.diff(self.indptr)), self.indices] = True
        return m

    def to_dense(self, values: np.ndarray) -> np.ndarray:
        """The dense ``(out, in)`` matrix of ``values`` (zeros at inactive positions)."""
        w = np.zeros(self.shape, dtype=values.dtype)
        w[np.repeat(np.arange(self.out_features), np.diff(self.indptr)), self.indices] = values
        return w

    def gather(self, dense: np.ndarray) -> np.ndarray:
        """The ``(nnz,)`` values of a dense ``(out, in)`` matrix at the active positions."""
        return np.ascontiguousarray(dense[np.repeat(np.arange(self.out_features), np.diff(self.indptr)),
                                          self.indices])


# ------------------------------------------------------------------ kernels


def _make_spmm(width: int, gather: bool):
    """``y (B, n_out) = tiles^T-product``: for each of ``n_out`` segments of ``ptr``, the sum over its
    entries ``k`` of ``val[perm[k] if gather else k] * xp[tile, idx[k], :]``, plus ``bias``, written
    transposed into ``y``. Forward: CSR (no gather); input gradient: CSC (gather through ``perm``)."""
    C = width // LANES
    BUF = ROWS * width

    @jit
    def spmm(ptr, idx, perm, val, bias, xp, y):
        n_out = y.shape[1]
        ntiles, cols, _ = xp.shape
        nblocks = (n_out + ROWS - 1) // ROWS
        xf = xp.reshape(-1)
        for job in prange(nblocks * ntiles):
            blk = job // ntiles
            tile = job % ntiles
            buf = carray(stack_alloc(BUF), (BUF,))
            acc = carray(stack_alloc(width), (width,))
            i0 = blk * ROWS
            nr = min(ROWS, n_out - i0)
            xo = tile * cols * width
            for r in range(nr):
                s = ptr[i0 + r]
                n = ptr[i0 + r + 1] - s
                js = idx[s:s + n]
                for c in range(C):
                    vzero(acc, c * LANES)
                if gather:
                    ps = perm[s:s + n]
                    for k in range(n):
                        w = val[ps[k]]
                        j = xo + np.intp(js[k]) * width
                        for c in range(C):
                            vfma(acc, c * LANES, w, xf, j + c * LANES)
                else:
                    vs = val[s:s + n]
                    for k in range(n):
                        w = vs[k]
                        j = xo + np.intp(js[k]) * width
                        for c in range(C):
                            vfma(acc, c * LANES, w, xf, j + c * LANES)
                for c in range(C):
                    vzero(buf, r * width + c * LANES)
                    vadd(buf, r * width + c * LANES, acc, c * LANES)
            write_block(buf, width, y, tile * width, i0, nr, bias, 0)

    return spmm


def _make_sddmm(width: int):
    """``dv[k] = sum_b dyp[., i, b] * xp[., j, b]`` for each active ``(i, j)`` (value index ``k``)."""
    C = width // LANES

    @jit
    def sddmm(indptr, indices, dyp, xp, dv):
        ntiles, out, _ = dyp.shape
        cols = xp.shape[1]
        df = dyp.reshape(-1)
        xf = xp.reshape(-1)
        for i in prange(out):
            acc = carray(stack_alloc(width), (width,))
            s = indptr[i]
            n = indptr[i + 1] - s
            js = indices[s:s + n]
            dvs = dv[s:s + n]
            for k in range(n):
                for c in range(C):
                    vzero(acc, c * LANES)
                j = np.intp(js[k])
                for t in range(ntiles):
                    do = (t * out + i) * width
                    xo = (t * cols + j) * width
                    for c in range(C):
                        vload_fma(acc, c * LANES, df, do + c * LANES, xf, xo + c * LANES)
                for c in range(1, C):  # lanes first, then one pairwise tree
                    vadd(acc, 0, acc, c * LANES)
                dvs[k] = vsum(acc, 0)

    return sddmm


def _make_bias_grad(width: int):
    """``db[i] = sum_b dyp[., i, b]`` (the padded batch rows are zeros)."""
    C = width // LANES

    @jit
    def bias_grad(dyp, db):
        ntiles, out, _ = dyp.shape
        df = dyp.reshape(-1)
        for i in prange(out):
            acc = carray(stack_alloc(width), (width,))
            for c in range(C):
                vzero(acc, c * LANES)
            for t in range(ntiles):
                for c in range(C):
                    vadd(acc, c * LANES, df, (t * out + i) * width + c * LANES)
            for c in range(1, C):
                vadd(acc, 0, acc, c * LANES)
            db[i] = vsum(acc, 0)

    return bias_grad


_FORWARD = {w: _make_spmm(w, False) for w in WIDTHS}
_BIAS_GRAD = {w: _make_bias_grad(w) for w in WIDTHS}
_INPUT_GRAD = {w: _make_spmm(w, True) for w in WIDTHS}
_WEIGHT_GRAD = {w: _make_sddmm(w) for w in WIDTHS}
_NO_PERM = np.zeros(0, dtype=np.int32)
_ZEROS: dict[int, np.ndarray] = {}


def _zeros(n: int) -> np.ndarray:
    z = _ZEROS.get(n)
    if z is None:
        z = _ZEROS[n] = np.zeros(n, dtype=np.float32)
    return z


def tiles(x: np.ndarray, width: int | None = None, reuse: bool = False) -> np.ndarray:
    """``x (B, features)`` float32 as ``(tiles, features, T)`` batch tiles (see the module); ``T`` from
    :func:`tile_width` unless given. ``reuse``: into a per-thread scratch buffer, valid until the next such call."""
    return pack_tiles(x, tile_width(x.shape[0]) if width is None else width, reuse=reuse)


def _check_tiles(xp: np.ndarray, features: int, batch: int) -> int:
    width = xp.shape[2] if xp.ndim == 3 else 0
    if (width not in WIDTHS or xp.dtype != np.float32 or not xp.flags.c_contiguous or xp.shape[1] != features
            or xp.shape[0] * width < batch or (xp.shape[0] - 1) * width >= max(batch, 1)):
        raise ValueError(f"tiles must be C-contiguous float32 (ceil({batch} / T), {features}, T) with T in {WIDTHS}, "
                         f"got {xp.dtype} {xp.shape}")
    return width


def _check_values(s: SparseStructure, values: np.ndarray) -> None:
    if values.dtype != np.float32 or values.shape != (s.nnz,) or not values.flags.c_contiguous:
        raise ValueError(f"values must be C-contiguous float32 ({s.nnz},), got {values.dtype} {values.shape}")


def forward(s: SparseStructure, values: np.ndarray, xp: np.ndarray, bias: np.ndarray | None,
            y: np.ndarray) -> None:
    """``y[:] = X W^T + bias`` from ``X``'s tiles ``xp`` (:func:`tiles`); ``y`` C-contiguous ``(B, out)``."""
    _check_values(s, values)
    width = _check_tiles(xp, s.in_features, y.shape[0])
    if y.dtype != np.float32 or y.ndim != 2 or y.shape[1] != s.out_features or not y.flags.c_contiguous:
        raise ValueError(f"y must be C-contiguous float32 (B, {s.out_features})")
    if bias is None:
        bias = _zeros(s.out_features)
    elif bias.dtype != np.float32 or bias.shape != (s.out_features,) or not bias.flags.c_contiguous:
        raise ValueError(f"bias must be C-contiguous float32 ({s.out_features},)")
    if y.size == 0:
        return
    sync_threads()
    _FORWARD[width](s.indptr, s.indices, _NO_PERM, values, bias, xp, y)


def input_grad(s: SparseStructure, values: np.ndarray, dyp: np.ndarray, dx: np.ndarray) -> None:
    """``dx[:] = dY W`` from ``dY``'s tiles ``dyp`` (:func:`tiles`); ``dx`` C-contiguous ``(B, in)``."""
    _check_values(s, values)
    width = _check_tiles(dyp, s.out_features, dx.shape[0])
    if dx.dtype != np.float32 or dx.ndim != 2 or dx.shape[1] != s.in_features or not dx.flags.c_contiguous:
        raise ValueError(f"dx must be C-contiguous float32 (B, {s.in_features})")
    if dx.size == 0:
        return
    sync_threads()
    _INPUT_GRAD[width](s.col_ptr, s.row_idx, s.perm, values, _zeros(s.in_features), dyp, dx)


def weight_grad(s: SparseStructure, dyp: np.ndarray, xp: np.ndarray, dv: np.ndarray) -> None:
    """``dv[k] = sum_b dY[b, i] X[b, j]`` for the ``k``-th active ``(i, j)``, from the tiles of ``dY`` and
    ``X`` (the same ``T``); ``dv`` C-contiguous float32 ``(nnz,)``."""
    if dyp.ndim != 3 or xp.ndim != 3 or dyp.shape[0] != xp.shape[0] or dyp.shape[2] != xp.shape[2]:
        raise ValueError(f"dY and X tiles must have the same tiling, got {dyp.shape} and {xp.shape}")
    width = _check_tiles(xp, s.in_features, xp.shape[0] * xp.shape[2])
    _check_tiles(dyp, s.out_features, dyp.shape[0] * width)
    if dv.dtype != np.float32 or dv.shape != (s.nnz,) or not dv.flags.c_contiguous:
        raise ValueError(f"dv must be C-contiguous float32 ({s.nnz},)")
    if s.nnz == 0:
        return
    sync_threads()
    _WEIGHT_GRAD[width](s.indptr, s.indices, dyp, xp, dv)


def bias_grad(dyp: np.ndarray, db: np.ndarray) -> None:
    """``db[i] = sum_b dY[b, i]`` from ``dY``'s tiles (in numba's thread pool, not PyTorch's)."""
    width = dyp.shape[2] if dyp.ndim == 3 else 0
    if width not in WIDTHS or dyp.dtype != np.float32 or not dyp.flags.c_contiguous:
        raise ValueError(f"tiles must be C-contiguous float32 (tiles, out, T), got {dyp.dtype} {dyp.shape}")
    if db.dtype != np.float32 or db.shape != (dyp.shape[1],) or not db.flags.c_contiguous:
        raise ValueError(f"db must be C-contiguous float32 ({dyp.shape[1]},)")
    sync_threads()
    _BIAS_GRAD[width](dyp, db)


__all__ = ["ROWS", "WIDTHS", "SparseStructure", "bias_grad", "forward", "input_grad", "tile_width", "tiles", "weight_grad"]
