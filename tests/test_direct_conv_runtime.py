"""The direct sparse convolution (kernel ``"conv"``) inside the runtime: ``SparseConv2d`` and ``sn.convert``.

Reference: ``nn.Conv2d`` with the same (pruned) weight.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsenn as sn
from sparsenn.backend import kernels as K
from sparsenn.backend import runtime
from sparsenn.backend.runtime import ArchiveError, SparseConv2d


def pruned_conv(cin, cout, k, stride=1, padding=0, dilation=1, mode="zeros", bias=True, sparsity=0.8, seed=0):
    torch.manual_seed(seed)
    c = nn.Conv2d(cin, cout, k, stride, padding, dilation, bias=bias, padding_mode=mode)
    with torch.no_grad():
        c.weight.mul_(torch.rand_like(c.weight) >= sparsity)
    return c


def direct(c):
    kh, kw = c.kernel_size
    return SparseConv2d.from_conv(c, {1: "conv"}, {"conv": K.pack(c.weight, "conv", kh=kh, kw=kw)})


GEOMETRIES = [  # (cin, cout, k, stride, padding, dilation, padding_mode, bias)
    (16, 32, 3, 1, 1, 1, "zeros", True),
    (16, 32, 3, 2, 1, 1, "zeros", False),
    (8, 16, 1, 1, 0, 1, "zeros", True),
    (8, 16, 1, 2, 0, 1, "zeros", True),
    (8, 16, 3, 1, 2, 2, "zeros", True),
    (8, 16, 3, 1, 1, 1, "reflect", True),
    (8, 16, 3, 1, 1, 1, "circular", False),
    (3, 8, 7, 2, 3, 1, "zeros", True),
    (4, 8, (3, 1), (2, 1), (1, 0), 1, "zeros", True),
]


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
def test_sparse_conv2d_direct_matches_conv2d(geometry):
    cin, cout, k, s, p, d, mode, bias = geometry
    c = pruned_conv(cin, cout, k, s, p, d, mode, bias)
    layer = direct(c)
    x = torch.randn(2, cin, 15, 17)
    ref = c(x)
    torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer(x[0]), ref[0], rtol=1e-5, atol=1e-5)  # unbatched
    y = layer(x.contiguous(memory_format=torch.channels_last))  # F.conv2d keeps the input's layout
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer(x[:, :, 1:, 2:]), c(x[:, :, 1:, 2:]), rtol=1e-5, atol=1e-5)  # a strided view


def test_registered_kernel_is_an_ordinary_packed_weight():
    c = pruned_conv(6, 10, 3)
    packed = K.pack(c.weight, "conv", kh=3, kw=3)
    assert packed.meta == {"out": 10, "in": 54, "channels": 6, "kh": 3, "kw": 3}
    assert packed.problem() is None
    w2d = c.weight.detach().reshape(10, -1).numpy()
    np.testing.assert_array_equal(packed.to_dense(), w2d)
    x = np.random.default_rng(0).standard_normal((7, 54)).astype(np.float32)  # rows of patches
    np.testing.assert_allclose(packed.matmul(x), x @ w2d.T, rtol=1e-5, atol=1e-5)
    assert "direct sparse 3x3 convolution" in packed.describe()
    with pytest.raises(ValueError, match="not the view of a convolution with a 4x4 kernel"):
        K.pack(c.weight, "conv", kh=4, kw=4)
    bad = K.Packed("conv", packed.arrays, {**packed.meta, "channels": 5})
    assert "is not the 54 columns" in bad.problem()


def test_advisor_does_not_offer_the_convolution_kernel_for_matmuls():
    from sparsenn.backend.formats import list_matmul_candidates

    assert "sparsenn_conv" not in list_matmul_candidates()
    assert "sparsenn_csr" in list_matmul_candidates()


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, 2, 1)
        self.a = nn.Conv2d(16, 32, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(32)
        self.dw = nn.Conv2d(32, 32, 3, 1, 1, groups=32)
        self.pw = nn.Conv2d(32, 32, 1)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(self.bn(self.a(x)))
        x = x + self.pw(F.relu(self.dw(x)))
        return self.head(x.mean((2, 3)))


def small_cnn(sparsity=0.9):
    torch.manual_seed(0)
    model = SmallCNN().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d) and m.groups == 1:
                m.weight.mul_(torch.rand_like(m.weight) >= sparsity)
    return model


def test_convert_runs_convolutions_direct_and_keeps_depthwise_dense(tmp_path):
    model = small_cnn()
    x = torch.randn(2, 3, 32, 32)
    conv = sn.convert(model, x, batch_sizes=(1, 2), force="conv")
    for name in ("stem", "a", "pw"):
        layer = getattr(conv, name)
        assert isinstance(layer, SparseConv2d) and set(layer.plan.values()) == {"conv"}, name
    assert isinstance(conv.dw, nn.Conv2d) and isinstance(conv.head, nn.Linear)
    notes = {r.name: r.note for r in conv.conversion_summary.layers}
    assert "depthwise" in notes["dw"]
    with torch.inference_mode():
        torch.testing.assert_close(conv(x), model(x), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(conv(x[:1]), model(x[:1]), rtol=1e-4, atol=1e-5)
    path = runtime.save(conv, tmp_path / "cnn.safetensors")  # archives carry the kernel like any other
    loaded = runtime.load(path, SmallCNN().eval())
    with torch.inference_mode():
        assert torch.equal(loaded(x), conv(x))


def test_convert_times_the_direct_kernel_against_the_others():
    model = small_cnn()
    conv = sn.convert(model, torch.randn(2, 3, 32, 32), batch_sizes=(2,), time_limit=None, budget=0.05)
    rows = {r.name: r for r in conv.conversion_summary.layers}
    assert "conv" in rows["a"].formats  # a candidate, packed and measured or screened by the cost model
    assert "conv" not in rows["head"].formats  # Linear layers are not offered it


def test_hostile_direct_conv_state_is_refused_before_the_kernel_runs():
    c = pruned_conv(8, 16, 3, padding=1)
    layer = direct(c)
    x = torch.randn(1, 8, 9, 9)
    torch.testing.assert_close(layer(x), c(x), rtol=1e-5, atol=1e-5)
    state = layer.state_dict()
    state["conv_tap"] = state["conv_tap"].clone()
    state["conv_tap"][0] = 10_000  # outside [0, in*kh*kw)
    layer.load_state_dict(state)
    with pytest.raises(ArchiveError, match="tap holds 10000"):
        layer(x)
    other = direct(pruned_conv(8, 16, 3, padding=1, seed=1))  # right sizes, wrong kernel geometry in the meta
    extra = other.get_extra_state()
    extra["kernel_meta"]["conv"].update(channels=72, kh=1, kw=1)
    other.set_extra_state(extra)
    with pytest.raises(ArchiveError, match="1x1 convolution of 72 channels"):
        other(x)
