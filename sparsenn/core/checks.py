"""Argument checks shared across the package: one definition of "a number", one message style.

A number is any real scalar a user may hand over: Python ``int``/``float``, NumPy scalars
(``np.float32(0.9)``, ``np.int64(0)``), 0-d NumPy arrays and 0-d tensors of a real dtype, or
anything else registered as :class:`numbers.Real` (``fractions.Fraction``). Booleans are not
numbers here (``True`` as a sparsity is a mistake, not 1.0), nor are complex values, strings,
or tensors with more than one element.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch


def as_real(value: object) -> float | None:
    """``value`` as a Python float if it is a real scalar (see the module docstring), else ``None``."""
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or value.dtype is torch.bool or value.is_complex():
            return None
        return float(value.item())
    if isinstance(value, np.ndarray):
        if value.ndim != 0 or value.dtype.kind not in "iuf":
            return None
        return float(value)
    return None


def _describe(value: object) -> str:
    if isinstance(value, (bool, np.bool_)):
        return f"{value!r} (a bool, not a number)"
    if isinstance(value, (torch.Tensor, np.ndarray)) and value.ndim != 0:
        return f"a {type(value).__name__} of shape {tuple(value.shape)} (not a single number)"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def real(name: str, value: object, *, low: float = -math.inf, high: float = math.inf,
         low_open: bool = False, high_open: bool = False, noun: str = "a finite number") -> float:
    """``value`` as a float if it is a finite real number in the interval, else a ValueError naming it
    (``"<name> must be <noun> in [low, high), got <value>"``)."""
    v = as_real(value)
    inside = v is not None and math.isfinite(v) and (v > low if low_open else v >= low) \
        and (v < high if high_open else v <= high)
    if not inside:
        if math.isinf(low) and math.isinf(high):
            where = ""
        elif math.isinf(high):
            where = f" {'>' if low_open else '>='} {low:g}"
        else:
            where = f" in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be {noun}{where}, got {_describe(value)}")
    return v


def nonnegative(name: str, value: object) -> float:
    """A finite number >= 0 (penalty strengths, learning rates, L1 coefficients)."""
    return real(name, value, low=0.0)


def positive(name: str, value: object) -> float:
    """A finite number > 0 (smoothing parameters)."""
    return real(name, value, low=0.0, low_open=True)


def sparsity(name: str, value: object, *, allow_one: bool = False, allow_zero: bool = True) -> float:
    """A fraction of zeros: a number in [0, 1) (``allow_one``: [0, 1]; not ``allow_zero``: (0, ...))."""
    return real(name, value, low=0.0, high=1.0, low_open=not allow_zero, high_open=not allow_one, noun="a number")
