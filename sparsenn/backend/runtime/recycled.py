"""Large float32 outputs in memory that was written before: freed buffers kept for the next call of the same size.

An allocation larger than glibc's mmap threshold (32 MB at most) is fresh ``mmap`` memory on every call,
and the kernel writing it first takes a page fault per 4 KB page. For a ResNet stem at batch 16
(``16 x 64 x 112 x 112`` float32, 51 MB) that made the sparse convolution 55-60 ms a call against 9 ms
writing into memory used before (measured on the 2-core Xeon, 2026-12-07); PyTorch's own convolution pays
the same, and ONNX Runtime, with its arena, does not.

:func:`empty` returns a new tensor for anything under :data:`MIN_BYTES`, and otherwise a tensor over a
buffer from a small pool (:data:`MAX_BUFFERS` buffers, :data:`MAX_POOL_BYTES` in all). When the tensor and
every view of it are gone (the NumPy array the tensor was made from is then collected), its buffer goes
back to the pool. The array is reachable only through the tensor's storage (``tensor.numpy()`` views keep
the tensor alive), so a buffer is never handed out while anything can still read or write it.
"""

from __future__ import annotations

import math
import threading
import weakref
from collections import OrderedDict

import numpy as np
import torch

#: smaller outputs are plain ``torch.empty``: recycling BERT-base's 6-25 MB products' outputs as well removed
#: their page faults but no measurable time (2026-12-07; its 6-25 MB activation tiles, allocated per call, did
#: cost 10-15%, and are kept instead: :mod:`sparsenn.backend.kernels._tiles`)
MIN_BYTES = 32 << 20
MAX_BUFFERS = 4  #: buffers kept for reuse
MAX_POOL_BYTES = 1 << 30  #: bytes kept for reuse

_lock = threading.Lock()
_pool: OrderedDict[int, list[np.ndarray]] = OrderedDict()  # nbytes -> free buffers (uint8), oldest size first


def _kept() -> tuple[int, int]:
    return sum(len(b) for b in _pool.values()), sum(n * len(b) for n, b in _pool.items())


def _give_back(buffer: np.ndarray) -> None:
    """Keep ``buffer`` for the next request of its size (dropping the oldest sizes over the limits)."""
    n = buffer.nbytes
    if n > MAX_POOL_BYTES:
        return
    with _lock:
        _pool.setdefault(n, []).append(buffer)
        _pool.move_to_end(n)
        count, total = _kept()
        while count > MAX_BUFFERS or total > MAX_POOL_BYTES:
            oldest = next(iter(_pool))
            _pool[oldest].pop(0)
            if not _pool[oldest]:
                del _pool[oldest]
            count, total = _kept()


def empty(shape: tuple[int, ...]) -> torch.Tensor:
    """A C-contiguous float32 CPU tensor of ``shape`` with arbitrary contents, over recycled memory when large."""
    nbytes = math.prod(shape) * 4
    if nbytes < MIN_BYTES:
        return torch.empty(shape, dtype=torch.float32)
    with _lock:
        free = _pool.get(nbytes)
        buffer = free.pop() if free else None
        if free is not None and not free:
            del _pool[nbytes]
    if buffer is None:
        buffer = np.empty(nbytes, dtype=np.uint8)
    array = buffer.view(np.float32).reshape(shape)
    weakref.finalize(array, _give_back, buffer)
    return torch.from_numpy(array)  # the array now lives exactly as long as the tensor's storage


def clear() -> None:
    """Free every kept buffer."""
    with _lock:
        _pool.clear()


__all__ = ["MAX_BUFFERS", "MAX_POOL_BYTES", "MIN_BYTES", "clear", "empty"]
