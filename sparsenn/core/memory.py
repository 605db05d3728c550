"""Give the C heap's free memory back to the operating system.

PyTorch's CPU tensors come from the C allocator. A long loop of differently sized
temporaries (one-shot pruning runs every block on every calibration batch) leaves the
heap holding freed chunks between live ones, which glibc keeps mapped: the process's
resident set grows by hundreds of megabytes it does not use. ``malloc_trim(0)`` returns
those pages. Elsewhere (macOS, musl, Windows) this is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["release_free_memory"]

_trim = None
if sys.platform.startswith("linux"):
    try:
        _trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        _trim.argtypes, _trim.restype = [ctypes.c_size_t], ctypes.c_int
    except (OSError, AttributeError):  # not glibc
        _trim = None


def release_free_memory() -> bool:
    """Return the C heap's free pages to the system; whether anything could be done (glibc only)."""
    if _trim is None:
        return False
    _trim(0)
    return True
