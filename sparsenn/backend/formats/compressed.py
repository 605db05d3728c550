"""Coordinate and compressed formats: COO, CSR, CSC (Saad, "Iterative Methods for
Sparse Linear Systems", 2003, sec. 3.4; the layouts of ``scipy.sparse``).

Only nonzeros are stored. Index arrays use :func:`~sparsenn.backend.formats.base.index_dtype`
of the largest value they may hold: row indices ``rows - 1``, column indices
``cols - 1``, pointers ``nnz``.
"""

from __future__ import annotations

import numpy as np

from .base import SparseFormat, as_index, check_weight, matrix_and_mask


def _pointers(major: np.ndarray, length: int, nnz: int) -> np.ndarray:
    """``length + 1`` offsets of each major index's run in a sorted ``major`` array."""
    counts = np.bincount(major, minlength=length) if major.size else np.zeros(length, dtype=np.int64)
    return as_index(np.concatenate([[0], np.cumsum(counts)]), nnz)


class COO(SparseFormat):
    """Row index, column index and value of every nonzero, in row-major order.

    ``nbytes = nnz * (itemsize + row index bytes + column index bytes)``.
    """

    name = "coo"

    def __init__(self, row: np.ndarray, col: np.ndarray, values: np.ndarray, shape, dtype):
        super().__init__(shape, dtype, values.size)
        self.row, self.col, self.values = row, col, values

    @classmethod
    def from_dense(cls, weight) -> COO:
        w = check_weight(weight)
        a, nz = matrix_and_mask(w)
        r, c = np.nonzero(nz)
        return cls(as_index(r, a.shape[0] - 1), as_index(c, a.shape[1] - 1), a[r, c], w.shape, w.dtype)

    def arrays(self):
        return {"values": self.values, "row": self.row, "col": self.col}

    def _matrix(self):
        out = np.zeros(self.matrix_shape, dtype=self.values.dtype)
        out[self.row.astype(np.intp), self.col.astype(np.intp)] = self.values
        return out


class CSR(SparseFormat):
    """Compressed sparse rows: values and column indices row by row, ``rows + 1`` row pointers.

    ``nbytes = nnz * (itemsize + column index bytes) + (rows + 1) * pointer bytes``.
    """

    name = "csr"
    _transposed = False

    def __init__(self, indptr: np.ndarray, indices: np.ndarray, values: np.ndarray, shape, dtype):
        super().__init__(shape, dtype, values.size)
        self.indptr, self.indices, self.values = indptr, indices, values

    @classmethod
    def from_dense(cls, weight):
        w = check_weight(weight)
        a, nz = matrix_and_mask(w)
        if cls._transposed:
            a, nz = a.T, nz.T
        major, minor = np.nonzero(nz)  # row-major order of the (transposed) matrix
        indptr = _pointers(major, a.shape[0], major.size)
        return cls(indptr, as_index(minor, a.shape[1] - 1), np.ascontiguousarray(a[major, minor]), w.shape, w.dtype)

    def arrays(self):
        return {"values": self.values, "indices": self.indices, "indptr": self.indptr}

    def _matrix(self):
        rows, cols = self.matrix_shape
        shape = (cols, rows) if self._transposed else (rows, cols)
        out = np.zeros(shape, dtype=self.values.dtype)
        major = np.repeat(np.arange(shape[0]), np.diff(self.indptr.astype(np.int64)))
        out[major, self.indices.astype(np.intp)] = self.values
        return out.T if self._transposed else out


class CSC(CSR):
    """Compressed sparse columns: CSR of the transpose; ``indices`` are row indices, ``cols + 1`` pointers.

    ``nbytes = nnz * (itemsize + row index bytes) + (cols + 1) * pointer bytes``.
    """

    name = "csc"
    _transposed = True
