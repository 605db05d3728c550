"""Exact zeros at masked positions, fast: ``zero_masked_(t, mask)`` is ``t.masked_fill_(~mask, 0)``.

It runs once or twice per masked parameter per training step (the gradient hook, the
optimizer's write-back), so it must be cheap, and it must be right for the mask *as it
is now*: a mask edited through ``mask.data`` or a NumPy view does not bump its version
counter, so nothing derived from the mask (an integer copy, say) may be cached and
reused. On CPU, ``masked_fill_`` with a boolean mask is an unvectorized loop (>10x slower
than a bitwise AND); instead a small compiled loop reads the boolean mask itself and
writes an all-zero bit pattern wherever it is ``False``: +0.0 for floating point (NaN,
Inf and -0.0 included), 0 for integers, ``0+0j`` for complex, bit for bit what
``masked_fill_(~mask, 0)`` writes, and leaves every other element untouched. Its cost is
one read of the mask (1 byte per element) and of the tensor, and a write of the tensor;
nothing is allocated and nothing is cached but the compiled loop. It applies to
contiguous CPU tensors of plain ``torch.Tensor`` / ``nn.Parameter`` type with a
contiguous boolean mask of the same shape; anything else (other devices, strided views,
tensor subclasses, broadcast masks) takes ``masked_fill_``. The write is reported to
autograd (``increment_version``), as an in-place torch operation would be.
"""

from __future__ import annotations

import threading

import numpy as np
import torch
from torch.autograd.graph import increment_version

_PLAIN = (torch.Tensor, torch.nn.Parameter)
_WIDTHS = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
_kernels: dict[int, object] = {}  # element width in bytes -> ctypes entry point (compiled on first use)
_lock = threading.Lock()


def _compile(width: int):
    """``kernel(values_ptr, mask_ptr, n)``: ``values[i] = 0`` where ``mask[i] == 0`` (as ``width``-byte integers)."""
    import numba
    from numba import carray, types

    dtype = _WIDTHS[width]
    zero_value = dtype(0)

    def zero(values, mask, n):  # pragma: no cover - compiled
        v = carray(values, (n,), dtype=dtype)
        m = carray(mask, (n,), dtype=np.uint8)
        for i in range(n):
            v[i] = v[i] if m[i] else zero_value  # a select: LLVM vectorizes it

    sig = types.void(types.voidptr, types.voidptr, types.int64)
    try:
        compiled = numba.cfunc(sig, cache=True)(zero)
    except RuntimeError:  # no writable cache location: compile in memory
        compiled = numba.cfunc(sig, cache=False)(zero)
    return compiled.ctypes


def _kernel(width: int):
    k = _kernels.get(width)
    if k is None:
        with _lock:
            k = _kernels.get(width)
            if k is None:
                k = _kernels[width] = _compile(width)
    return k


def _direct(t: torch.Tensor, mask: torch.Tensor) -> bool:
    """True if the compiled loop applies (see the module docstring); otherwise ``masked_fill_``."""
    return (type(t) in _PLAIN and type(mask) in _PLAIN and t.is_cpu and mask.is_cpu
            and mask.dtype is torch.bool and t.layout is torch.strided and t.element_size() in _WIDTHS
            and not t.is_quantized and not t.is_neg() and t.shape == mask.shape
            and t.is_contiguous() and mask.is_contiguous())


def zero_masked_(t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``t.masked_fill_(~mask, 0)``, faster: exact zeros wherever ``mask`` is False, in place; returns ``t``."""
    if not _direct(t, mask):
        return t.masked_fill_(~mask.to(t.device), 0)
    n = t.numel()
    if n:
        _kernel(t.element_size())(t.data_ptr(), mask.data_ptr(), n)
        increment_version(t)
    return t


def zero_masked(t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Out-of-place :func:`zero_masked_` (``t.masked_fill(~mask, 0)``)."""
    out = t.clone(memory_format=torch.contiguous_format)
    if not _direct(out, mask):
        return t.masked_fill(~mask.to(t.device), 0)
    return zero_masked_(out, mask)
