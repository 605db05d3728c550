"""Sparse variational dropout: the KL approximation of Molchanov et al. 2017 (hand values and
the exact KL by quadrature), the local reparametrization trick's moments, and pruning by
log alpha into exact zeros under masks."""

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

import sparsenn as sn
from sparsenn import variational as vd
from sparsenn.create.regularize.variational import K1, Conv2dSVDO, LinearSVDO


def _paper_kl(log_alpha):
    """-(k1 sigmoid(k2 + k3 log a) - 0.5 log(1 + 1/a) - k1), eq. 14 of arXiv:1701.05369, by hand."""
    k1, k2, k3 = 0.63576, 1.87320, 1.48695
    a = math.exp(log_alpha)
    return -(k1 / (1 + math.exp(-(k2 + k3 * log_alpha))) - 0.5 * math.log(1 + 1 / a) - k1)


def test_kl_approximation_hand_values():
    las = [-10.0, -3.0, 0.0, 1.5, 3.0, 10.0]
    got = vd.kl_approximation(torch.tensor(las, dtype=torch.float64))
    for la, value in zip(las, got.tolist()):
        assert value == pytest.approx(_paper_kl(la), rel=1e-12)
    assert _paper_kl(0.0) == pytest.approx(0.431239, abs=1e-6)  # 0.63576 (1 - sigmoid(1.8732)) + 0.5 log 2
    assert got[-1] < 1e-3 and (got.diff() < 0).all()  # decreasing, -> 0 as alpha grows


def test_kl_approximation_matches_the_exact_kl_by_quadrature():
    # KL(N(theta, alpha theta^2) || log-uniform) = -0.5 log alpha + E_{e ~ N(1, alpha)} log|e| + const;
    # with const = k1 (KL -> 0 as alpha -> inf) the paper's fit is within 0.01 (its stated accuracy)
    from scipy import integrate

    def expected_log_abs(alpha):
        s = math.sqrt(alpha)
        f = lambda z: math.log(abs(1 + s * z)) * math.exp(-z * z / 2) / math.sqrt(2 * math.pi)  # noqa: E731
        return sum(integrate.quad(f, lo, hi, limit=200)[0] for lo, hi in ((-np.inf, -1 / s), (-1 / s, np.inf)))

    las = np.linspace(-8, 8, 33)
    exact = np.array([-0.5 * la + expected_log_abs(math.exp(la)) + K1 for la in las])
    approx = vd.kl_approximation(torch.tensor(las)).numpy()
    assert np.abs(approx - exact).max() < 0.01


def test_log_alpha_is_clipped_and_kl_sums_over_layers():
    layer = LinearSVDO(4, 3)
    with torch.no_grad():
        layer.log_sigma2.fill_(-30.0)
        layer.log_sigma2[0] = 30.0
    assert layer.log_alpha.min() == -10.0 and layer.log_alpha.max() == 10.0
    model = nn.Sequential(layer, nn.ReLU(), LinearSVDO(3, 2))
    expected = vd.kl_approximation(layer.log_alpha).sum() + vd.kl_approximation(model[2].log_alpha).sum()
    torch.testing.assert_close(vd.kl_divergence(model), expected)


# ----------------------------------------------------------------------------- forward passes


def test_eval_forward_equals_the_dense_layer_when_nothing_is_dropped():
    torch.manual_seed(0)
    for dense, x in ((nn.Linear(8, 5), torch.randn(3, 8)),
                     (nn.Conv2d(3, 4, 3, stride=2, padding=1), torch.randn(2, 3, 9, 9))):
        svdo = (LinearSVDO if isinstance(dense, nn.Linear) else Conv2dSVDO).from_dense(dense, log_sigma2_init=-30.0)
        assert svdo.keep_mask().all()
        assert torch.equal(svdo.eval()(x), dense(x))


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_local_reparametrization_moments(kind):
    # train mode samples b = x theta + eps sqrt(x^2 (alpha theta^2)): mean and variance per output
    torch.manual_seed(0)
    if kind == "linear":
        layer, x = LinearSVDO(6, 3), torch.randn(1, 6)
        mean = nn.functional.linear(x, layer.weight, layer.bias)
        op = lambda inp, w: nn.functional.linear(inp, w)  # noqa: E731
    else:
        layer, x = Conv2dSVDO(2, 3, 3, padding=1), torch.randn(1, 2, 4, 4)
        mean = nn.functional.conv2d(x, layer.weight, layer.bias, padding=1)
        op = lambda inp, w: nn.functional.conv2d(inp, w, padding=1)  # noqa: E731
    with torch.no_grad():
        layer.log_sigma2.copy_(torch.log(layer.weight ** 2) + torch.empty_like(layer.weight).uniform_(-2, 1))
    var = op(x * x, layer.log_alpha.exp() * layer.weight ** 2)
    samples = layer.train()(x.expand(20_000, *x.shape[1:])).detach()
    torch.testing.assert_close(samples.mean(0, keepdim=True), mean.detach(), atol=4 * var.max().sqrt().item() / 140,
                               rtol=0)
    torch.testing.assert_close(samples.var(0, keepdim=True), var.detach(), rtol=0.06, atol=1e-6)


def test_gradients_reach_theta_and_log_sigma2():
    layer = LinearSVDO(4, 2)
    (layer(torch.randn(8, 4)).pow(2).sum() + layer.kl()).backward()
    assert layer.weight.grad.abs().sum() > 0 and layer.log_sigma2.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- convert and prune


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Sequential(nn.Linear(4 * 4 * 4, 8)),
                         nn.ReLU(), nn.Linear(8, 3))


def test_convert_copies_weights_and_keeps_the_mode():
    model = _net().eval()
    reference = copy.deepcopy(model)
    vd.convert(model, exclude="5", log_sigma2_init=-30.0)
    assert [n for n, _ in vd.svdo_layers(model)] == ["0", "3.0"]
    assert isinstance(model[5], nn.Linear) and not model[0].training
    assert torch.equal(model[0].weight, reference[0].weight) and torch.equal(model[3][0].bias, reference[3][0].bias)
    x = torch.randn(2, 1, 6, 6)
    assert torch.equal(model(x), reference(x))  # log alpha = -10 everywhere: nothing dropped


def test_prune_zeros_exactly_the_weights_with_log_alpha_above_the_threshold():
    model = vd.convert(_net())
    torch.manual_seed(1)
    with torch.no_grad():
        for _, layer in vd.svdo_layers(model):
            layer.log_sigma2.copy_(torch.log(layer.weight ** 2) + torch.empty_like(layer.weight).uniform_(-6, 8))
    log_alphas = {name: layer.log_alpha.detach().clone() for name, layer in vd.svdo_layers(model)}
    x = torch.randn(5, 1, 6, 6)
    before = model.eval()(x)
    expected = vd.svdo_sparsity(model)
    assert 0.2 < expected < 0.8
    vd.prune(model)
    assert vd.svdo_layers(model) == [] and isinstance(model[0], nn.Conv2d) and isinstance(model[3][0], nn.Linear)
    masks = sn.get_masks(model)
    assert set(masks) == {"0.weight", "3.0.weight", "5.weight"}
    for name, log_alpha in log_alphas.items():
        weight = model.get_submodule(name).weight
        assert torch.equal(masks[f"{name}.weight"], log_alpha <= 3.0)
        assert (weight[log_alpha > 3.0] == 0).all() and (weight[log_alpha <= 3.0] != 0).all()
    torch.testing.assert_close(model(x), before)  # eval-mode SVDO already dropped them
    dropped = sum(int((la > 3).sum()) for la in log_alphas.values())
    assert sn.metrics.layer_sparsity(model)["0.weight"] == pytest.approx(float((log_alphas["0"] > 3).float().mean()))
    assert dropped / sum(la.numel() for la in log_alphas.values()) == pytest.approx(expected)


def test_prune_with_an_explicit_threshold():
    layer = LinearSVDO(5, 4)
    with torch.no_grad():
        layer.log_sigma2.copy_(torch.log(layer.weight ** 2) + torch.linspace(-5, 5, 20).reshape(4, 5))
    model = nn.Sequential(layer)
    n_above = int((layer.log_alpha > 0.0).sum())
    vd.prune(model, threshold=0.0)
    assert int((model[0].weight == 0).sum()) == n_above


def test_training_with_the_kl_sparsifies_and_keeps_accuracy():
    torch.manual_seed(0)
    x = torch.randn(512, 16)
    y = (x[:, 0] + x[:, 1] > 0).long()  # 2 of 16 inputs matter
    model = vd.convert(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 2)))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(200):
        idx = torch.randint(0, 512, (64,))
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx]) + vd.kl_divergence(model) / len(x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    vd.prune(model)
    assert sn.sparsity(model) > 0.6
    assert (model(x).argmax(1) == y).float().mean() > 0.9


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs,match", [
    (dict(threshold=11.0), r"threshold must be a finite number in \[-10, 10\]"),
    (dict(threshold=float("nan")), "threshold"),
    (dict(log_sigma2_init=float("inf")), "log_sigma2_init"),
    (dict(include=nn.ReLU), "matches no|no parameters"),
    (dict(include=["0", "3.0", "nope"]), "nope"),
])
def test_convert_bad_arguments_leave_the_model_unchanged(kwargs, match):
    model = _net()
    before = copy.deepcopy(model)
    with pytest.raises(ValueError, match=match):
        vd.convert(model, **kwargs)
    assert str(model) == str(before) and vd.svdo_layers(model) == []


def test_convert_refuses_unsupported_and_masked_layers():
    model = nn.Sequential(nn.Linear(4, 4), nn.Conv1d(4, 4, 1))
    with pytest.raises(ValueError, match="belongs to Conv1d"):
        vd.convert(model, include=[nn.Linear, nn.Conv1d])
    assert isinstance(model[0], nn.Linear)
    sn.masks_from_zeros(model, include="0")
    with pytest.raises(ValueError, match="has a mask"):
        vd.convert(model, include="0")
    conv = nn.Conv2d(1, 1, 3, padding=1, padding_mode="reflect")
    with pytest.raises(ValueError, match="padding_mode"):
        Conv2dSVDO.from_dense(conv)


def test_prune_and_kl_need_svdo_layers_and_a_valid_threshold():
    with pytest.raises(ValueError, match="convert"):
        vd.kl_divergence(_net())
    with pytest.raises(ValueError, match="convert"):
        vd.prune(_net())
    model = vd.convert(_net())
    with pytest.raises(ValueError, match="threshold"):
        vd.prune(model, threshold=-11.0)
    assert len(vd.svdo_layers(model)) == 3  # unchanged
    with pytest.raises(ValueError, match="threshold"):
        LinearSVDO(2, 2, threshold=20.0)
