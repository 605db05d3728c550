"""Checks of packed arrays before a kernel reads them: names, dtypes, lengths, pointers, sorted indices.

The kernels read their arrays without bounds checks (that is what makes them fast), so
arrays that did not come from :func:`pack` in this process (a file, a ``state_dict``)
must be checked first: every pointer inside its array, every index inside the matrix,
every length what the metadata says. Each kernel module's ``check_packed(arrays, meta)``
returns why its arrays are not what its ``pack`` makes (``None`` if they are), built
from these helpers. All checks are vectorized NumPy over the arrays (no Python loop
per nonzero) and allocate at most a few bytes per stored entry.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

MAX_DIM = 2**31 - 1  # rows / columns a kernel addresses (int32 pointers, intp arithmetic)


def names_problem(arrays: dict, names: Sequence[str]) -> str | None:
    """Why ``arrays`` does not hold exactly the arrays ``names`` (numpy arrays)."""
    if not isinstance(arrays, dict) or set(arrays) != set(names):
        got = sorted(map(str, arrays)) if isinstance(arrays, dict) else type(arrays).__name__
        return f"expected arrays {list(names)}, got {got}"
    for n in names:
        if not isinstance(arrays[n], np.ndarray):
            return f"array {n!r} is a {type(arrays[n]).__name__}, not a numpy array"
    return None


def meta_problem(meta: dict, keys: Sequence[str]) -> str | None:
    """Why ``meta`` is not exactly ``keys`` -> integers in ``[0, MAX_DIM]``."""
    if not isinstance(meta, dict) or set(meta) != set(keys):
        got = sorted(map(str, meta)) if isinstance(meta, dict) else type(meta).__name__
        return f"expected metadata {list(keys)}, got {got}"
    for k in keys:
        v = meta[k]
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 0 <= v <= MAX_DIM:
            return f"metadata {k!r} must be an integer in [0, {MAX_DIM}], got {v!r}"
    return None


def array_problem(a: np.ndarray, name: str, dtype: type, shape: tuple[int, ...]) -> str | None:
    """Why ``a`` is not a C-contiguous ``dtype`` array of ``shape`` (``-1``: any length there)."""
    if a.dtype != np.dtype(dtype):
        return f"{name} must be {np.dtype(dtype)}, got {a.dtype}"
    if a.ndim != len(shape) or any(s != -1 and s != n for s, n in zip(shape, a.shape)):
        want = "(" + ", ".join("*" if s == -1 else str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"
        return f"{name} must have shape {want}, got {a.shape}"
    if not a.flags.c_contiguous:
        return f"{name} must be C-contiguous"
    return None


def pointer_problem(ptr: np.ndarray, total: int, name: str = "ptr") -> str | None:
    """Why ``ptr`` is not ``0 = ptr[0] <= ptr[1] <= ... <= ptr[-1] = total``."""
    if ptr[0] != 0:
        return f"{name}[0] must be 0, got {ptr[0]}"
    d = np.diff(ptr)
    if d.size and d.min() < 0:
        i = int(np.argmax(d < 0))
        return f"{name} must not decrease, but {name}[{i + 1}] = {ptr[i + 1]} < {name}[{i}] = {ptr[i]}"
    if ptr[-1] != total:
        return f"{name}[-1] = {ptr[-1]} must equal the number of stored entries ({total})"
    return None


def segment_starts(ptr: np.ndarray, total: int) -> np.ndarray:
    """A bool per stored entry: whether it starts a segment of a (checked) ``ptr``."""
    starts = np.zeros(total + 1, dtype=bool)
    starts[ptr[:-1]] = True
    return starts[:total]


def sorted_problem(idx: np.ndarray, ptr: np.ndarray, name: str) -> str | None:
    """Why the indices ``idx`` are not strictly increasing within each segment of a (checked) ``ptr``."""
    if idx.size < 2:
        return None
    same = ~segment_starts(ptr, idx.size)[1:]  # entry k + 1 is in entry k's segment
    bad = same & (idx[1:] <= idx[:-1])
    if bad.any():
        k = int(np.argmax(bad)) + 1
        return f"{name} must increase strictly within a row (no repeats), but entry {k} is {idx[k]} after {idx[k - 1]}"
    return None
