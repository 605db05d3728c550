"""Relative sparse indices with padding zeros (Han, Mao & Dally 2016, Sec. 2 and Fig. 2).

The positions of a layer's kept weights (in its flattened order) are stored as gaps of
``index_bits`` bits each: the gap of an entry is the number of positions skipped since
the previous entry (since the start for the first one). A gap larger than the largest
``index_bits``-bit number, ``2**index_bits - 1``, cannot be stored: a *filler* entry whose
value is zero is placed ``2**index_bits`` positions after the previous entry (gap
``2**index_bits - 1``), as often as needed; the paper's Fig. 2 rule.

The paper's figure (3 bits, kept weights at positions 1, 4 and 15) writes the differences
1, 3, 8, 3: it counts its first difference from position 0 and the others from the previous
entry, so a weight at position 0 would need a difference of 0 and a full gap a difference
of 8, nine values for 3 bits. Counting every entry's skipped positions gives the same
entries, the same filler (at position 12) and only eight values: gaps 1, 2, 7, 2.
"""

from __future__ import annotations

import numpy as np

__all__ = ["count_entries", "entry_positions", "relative_indices"]


def _check_bits(index_bits: int) -> int:
    if isinstance(index_bits, bool) or not isinstance(index_bits, (int, np.integer)) or not 1 <= index_bits <= 16:
        raise ValueError(f"index_bits must be an int in [1, 16], got {index_bits!r}")
    return int(index_bits)


def _skips(positions) -> np.ndarray:
    """Positions skipped before each entry, checking that ``positions`` are increasing integers >= 0."""
    pos = np.asarray(positions)
    if pos.ndim != 1 or (pos.size and not np.issubdtype(pos.dtype, np.integer)):
        raise ValueError(f"positions must be a 1-D array of integers, got {pos.dtype} of shape {pos.shape}")
    skips = np.diff(pos.astype(np.int64), prepend=-1) - 1
    if skips.size and skips.min() < 0:
        bad = int(np.argmin(skips))
        raise ValueError(f"positions must be strictly increasing and >= 0; position {int(pos[bad])} at entry {bad} "
                         "is not")
    return skips


def count_entries(positions, index_bits: int) -> int:
    """How many entries (kept weights plus fillers) ``positions`` need with ``index_bits``-bit gaps."""
    skips = _skips(positions)
    return int(skips.size + (skips >> _check_bits(index_bits)).sum())


def relative_indices(positions, index_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """``(gaps, filler)``: one gap (``int64`` in ``[0, 2**index_bits)``) per entry, and which entries are fillers.

    ``positions``: the flat positions of the kept weights, strictly increasing.
    """
    bits = _check_bits(index_bits)
    skips = _skips(positions)
    fillers = skips >> bits  # each filler covers 2**bits positions: 2**bits - 1 skipped, itself
    ends = np.cumsum(fillers + 1) - 1  # where each kept weight's own entry lands
    total = int(ends[-1]) + 1 if ends.size else 0
    gaps = np.full(total, (1 << bits) - 1, dtype=np.int64)
    filler = np.ones(total, dtype=bool)
    gaps[ends] = skips & ((1 << bits) - 1)
    filler[ends] = False
    return gaps, filler


def entry_positions(gaps) -> np.ndarray:
    """The flat position of every entry (fillers included) from its gap: the inverse of :func:`relative_indices`."""
    gaps = np.asarray(gaps, dtype=np.int64)
    return np.cumsum(gaps + 1) - 1
