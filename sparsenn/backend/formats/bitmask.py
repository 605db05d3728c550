"""Bitmask: one bit per entry of the matrix view (1 = nonzero) and the nonzero values.

Bits are in row-major order, packed little-endian into ``uint8`` (entry ``i`` is bit
``i % 8`` of byte ``i // 8``; ``np.packbits(..., bitorder="little")``), the same bit
order as the N:M metadata. Values are the nonzeros in row-major order.
"""

from __future__ import annotations

import numpy as np

from .base import SparseFormat, check_weight, matrix_and_mask


class Bitmask(SparseFormat):
    """``nbytes = ceil(rows * cols / 8) + nnz * itemsize``."""

    name = "bitmask"

    def __init__(self, mask: np.ndarray, values: np.ndarray, shape, dtype):
        super().__init__(shape, dtype, values.size)
        self.mask, self.values = mask, values

    @classmethod
    def from_dense(cls, weight) -> Bitmask:
        w = check_weight(weight)
        a, nz = matrix_and_mask(w)
        return cls(np.packbits(nz.reshape(-1), bitorder="little"), np.ascontiguousarray(a[nz]), w.shape, w.dtype)

    def dense_mask(self) -> np.ndarray:
        """The unpacked boolean mask of the matrix view."""
        rows, cols = self.matrix_shape
        return np.unpackbits(self.mask, count=rows * cols, bitorder="little").astype(bool).reshape(rows, cols)

    def arrays(self):
        return {"values": self.values, "mask": self.mask}

    def _matrix(self):
        out = np.zeros(self.matrix_shape, dtype=self.values.dtype)
        out[self.dense_mask()] = self.values
        return out
