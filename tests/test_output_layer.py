"""Channel patterns keep the model's output layer dense; patterns that do not fit a layer name it.

``pattern="channel"`` at 80% used to remove 800 of ResNet-18's 1,000 classifier rows, i.e.
800 classes, without a word. A pattern that removes whole output units now leaves the
output layer (the last Linear/Conv in module order) out of the selection, with a
:class:`~sparsenn.DenseOutputLayerWarning`, unless ``include`` names it.
"""

import warnings

import pytest
import torch
from torch import nn

import sparsenn as sn
from sparsenn.core.targets import DenseOutputLayerWarning, output_layer, select_parameters


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class TinyResNet(nn.Module):
    """conv1 (3 -> 8, 7x7) -> bn -> 2 residual blocks -> pool -> fc (8 -> 10 classes)."""

    def __init__(self, classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 7, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.layer1 = nn.Sequential(Block(8), Block(8))
        self.fc = nn.Linear(8, classes)

    def forward(self, x):
        x = self.layer1(torch.relu(self.bn1(self.conv1(x))))
        return self.fc(x.mean(dim=(2, 3)))


def _alive_outputs(model):
    return int((model.fc.weight.detach().abs().sum(1) > 0).sum())


def test_channel_pattern_keeps_the_classifier_dense_and_says_so():
    model = TinyResNet()
    with pytest.warns(DenseOutputLayerWarning, match=r"output layer 'fc'.*include=.*'fc'"):
        sp = sn.Sparsifier(model, 0.8, pattern="channel")
    assert "fc.weight" not in sp.names and "conv1.weight" in sp.names
    assert not hasattr(model.fc, "weight_mask")
    assert _alive_outputs(model) == 10  # no class removed
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 10)


def test_naming_the_output_layer_in_include_prunes_it_without_warning():
    model = TinyResNet()
    with warnings.catch_warnings():
        warnings.simplefilter("error", DenseOutputLayerWarning)
        sp = sn.Sparsifier(model, 0.8, pattern="channel", include=[nn.Conv2d, "fc"])
    assert "fc.weight" in sp.names
    assert _alive_outputs(model) == 2  # round(0.2 * 10) rows kept: what was asked for
    for explicit in ("fc.weight", ["fc"]):
        assert "fc.weight" in select_parameters(TinyResNet(), explicit, pattern="channel")


def test_excluding_it_or_other_patterns_are_silent():
    with warnings.catch_warnings():
        warnings.simplefilter("error", DenseOutputLayerWarning)
        sp = sn.Sparsifier(TinyResNet(), 0.5, pattern="channel", exclude="fc")
        assert "fc.weight" not in sp.names
        for pattern, sparsity in [("unstructured", 0.8), ("channel_in", 0.5), ("block2x2", 0.5)]:
            names = select_parameters(TinyResNet(), exclude=None if pattern != "block2x2" else "conv1",
                                      pattern=pattern)
            assert "fc.weight" in names, pattern  # these never remove a whole output unit
        sp = sn.Sparsifier(TinyResNet(), 0.8, pattern="unstructured")
        assert "fc.weight" in sp.names


def test_output_layer_is_the_last_linear_or_conv_in_module_order():
    assert output_layer(TinyResNet()) == ("fc", "fc.weight")
    seq = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3), nn.LayerNorm(3))
    assert output_layer(seq) == ("2", "2.weight")
    mha_last = nn.ModuleDict({"proj": nn.Linear(4, 4), "attn": nn.MultiheadAttention(4, 1)})
    assert output_layer(mha_last) == ("attn.out_proj", "attn.out_proj.weight")  # the attention's output Linear
    assert output_layer(nn.Sequential(nn.Embedding(5, 4), nn.LayerNorm(4))) is None


class TiedLM(nn.Module):
    """Embedding -> Linear -> head whose weight is the embedding's (tied, as in most language models)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(12, 8)
        self.mlp = nn.Linear(8, 8)
        self.head = nn.Linear(8, 12, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, x):
        return self.head(torch.relu(self.mlp(self.embed(x))))


def test_a_tied_head_is_found_through_the_weight_it_shares():
    model = TiedLM()
    assert output_layer(model) == ("head", "embed.weight")
    # the head (a Linear, a default type) selects the tied tensor under its first name, embed.weight;
    # as the output layer it is left dense
    with pytest.warns(DenseOutputLayerWarning, match="'head'"):
        assert select_parameters(model, pattern="channel") == ["mlp.weight"]
    assert select_parameters(model) == ["embed.weight", "mlp.weight"]  # unstructured: the tied head is masked once
    with pytest.warns(DenseOutputLayerWarning, match="'head'"):
        names = select_parameters(model, include=[nn.Embedding, nn.Linear], pattern="channel")
    assert names == ["mlp.weight"]
    assert select_parameters(model, include=["embed", "mlp"], pattern="channel") == ["embed.weight", "mlp.weight"]


def test_a_model_that_is_one_layer_keeps_it():
    lin = nn.Linear(8, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DenseOutputLayerWarning)
        sp = sn.Sparsifier(lin, 0.5, pattern="channel")
    assert sp.names == ["weight"]


def test_sparse_init_and_iterative_prune_follow_the_same_rule():
    model = TinyResNet()
    with pytest.warns(DenseOutputLayerWarning):
        masks = sn.sparse_init(model, 0.5, pattern="channel")
    assert "fc.weight" not in masks
    model = TinyResNet()
    with pytest.warns(DenseOutputLayerWarning):
        sn.iterative_prune(model, levels=[0.5], train_fn=lambda m, info: None, pattern="channel",
                           overrides={"conv1.weight": 0.5})
    assert not hasattr(model.fc, "weight_mask") and _alive_outputs(model) == 10


def test_pattern_that_does_not_fit_suggests_exclude_with_every_layer_name():
    model = TinyResNet()  # conv1: 3 * 7 * 7 = 147 inputs per filter, not divisible by 4
    with pytest.raises(sn.PatternError, match=r"'conv1.weight'.*147.*exclude=\['conv1'\]"):
        sn.Sparsifier(model, pattern="2:4")
    assert not hasattr(model.conv1, "weight_mask")  # nothing changed
    mlp = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3), nn.ReLU(), nn.Linear(3, 5))
    with pytest.raises(sn.PatternError, match=r"'0.weight'.*'4.weight'.*exclude=\['0', '4'\]"):
        sn.Sparsifier(mlp, pattern="2:4")
    with pytest.raises(sn.PatternError, match=r"block4x4.*exclude=\['2'\]"):
        sn.Sparsifier(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 6)), 0.5, pattern="block4x4")
    sp = sn.Sparsifier(model, pattern="2:4", exclude=["conv1"])  # the suggestion works
    assert "conv1.weight" not in sp.names
