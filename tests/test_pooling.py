"""Compiled max pooling (kernels/pooling.py, runtime/pooling.py) against F.max_pool2d, its use in convert, and
archives that record it."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import sparsenn as sn
from conftest import forge_runtime_archive
from sparsenn.backend.kernels import pooling as P
from sparsenn.backend.runtime import io
from sparsenn.backend.runtime import pooling as RP
from sparsenn.backend.runtime.errors import ArchiveError
from sparsenn.backend.runtime.pooling import POOLS_ATTR, CompiledMaxPool2d


def same(a, b):
    """Equal, NaN where the other is NaN."""
    return a.shape == b.shape and torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(
        torch.nan_to_num(a, nan=0.0), torch.nan_to_num(b, nan=0.0))


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 2), c=st.integers(1, 3), h=st.integers(1, 13), w=st.integers(1, 13),
       kh=st.integers(1, 4), kw=st.integers(1, 4), sh=st.integers(1, 3), sw=st.integers(1, 3),
       pad=st.booleans(), special=st.sampled_from([None, "nan", "inf", "-inf"]), seed=st.integers(0, 2**16))
def test_kernel_equals_max_pool2d(n, c, h, w, kh, kw, sh, sw, pad, special, seed):
    ph, pw = (kh // 2, kw // 2) if pad else (0, 0)
    if h + 2 * ph < kh or w + 2 * pw < kw:
        return
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g)
    if special:
        x.view(-1)[torch.randint(0, x.numel(), (3,), generator=g)] = float(special)
    got = torch.from_numpy(P.max_pool2d(x.numpy(), (kh, kw), (sh, sw), (ph, pw)))
    assert same(got, F.max_pool2d(x, (kh, kw), (sh, sw), (ph, pw)))


def test_hand_computed_case():
    x = torch.arange(16, dtype=torch.float32).view(1, 1, 4, 4)  # rows 0..3, 4..7, 8..11, 12..15
    assert P.max_pool2d(x.numpy(), 3, 2, 1).tolist() == [[[[5.0, 7.0], [13.0, 15.0]]]]
    assert P.max_pool2d(-x.numpy(), 2, None, 0).tolist() == [[[[-0.0, -2.0], [-8.0, -10.0]]]]


def test_settings_and_inputs_it_refuses():
    assert P.supported(3, 2, 1) and P.supported((3, 2), (1, 2), (1, 1)) and P.supported(2, None, 0)
    assert not P.supported(3, 2, 2)  # padding over half the kernel
    assert not P.supported(3, 2, 1, dilation=2) and not P.supported(3, 2, 1, ceil_mode=True)
    assert not P.supported(17, 1, 0) and not P.supported("3", 2, 1)
    x = np.zeros((1, 1, 4, 4), dtype=np.float32)
    with pytest.raises(ValueError, match=r"unsupported max pooling: kernel 3, stride 2, padding 2"):
        P.max_pool2d(x, 3, 2, 2)
    with pytest.raises(ValueError, match="C-contiguous float32"):
        P.max_pool2d(x.astype(np.float64), 3, 2, 1)
    with pytest.raises(ValueError, match="smaller than the 5 x 5 kernel"):
        P.max_pool2d(x, 5, 1, 0)


def test_module_runs_the_kernel_only_on_inputs_it_takes(monkeypatch):
    pool = CompiledMaxPool2d.of(nn.MaxPool2d(3, 2, 1))
    assert isinstance(pool, nn.MaxPool2d) and pool.kernel_size == 3 and pool.stride == 2 and pool.padding == 1
    calls = []
    real = P.max_pool2d
    monkeypatch.setattr(P, "max_pool2d", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(2, 3, 9, 9)
    inputs = [x, x.contiguous(memory_format=torch.channels_last), x.double(), x[:, :, ::2], x[0]]
    for y in inputs:
        assert torch.equal(pool(y), F.max_pool2d(y, 3, 2, 1))
    assert len(calls) == 1  # only the contiguous float32 NCHW one
    g = x.clone().requires_grad_()
    pool(g).sum().backward()  # needs gradients: PyTorch's pooling, differentiable
    assert g.grad is not None and len(calls) == 1
    with pytest.raises(RuntimeError):  # too small: PyTorch's own error
        pool(torch.randn(1, 1, 1, 1)[:, :, :0])


def cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2, 1), nn.Conv2d(8, 8, 3),
                         nn.MaxPool2d(2, ceil_mode=True), nn.Flatten(), nn.Linear(128, 4)).eval()


@pytest.mark.parametrize("kernel_wins", [True, False])
def test_convert_compiles_the_pools_the_kernel_runs_faster(monkeypatch, kernel_wins):
    model = cnn()
    x = torch.randn(2, 3, 20, 20)
    fake = {"torch": 2.0, "kernel": 1.0} if kernel_wins else {"torch": 1.0, "kernel": 2.0}
    monkeypatch.setattr(RP, "interleaved_medians", lambda fns, **kw: {k: fake[k] for k in fns})
    c = sn.convert(model, x, batch_sizes=(2, 5))
    assert c.__dict__[POOLS_ATTR] == (["2"] if kernel_wins else [])  # "4" has ceil_mode: not compilable
    assert isinstance(c[2], CompiledMaxPool2d) == kernel_wins and type(c[4]) is nn.MaxPool2d
    assert any("max pool" in n for n in c.conversion_summary.notes) == kernel_wins
    with torch.inference_mode():
        torch.testing.assert_close(c(x), model(x), rtol=1e-4, atol=1e-5)


def test_archives_compile_the_pools_again_and_refuse_forged_names(monkeypatch, tmp_path):
    model = cnn()
    x = torch.randn(2, 3, 20, 20)
    monkeypatch.setattr(RP, "interleaved_medians", lambda fns, **kw: {"torch": 2.0, "kernel": 1.0})
    c = sn.convert(model, x, batch_sizes=(2,))
    path = tmp_path / "cnn.safetensors"
    io.save(c, path)
    loaded = io.load(path, cnn())
    assert loaded.__dict__[POOLS_ATTR] == ["2"] and isinstance(loaded[2], CompiledMaxPool2d)
    with torch.inference_mode():
        assert torch.equal(loaded(x), c(x))
    for forged in (["0"], ["4"], ["nope"], [""], "2"):
        bad = forge_runtime_archive(path, tmp_path / "forged.safetensors", pools=forged)
        fresh = cnn()
        before = copy.deepcopy(fresh.state_dict())
        with pytest.raises(ArchiveError, match="pools"):
            io.load(bad, fresh)
        assert type(fresh[2]) is nn.MaxPool2d
        assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())


def test_compile_pools_refuses_what_it_cannot_run():
    model = nn.Sequential(nn.MaxPool2d(3, 2, 1, return_indices=True), nn.MaxPool2d(3, dilation=2), nn.ReLU())
    for name in ("0", "1", "2", "9"):
        with pytest.raises(ValueError, match="not max pools the compiled kernel takes"):
            RP.compile_pools(model, [name])
    assert [type(m) for m in model] == [nn.MaxPool2d, nn.MaxPool2d, nn.ReLU]
