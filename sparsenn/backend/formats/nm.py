"""N:M compressed: ``n`` value slots per group of ``m`` consecutive columns, plus each
slot's position in its group packed in bits (Mishra et al. 2021, "Accelerating Sparse
Deep Neural Networks": the 2:4 layout of NVIDIA's Sparse Tensor Cores).

Groups run along the columns of the matrix view, as in :class:`sparsenn.core.patterns.NM`.
Every group keeps exactly ``n`` slots so the layout is regular: its nonzeros, then
(if it has fewer than ``n``) its first zero positions, holding explicit ``+0.0``;
slots are in increasing position order. ``values`` is ``(rows, cols / m * n)``.

Metadata: each slot's position ``0 <= p < m`` is a ``b = ceil(log2(m))``-bit code
(2 bits for 2:4, 3 for 4:8, 1 for 1:2). The codes of all slots, row-major, form one
little-endian bit stream: bit ``j`` of slot ``k``'s code is stream bit ``k*b + j``,
which is bit ``(k*b + j) % 8`` of byte ``(k*b + j) // 8`` of the ``uint8`` array
``metadata`` (``np.packbits(..., bitorder="little")``); ``ceil(slots * b / 8)`` bytes.
For 2:4 a byte holds two groups, ``p0 | p1 << 2 | p2 << 4 | p3 << 6``: the first index
in the lowest bits, as in a Sparse Tensor Core metadata word (read the bytes as
little-endian ``uint16``/``uint32`` words to get 4/8 groups per word; the reordering
of words across threads that cuSPARSELt applies is not done).
"""

from __future__ import annotations

import math

import numpy as np

from .base import FormatError, SparseFormat, UnrepresentableError, check_weight, matrix_and_mask


def check_nm(n: object, m: object) -> tuple[int, int]:
    ok = all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in (n, m))
    if not ok or not 0 < n < m:
        raise FormatError(f"N:M needs integers 0 < n < m, got n={n!r}, m={m!r}")
    return int(n), int(m)


def code_bits(m: int) -> int:
    """Bits per position code: ``ceil(log2(m))`` (at least 1)."""
    return max(1, math.ceil(math.log2(m)))


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack integer codes ``< 2**bits`` into a little-endian bit stream of ``uint8``."""
    codes = np.asarray(codes, dtype=np.uint64).reshape(-1)
    stream = (codes[:, None] >> np.arange(bits, dtype=np.uint64)) & np.uint64(1)
    return np.packbits(stream.astype(np.uint8).reshape(-1), bitorder="little")


def unpack_codes(packed: np.ndarray, count: int, bits: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`: ``count`` codes as ``int64``."""
    stream = np.unpackbits(packed, count=count * bits, bitorder="little").reshape(count, bits)
    return stream.astype(np.int64) @ (np.int64(1) << np.arange(bits, dtype=np.int64))


class NMCompressed(SparseFormat):
    """``values`` (``n`` slots per group) + ``metadata`` (packed position codes).

    ``nbytes = slots * itemsize + ceil(slots * ceil(log2(m)) / 8)`` with
    ``slots = rows * cols / m * n``. ``from_dense`` raises :class:`UnrepresentableError` if
    ``cols`` is not a multiple of ``m`` or a group holds more than ``n`` nonzeros.
    """

    name = "nm"

    def __init__(self, values: np.ndarray, metadata: np.ndarray, shape, dtype, nnz, n: int, m: int):
        super().__init__(shape, dtype, nnz)
        self.values, self.metadata = values, metadata
        self.n, self.m = n, m

    @property
    def spec(self):
        return f"{self.n}:{self.m}"

    @classmethod
    def from_dense(cls, weight, n=2, m=4) -> NMCompressed:
        n, m = check_nm(n, m)
        wt = check_weight(weight)
        a, nz = matrix_and_mask(wt)
        rows, cols = a.shape
        if cols % m:
            raise UnrepresentableError(
                f"{n}:{m} needs the input dimension (columns of the matrix view) to be a multiple of {m}; "
                f"shape {tuple(wt.shape)} has {cols} columns"
            )
        groups = nz.reshape(-1, m)
        counts = groups.sum(axis=1)
        if counts.size and counts.max() > n:
            g = int(np.argmax(counts > n))
            row, col = divmod(g * m, cols)
            raise UnrepresentableError(
                f"weight of shape {tuple(wt.shape)} is not {n}:{m}: row {row}, columns {col}..{col + m - 1} "
                f"hold {counts[g]} nonzeros (at most {n} allowed)"
            )
        # nonzeros first, then the lowest zero positions; then increasing position
        key = np.where(groups, 0, m) + np.arange(m)
        pos = np.sort(np.argsort(key, axis=1, kind="stable")[:, :n], axis=1)
        vals = np.take_along_axis(a.reshape(-1, m), pos, axis=1)
        vals[~np.take_along_axis(groups, pos, axis=1)] = 0  # padding slots hold +0.0
        values = np.ascontiguousarray(vals.reshape(rows, cols // m * n))
        return cls(values, pack_codes(pos, code_bits(m)), wt.shape, wt.dtype, int(counts.sum()), n, m)

    def positions(self) -> np.ndarray:
        """Each slot's column in the matrix view, shaped like ``values`` (``int64``)."""
        rows, slots_per_row = self.values.shape
        codes = unpack_codes(self.metadata, rows * slots_per_row, code_bits(self.m))
        group = np.arange(rows * slots_per_row) % slots_per_row // self.n
        return (group * self.m + codes).reshape(rows, slots_per_row)

    def arrays(self):
        return {"values": self.values, "metadata": self.metadata}

    def _matrix(self):
        rows, cols = self.matrix_shape
        out = np.zeros((rows, cols), dtype=self.values.dtype)
        np.put_along_axis(out, self.positions(), self.values, axis=1)
        return out
