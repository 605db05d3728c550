"""sparsify_initializers on hand-built ONNX graphs: the format, which initializers qualify, ORT agreement."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from sparsenn.compress.onnx_sparse import (
    INDEX_BYTES,
    sparse_bytes,
    sparsify_initializers,
)


def _matmul_model(weights: dict[str, np.ndarray], *, shared: bool = False, extra_inits=(), outputs=()) -> onnx.ModelProto:
    """y_i = x @ W_i for each initializer W_i (rows of W = x's features); ``shared``: W used by two MatMuls."""
    (name, w), = weights.items()
    elem = helper.np_dtype_to_tensor_dtype(w.dtype)
    nodes = [helper.make_node("MatMul", ["x", name], ["y"])]
    outs = [helper.make_tensor_value_info("y", elem, [None, None])]
    if shared:
        nodes.append(helper.make_node("MatMul", ["x", name], ["y2"]))
        outs.append(helper.make_tensor_value_info("y2", elem, [None, None]))
    outs += [helper.make_tensor_value_info(o, elem, [None, None]) for o in outputs]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", elem, [None, w.shape[0]])], outs,
                              initializer=[numpy_helper.from_array(w, name=name), *extra_inits])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _densify(sparse: onnx.SparseTensorProto) -> np.ndarray:
    values = numpy_helper.to_array(sparse.values)
    indices = numpy_helper.to_array(sparse.indices)
    out = np.zeros(int(np.prod(sparse.dims)), dtype=values.dtype)
    out[indices] = values
    return out.reshape(tuple(sparse.dims))


def _run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})


def test_hand_computed_case_linear_int64_indices_and_ort_agrees():
    w = np.array([[0, 2, 0], [0, 0, 0], [3, 0, 0]], dtype=np.float32)  # 2 * 12 bytes < 9 * 4
    model = _matmul_model({"W": w})
    converted = sparsify_initializers(model, 0.5)
    assert [(c.name, c.shape, c.nnz, c.dtype) for c in converted] == [("W", (3, 3), 2, "float32")]
    assert len(model.graph.initializer) == 0
    (sp,) = model.graph.sparse_initializer
    assert sp.values.name == "W" and list(sp.dims) == [3, 3]
    assert sp.indices.data_type == TensorProto.INT64 and list(sp.indices.dims) == [2]
    assert numpy_helper.to_array(sp.values).tolist() == [2.0, 3.0]
    assert numpy_helper.to_array(sp.indices).tolist() == [1, 6]  # row-major positions (0, 1) and (2, 0)
    onnx.checker.check_model(model)
    x = np.array([[1, 10, 100], [-1, 0, 2]], dtype=np.float32)
    np.testing.assert_array_equal(_run(model, x)[0], x @ w)


def test_shared_initializer_is_converted_once_and_both_consumers_agree():
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((8, 5)) * (rng.random((8, 5)) < 0.1)).astype(np.float32)
    model = _matmul_model({"W": w}, shared=True)
    assert len(sparsify_initializers(model, 0.5)) == 1
    onnx.checker.check_model(model)
    x = rng.standard_normal((3, 8)).astype(np.float32)
    y, y2 = _run(model, x)
    np.testing.assert_allclose(y, x @ w, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(y, y2)


def test_all_zero_initializer_becomes_empty_sparse_tensor_ort_loads_it():
    model = _matmul_model({"W": np.zeros((4, 3), np.float32)})
    (c,) = sparsify_initializers(model, 0.5)
    assert c.nnz == 0 and c.sparsity == 1.0
    onnx.checker.check_model(model)
    np.testing.assert_array_equal(_run(model, np.ones((2, 4), np.float32))[0], np.zeros((2, 3), np.float32))


def test_non_float_output_and_not_smaller_initializers_stay_dense():
    w = np.eye(6, dtype=np.float32)  # 5/6 zeros: smaller sparse
    shape_const = numpy_helper.from_array(np.zeros(6, np.int64), name="ints")  # int64: never
    out_init = numpy_helper.from_array(np.zeros((6, 6), np.float32), name="z")  # a graph output: never
    model = _matmul_model({"W": w}, extra_inits=[shape_const, out_init], outputs=["z"])
    assert [c.name for c in sparsify_initializers(model, 0.0)] == ["W"]
    assert sorted(i.name for i in model.graph.initializer) == ["ints", "z"]
    # 60% zeros in float32: 0.4 * (4 + 8) > 4 bytes per weight, so stays dense even at min_sparsity=0
    w60 = np.array([[1, 0, 0, 1, 0], [0, 1, 0, 0, 1]], np.float32).T
    model = _matmul_model({"W": w60})
    assert sparsify_initializers(model, 0.0) == [] and len(model.graph.initializer) == 1


def test_old_ir_version_is_refused_by_name():
    model = _matmul_model({"W": np.zeros((2, 2), np.float32)})
    model.ir_version = 5
    with pytest.raises(ValueError, match="IR version >= 6.*IR version 5"):
        sparsify_initializers(model, 0.5)
    assert len(model.graph.initializer) == 1


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 12), cols=st.integers(1, 12), density=st.floats(0.0, 1.0),
       dtype=st.sampled_from([np.float32, np.float16, np.float64]), min_sparsity=st.floats(0.0, 1.0),
       seed=st.integers(0, 2**16))
def test_sparse_form_is_exact_and_converted_iff_sparse_enough_and_smaller(rows, cols, density, dtype,
                                                                          min_sparsity, seed):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((rows, cols)) * (rng.random((rows, cols)) < density)).astype(dtype)
    model = _matmul_model({"W": w})
    converted = sparsify_initializers(model, min_sparsity)
    nnz, numel = int(np.count_nonzero(w)), w.size
    expected = (numel - nnz) >= min_sparsity * numel and sparse_bytes(nnz, w.itemsize) < numel * w.itemsize
    assert bool(converted) == expected
    if expected:
        (sp,) = model.graph.sparse_initializer
        assert converted[0].nnz == nnz and sp.values.data_type == helper.np_dtype_to_tensor_dtype(w.dtype)
        indices = numpy_helper.to_array(sp.indices)
        assert np.all(np.diff(indices) > 0)  # strictly increasing, as the checker requires
        np.testing.assert_array_equal(_densify(sp), w)
        assert sparse_bytes(nnz, w.itemsize) == nnz * (w.itemsize + INDEX_BYTES)
        onnx.checker.check_model(model)
    else:
        assert len(model.graph.sparse_initializer) == 0
        np.testing.assert_array_equal(numpy_helper.to_array(model.graph.initializer[0]), w)
