"""Sparse initialization: ERK masks at init, sparse fan-in rescaling, mask transfer."""

import math

import pytest
import torch
from torch import nn

import sparsenn as sn
from sparsenn.core.registry import UnknownNameError
from sparsenn.core.distributions import layer_densities
from sparsenn.create.init import DEFAULT_GAIN, rescale_for_sparse_fan_in, sparse_init, transfer_masks
from sparsenn.core.masks import get_masks, get_pattern
from sparsenn.core.patterns import NM
from conftest import TinyMLP


def _convnet():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 32, 3), nn.ReLU(), nn.Flatten(),
        nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10),
    )


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- masks at init


def test_erk_masks_match_layer_densities_and_target():
    model = _convnet()
    masks = sparse_init(model, 0.9, distribution="erk", seed=1)
    params = dict(model.named_parameters())
    shapes = {n: tuple(params[n].shape) for n in masks}
    dens = layer_densities("erk", shapes, 0.9)
    assert list(masks) == ["0.weight", "2.weight", "5.weight", "7.weight"]
    for n, m in masks.items():
        assert m.dtype == torch.bool and m is getattr(model.get_submodule(n.split(".")[0]), "weight_mask")
        assert int(m.sum()) == round(dens[n] * m.numel())
        assert torch.all(params[n][~m] == 0)
    assert len(set(round(d, 6) for d in dens.values())) > 1  # ERK is not uniform here
    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    assert abs(kept - 0.1 * total) <= len(masks)  # per-layer rounding only


def test_seed_determines_masks_and_weights():
    a, b, c = _convnet(), _convnet(), _convnet()
    ma, mb, mc = (sparse_init(m, 0.8, seed=s) for m, s in ((a, 3), (b, 3), (c, 4)))
    assert all(torch.equal(ma[n], mb[n]) for n in ma)
    assert _same(a.state_dict(), b.state_dict())
    assert any(not torch.equal(ma[n], mc[n]) for n in ma)


@pytest.mark.parametrize("distribution, sparsity", [("uniform", 0.5), ("erk", 0.9), ("er", 0.9)])
def test_nm_pattern_respected(distribution, sparsity):
    model = TinyMLP()
    masks = sparse_init(model, sparsity, distribution=distribution, pattern="2:4")
    for n, m in masks.items():
        assert NM(2, 4).obeys(m)
        assert get_pattern(model.get_submodule(n.split(".")[0]), "weight") == "2:4"
    if distribution == "uniform":  # density 1/2: exactly 2 of every 4
        assert all(bool((m.reshape(-1, 4).sum(1) == 2).all()) for m in masks.values())


def test_include_exclude_overrides_and_no_rescale():
    model = TinyMLP()
    before = _state(model)
    masks = sparse_init(model, 0.5, distribution="uniform", exclude="fc3", overrides={"fc1.weight": 0.75},
                        rescale=False)
    assert list(masks) == ["fc1.weight", "fc2.weight"]
    assert int(masks["fc1.weight"].sum()) == round(0.25 * 16 * 32)
    w = model.fc2.weight.detach()
    assert torch.equal(w[masks["fc2.weight"]], before["fc2.weight"][masks["fc2.weight"]])  # kept weights untouched
    assert torch.equal(model.fc3.weight, before["fc3.weight"])


# ----------------------------------------------------------------------------- sparse fan-in rescaling


@pytest.mark.parametrize("mode", ["kaiming_uniform", "kaiming_normal"])
def test_rescale_row_std_and_preactivation_variance(mode):
    torch.manual_seed(0)
    dense = nn.Linear(1000, 2000)
    sparse = nn.Linear(1000, 2000)
    masks = sparse_init(sparse, 0.9, distribution="uniform", seed=0, rescale=mode)
    w, m = sparse.weight.detach(), masks["weight"]
    assert torch.all(w[~m] == 0)
    fan = m.sum(1)
    assert int(fan.sum()) == 200_000
    # each row's active weights: std gain/sqrt(k_i) (per-row sample of ~100 values: check the mean ratio
    # tightly and every row loosely)
    row_std = torch.stack([w[i][m[i]].std() for i in range(2000)])
    ratio = row_std / (DEFAULT_GAIN / fan.float().sqrt())
    assert abs(ratio.mean().item() - 1) < 0.02
    assert ratio.min() > 0.6 and ratio.max() < 1.4
    # the defining property: the pre-activation variance of the dense layer
    x = torch.randn(2000, 1000, generator=torch.Generator().manual_seed(1))
    var_sparse = (x @ w.T).var().item()
    var_dense = (x @ dense.weight.detach().T).var().item()
    assert var_sparse == pytest.approx(var_dense, rel=0.05)
    assert var_dense == pytest.approx(DEFAULT_GAIN**2, rel=0.05)  # PyTorch's default: U(+-1/sqrt(fan_in))
    unscaled = nn.Linear(1000, 2000)
    sparse_init(unscaled, 0.9, distribution="uniform", rescale=False)
    assert (x @ unscaled.weight.detach().T).var().item() < 0.2 * var_dense  # without rescale: ~10x smaller


def test_rescale_uniform_bounds_and_dense_mask_is_pytorch_default():
    layer = nn.Linear(64, 32)
    mask = torch.rand(32, 64, generator=torch.Generator().manual_seed(0)) < 0.3
    mask[5] = False  # a row with no active input stays zero
    sn.masks.attach_mask(layer, "weight", mask)
    assert rescale_for_sparse_fan_in(layer, seed=0) == ["weight"]
    w = layer.weight.detach()
    assert torch.all(w[5] == 0) and torch.all(w[~mask] == 0)
    bound = 1 / mask.sum(1).clamp(min=1).float().sqrt()  # gain*sqrt(3)/sqrt(k) with gain = 1/sqrt(3)
    assert torch.all(w.abs() <= bound[:, None] + 1e-7)
    dense = nn.Linear(64, 32)
    sn.masks.attach_mask(dense, "weight")
    rescale_for_sparse_fan_in(dense, seed=0)
    assert dense.weight.abs().max() <= 1 / 8 and dense.weight.abs().max() > 0.9 / 8  # U(-1/sqrt(64), 1/sqrt(64))


def test_rescale_conv_fan_in_gain_and_seed():
    conv = nn.Conv2d(64, 128, 3)
    masks = sparse_init(conv, 0.75, distribution="uniform", rescale=False)
    a = rescale_for_sparse_fan_in(conv, mode="kaiming_normal", seed=2, gain=math.sqrt(2))
    w1 = conv.weight.detach().clone()
    rescale_for_sparse_fan_in(conv, mode="kaiming_normal", seed=2, gain=math.sqrt(2))
    assert a == ["weight"] and torch.equal(w1, conv.weight)
    assert torch.all(w1[~masks["weight"]] == 0)
    fan = masks["weight"].reshape(128, -1).sum(1).float()  # active inputs over in_channels * kh * kw
    row_sq = (w1.reshape(128, -1) ** 2).sum(1)  # k_i weights of variance gain**2 / k_i: about gain**2 = 2
    assert row_sq.mean().item() == pytest.approx(2.0, rel=0.03)
    assert bool((fan < 576).all())
    bias = conv.bias.detach().clone()
    rescale_for_sparse_fan_in(conv)
    assert torch.equal(conv.bias, bias)  # biases are left alone


# ----------------------------------------------------------------------------- transfer


def test_transfer_from_model_and_checkpoint(tmp_path):
    torch.manual_seed(0)
    src = TinyMLP()
    sp = sn.Sparsifier(src, sparsity=0.8)
    src_masks = {n: m.clone() for n, m in get_masks(src).items()}

    dst = TinyMLP()
    assert transfer_masks(src, dst) == list(src_masks)
    for n, m in get_masks(dst).items():
        assert torch.equal(m, src_masks[n]) and m is not src_masks[n]
        assert torch.all(dict(dst.named_parameters())[n][~m] == 0)

    path = sn.save(tmp_path / "ck.safetensors", src, sp)
    dst2 = TinyMLP()
    assert transfer_masks(str(path), dst2) == list(src_masks)
    assert all(torch.equal(get_masks(dst2)[n], src_masks[n]) for n in src_masks)
    assert transfer_masks(path, dst2) == list(src_masks)  # a Path too; idempotent


def test_transfer_mismatch_leaves_target_unchanged(tmp_path):
    src = TinyMLP()
    sparse_init(src, 0.8)
    dst = TinyMLP(hidden=48)
    before = _state(dst)
    with pytest.raises(ValueError, match=r"fc1.weight: mask \(32, 16\) vs parameter \(48, 16\)"):
        transfer_masks(src, dst)
    assert _same(before, dst.state_dict()) and not get_masks(dst)
    path = sn.save(tmp_path / "ck.safetensors", src)
    with pytest.raises(ValueError, match="fc2.weight"):
        transfer_masks(path, dst)
    assert _same(before, dst.state_dict())
    # non-strict: the masks that fit are copied, the rest skipped
    other = nn.Sequential()
    other.fc1 = nn.Linear(16, 32)
    assert transfer_masks(src, other, strict=False) == ["fc1.weight"]
    with pytest.raises(ValueError, match="holds no masks"):
        transfer_masks(TinyMLP(), dst)


def test_transfer_strict_rejects_extra_target_masks():
    src, dst = TinyMLP(), TinyMLP()
    sparse_init(src, 0.5, exclude="fc3")
    sparse_init(dst, 0.5)
    before = _state(dst)
    with pytest.raises(ValueError, match="fc3.weight: masked in the target, absent from the source"):
        transfer_masks(src, dst)
    assert _same(before, dst.state_dict())
    assert transfer_masks(src, dst, strict=False) == ["fc1.weight", "fc2.weight"]


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5, float("nan"), "0.5", True])
def test_bad_sparsity(sparsity):
    model = TinyMLP()
    before = _state(model)
    with pytest.raises(ValueError, match=r"sparsity must be a number in \[0, 1\)"):
        sparse_init(model, sparsity)
    assert _same(before, model.state_dict())


def test_unknown_distribution_pattern_and_mode_leave_model_unchanged():
    model = TinyMLP()
    before = _state(model)
    with pytest.raises(UnknownNameError, match="unknown distribution 'erdos'.*erk.*uniform"):
        sparse_init(model, 0.5, distribution="erdos")
    with pytest.raises(UnknownNameError, match="rescale mode 'xavier'; valid modes: kaiming_normal, kaiming_uniform"):
        sparse_init(model, 0.5, rescale="xavier")
    with pytest.raises(ValueError, match="2:4 keeps at most 0.5.*use a higher sparsity"):
        sparse_init(model, 0.3, pattern="2:4")
    with pytest.raises(ValueError, match="not divisible by 3"):
        sparse_init(model, 0.8, pattern="1:3")
    with pytest.raises(ValueError, match="matches no parameter"):
        sparse_init(model, 0.5, exclude="fc9")
    assert _same(before, model.state_dict()) and not get_masks(model)
    with pytest.raises(ValueError, match="has no masks"):
        rescale_for_sparse_fan_in(model)
    sparse_init(model, 0.5)
    with pytest.raises(UnknownNameError, match="unknown rescale mode 'he'"):
        rescale_for_sparse_fan_in(model, mode="he")
    with pytest.raises(ValueError, match="gain must be a positive finite number, got -1"):
        rescale_for_sparse_fan_in(model, gain=-1)


def test_rescale_with_the_random_masks_seed_is_not_correlated_with_the_mask():
    """The same integer seed for a random mask and for the rescale must not give kept weights one sign."""
    model = torch.nn.Sequential(torch.nn.Linear(200, 100))
    sn.Sparsifier(model, sparsity=0.8, method="random", seed=3)
    sn.rescale_for_sparse_fan_in(model, seed=3)
    kept = model[0].weight[sn.get_masks(model)["0.weight"].bool()]
    assert 0.4 < float((kept > 0).float().mean()) < 0.6
