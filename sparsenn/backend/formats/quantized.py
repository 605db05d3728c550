"""Lossy formats: bitmask or dense storage with bfloat16 or int8 values (per-row int8 scales).

Unlike the exact formats, :meth:`to_dense` returns the *rounded* weight: bfloat16 rounds
each value to nearest-even (8 significant bits); int8 stores ``round(w / s_i)`` with a
symmetric per-output-row scale ``s_i = max_j |w_ij| / 127`` (at most ``s_i / 2`` error per
entry). The positions of the zeros are kept exactly (the mask is the weight's). These
are the layouts :mod:`sparsenn.backend.kernels.bitmask` multiplies with.

Bytes: ``bitmask_*``: ``ceil(rows * cols / 8) + nnz * v`` (+ ``4 * rows`` scales for
int8); ``dense_*``: ``rows * cols * v`` (+ scales), ``v`` = 2 (bf16) or 1 (int8). The
kernels' own layout adds row pointers and pads rows to 64 columns (see there).
"""

from __future__ import annotations

import numpy as np
import torch

from .base import SparseFormat, check_weight, matrix_and_mask, matrix_shape


def quantize_int8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(q int8, scale float32 (rows,))`` of a float32 matrix: symmetric per-row scales ``max|w_i| / 127``
    (1 for an all-zero row)."""
    amax = np.abs(w).max(axis=1) if w.shape[1] else np.zeros(w.shape[0], np.float32)
    scale = (amax / 127.0).astype(np.float32)
    scale[scale == 0] = 1.0
    q = np.clip(np.rint(w / scale[:, None]), -127, 127).astype(np.int8)
    return q, scale


def bf16_bits(w: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (``uint16``), rounded to nearest-even (as ``torch.Tensor.bfloat16``)."""
    return torch.from_numpy(np.ascontiguousarray(w, np.float32)).bfloat16().view(torch.int16).numpy().view(np.uint16)


def bf16_value(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bits (``uint16``) -> float32 (exact)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


class _Quantized(SparseFormat):
    values = ""  # "bf16" or "int8"
    dense = False

    def __init__(self, mask, codes, scale, shape, dtype, nnz):
        super().__init__(shape, dtype, nnz)
        self.mask, self.codes, self.scale = mask, codes, scale

    @classmethod
    def from_dense(cls, weight) -> _Quantized:
        w = check_weight(weight)
        a, nz = matrix_and_mask(w.float())
        codes, scale = (quantize_int8(a) if cls.values == "int8" else (bf16_bits(a), None))
        mask = None if cls.dense else np.packbits(nz.reshape(-1), bitorder="little")
        kept = codes.reshape(-1) if cls.dense else np.ascontiguousarray(codes[nz])
        return cls(mask, kept, scale, w.shape, w.dtype, int(nz.sum()))

    def arrays(self):
        out = {"values": self.codes}
        if self.mask is not None:
            out["mask"] = self.mask
        if self.scale is not None:
            out["scale"] = self.scale
        return out

    def _matrix(self):
        rows, cols = matrix_shape(self.shape)
        v = bf16_value(self.codes) if self.values == "bf16" else self.codes.astype(np.float32)
        if self.dense:
            out = v.reshape(rows, cols).copy()
        else:
            out = np.zeros((rows, cols), dtype=np.float32)
            out[np.unpackbits(self.mask, count=rows * cols, bitorder="little").astype(bool).reshape(rows, cols)] = v
        if self.scale is not None:
            out *= self.scale[:, None]
        return out

    def to_dense(self) -> torch.Tensor:
        """The rounded weight (see the module doc), in the weight's shape and dtype."""
        return torch.from_numpy(self._matrix()).to(self.dtype).reshape(self.shape)


class BitmaskBF16(_Quantized):
    """A bit per entry and the nonzeros rounded to bfloat16: ``ceil(rows*cols/8) + 2*nnz`` bytes."""

    name, values = "bitmask_bf16", "bf16"


class BitmaskInt8(_Quantized):
    """A bit per entry, the nonzeros as int8 and a float32 scale per row: ``ceil(rows*cols/8) + nnz + 4*rows``."""

    name, values = "bitmask_int8", "int8"


class DenseBF16(_Quantized):
    """Every entry rounded to bfloat16: ``2*rows*cols`` bytes."""

    name, values, dense = "dense_bf16", "bf16", True


class DenseInt8(_Quantized):
    """Every entry as int8 with a float32 scale per row: ``rows*cols + 4*rows`` bytes."""

    name, values, dense = "dense_int8", "int8", True
