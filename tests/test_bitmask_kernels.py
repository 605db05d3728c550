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


# ---------------------------------------------------------------- one-row int8 products in integers

INT8 = ["bitmask_int8", "dense_int8"]
needs_dot = pytest.mark.skipif(not B.INT8_DOT, reason="integer int8 products need AVX-512 VBMI2 + VNNI")


def _bound(p, x, y, ref):
    """The integer path's documented error bound (module docstring of kernels.bitmask), with float64 slack."""
    q = np.abs(p.to_dense().astype(np.float64))  # scale_i |q_ij|
    m = np.abs(x).max(axis=1, keepdims=True).astype(np.float64)
    return (m * q.sum(axis=1)) * 2.0**-(B._XBITS - 1) * (1 + 1e-9) + 2.0**-24 * np.abs(ref) * (1 + 1e-9) + 1e-300


def _x(rows, cols, seed, outliers=False):
    x = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    if outliers:
        x[:, ::17] *= 300  # a few entries hundreds of times the rest, as in a language model's activations
    return x


@needs_dot
@pytest.mark.parametrize("name", INT8)
@pytest.mark.parametrize("shape,sparsity", [((1, 1), 0.0), ((5, 63), 0.5), ((7, 64), 0.0), ((9, 65), 0.7),
                                            ((33, 200), 0.9), ((64, 576), 0.7), ((300, 640), 0.5),
                                            ((3, 64 * 40 + 5), 0.6), ((8, 128), 1.0)])
def test_integer_path_within_its_bound(name, shape, sparsity):
    # odd and even row counts, `in` below / at / past multiples of 64, more words than DOT_BLOCK (fold
    # in the middle of a row), an all-zero weight; small layers take the serial kernels, larger ones the
    # parallel ones
    w = _weight(*shape, sparsity, seed=6)
    p = K.pack(w, name)
    for outliers in (False, True):
        x = _x(1, shape[1], seed=7, outliers=outliers)
        bias = np.random.default_rng(8).standard_normal(shape[0]).astype(np.float32)
        y = p.matmul(x, bias)
        ref = _reference(p, x, bias)
        assert np.all(np.abs(y - ref) <= _bound(p, x, y, ref))
        row = K.KERNELS.get(name).row(p.arrays, p.meta, bias)
        yt = torch.empty(shape[0])
        row(torch.from_numpy(x[0]), yt)
        assert np.array_equal(yt.numpy(), y[0])


@needs_dot
def test_integer_path_rows_with_empty_and_full_words():
    w = _weight(6, 256, 0.5, seed=9)
    w[0] = 0  # an empty row
    w[1, 64:128] = 0  # an empty word
    w[2] = np.random.default_rng(10).standard_normal(256)  # full words
    w[3, :64] = 1.0  # a full word, then sparse ones
    w[4] = 0
    w[4, 255] = -2.0  # only the last column
    w[5, ::2] = 0
    x = _x(1, 256, seed=11)
    for name in INT8:
        p = K.pack(w, name)
        ref = _reference(p, x, np.zeros(6))
        y = p.matmul(x)
        assert np.all(np.abs(y - ref) <= _bound(p, x, y, ref))
        assert y[0, 0] == 0


@needs_dot
def test_integer_and_float_paths_agree():
    w = _weight(97, 300, 0.7, seed=12)
    x = _x(1, 300, seed=13)
    x_padded = np.zeros(B.WORD * 5, np.float32)
    x_padded[:300] = x[0]
    bias = np.zeros(97, np.float32)
    for name, sparse in (("bitmask_int8", True), ("dense_int8", False)):
        p = K.pack(w, name)
        a = p.arrays
        args = ((a["mask"], a["ptr"]) if sparse else ()) + (a["val"], a["scale"], 5, x_padded, bias)
        outs = {}
        for key in ((sparse, False, False), (sparse, True, False), (sparse, False, True), (sparse, True, True)):
            y = np.full(97, np.nan, np.float32)
            B._ROW[key](*args, y)
            outs[key] = y
        # serial and parallel kernels compute the same sums
        assert np.array_equal(outs[(sparse, False, False)], outs[(sparse, True, False)])
        assert np.array_equal(outs[(sparse, False, True)], outs[(sparse, True, True)])
        ref = _reference(p, x, bias)[0]
        for y in outs.values():
            assert np.abs(y - ref).max() <= 1e-6 * np.abs(ref).max()


@needs_dot
@pytest.mark.parametrize("name", INT8)
def test_integer_path_falls_back_for_unusual_activations(name):
    w = _weight(20, 130, 0.5, seed=14)
    p = K.pack(w, name)
    bias = np.arange(20, dtype=np.float32)
    fallback = {k[:2]: f for k, f in B._ROW.items() if not k[2]}
    x = _x(1, 130, seed=15)

    def float_path(xs):  # the float32 kernel's product of xs's one row
        xp = np.zeros(192, np.float32)
        xp[:130] = xs[0]
        yf = np.empty(20, np.float32)
        a = p.arrays
        args = ((a["mask"], a["ptr"]) if name.startswith("bitmask") else ()) + (a["val"], a["scale"], 3, xp, bias)
        fallback[(name.startswith("bitmask"), True)](*args, yf)
        return yf

    for special in (np.nan, np.inf, -np.inf):
        xs = x.copy()
        xs[0, 7] = special
        y = p.matmul(xs, bias)
        assert np.array_equal(y[0], float_path(xs), equal_nan=True)  # what the float32 kernel gives (NaN where touched)
    for scale in (0.0, 1e30, 1e-30, 1e-38, 1e-44):  # zeros, large, small; below 2^-105 and subnormal: float32 path
        xs = (x * np.float32(scale)).astype(np.float32)
        y = p.matmul(xs, bias)
        if scale in (1e-38, 1e-44):
            assert np.array_equal(y[0], float_path(xs))
        else:
            ref = _reference(p, xs, bias)
            assert np.all(np.abs(y - ref) <= _bound(p, xs, y, ref))
    assert np.array_equal(p.matmul(np.zeros((1, 130), np.float32), bias)[0], bias)


@needs_dot
def test_quantized_activations():
    g = np.random.default_rng(16)
    for x in (g.standard_normal(192).astype(np.float32), np.full(64, -3.0, np.float32),
              np.float32(2.0**23 - 0.5) * np.ones(64, np.float32) / np.float32(2.0**20),  # rounds up to 2^23
              np.zeros(128, np.float32)):
        words = x.size // 64
        xq = B._planes(words)
        assert xq.ctypes.data % 64 == 0 and xq.size == words * B.X_PLANES
        ok, e, top = B._quantize_x(x, xq)
        assert ok
        planes = xq.reshape(words, B.PLANES, 64).astype(np.int64)
        planes[:, -1] = np.where(planes[:, -1] > 127, planes[:, -1] - 256, planes[:, -1])  # the signed top byte
        big = (planes << (8 * np.arange(B.PLANES))[None, :, None]).sum(axis=1).reshape(-1)
        assert np.abs(big).max() < 2 ** (B._XBITS - 1)
        assert np.all(np.abs(big * 2.0**-e - x) <= 2.0 ** -(e + 1))
        assert top == planes[:, -1].sum()
        if np.abs(x).max() > 0:
            assert 2 ** (B._XBITS - 2) <= np.abs(x).max() * 2.0**e < 2 ** (B._XBITS - 1)


@needs_dot
def test_values_at_the_end_of_mapped_memory():
    # the last rows' 64-byte loads must not read past the values: put them right before an unreadable page
    import ctypes
    import mmap

    w = _weight(40, 130, 0.3, seed=17)
    p = K.pack(w, "bitmask_int8")
    val = p.arrays["val"]
    page = mmap.PAGESIZE
    n = -(-val.nbytes // page) * page
    buf = mmap.mmap(-1, n + page, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    raw = np.frombuffer(buf, dtype=np.int8)
    libc = ctypes.CDLL(None, use_errno=True)
    guard = ctypes.c_void_p(raw.ctypes.data + n)
    assert libc.mprotect(guard, ctypes.c_size_t(page), 0) == 0  # PROT_NONE: reading it faults
    arr = q = None
    try:
        arr = raw[n - val.size:n]
        arr[:] = val
        q = K.Packed("bitmask_int8", dict(p.arrays, val=arr), p.meta)
        x = _x(2, 130, seed=18)
        assert np.array_equal(q.matmul(x), p.matmul(x))
    finally:
        libc.mprotect(guard, ctypes.c_size_t(page), 3)
        del raw, arr, q
        buf.close()


def test_values_of_minus_128():
    # pack never makes -128 (symmetric scales), but a loaded file may hold it
    w = _weight(3, 100, 0.5, seed=19)
    p = K.pack(w, "bitmask_int8")
    val = p.arrays["val"].copy()
    val[::3] = -128
    q = K.Packed("bitmask_int8", dict(p.arrays, val=val), p.meta)
    assert q.problem() is None
    x = _x(1, 100, seed=20)
    ref = _reference(q, x, np.zeros(3))
    assert np.abs(q.matmul(x) - ref).max() <= 1e-5 * np.abs(ref).max()


def test_serial_kernels_are_their_own_functions():
    # numba's disk cache keys leave out parallel=True/False: one function compiled both ways shared an entry
    for ser, par in ((B._spmv_serial, B._spmv), (B._gemv_serial, B._gemv), (B._spmv_i8_serial, B._spmv_i8),
                     (B._gemv_i8_serial, B._gemv_i8)):
        assert ser.py_func.__qualname__ != par.py_func.__qualname__
        assert not ser.targetoptions.get("parallel") and par.targetoptions.get("parallel")
