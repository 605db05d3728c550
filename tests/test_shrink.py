"""Structured surgery (``sn.shrink``): the shrunk model computes what the masked model computes.

Reference: the same model with the removed channels masked to zero (producer rows and
biases, BatchNorm scale and shift); every construct the dependency graph follows has an
equality test, plus the graph's groups on a ResNet and the refusals.
"""

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import sparsenn as sn
from sparsenn.models import ResNet18
from sparsenn.structured import couple_batchnorm
from sparsenn.structured.graph import build_graph
from sparsenn.structured.shrink import ShrinkError


def randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.randn(m.num_features, generator=g))
                m.bias.copy_(torch.randn(m.num_features, generator=g))
    return model.eval()


def masked_like(model, shrunk):
    """``model`` with the channels ``shrunk`` removed set to zero in every producer and norm."""
    masked = copy.deepcopy(model).eval()
    modules = dict(masked.named_modules())
    with torch.no_grad():
        for g in shrunk.shrink_graph.groups:
            kept = shrunk.shrink_kept.get(g.producers[0]) if g.producers else None
            if kept is None:
                continue
            gone = torch.tensor([c for c in range(g.size) if c not in set(kept)], dtype=torch.long)
            for name in g.producers:
                m = modules[name]
                m.weight[gone] = 0
                if m.bias is not None:
                    m.bias[gone] = 0
            for name in g.norms:
                m = modules[name]
                m.weight[gone] = 0
                m.bias[gone] = 0
    return masked


def params(model):
    return sum(p.numel() for p in model.parameters())


def assert_shrinks_exactly(model, x, ratio=0.5, **kw):
    model = randomize(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    shrunk = sn.shrink(model, x, ratio=ratio, **kw)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the input is unchanged
    assert shrunk.shrink_kept and params(shrunk) < params(model)
    with torch.no_grad():
        torch.testing.assert_close(shrunk(x), masked_like(model, shrunk)(x), rtol=1e-4, atol=1e-5)
    return shrunk


class ConvChain(nn.Module):  # conv-bn-relu, pooling, flatten into a Linear (each channel 4x4 columns)
    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c2, self.b2 = nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32)
        self.fc1, self.fc2 = nn.Linear(32 * 4 * 4, 64), nn.Linear(64, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.b1(self.c1(x))), 2)
        x = F.adaptive_avg_pool2d(F.relu6(self.b2(self.c2(x))), 4)
        return self.fc2(F.gelu(self.fc1(torch.flatten(x, 1))))


class Dense(nn.Module):  # concatenation along channels (DenseNet-style), then a 1x1 convolution
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 12, 1)
        self.mix = nn.Conv2d(20, 16, 1)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        y = torch.cat([F.relu(self.a(x)), F.silu(self.b(x))], dim=1)
        return self.head(self.mix(y).mean((2, 3)))


class Depthwise(nn.Module):  # expand, depthwise, project, residual (MobileNetV2 / EfficientNet block)
    def __init__(self):
        super().__init__()
        self.stem, self.bs = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.expand, self.be = nn.Conv2d(16, 48, 1, bias=False), nn.BatchNorm2d(48)
        self.dw, self.bd = nn.Conv2d(48, 48, 3, padding=1, groups=48, bias=False), nn.BatchNorm2d(48)
        self.project, self.bp = nn.Conv2d(48, 16, 1, bias=False), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = F.relu6(self.bs(self.stem(x)))
        y = F.relu6(self.bd(self.dw(F.relu6(self.be(self.expand(x))))))
        x = x + self.bp(self.project(y))
        return self.fc(x.mean((2, 3)))


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(20, 64), nn.Linear(64, 32), nn.Linear(32, 3)

    def forward(self, x):
        if x.shape[-1] != 20:  # an input check: it would stop torch.fx, not a recorded run
            raise ValueError("bad input")
        return self.l3(torch.tanh(self.l2(F.relu(self.l1(x)))))


@pytest.mark.parametrize("make, x", [
    (ConvChain, torch.randn(2, 3, 16, 16)),
    (Dense, torch.randn(2, 3, 8, 8)),
    (Depthwise, torch.randn(2, 3, 8, 8)),
    (MLP, torch.randn(4, 20)),
    (lambda: ResNet18(num_classes=10), torch.randn(2, 3, 32, 32)),
], ids=["conv-bn-flatten-linear", "concat", "depthwise-residual", "mlp", "resnet18"])
@pytest.mark.parametrize("importance", ["l1", "l2", "bn_scale", "random", "wanda", "apoz", "taylor", "flap"])
def test_shrunk_equals_masked(make, x, importance):
    torch.manual_seed(0)
    kw = {"loss_fn": lambda out: out.pow(2).mean()} if importance == "taylor" else {}
    assert_shrinks_exactly(make(), x, importance=importance, **kw)


def test_resnet18_groups_couple_the_residual_stream():
    graph = build_graph(ResNet18(num_classes=10).eval(), torch.randn(1, 3, 32, 32))
    stage1 = graph.group_of("conv1")
    assert sorted(stage1.producers) == ["conv1", "layer1.0.conv2", "layer1.1.conv2"]
    assert sorted(stage1.norms) == ["bn1", "layer1.0.bn2", "layer1.1.bn2"]
    assert {c[0] for c in stage1.consumers} == {"layer1.0.conv1", "layer1.1.conv1", "layer2.0.conv1",
                                               "layer2.0.downsample.0"}
    assert graph.group_of("fc").frozen == "they are the model's output"
    assert len(graph.prunable()) == 12


def test_resnet18_shrinks_to_a_quarter_of_the_parameters_at_half_the_channels():
    shrunk = sn.shrink(ResNet18(num_classes=10).eval(), torch.randn(1, 3, 32, 32), ratio=0.5, round_to=8)
    assert shrunk.conv1.out_channels == 32 and shrunk.layer4[1].conv2.out_channels == 256
    assert shrunk.fc.in_features == 256 and shrunk.fc.out_features == 10
    assert 0.24 < params(shrunk) / params(ResNet18(num_classes=10)) < 0.26
    assert all(m.out_channels % 8 == 0 for m in shrunk.modules() if isinstance(m, nn.Conv2d))


def test_round_to_and_ignore():
    torch.manual_seed(0)
    model = randomize(ConvChain())
    x = torch.randn(1, 3, 16, 16)
    shrunk = sn.shrink(model, x, ratio=0.3, round_to=8, ignore=["c2"])
    assert shrunk.c1.out_channels == 16 and shrunk.c2.out_channels == 32  # 16 * 0.7 = 11.2 -> 16; c2 ignored
    assert shrunk.fc1.out_features == 48  # 64 - 19 = 45 -> 48
    shrunk = sn.shrink(model, x, ratio=0.3, ignore=[model.fc1])
    assert shrunk.fc1.out_features == 64 and shrunk.c1.out_channels == 12
    resnet = sn.shrink(ResNet18(num_classes=10).eval(), torch.randn(1, 3, 32, 32), ratio=0.5, ignore=["fc"])
    assert resnet.fc.out_features == 10 and resnet.fc.in_features == 256  # its inputs still follow stage 4


def test_ratio_none_removes_the_channels_a_channel_sparsifier_zeroed():
    torch.manual_seed(0)
    model = randomize(ConvChain())
    x = torch.randn(2, 3, 16, 16)
    sp = sn.Sparsifier(model, sparsity=0.5, method="l1_filter", pattern="channel", include=["c1", "c2", "fc1"])
    couple_batchnorm(sp, x)
    with torch.no_grad():
        ref = model(x)
    shrunk = sn.shrink(model, x)
    # c1's pruned rows keep their bias, but its coupled BatchNorm zeroes them; fc1's pruned rows still
    # emit their bias (no BatchNorm after it), so they are not zero and stay
    assert (shrunk.c1.out_channels, shrunk.c2.out_channels, shrunk.fc1.out_features) == (8, 16, 64)
    with torch.no_grad():
        torch.testing.assert_close(shrunk(x), ref, rtol=1e-4, atol=1e-5)
    assert sn.shrink(ConvChain().eval(), x).c1.out_channels == 16  # nothing zero: nothing removed


def test_constructs_the_graph_does_not_follow_are_kept_and_named():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.g = nn.Conv2d(8, 8, 3, padding=1, groups=2)  # grouped: frozen
            self.b = nn.Linear(8, 8)
            self.w = nn.Parameter(torch.randn(4, 8))  # not inside a Linear

        def forward(self, x):
            y = self.g(self.a(x)).mean((2, 3))
            return F.linear(torch.sigmoid(self.b(y)), self.w)  # sigmoid: not zero-preserving

    graph = build_graph(Odd().eval(), torch.randn(1, 3, 8, 8))
    assert "grouped convolution" in graph.group_of("a").frozen
    assert "sigmoid" in graph.group_of("b").frozen
    assert any(n.startswith("w is read by linear") for n in graph.notes)
    shrunk = sn.shrink(Odd().eval(), torch.randn(1, 3, 8, 8), ratio=0.5)
    assert shrunk.a.out_channels == 8 and shrunk.b.out_features == 8


def test_bad_arguments_are_refused_and_the_model_unchanged():
    model = ConvChain().eval()
    x = torch.randn(1, 3, 16, 16)
    with pytest.raises(ValueError, match=r"ratio must be a number in \[0, 1\)"):
        sn.shrink(model, x, ratio=1.0)
    with pytest.raises(ValueError, match=r"unknown importance 'obd'; valid: l1, l2, filter_l1, filter_l2, bn_scale, "
                                         r"random, wanda, apoz, taylor, flap \(or group_l1, group_l2, "
                                         r"l1_filter, bn_gamma\)"):
        sn.shrink(model, x, ratio=0.5, importance="obd")
    with pytest.raises(ValueError, match="round_to must be a positive integer"):
        sn.shrink(model, x, ratio=0.5, round_to=0)
    with pytest.raises(ValueError, match="'nope' is not a module name"):
        sn.shrink(model, x, ratio=0.5, ignore=["nope"])
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        zeroed.c1.weight.zero_()
        zeroed.c1.bias.zero_()
        zeroed.b1.weight.zero_()
        zeroed.b1.bias.zero_()
    with pytest.raises(ShrinkError, match=r"every channel of the group produced by \['c1'\] is zero"):
        sn.shrink(zeroed, x)
    assert isinstance(model.c1, nn.Conv2d) and model.c1.out_channels == 16


def test_efficientnet_lite0_depthwise_blocks_shrink_exactly():
    from sparsenn.models import EfficientNetLite0

    torch.manual_seed(0)
    model = EfficientNetLite0(num_classes=10)
    shrunk = assert_shrinks_exactly(model, torch.randn(1, 3, 64, 64), ratio=0.3)
    block = shrunk._blocks[1]  # expand 16 -> 96 (x6), depthwise, project to 24
    assert block._depthwise_conv.groups == block._depthwise_conv.out_channels == block._expand_conv.out_channels
    assert block._expand_conv.out_channels == 96 - int(0.3 * 96)


def test_wanda_keeps_the_channels_with_the_largest_activation_times_weight():
    """A hand-made case: equal consumer weights, so the channels kept are those with the largest input
    norm; l1 (producer rows) would pick the largest rows instead."""
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.ReLU(), nn.Linear(4, 2, bias=False)).eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0])))
        model[2].weight.fill_(1.0)
    x = torch.tensor([[0.1, 0.1, 5.0, 9.0]]).repeat(3, 1)  # activations: 0.4, 0.3, 10, 9
    assert sn.shrink(model, x, ratio=0.5, importance="wanda").shrink_kept == {"0": [2, 3]}
    assert sn.shrink(model, x, ratio=0.5, importance="l1").shrink_kept == {"0": [0, 1]}


@settings(max_examples=25, deadline=None)
@given(widths=st.lists(st.integers(2, 12), min_size=2, max_size=4), ratio=st.floats(0.0, 0.95),
       importance=st.sampled_from(["l1", "l2", "random", "wanda"]), round_to=st.integers(1, 4),
       residual=st.booleans(), seed=st.integers(0, 1000))
def test_shrunk_equals_masked_property(widths, ratio, importance, round_to, residual, seed):
    """Random MLPs (optionally with a residual stream the hidden layers add to): whatever the widths and
    ratio, the shrunk model computes what the masked model computes, and every kept count is what the
    rounding rule gives."""
    torch.manual_seed(seed)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(5, widths[0])
            self.hidden = nn.ModuleList(nn.Linear(widths[0] if residual else a, widths[0] if residual else b)
                                        for a, b in itertools.pairwise(widths))
            self.out = nn.Linear(widths[0] if residual else widths[-1], 3)

        def forward(self, x):
            h = F.relu(self.inp(x))
            for layer in self.hidden:
                h = h + F.relu(layer(h)) if residual else F.relu(layer(h))
            return self.out(h)

    model = Net().eval()
    x = torch.randn(4, 5)
    shrunk = sn.shrink(model, x, ratio=ratio, importance=importance, round_to=round_to)
    with torch.no_grad():
        torch.testing.assert_close(shrunk(x), masked_like(model, shrunk)(x), rtol=1e-4, atol=1e-5)
    for g in shrunk.shrink_graph.prunable():
        n = g.size - int(ratio * g.size)
        expected = min(g.size, -(-n // round_to) * round_to)
        assert len(shrunk.shrink_kept.get(g.producers[0], range(g.size))) == expected


def test_apoz_removes_the_channels_relu_zeroes_most_often_and_aliases_work():
    """Hand-made: hidden units 0 and 1 are zero after ReLU for 3 of 4 inputs, units 2 and 3 never."""
    model = nn.Sequential(nn.Linear(1, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[5.0], [4.0], [1.0], [1.0]]))
        model[0].bias.copy_(torch.tensor([-30.0, -20.0, 10.0, 10.0]))
    x = torch.tensor([[1.0], [2.0], [3.0], [8.0]])  # unit 0 > 0 only at 8; unit 1 only at 8
    assert sn.shrink(model, x, ratio=0.5, importance="apoz").shrink_kept == {"0": [2, 3]}
    assert sn.shrink(model, x, ratio=0.5, importance="l1_filter").shrink_kept == \
        sn.shrink(model, x, ratio=0.5, importance="filter_l1").shrink_kept == {"0": [0, 1]}  # the largest rows


def test_a_property_that_returns_a_view_freezes_what_it_reads():
    """``y.T`` arrives as a property getter; only metadata properties (``shape``, ``dtype``...) are ignored, so
    a transposed view read by the next layer keeps the producer's channels (else the next layer's input
    would no longer match)."""

    class Transposed(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)

        def forward(self, x):
            y = F.relu(self.a(x))
            assert y.shape[-1] == 8 and y.dtype == torch.float32  # metadata: ignored
            return self.b(y.T.T)

    x = torch.randn(5, 4)
    assert "read by T" in build_graph(Transposed().eval(), x).group_of("a").frozen
    model = Transposed().eval()
    shrunk = sn.shrink(model, x, ratio=0.5)
    assert shrunk.a.out_features == 8
    with torch.no_grad():
        torch.testing.assert_close(shrunk(x), model(x))
