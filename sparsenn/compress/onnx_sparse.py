"""Sparse initializers in an ONNX graph: float weights with many zeros stored as ``SparseTensorProto``.

ONNX IR (``GraphProto.sparse_initializer``, IR version >= 6): a sparse tensor is a values
tensor (1-D, named like the initializer it replaces), an int64 indices tensor and the
dense shape (``dims``). The indices are the linearised, row-major positions of the
non-zeros, shape ``[NNZ]``, strictly increasing (the ONNX checker enforces the order);
the ``[NNZ, rank]`` coordinate form is also valid but costs ``rank`` times the bytes.

Zeros cost nothing, every kept value costs its own bytes plus 8 bytes of index, so a
float32 tensor shrinks only above 2/3 zeros (float16: 4/5). An initializer becomes sparse
when at least ``min_sparsity`` of its entries are zero *and* the sparse form is smaller.
Only the top-level graph's initializers are converted; initializers of subgraphs (``If``,
``Loop`` bodies), graph inputs and outputs, and tensors stored as external data stay dense.

A sparse initializer is typed ``sparse_tensor(float)`` by ONNX's type checker, which the
standard operators do not accept: ``onnx.checker.check_model`` (the default check) passes,
``full_check=True`` reports the first consumer. ONNX Runtime densifies every sparse
initializer when it builds a session (and for saving an optimized model converts back),
so the saving is file size and download, not memory or speed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["FLOAT_TYPES", "INDEX_BYTES", "SparseInitializer", "sparse_bytes", "sparsify_initializers"]

FLOAT_TYPES = {
    TensorProto.FLOAT: "float32",
    TensorProto.FLOAT16: "float16",
    TensorProto.BFLOAT16: "bfloat16",
    TensorProto.DOUBLE: "float64",
}
INDEX_BYTES = 8  # int64 linear indices, as the ONNX spec requires
MIN_IR_VERSION = 6  # the first IR version with GraphProto.sparse_initializer


@dataclass(frozen=True)
class SparseInitializer:
    """One initializer stored sparse: its name, dense shape, dtype and number of stored values."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    nnz: int

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nnz / self.numel if self.numel else 0.0


def sparse_bytes(nnz: int, itemsize: int) -> int:
    """Payload bytes of a sparse tensor with ``nnz`` values of ``itemsize`` bytes (values + int64 indices)."""
    return nnz * (itemsize + INDEX_BYTES)


def _boundary_names(graph: onnx.GraphProto) -> set[str]:
    return {v.name for v in graph.input} | {v.name for v in graph.output}


def _to_sparse(init: TensorProto, array: np.ndarray) -> tuple[onnx.SparseTensorProto, int]:
    """The sparse form of ``init`` (its values ``array``): linear sorted int64 indices; and its nnz."""
    flat = array.reshape(-1)
    positions = np.flatnonzero(flat).astype(np.int64)  # ascending: the order the checker requires
    values = numpy_helper.from_array(np.ascontiguousarray(flat[positions]), name=init.name)
    if values.data_type != init.data_type:  # numpy_helper must keep the element type exactly
        raise AssertionError(f"initializer {init.name!r}: values stored as type {values.data_type}, "
                             f"expected {init.data_type}")
    indices = numpy_helper.from_array(positions)
    return helper.make_sparse_tensor(values, indices, list(init.dims)), int(positions.size)


def sparsify_initializers(model: onnx.ModelProto, min_sparsity: float) -> list[SparseInitializer]:
    """Move every qualifying float initializer of ``model.graph`` to ``graph.sparse_initializer``, in place.

    Qualifying (see the module docstring): a float type, stored inside the file, not a
    graph input or output, at least ``min_sparsity`` zeros, and smaller sparse than dense.
    The values tensor keeps the initializer's name, so every consumer (several nodes may
    share one initializer) reads the same tensor. Returns what was converted, in graph order.
    """
    if model.ir_version < MIN_IR_VERSION:
        raise ValueError(f"sparse initializers need ONNX IR version >= {MIN_IR_VERSION}, "
                         f"the model has IR version {model.ir_version}")
    graph = model.graph
    boundary = _boundary_names(graph)
    converted: list[SparseInitializer] = []
    sparse: list[onnx.SparseTensorProto] = []
    keep: list[TensorProto] = []
    for init in graph.initializer:
        if (init.data_type not in FLOAT_TYPES or init.name in boundary
                or init.data_location == TensorProto.EXTERNAL):
            keep.append(init)
            continue
        array = numpy_helper.to_array(init)
        numel, itemsize = array.size, array.dtype.itemsize
        nnz = int(np.count_nonzero(array))
        if numel == 0 or (numel - nnz) < min_sparsity * numel or sparse_bytes(nnz, itemsize) >= numel * itemsize:
            keep.append(init)
            continue
        tensor, nnz = _to_sparse(init, array)
        sparse.append(tensor)
        converted.append(SparseInitializer(init.name, tuple(int(d) for d in init.dims),
                                           FLOAT_TYPES[init.data_type], nnz))
    if converted:
        del graph.initializer[:]
        graph.initializer.extend(keep)
        graph.sparse_initializer.extend(sparse)
    return converted
