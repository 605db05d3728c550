"""Block compressed sparse rows (BSR): CSR over ``h x w`` blocks of the matrix view
(the layout of ``scipy.sparse.bsr_matrix`` and of block-sparse GPU kernels, Gray et al. 2017).

A block holding any nonzero is stored whole (its zeros included). A matrix whose sides
are not multiples of the block is padded with zeros at the bottom and right to
``(ceil(rows/h)*h, ceil(cols/w)*w)``: edge blocks are stored whole like the others and
:meth:`BSR.to_dense` crops the padding off.
"""

from __future__ import annotations

import numpy as np

from .base import FormatError, SparseFormat, as_index, check_weight, matrix_and_mask, positive_int
from .compressed import _pointers


def parse_block(block: object) -> tuple[int, int]:
    """``(h, w)`` from an int (square) or a pair of positive ints."""
    if isinstance(block, (int, np.integer)) and not isinstance(block, bool):
        block = (block, block)
    if not isinstance(block, (tuple, list)) or len(block) != 2:
        raise FormatError(f"block must be a positive int or a pair (h, w) of positive ints, got {block!r}")
    return positive_int("block height", block[0]), positive_int("block width", block[1])


class BSR(SparseFormat):
    """Blocks with a nonzero, block-row pointers and block-column indices.

    ``nbytes = blocks * h * w * itemsize + blocks * block-column index bytes
    + (block rows + 1) * pointer bytes``; index dtypes from ``block cols - 1`` and ``blocks``.
    """

    name = "bsr"

    def __init__(self, indptr: np.ndarray, indices: np.ndarray, values: np.ndarray, shape, dtype, nnz,
                 block: tuple[int, int]):
        super().__init__(shape, dtype, nnz)
        self.indptr, self.indices, self.values = indptr, indices, values
        self.block = block

    @property
    def spec(self):
        return f"bsr{self.block[0]}x{self.block[1]}"

    @property
    def padded_shape(self) -> tuple[int, int]:
        """The matrix view rounded up to whole blocks."""
        (rows, cols), (h, w) = self.matrix_shape, self.block
        return -(-rows // h) * h, -(-cols // w) * w

    @classmethod
    def from_dense(cls, weight, block=(4, 4)) -> BSR:
        h, w_ = parse_block(block)
        wt = check_weight(weight)
        a, nz = matrix_and_mask(wt)
        rows, cols = a.shape
        br, bc = -(-rows // h), -(-cols // w_)
        padded = np.zeros((br * h, bc * w_), dtype=a.dtype)
        padded[:rows, :cols] = a
        pnz = np.zeros(padded.shape, dtype=bool)
        pnz[:rows, :cols] = nz
        blocks = padded.reshape(br, h, bc, w_).transpose(0, 2, 1, 3)  # (br, bc, h, w)
        keep = pnz.reshape(br, h, bc, w_).any(axis=(1, 3))
        r, c = np.nonzero(keep)
        values = np.ascontiguousarray(blocks[r, c])
        # explicit zeros inside stored blocks as +0.0 (a -0.0 is zero here as everywhere)
        values[~pnz.reshape(br, h, bc, w_).transpose(0, 2, 1, 3)[r, c]] = 0
        return cls(_pointers(r, br, r.size), as_index(c, bc - 1), values, wt.shape, wt.dtype, int(nz.sum()), (h, w_))

    def arrays(self):
        return {"values": self.values, "indices": self.indices, "indptr": self.indptr}

    def _matrix(self):
        (h, w), (prows, pcols) = self.block, self.padded_shape
        blocks = np.zeros((prows // h, pcols // w, h, w), dtype=self.values.dtype)
        r = np.repeat(np.arange(prows // h), np.diff(self.indptr.astype(np.int64)))
        blocks[r, self.indices.astype(np.intp)] = self.values
        rows, cols = self.matrix_shape
        return blocks.transpose(0, 2, 1, 3).reshape(prows, pcols)[:rows, :cols]
