"""The direct sparse convolution kernel (:mod:`sparsenn.backend.kernels.conv`) against ``F.conv2d``."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsenn.backend.kernels import conv as conv_module
from sparsenn.backend.kernels.conv import check_conv, conv2d, output_size, pack_conv, unpack_conv


def sparse_conv_weight(out, cin, kh, kw, sparsity, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((out, cin, kh, kw)).astype(np.float32)
    return w * (rng.random(w.shape) >= sparsity)


def reference(x, w, bias, stride, padding, dilation):
    """``F.conv2d`` with ``padding`` as ``(top, bottom, left, right)`` (an explicit zero pad first)."""
    top, bottom, left, right = padding
    xt = F.pad(torch.from_numpy(x), (left, right, top, bottom))
    b = None if bias is None else torch.from_numpy(bias)
    return F.conv2d(xt, torch.from_numpy(w), b, stride, 0, dilation).numpy()


def assert_conv(n, cin, out, h, w, k, stride=1, padding=0, dilation=1, sparsity=0.8, bias=True, seed=0):
    kh, kw = (k, k) if isinstance(k, int) else k
    sh, sw = (stride, stride) if isinstance(stride, int) else stride
    dh, dw = (dilation, dilation) if isinstance(dilation, int) else dilation
    pad = (padding,) * 4 if isinstance(padding, int) else tuple(padding)
    wt = sparse_conv_weight(out, cin, kh, kw, sparsity, seed)
    rng = np.random.default_rng(seed + 1)
    x = rng.standard_normal((n, cin, h, w)).astype(np.float32)
    b = rng.standard_normal(out).astype(np.float32) if bias else None
    arrays, meta = pack_conv(wt)
    assert check_conv(arrays, meta) is None
    y = conv2d(arrays, meta, x, b, (sh, sw), pad, (dh, dw))
    ref = reference(x, wt, b, (sh, sw), pad, (dh, dw))
    assert y.shape == ref.shape == (n, out, *output_size(h, w, kh, kw, (sh, sw), pad, (dh, dw)))
    assert y.dtype == np.float32 and y.flags.c_contiguous
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5 * max(float(np.abs(ref).max()), 1e-30))
    return y


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("stride", [1, 2])
def test_pointwise(n, stride):
    # 23 x 37: planes (and strided planes) that are not whole vectors or tiles
    assert_conv(n, 24, 40, 23, 37, 1, stride=stride)


def test_pointwise_large_plane_and_padding():
    assert_conv(1, 16, 32, 56, 56, 1)  # the direct path: x itself, 3136 pixels = 49 tiles
    assert_conv(2, 8, 8, 9, 11, 1, padding=(1, 0, 2, 1))


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("stride,padding", [(1, 0), (1, 1), (2, 0), (2, 1)])
def test_3x3(n, stride, padding):
    assert_conv(n, 16, 24, 19, 27, 3, stride=stride, padding=padding, bias=n == 1)


def test_3x3_dilated_and_asymmetric():
    assert_conv(2, 8, 16, 20, 17, 3, padding=2, dilation=2)
    assert_conv(1, 8, 16, 20, 17, 3, stride=(2, 1), padding=(0, 2, 1, 3), dilation=(1, 2))
    assert_conv(1, 6, 10, 15, 26, (3, 5), stride=(1, 3), padding=(1, 1, 2, 2))


def test_stem_7x7_stride_2():
    assert_conv(2, 3, 16, 45, 38, 7, stride=2, padding=3, sparsity=0.5)


@pytest.mark.parametrize("h,w", [(7, 7), (14, 14), (28, 28), (5, 40)])
def test_resnet_like_planes(h, w):
    assert_conv(2, 32, 48, h, w, 3, padding=1, sparsity=0.9)


@pytest.mark.parametrize("tile", conv_module.TILES)
def test_every_register_tile(tile, monkeypatch):
    # each compiled tile width on planes with full tiles, a masked last tile and one partial tile
    monkeypatch.setattr(conv_module, "tile_vectors", lambda length: tile)
    assert_conv(2, 12, 20, 14, 14, 3, padding=1)  # 14 x 16 = 224 positions
    assert_conv(1, 12, 20, 7, 7, 3, padding=1)  # 7 x 9 = 63 positions
    assert_conv(1, 12, 20, 16, 16, 1)  # direct: 256 positions, whole vectors
    assert_conv(1, 12, 20, 19, 40, 3, stride=2, padding=1)


def test_tiny_and_single_output_pixel():
    assert_conv(1, 5, 7, 3, 3, 3)  # one output pixel
    assert_conv(2, 1, 1, 1, 1, 1)
    assert_conv(1, 4, 3, 2, 2, 3, padding=1, stride=3)


def test_all_zero_weight_gives_bias():
    wt = np.zeros((6, 4, 3, 3), np.float32)
    arrays, meta = pack_conv(wt)
    assert arrays["tap"].size == 0
    x = np.random.default_rng(0).standard_normal((2, 4, 10, 9)).astype(np.float32)
    b = np.arange(6, dtype=np.float32)
    y = conv2d(arrays, meta, x, b, 1, 1)
    np.testing.assert_array_equal(y, np.broadcast_to(b[None, :, None, None], (2, 6, 10, 9)))
    np.testing.assert_array_equal(conv2d(arrays, meta, x, None, 1, 1), np.zeros((2, 6, 10, 9), np.float32))


def test_dense_weight_and_nonfinite_free_padding():
    # every tap nonzero: padding positions must contribute exact zeros
    assert_conv(1, 4, 4, 6, 6, 3, padding=1, sparsity=0.0)


def test_non_contiguous_input_and_empty_batch():
    wt = sparse_conv_weight(8, 6, 3, 3, 0.7)
    arrays, meta = pack_conv(wt)
    x = np.random.default_rng(2).standard_normal((2, 12, 15, 16)).astype(np.float32)[:, ::2, :, 1:]
    y = conv2d(arrays, meta, x, None, 1, 1)
    np.testing.assert_allclose(y, reference(np.ascontiguousarray(x), wt, None, 1, (1, 1, 1, 1), 1),
                               rtol=1e-4, atol=1e-5 * np.abs(y).max())
    assert conv2d(arrays, meta, np.zeros((0, 6, 5, 5), np.float32), None, 1, 1).shape == (0, 8, 5, 5)


def test_same_result_on_one_and_two_threads():
    wt = sparse_conv_weight(32, 16, 3, 3, 0.8)
    arrays, meta = pack_conv(wt)
    x = np.random.default_rng(3).standard_normal((2, 16, 21, 30)).astype(np.float32)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y1 = conv2d(arrays, meta, x, None, 1, 1)
        torch.set_num_threads(2)
        y2 = conv2d(arrays, meta, x, None, 1, 1)
    finally:
        torch.set_num_threads(before)
    np.testing.assert_array_equal(y1, y2)


def test_bad_inputs_raise():
    arrays, meta = pack_conv(sparse_conv_weight(4, 3, 3, 3, 0.5))
    x = np.zeros((1, 3, 8, 8), np.float32)
    with pytest.raises(ValueError, match="input"):
        conv2d(arrays, meta, x.astype(np.float64))
    with pytest.raises(ValueError, match="input"):
        conv2d(arrays, meta, np.zeros((1, 4, 8, 8), np.float32))
    with pytest.raises(ValueError, match="too small"):
        conv2d(arrays, meta, np.zeros((1, 3, 2, 8), np.float32))
    with pytest.raises(ValueError, match="bias"):
        conv2d(arrays, meta, x, np.zeros(5, np.float32))
    with pytest.raises(ValueError):
        conv2d(arrays, meta, x, None, stride=0)
    with pytest.raises(ValueError):
        pack_conv(np.zeros((4, 3, 3), np.float32))
    with pytest.raises(ValueError, match="packed"):  # a cheap guard; check_conv is the full check
        conv2d({**arrays, "tap": arrays["tap"].astype(np.int64)}, meta, x)


def test_pack_unpack_round_trip():
    wt = sparse_conv_weight(10, 7, 3, 5, 0.6)
    arrays, meta = pack_conv(wt)
    assert meta == {"out": 10, "in": 7, "kh": 3, "kw": 5}
    assert arrays["ptr"].dtype == np.int32 and arrays["ptr"].shape == (11,)
    assert arrays["tap"].dtype == np.int32 and arrays["val"].dtype == np.float32
    assert arrays["tap"].size == np.count_nonzero(wt)
    np.testing.assert_array_equal(unpack_conv(arrays, meta), wt)
    # the tap encoding: c * kh * kw + dy * kw + dx
    o = 3
    s, e = arrays["ptr"][o], arrays["ptr"][o + 1]
    c, rest = np.divmod(arrays["tap"][s:e], 15)
    dy, dx = np.divmod(rest, 5)
    np.testing.assert_array_equal(wt[o, c, dy, dx], arrays["val"][s:e])


def test_check_conv_rejects_unsafe_arrays():
    arrays, meta = pack_conv(sparse_conv_weight(6, 4, 3, 3, 0.5))
    assert check_conv(arrays, meta) is None

    def broken(**changes):
        a = {k: v.copy() for k, v in arrays.items()}
        for k, v in changes.items():
            a[k] = v(a[k]) if callable(v) else v
        return check_conv(a, meta)

    def decrease(p):
        p[2] = p[3] + 1  # ptr[3] < ptr[2]
        return p

    assert "decrease" in broken(ptr=decrease)
    assert "ptr[-1]" in broken(ptr=lambda p: np.concatenate([p[:-1], [p[-1] - 1]]).astype(np.int32))
    assert "outside" in broken(tap=lambda t: np.where(np.arange(t.size) == 0, 4 * 9, t).astype(np.int32))
    assert "outside" in broken(tap=lambda t: np.where(np.arange(t.size) == 0, -1, t).astype(np.int32))
    assert "int32" in broken(tap=lambda t: t.astype(np.int64))
    assert "float32" in broken(val=lambda v: v.astype(np.float64))
    assert "int32" in broken(ptr=lambda p: p.astype(np.uint32))
    assert "contiguous" in broken(val=lambda v: np.repeat(v, 2)[::2])
    assert "shape" in broken(val=lambda v: v[:-1])
    assert "increase" in broken(tap=lambda t: t[::-1].copy())
    assert "expected arrays" in check_conv({"ptr": arrays["ptr"], "val": arrays["val"]}, meta)
    assert "metadata" in check_conv(arrays, {**meta, "kh": -1})
    assert "metadata" in check_conv(arrays, {"out": 6, "in": 4, "kh": 3})
    assert check_conv(arrays, {**meta, "in": 3}) is not None  # taps past the smaller input


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 2), cin=st.integers(1, 9), out=st.integers(1, 20), kh=st.integers(1, 4),
       kw=st.integers(1, 4), sh=st.integers(1, 3), sw=st.integers(1, 3), dh=st.integers(1, 2),
       dw=st.integers(1, 2), pad=st.tuples(*[st.integers(0, 3)] * 4), h=st.integers(1, 20),
       w=st.integers(1, 40), sparsity=st.sampled_from([0.0, 0.5, 0.9, 1.0]), seed=st.integers(0, 2**16))
def test_matches_torch_property(n, cin, out, kh, kw, sh, sw, dh, dw, pad, h, w, sparsity, seed):
    ho, wo = output_size(h, w, kh, kw, (sh, sw), pad, (dh, dw))
    if ho < 1 or wo < 1:
        return
    assert_conv(n, cin, out, h, w, (kh, kw), (sh, sw), pad, (dh, dw), sparsity, bias=seed % 2 == 0, seed=seed)
