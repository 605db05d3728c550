"""Structured criteria and BatchNorm helpers against hand-computed references."""

import pytest
import torch
from torch import nn

import sparsenn as sn
from conftest import TinyMLP
from sparsenn.models.zoo import SmallVGG
from sparsenn.structured.channels import (
    SlimmingPenalty,
    couple_batchnorm,
    find_following_batchnorm,
    structured_macs,
)

VGG_PAIRS = {"features.0": "features.1", "features.3": "features.4",
             "features.7": "features.8", "features.10": "features.11"}


def _vgg(seed=0):
    torch.manual_seed(seed)
    return SmallVGG(in_channels=1, num_classes=3, widths=(4, 8))


def _vgg_data(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 1, 12, 12, generator=g), torch.randint(0, 3, (4,), generator=g)) for _ in range(n)]


def _kept_channels(mask):
    return mask.reshape(mask.shape[0], -1).all(1).nonzero().flatten().tolist()


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_methods_registered_and_channel_only():
    for name in ("l1_filter", "apoz", "bn_gamma"):
        assert name in sn.list_methods()
        assert sn.core.methods.METHODS.get(name).patterns == ("channel",)


# ----------------------------------------------------------------------------- l1_filter


def test_l1_filter_keeps_largest_l1_filters():
    conv = nn.Conv2d(1, 4, kernel_size=2, bias=False)
    with torch.no_grad():  # L1 norms 4, 1, 3, 2.5 (signs mixed)
        conv.weight.copy_(torch.tensor([[1.0, -1, 1, -1], [0.25, -0.25, 0.25, 0.25],
                                        [-3.0, 0, 0, 0], [0.5, 0.5, -0.5, -1.0]]).reshape(4, 1, 2, 2))
    model = nn.Sequential(conv)
    ctx = sn.ScoreContext(model=model, params={"0.weight": conv.weight}, masks={})
    unit = sn.core.methods.make_method("l1_filter").score(ctx)["0.weight"].reshape(4, -1).sum(1)
    assert torch.equal(unit, torch.tensor([4.0, 1.0, 3.0, 2.5]))
    sp = sn.Sparsifier(model, sparsity=0.5, method="l1_filter", pattern="channel")
    assert _kept_channels(sp.masks["0.weight"]) == [0, 2]


def test_l1_filter_equals_magnitude_channel():
    torch.manual_seed(0)
    a, b = TinyMLP(), TinyMLP()
    b.load_state_dict(a.state_dict())
    sa = sn.Sparsifier(a, sparsity=0.5, method="l1_filter", pattern="channel")
    sb = sn.Sparsifier(b, sparsity=0.5, method="magnitude", pattern="channel")
    assert all(torch.equal(sa.masks[k], sb.masks[k]) for k in sa.masks)


# ----------------------------------------------------------------------------- APoZ


def _apoz_scores(model, data, **kw):
    sp_ctx = sn.ScoreContext(model=model, params={n: p for n, p in model.named_parameters() if n.endswith("weight")
                                                  and p.dim() > 1}, masks={}, data=data, num_batches=len(data))
    return sn.core.methods.make_method("apoz").score(sp_ctx)


def test_apoz_always_negative_channel_pruned_first():
    conv = nn.Conv2d(1, 3, kernel_size=1)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([-1.0, 1.0, 1.0]).reshape(3, 1, 1, 1))
        conv.bias.copy_(torch.tensor([0.0, 0.0, -1.0]))
    model = nn.Sequential(conv, nn.ReLU())
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 1, 5, 5, generator=g) * 2 + 0.1  # positive: channel 0 always < 0
    data = [(x, torch.zeros(4, dtype=torch.long))]
    act = torch.relu(conv(x)).detach()
    apoz = (act == 0).double().mean(dim=(0, 2, 3))
    assert apoz[0] == 1 and apoz[1] == 0 and 0 < apoz[2] < 1
    score = _apoz_scores(model, data)["0.weight"]
    assert torch.allclose(score.reshape(3, -1).sum(1).double(), 1 - apoz)
    sp = sn.Sparsifier(model, sparsity=1 / 3, method="apoz", pattern="channel", data=data)
    assert _kept_channels(sp.masks["0.weight"]) == [1, 2]


def test_apoz_conv_bn_matches_direct_computation_and_leaves_model_unchanged():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 3, 3), nn.BatchNorm2d(3), nn.ReLU(inplace=True))
    with torch.no_grad():
        for bn in (model[1], model[4]):
            bn.weight.uniform_(-1, 1)
            bn.bias.uniform_(-0.5, 0.5)
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 2.0)
    data = [(torch.randn(3, 2, 6, 6), torch.zeros(3)) for _ in range(2)]
    model.train()
    before = _state(model)
    scores = _apoz_scores(model, data)
    assert model.training and all(m.training for m in model.modules())
    assert _same_state(before, _state(model))  # running stats untouched

    model.eval()
    with torch.no_grad():
        h1 = torch.cat([model[1](model[0](x)) for x, _ in data])
        h2 = torch.cat([model[4](model[3](torch.relu(model[1](model[0](x))))) for x, _ in data])
    for name, h in (("0.weight", h1), ("3.weight", h2)):
        expect = 1 - (h <= 0).double().mean(dim=(0, 2, 3))
        got = scores[name].reshape(scores[name].shape[0], -1).sum(1).double()
        assert torch.allclose(got, expect, atol=1e-6), name


@pytest.mark.parametrize("method", ["apoz", "l1_filter", "bn_gamma"])
def test_unsupported_pattern_is_a_clear_error(method):
    model = _vgg()
    before = _state(model)
    with pytest.raises(ValueError, match=rf"{method}.*unstructured.*supports: channel"):
        sn.Sparsifier(model, sparsity=0.5, method=method, pattern="unstructured", data=_vgg_data(),
                      exclude="classifier")
    assert _same_state(before, _state(model))


# ----------------------------------------------------------------------------- BatchNorm pairing / bn_gamma


def test_find_following_batchnorm_static_and_traced():
    model = _vgg()
    assert find_following_batchnorm(model) == VGG_PAIRS
    assert find_following_batchnorm(model, torch.randn(2, 1, 12, 12)) == VGG_PAIRS


def test_traced_pairing_follows_execution_not_definition_order():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(3)  # defined before its conv
            self.conv = nn.Conv2d(1, 3, 1)
            self.conv2 = nn.Conv2d(3, 3, 1)
            self.act = nn.ReLU(inplace=True)
            self.bn2 = nn.BatchNorm2d(3)  # normalizes the ReLU's output, not conv2's

        def forward(self, x):
            return self.bn2(self.act(self.conv2(self.bn(self.conv(x)))))

    model = Odd()
    assert find_following_batchnorm(model, torch.randn(2, 1, 4, 4)) == {"conv": "bn"}
    assert "conv" not in find_following_batchnorm(model)


@pytest.mark.parametrize("with_data", [False, True])
def test_bn_gamma_keeps_largest_abs_gamma(with_data):
    model = _vgg()
    gammas = {"features.1": [0.5, -2.0, 0.1, 1.0], "features.4": [-0.3, 0.2, 0.9, -0.8],
              "features.8": [1, -5, 0.2, 3, -0.1, 0.4, 2, -0.05],
              "features.11": [0.01, 0.02, -0.9, 0.8, 0.7, -0.03, 0.04, 0.6]}
    with torch.no_grad():
        for name, g in gammas.items():
            model.get_submodule(name).weight.copy_(torch.tensor(g))
    sp = sn.Sparsifier(model, sparsity=0.5, method="bn_gamma", pattern="channel", exclude="classifier",
                       data=_vgg_data() if with_data else None)
    expect = {"features.0": [1, 3], "features.3": [2, 3], "features.7": [0, 1, 3, 6],
              "features.10": [2, 3, 4, 7]}
    for layer, kept in expect.items():
        assert _kept_channels(sp.masks[f"{layer}.weight"]) == kept, layer


def test_bn_gamma_without_batchnorm_names_the_layer():
    model = TinyMLP()
    before = _state(model)
    with pytest.raises(ValueError, match=r"bn_gamma.*'fc1'.*no BatchNorm"):
        sn.Sparsifier(model, sparsity=0.5, method="bn_gamma", pattern="channel")
    assert _same_state(before, _state(model))
    vgg = _vgg()
    with pytest.raises(ValueError, match=r"'classifier'"):  # named explicitly: scored, and it has no BatchNorm
        sn.Sparsifier(vgg, sparsity=0.5, method="bn_gamma", pattern="channel", include=[nn.Conv2d, "classifier"])
    assert not sn.get_masks(vgg)
    with pytest.warns(sn.DenseOutputLayerWarning, match="'classifier'"):  # by default the classifier stays dense
        sp = sn.Sparsifier(vgg, sparsity=0.5, method="bn_gamma", pattern="channel")
    assert "classifier.weight" not in sp.names


# ----------------------------------------------------------------------------- Network Slimming


def _conv_bn():
    model = nn.Sequential(nn.Conv2d(1, 3, 1), nn.BatchNorm2d(3), nn.ReLU())
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([0.5, -1.0, 0.0]))
    return model


def test_slimming_penalty_adds_strength_times_sign():
    model, s = _conv_bn(), 1e-3
    pen = SlimmingPenalty(model, strength=s)
    pen.apply_()  # no grad yet: created
    assert torch.equal(model[1].weight.grad, torch.tensor([s, -s, 0.0]))
    model.zero_grad()
    model(torch.randn(4, 1, 3, 3)).sum().backward()
    g = model[1].weight.grad.clone()
    pen.apply_()
    assert torch.equal(model[1].weight.grad, g + s * torch.tensor([1.0, -1.0, 0.0]))

    model.zero_grad(set_to_none=True)
    loss = pen.loss()
    assert loss.item() == pytest.approx(s * 1.5)
    loss.backward()
    assert torch.allclose(model[1].weight.grad, torch.tensor([s, -s, 0.0]))


def test_slimming_penalty_bad_input():
    with pytest.raises(ValueError, match=r"strength.*-0\.1"):
        SlimmingPenalty(_conv_bn(), strength=-0.1)
    with pytest.raises(ValueError, match="BatchNorm"):
        SlimmingPenalty(TinyMLP())


def _post_relu(model, layer, x):
    out = {}
    h = model.get_submodule(layer).register_forward_hook(lambda m, a, y: out.setdefault("y", y.detach().clone()))
    with torch.no_grad():
        model(x)
    h.remove()
    return out["y"]


@pytest.mark.parametrize("train_mode", [False, True])
def test_couple_batchnorm_zeroes_pruned_channel_outputs(train_mode):
    model = _vgg()
    with torch.no_grad():
        for name in VGG_PAIRS.values():
            model.get_submodule(name).bias.fill_(1.0)  # a pruned channel would otherwise emit relu(beta) = 1
    sp = sn.Sparsifier(model, sparsity=0.5, method="l1_filter", pattern="channel", exclude="classifier")
    x = torch.randn(4, 1, 12, 12)
    model.train(train_mode)
    pruned = {layer: ~sp.masks[f"{layer}.weight"].reshape(sp.masks[f"{layer}.weight"].shape[0], -1).all(1)
              for layer in VGG_PAIRS}
    relu_of = {"features.0": "features.2", "features.3": "features.5", "features.7": "features.9",
               "features.10": "features.12"}
    assert (_post_relu(model, "features.2", x)[:, pruned["features.0"]] != 0).any()  # the problem

    counts = couple_batchnorm(sp)
    assert counts == {bn: int(pruned[layer].sum()) for layer, bn in VGG_PAIRS.items()}
    for layer, relu in relu_of.items():
        y = _post_relu(model, relu, x)
        assert (y[:, pruned[layer]] == 0).all(), layer
        assert (y[:, ~pruned[layer]] != 0).any(), layer
        bn = model.get_submodule(VGG_PAIRS[layer])
        assert torch.equal(bn.weight_mask, ~pruned[layer]) and torch.equal(bn.bias_mask, ~pruned[layer])
        assert (bn.weight[pruned[layer]] == 0).all() and (bn.bias[pruned[layer]] == 0).all()


def test_couple_batchnorm_on_finalized_model_uses_zero_rows():
    model = _vgg()
    sp = sn.Sparsifier(model, sparsity=0.5, method="l1_filter", pattern="channel", exclude="classifier")
    sp.finalize()
    counts = couple_batchnorm(model)
    assert counts == {bn: 2 if bn in ("features.1", "features.4") else 4 for bn in VGG_PAIRS.values()}
    with pytest.raises(TypeError, match="Sparsifier or an nn.Module"):
        couple_batchnorm("model")


# ----------------------------------------------------------------------------- MACs


def test_structured_macs_by_hand():
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.ReLU(),
                          nn.Conv2d(4, 3, 3, padding=1, bias=False), nn.ReLU(),
                          nn.Flatten(), nn.Linear(75, 2))
    with torch.no_grad():
        for m in (model[0], model[2]):
            m.weight.fill_(1.0)
        model[0].weight[[1, 3]] = 0  # conv1 keeps 2 of 4 filters -> conv2 sees 2 live inputs
        model[2].weight[0] = 0  # conv2 keeps 2 of 3 -> the linear sees 50 of 75 live features
    x = torch.rand(1, 2, 5, 5) + 0.1
    model.train()
    dense, effective = structured_macs(model, x)
    # conv1: 25 positions * 4*2*9; conv2: 25 * 3*4*9; linear: 1 * 2*75
    assert dense == 25 * 72 + 25 * 108 + 150
    # conv1: 25 * 9 * (2 out * 2 in); conv2: 25 * 9 * (2 out * 2 in); linear: 2 out * 50 in
    assert effective == 25 * 9 * 4 + 25 * 9 * 4 + 2 * 50
    assert model.training
    md = sn.metrics.macs(model, x)
    assert dense == sum(d for d, _ in md.values())


def test_coupled_batchnorm_masks_are_enforced_by_the_sparsifier_and_finalized():
    import sparsenn as sn
    from sparsenn.structured.channels import couple_batchnorm

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 3))
    sp = sn.Sparsifier(model, sparsity=0.5, method="l1_filter", pattern="channel", include=nn.Conv2d)
    couple_batchnorm(sp)
    assert sp.dependents == ["1.weight", "1.bias"]
    opt = sp.wrap(torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9))
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 3, (16,))
    for _ in range(5):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        sp.step()
    pruned = ~model[0].weight_mask.reshape(8, -1).any(1)
    assert pruned.sum() == 4
    assert (model[1].weight[pruned] == 0).all() and (model[1].bias[pruned] == 0).all()
    assert (model[2](model[1](model[0](x)))[:, pruned] == 0).all()  # the channels really output zero
    sp.finalize()
    assert not any(k.endswith("_mask") for k in model.state_dict())
