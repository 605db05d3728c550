"""The bitmask kernels (float32 / bfloat16 / int8 values) and the dense bf16/int8 kernels, against float64 references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsenn.backend import kernels as K
from sparsenn.backend.kernels import bitmask as B

NAMES = ["bitmask", "bitmask_bf16", "bitmask_int8", "dense_bf16", "dense_int8"]


def _weight(rows, cols, sparsity, seed=0):
    g = np.random.default_rng(seed)
    w = g.standard_normal((rows, cols)).astype(np.float32)
    w[g.random((rows, cols)) < sparsity] = 0
    return w


def _reference(p, x, bias):
    return x.astype(np.float64) @ p.to_dense().astype(np.float64).T + bias


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", [(37, 100), (192, 576), (3, 64), (130, 1)])
@pytest.mark.parametrize("rows", [1, 2, 5, 70])
def test_matches_the_dequantized_product(name, shape, rows):
    w = _weight(*shape, 0.6)
    p = K.pack(w, name)
    assert p.problem() is None
    g = np.random.default_rng(1)
    x = g.standard_normal((rows, shape[1])).astype(np.float32)
    bias = g.standard_normal(shape[0]).astype(np.float32)
    y = p.matmul(x, bias)
    ref = _reference(p, x, bias)
    assert np.abs(y - ref).max() <= 1e-5 * max(np.abs(ref).max(), 1.0)


@pytest.mark.parametrize("name", NAMES)
def test_rounding_is_bounded(name):
    w = _weight(64, 200, 0.5)
    wd = K.pack(w, name).to_dense()
    if name == "bitmask":
        assert np.array_equal(wd, w)  # float32 values are kept exactly
    elif name.endswith("bf16"):  # round to nearest: half an ulp of 8 significant bits
        assert np.all(np.abs(wd - w) <= np.abs(w) * 2.0**-8)
        assert np.array_equal(torch.from_numpy(w).bfloat16().float().numpy(), wd)
    else:  # symmetric per-row scale max|w|/127: at most half a step
        step = np.abs(w).max(axis=1, keepdims=True) / 127
        assert np.all(np.abs(wd - w) <= step / 2 * (1 + 1e-6))
    assert np.array_equal(wd == 0, w == 0) or name.endswith("int8")  # int8 may round tiny values to 0


def test_bytes_fall_with_sparsity():
    # 1 bit per weight + the values: below the dense int8 weight from 50% sparsity on
    for s in (0.5, 0.7, 0.9):
        w = _weight(256, 512, s, seed=2)
        nnz = np.count_nonzero(w)
        p = K.pack(w, "bitmask_int8")
        assert p.nbytes == 256 * 512 // 8 + nnz + 8 * 257 + 4 * 256  # mask + values + ptr + scales
        assert p.nbytes < K.pack(w, "dense_int8").nbytes
        assert K.pack(w, "bitmask").nbytes < 4 * w.size * (1 - s + 0.16)


def test_one_row_path_and_threads_agree():
    w = _weight(300, 640, 0.7, seed=3)
    x = np.random.default_rng(4).standard_normal((1, 640)).astype(np.float32)
    for name in NAMES:
        p = K.pack(w, name)
        bias = np.zeros(300, np.float32)
        y1 = p.matmul(x, bias)
        row = K.KERNELS.get(name).row(p.arrays, p.meta, bias)
        yt = torch.empty(300)
        row(torch.from_numpy(x[0]), yt)
        assert np.array_equal(yt.numpy(), y1[0])
        before = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            assert np.array_equal(p.matmul(x, bias), y1)  # sums never reassociated across threads
        finally:
            torch.set_num_threads(before)


def test_check_packed_rejects_inconsistent_arrays():
    w = _weight(20, 130, 0.5)
    p = K.pack(w, "bitmask_int8")
    assert p.problem() is None
    bad = {k: v.copy() for k, v in p.arrays.items()}
    bad["ptr"][5] += 1
    assert "ptr" in K.Packed("bitmask_int8", bad, p.meta).problem() or "mask bits" in \
        K.Packed("bitmask_int8", bad, p.meta).problem()
    bad = {k: v.copy() for k, v in p.arrays.items()}
    bad["mask"][1] |= np.uint64(1) << np.uint64(63)  # a bit past in=130 in row 0's last word
    assert K.Packed("bitmask_int8", bad, p.meta).problem() is not None
    bad = {k: v.copy() for k, v in p.arrays.items()}
    bad["val"] = bad["val"][:-1]
    assert K.Packed("bitmask_int8", bad, p.meta).problem() is not None
    bad = dict(p.arrays, scale=np.full(20, np.nan, np.float32))
    assert "scale" in K.Packed("bitmask_int8", bad, p.meta).problem()
    bad = dict(p.arrays, val=p.arrays["val"].astype(np.int16))
    assert "int8" in K.Packed("bitmask_int8", bad, p.meta).problem()
    assert "words" in K.Packed("bitmask_int8", p.arrays, dict(p.meta, words=7)).problem()


def test_bad_options():
    with pytest.raises(ValueError, match="values must be one of"):
        B.pack(np.ones((2, 2), np.float32), "int4")
    with pytest.raises(ValueError, match="dense packing"):
        B.pack(np.ones((2, 2), np.float32), "float32", dense=True)


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 40), cols=st.integers(1, 200), sparsity=st.floats(0.0, 1.0),
       batch=st.integers(1, 6), name=st.sampled_from(NAMES), seed=st.integers(0, 2**16))
def test_property_any_shape(rows, cols, sparsity, batch, name, seed):
    w = _weight(rows, cols, sparsity, seed)
    p = K.pack(w, name)
    assert p.problem() is None
    x = np.random.default_rng(seed + 1).standard_normal((batch, cols)).astype(np.float32)
    ref = _reference(p, x, np.zeros(rows))
    assert np.abs(p.matmul(x) - ref).max() <= 1e-5 * max(np.abs(ref).max(), 1.0)


@pytest.mark.parametrize("name", ["bitmask_bf16", "bitmask_int8", "dense_bf16", "dense_int8"])
def test_lossy_formats_agree_with_the_kernels(name):
    import sparsenn as sn

    w = torch.from_numpy(_weight(24, 96, 0.6, seed=5))
    f = sn.formats.to_format(w, name)
    assert torch.equal(f.to_dense(), torch.from_numpy(K.pack(w, name).to_dense()))
    nnz = int((w != 0).sum())
    v = 1 if name.endswith("int8") else 2
    scales = 4 * 24 if name.endswith("int8") else 0
    expected = (24 * 96 // 8 + nnz * v if name.startswith("bitmask") else 24 * 96 * v) + scales
    assert f.nbytes == expected
    table = sn.formats.bytes_table(torch.nn.Sequential(torch.nn.Linear(96, 24)), formats=("dense", name))
    assert table.rows[0].bytes[name] is not None
