"""How every kernel is compiled, and how many threads it runs on.

``jit(parallel=True)`` is ``numba.njit(parallel=..., fastmath={"contract"}, cache=True)``:
``contract`` lets LLVM fuse ``a * b + c`` into one fused multiply-add (one rounding
instead of two) and allows nothing else (no reassociation, no assumptions about NaN or
infinity). Compiled code is cached next to the source (``__pycache__``) or, where that
is not writable, in numba's user-wide cache; where neither is, the kernel is compiled
in memory at each first call instead (numba refuses ``cache=True`` at decoration time
when it has no writable location, and this falls back).
"""

from __future__ import annotations

import threading
import types

import numba
import torch

FASTMATH = frozenset({"contract"})


def _serial_copy(f):
    """A copy of ``f`` named ``<name>_serial``, for ``parallel=False``. numba's on-disk cache key leaves
    out the compile flags, so a serial and a parallel compilation of the *same* function shared one
    cache entry, and whichever was compiled first served both (the "parallel" decode kernels of
    ``bitmask`` ran on one thread, or the small-layer ones started parallel regions)."""
    g = types.FunctionType(f.__code__, f.__globals__, f.__name__ + "_serial", f.__defaults__, f.__closure__)
    g.__qualname__ = f.__qualname__ + "_serial"
    g.__doc__ = f.__doc__
    g.__module__ = f.__module__
    return g


def jit(fn=None, *, parallel: bool = True):
    """``numba.njit`` with the kernels' options (usable with or without arguments); ``parallel=False``
    compiles a renamed copy (:func:`_serial_copy`), so one function may be compiled both ways."""

    def compile_(f):
        if not parallel:
            f = _serial_copy(f)
        try:
            return numba.njit(parallel=parallel, fastmath=set(FASTMATH), cache=True)(f)
        except RuntimeError:  # "cannot cache function ...: no locator available"
            return numba.njit(parallel=parallel, fastmath=set(FASTMATH), cache=False)(f)

    return compile_(fn) if fn is not None else compile_


_started = False
_synced = threading.local()  # per Python thread (numba's count is per thread): torch's count last synced


def sync_threads() -> int:
    """Run numba's parallel loops on as many threads as torch uses (at most numba's pool size).

    Starting numba's OpenMP pool resets torch's thread count to the default (both call
    into OpenMP); the count torch had is restored once, right after the pool starts.
    """
    global _started
    if not _started:
        before = torch.get_num_threads()
        numba.get_num_threads()  # starts the pool
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)
        _started = True
    t = torch.get_num_threads()
    if getattr(_synced, "torch", None) == t:  # numba.get_num_threads costs 0.5 us; called per product
        return _synced.n
    n = max(1, min(t, numba.config.NUMBA_NUM_THREADS))
    if numba.get_num_threads() != n:
        numba.set_num_threads(n)
    _synced.torch, _synced.n = t, n
    return n
