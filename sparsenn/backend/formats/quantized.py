"""Lossy formats: bitmask or dense storage with bfloat16 or int8 values (per-row int8 scales).

Unlike the exact formats, :meth:`to_dense` returns the *rounded* weight: bfloat16 rounds
each value to nearest-even (8 significant bits); int8 stores ``round(w / s_i)`` with a
symmetric per-output-row scale ``s_i = max_j |w_ij| / 127`` (at most ``s_i / 2`` error per
entry), unless the row already lies on an int8 grid (below). The positions of the zeros
are kept exactly (the mask is the weight's). These are the layouts
:mod:`sparsenn.backend.kernels.bitmask` multiplies with.

**Rows already on a grid.** A weight quantized beforehand (``sn.quantize``: GPTQ moves
values between grid points, so a row's largest ``|q|`` may be ``m < 127`` and ``amax/127``
is not its step) is stored on its own grid: a row counts as on the grid of step
``amax / m`` when every ``w / (amax / m)`` is within :data:`GRID_TOL` of an integer;
``m = 127`` is tried first, then 126, 125, ... down to :data:`GRID_MIN`. Every row
``q * s`` (``q`` integers, ``0 < max|q| = m0 <= 127``) is found: some multiple ``k * m0``
lies in ``[64, 127]`` and ``amax / (k m0) = s / k`` is a grid of it (the values ``k q``);
any grid the search accepts represents the row to float32 rounding, since a wrong one
leaves fractions of at least ``1/127``. Ordinary float rows fail every test and round to
nearest as before. Only the rows failing the first test are searched, and a candidate is
tried on the row's few largest entries before the whole row.

Bytes: ``bitmask_*``: ``ceil(rows * cols / 8) + nnz * v`` (+ ``4 * rows`` scales for
int8); ``dense_*``: ``rows * cols * v`` (+ scales), ``v`` = 2 (bf16) or 1 (int8). The
kernels' own layout adds row pointers and pads rows to 64 columns (see there).
"""

from __future__ import annotations

import numpy as np
import torch

from .base import SparseFormat, check_weight, matrix_and_mask, matrix_shape

GRID_TOL = 1e-4  # |w / s - round(w / s)| (in steps) below which a row counts as on the grid of step s
GRID_MIN = 64  # the smallest max|q| a grid is searched for (every int8 row has a multiple of its max here)
_PROBES = 8  # a row's largest entries a candidate grid is tried on before the whole row


def _on_grid(w: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Per row of ``w``: whether every ``w / scale`` is within :data:`GRID_TOL` of an integer."""
    x = w / scale[:, None]
    np.subtract(x, np.rint(x), out=x)
    np.abs(x, out=x)
    return x.max(axis=1, initial=0.0) <= GRID_TOL


def int8_scales(w: np.ndarray) -> np.ndarray:
    """The float32 per-row scales of :func:`quantize_int8`: ``amax / 127``, or the step ``amax / m`` of the
    int8 grid the row already lies on (first ``m`` from 127 down to :data:`GRID_MIN`; module docstring);
    1 for an all-zero row.

    Cheap for ordinary weights: the candidates are tested first on :data:`_PROBES` entries per
    row (the largest ``|w|`` of as many column ranges; one pass), which rules out nearly every
    candidate of a row that is on no grid; only the survivors are tested on whole rows.
    """
    rows, cols = w.shape
    if not cols:
        return np.ones(rows, np.float32)
    a = np.abs(w)
    amax = a.max(axis=1)
    k = min(_PROBES, cols)
    probe = a[:, :cols // k * k].reshape(rows, k, -1).max(axis=2)  # (rows, k)
    del a
    steps = np.arange(127, GRID_MIN - 1, -1, dtype=np.float32)
    cand = (amax[:, None] / steps[None, :]).astype(np.float32)  # (rows, 64): the steps amax / m
    fits = cand > 0  # an all-zero (or subnormal) row keeps scale 1
    for j in range(k):
        alive = np.flatnonzero(fits.any(axis=1))
        if not alive.size:
            break
        x = probe[alive, j, None] / cand[alive]  # (alive, 64)
        fits[alive] &= np.abs(x - np.rint(x)) <= GRID_TOL
    scale = cand[:, 0].copy()  # round to nearest on amax / 127 unless a grid is found
    scale[scale == 0] = 1.0
    pending = np.flatnonzero(fits.any(axis=1))
    while pending.size:  # each row's first candidate that fits its probes, tried on the whole row
        first = fits[pending].argmax(axis=1)
        s = cand[pending, first]
        ok = _on_grid(w[pending], s)
        scale[pending[ok]] = s[ok]
        bad, first = pending[~ok], first[~ok]
        fits[bad, first] = False
        pending = bad[fits[bad].any(axis=1)]
    return scale


def quantize_int8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(q int8, scale float32 (rows,))`` of a float32 matrix: symmetric per-row scales ``max|w_i| / 127``
    (1 for an all-zero row), or the step of the int8 grid a row already lies on (module docstring), so
    that a weight from ``sn.quantize`` is stored exactly."""
    scale = int8_scales(w)
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
