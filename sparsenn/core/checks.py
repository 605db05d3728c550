"""Argument checks shared by the objective-based modules: one message style for bad numbers."""

from __future__ import annotations

import math


def real(name: str, value: object, *, low: float = -math.inf, high: float = math.inf,
         low_open: bool = False, high_open: bool = False) -> float:
    """``value`` as a float if it is a finite real number in the interval, else a ValueError naming it."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    inside = ok and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not inside:
        if math.isinf(low) and math.isinf(high):
            where = ""
        elif math.isinf(high):
            where = f" {'>' if low_open else '>='} {low:g}"
        else:
            where = f" in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be a finite number{where}, got {value!r}")
    return float(value)


def nonnegative(name: str, value: object) -> float:
    """A finite number >= 0 (penalty strengths, learning rates, L1 coefficients)."""
    return real(name, value, low=0.0)


def positive(name: str, value: object) -> float:
    """A finite number > 0 (smoothing parameters)."""
    return real(name, value, low=0.0, low_open=True)
