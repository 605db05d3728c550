"""What a recorded run (a ``torch.overrides.TorchFunctionMode`` around a forward pass) needs to read
its operations: the tensors inside nested arguments, whether an operation reads values or only
a tensor's metadata, and where basic indexing (``t[:, 1:, :]``) takes a dimension.

Shared by the channel dependency graph (:mod:`sparsenn.structured.graph`) and BatchNorm
folding's check that a convolution's output has no other reader
(:mod:`sparsenn.backend.runtime.fusion`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

#: operations (and properties) that read a tensor's metadata, not its values
METADATA = frozenset({
    "dim", "size", "shape", "ndim", "ndimension", "dtype", "device", "is_contiguous", "numel", "__len__",
    "layout", "requires_grad", "is_floating_point", "stride", "names", "data_ptr", "storage_offset",
    "element_size", "is_cuda", "is_sparse", "is_quantized", "is_complex",
})


def operation_name(func: Any) -> str:
    """The name of an operation seen by ``__torch_function__``; a property's getter is named after the
    property (``x.shape`` arrives as a descriptor's ``__get__``: ``"shape"``)."""
    name = getattr(func, "__name__", "")
    if name == "__get__":
        name = getattr(getattr(func, "__self__", None), "__name__", "")
    return name


def reads_values(func: Any) -> bool:
    """Whether the operation may read a tensor's values (anything but a metadata query)."""
    return operation_name(func) not in METADATA


def indexed_dim(index: Any, shape: tuple[int, ...], dim: int) -> int | None:
    """Where dimension ``dim`` of a tensor of ``shape`` lands in ``t[index]`` when the index keeps it whole
    (basic indexing: integers, slices, ``None``, ``...``); ``None`` if it is indexed into (an integer or a
    partial slice) or the index is not basic (tensors, lists, booleans)."""
    items = index if isinstance(index, tuple) else (index,)
    basic = all(i is None or i is Ellipsis or (isinstance(i, (int, slice)) and not isinstance(i, bool)) for i in items)
    if not basic or sum(i is Ellipsis for i in items) > 1:
        return None
    consumed = sum(1 for i in items if i is not None and i is not Ellipsis)
    if consumed > len(shape):
        return None
    expanded: list[Any] = []
    for i in items:
        expanded += [slice(None)] * (len(shape) - consumed) if i is Ellipsis else [i]
    expanded += [slice(None)] * (len(shape) - sum(1 for i in expanded if i is not None))
    src = out = 0
    for i in expanded:
        if i is None:
            out += 1
            continue
        if src == dim:
            if not isinstance(i, slice) or range(*i.indices(shape[dim])) != range(shape[dim]):
                return None
            return out
        out += isinstance(i, slice)
        src += 1
    return None


def tensors_in(obj: Any) -> Iterator[torch.Tensor]:
    """Every tensor in ``obj``, descending into lists, tuples and dict values."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from tensors_in(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from tensors_in(o)


__all__ = ["METADATA", "indexed_dim", "operation_name", "reads_values", "tensors_in"]
