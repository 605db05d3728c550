"""Large outputs over recycled memory: a buffer comes back only when nothing can reach it; the pool stays bounded;
the sparse convolution writes into it; timing always estimates every candidate."""

from __future__ import annotations

import gc
import threading
import time

import numpy as np
import pytest
import torch
from torch import nn

import sparsenn as sn
from sparsenn.backend.kernels import conv as C
from sparsenn.backend.runtime import recycled, timing


@pytest.fixture(autouse=True)
def small_pool(monkeypatch):
    """A 1 MiB threshold, so the tests need no large allocations; an empty pool before and after."""
    monkeypatch.setattr(recycled, "MIN_BYTES", 1 << 20)
    recycled.clear()
    yield
    recycled.clear()


def _pooled() -> list:
    return [b for free in recycled._pool.values() for b in free]


def test_small_outputs_are_plain_tensors():
    t = recycled.empty((10, 10))
    assert t.shape == (10, 10) and t.dtype == torch.float32 and t.is_contiguous()
    del t
    gc.collect()
    assert _pooled() == []


def test_a_buffer_returns_only_when_the_tensor_and_every_view_are_gone():
    t = recycled.empty((4, 256, 256))
    address = t.data_ptr()
    views = [t[1], t.view(-1), t.numpy(), t.numpy()[2:], np.asarray(t)[0]]
    del t
    gc.collect()
    assert _pooled() == []  # views still reach the memory: not reusable yet
    for v in views[1:]:
        assert (v.data_ptr() if isinstance(v, torch.Tensor) else v.__array_interface__["data"][0]) >= address
    views[0].fill_(3.0)
    del views, v
    gc.collect()
    assert len(_pooled()) == 1
    again = recycled.empty((4, 256, 256))  # the same size: the warm buffer, its old contents
    assert again.data_ptr() == address and _pooled() == []
    other = recycled.empty((2, 256, 256))  # another size: new memory
    assert other.data_ptr() != address


def test_the_pool_keeps_a_bounded_number_of_buffers(monkeypatch):
    monkeypatch.setattr(recycled, "MAX_BUFFERS", 2)
    tensors = [recycled.empty((1 << 18,) if i % 2 else (1 << 19,)) for i in range(5)]
    del tensors
    gc.collect()
    assert len(_pooled()) == 2
    monkeypatch.setattr(recycled, "MAX_POOL_BYTES", 3 << 20)
    big = [recycled.empty((1 << 19,)) for _ in range(3)]  # 2 MiB each: at most one kept
    del big
    gc.collect()
    assert sum(b.nbytes for b in _pooled()) <= 3 << 20


def test_threads_never_share_a_live_buffer():
    errors = []

    def work(value):
        for _ in range(200):
            t = recycled.empty((1 << 18,))
            t.fill_(value)
            time.sleep(0)
            if not bool((t == value).all()):
                errors.append(value)
                return

    threads = [threading.Thread(target=work, args=(float(v),)) for v in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_conv2d_writes_into_out_and_checks_it():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 3, 3, 3, generator=g)
    w[torch.rand(w.shape, generator=g) < 0.7] = 0
    arrays, meta = C.pack_conv(w.numpy())
    x = torch.randn(2, 3, 10, 9, generator=g)
    out = np.full((2, 8, 5, 5), np.nan, np.float32)
    y = C.conv2d(arrays, meta, x.numpy(), None, 2, 1, out=out)
    assert y is out
    torch.testing.assert_close(torch.from_numpy(out), torch.nn.functional.conv2d(x, w, None, 2, 1), rtol=1e-5,
                               atol=1e-5)
    for bad in (np.zeros((2, 8, 5, 4), np.float32), np.zeros((2, 8, 5, 5), np.float64),
                np.zeros((2, 8, 5, 10), np.float32)[..., ::2], [0.0]):
        with pytest.raises(ValueError, match="out must be a C-contiguous float32 array of shape"):
            C.conv2d(arrays, meta, x.numpy(), None, 2, 1, out=bad)


def test_sparse_convolutions_hand_out_recycled_outputs():
    conv = nn.Conv2d(4, 64, 3, padding=1)
    with torch.no_grad():
        conv.weight[torch.rand(conv.weight.shape, generator=torch.Generator().manual_seed(0)) < 0.9] = 0
    layer = sn.backend.runtime.SparseConv2d.from_conv(conv, {1: "conv"},
                                                      {"conv": sn.kernels.pack(conv.weight, "conv", kh=3, kw=3)})
    x = torch.randn(2, 4, 64, 64)
    with torch.inference_mode():
        first = layer(x)
        torch.testing.assert_close(first, conv(x), rtol=1e-4, atol=1e-4)
        address = first.data_ptr()
        del first
        gc.collect()
        second = layer(x * 2)  # 2 MiB, over the test's threshold: the first output's memory again
        assert second.data_ptr() == address
        torch.testing.assert_close(second, conv(x * 2), rtol=1e-4, atol=1e-4)


def test_every_candidate_gets_an_estimate_even_past_the_cap():
    """A slow first candidate used to exhaust the cap before the others were called once; then the comparison
    had no estimate of them and the layer stayed dense (a ResNet stem at batch 16: dense 36 ms, sparse 10 ms)."""
    calls = {"dense": 0, "sparse": 0}

    def dense():
        calls["dense"] += 1
        time.sleep(0.03)

    def sparse():
        calls["sparse"] += 1

    with pytest.raises(timing.TimingCapReached) as info:
        timing.interleaved_medians({"dense": dense, "sparse": sparse}, budget=0.01, min_repeats=3, max_seconds=0.01)
    assert set(info.value.estimate) == {"dense", "sparse"} and info.value.estimate["sparse"] < 0.01
    assert calls == {"dense": 3, "sparse": 3}  # two warm-up calls and one estimate each
