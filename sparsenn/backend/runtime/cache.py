"""Cold-cache timing for one-row products: what token-by-token decoding of a large model costs.

A decoder reads every weight once per generated token. When the model's weights are
larger than the last-level cache, each layer finds its weight in memory, not in the
cache, and the layer's time is that of reading its bytes. Timed in a loop, the same
layer keeps its weight in the cache (a 576x192 float32 weight is 0.4 MB; SmolLM2's L3
here is 32 MB), so a format that reads 4x fewer bytes (int8) looked no faster than the
float32 weight, and the float32 layer was kept. :func:`evict` reads a buffer of
``EVICT_FACTOR`` times the last-level cache before each timed call, so the call starts
cold, as in decoding.

:func:`last_level_cache_bytes` reads the largest cache size Linux reports under
``/sys/devices/system/cpu/cpu0/cache``; elsewhere it assumes ``DEFAULT_LLC_BYTES``.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

DEFAULT_LLC_BYTES = 32 << 20  #: assumed when the operating system does not say
EVICT_FACTOR = 1.5  #: the eviction buffer, in last-level caches (reading it pushes out what was cached)
_CACHE_DIR = Path("/sys/devices/system/cpu/cpu0/cache")
_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def _parse_size(text: str) -> int | None:
    text = text.strip().upper()
    if not text:
        return None
    unit = _UNITS.get(text[-1], 1)
    digits = text[:-1] if text[-1] in _UNITS else text
    return int(digits) * unit if digits.isdigit() else None


@functools.cache
def last_level_cache_bytes() -> int:
    """The size in bytes of this CPU's largest cache (``DEFAULT_LLC_BYTES`` where it cannot be read)."""
    sizes = []
    try:
        for index in _CACHE_DIR.glob("index*"):
            size = _parse_size((index / "size").read_text())
            if size:
                sizes.append(size)
    except OSError:
        pass
    return max(sizes, default=DEFAULT_LLC_BYTES)


@functools.cache
def _buffer() -> np.ndarray:
    n = int(EVICT_FACTOR * last_level_cache_bytes()) // 8
    return np.ones(max(n, 8), dtype=np.int64)


def evict() -> None:
    """Read one word of every cache line of a buffer larger than the last-level cache (about 2 ms for 48 MB).

    Single-threaded NumPy on purpose: a parallel read would leave a thread pool spinning
    that the timed call after it would pay for (see :mod:`.timing`).
    """
    _buffer()[::8].sum()


__all__ = ["DEFAULT_LLC_BYTES", "EVICT_FACTOR", "evict", "last_level_cache_bytes"]
