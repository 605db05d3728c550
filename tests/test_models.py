"""Reference models (sparsenn.models.zoo): shapes, parameter counts, registry."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparsenn.core.registry import UnknownNameError
from sparsenn.models import ResNet18
from sparsenn.models.zoo import LeNet5, LeNet300100, SmallVGG, list_models, make_model


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_lenet300100():
    m = LeNet300100()
    assert n_params(m) == 266_610
    assert [m.fc1.out_features, m.fc2.out_features, m.fc3.out_features] == [300, 100, 10]
    x = torch.rand(5, 1, 28, 28)
    out = m(x)
    assert out.shape == (5, 10)
    assert torch.equal(out, m(x.flatten(1)))
    assert make_model("lenet300100", in_features=64, num_classes=3)(torch.rand(2, 64)).shape == (2, 3)
    with pytest.raises(ValueError, match="784"):
        m(torch.rand(2, 100))


def test_lenet5():
    m = LeNet5()
    assert n_params(m) == 431_080
    assert (m.conv1.out_channels, m.conv2.out_channels) == (20, 50)
    assert (m.fc1.in_features, m.fc1.out_features, m.fc2.out_features) == (800, 500, 10)
    x = torch.rand(4, 1, 28, 28)
    assert m(x).shape == (4, 10)
    assert torch.equal(m(x), m(x.flatten(1)))
    with pytest.raises(ValueError, match=r"\(N, 1, 28, 28\)"):
        m(torch.rand(4, 3, 32, 32))


def test_smallvgg():
    m = SmallVGG()
    convs = [l for l in m.modules() if isinstance(l, nn.Conv2d)]
    bns = [l for l in m.modules() if isinstance(l, nn.BatchNorm2d)]
    assert [c.out_channels for c in convs] == [32, 32, 64, 64, 128, 128]
    assert [b.num_features for b in bns] == [32, 32, 64, 64, 128, 128]
    assert sum(isinstance(l, nn.MaxPool2d) for l in m.modules()) == 2
    assert m(torch.rand(3, 1, 28, 28)).shape == (3, 10)
    small = make_model("smallvgg", in_channels=3, num_classes=5, widths=(8, 16))
    assert small(torch.rand(2, 3, 28, 28)).shape == (2, 5)
    m.eval()
    out = m(torch.rand(3, 1, 28, 28))
    out.sum().backward()
    assert convs[0].weight.grad is not None


def test_resnet18_is_torchvisions_architecture():
    m = ResNet18()
    assert n_params(m) == 11_689_512  # torchvision.models.resnet18(): 11,689,512
    convs = [c for c in m.modules() if isinstance(c, nn.Conv2d)]
    assert len(convs) == 20 and all(c.bias is None for c in convs) and m.fc.out_features == 1000
    assert [len(getattr(m, f"layer{i}")) for i in range(1, 5)] == [2, 2, 2, 2]
    keys = set(m.state_dict())  # torchvision's names, so its state_dict loads
    assert {"conv1.weight", "bn1.running_mean", "layer1.0.conv2.weight", "layer2.0.downsample.0.weight",
            "layer2.0.downsample.1.num_batches_tracked", "layer4.1.bn2.bias", "fc.weight", "fc.bias"} <= keys
    assert (m.layer3[0].conv1.stride, m.layer3[0].downsample[0].kernel_size) == ((2, 2), (1, 1))
    m.eval()
    assert m(torch.rand(2, 3, 64, 64)).shape == (2, 1000)
    small = make_model("resnet18", num_classes=10, in_channels=1)
    assert small(torch.rand(2, 1, 32, 32)).shape == (2, 10)
    assert torch.all(ResNet18(zero_init_residual=True).layer1[0].bn2.weight == 0)
    with pytest.raises(ValueError, match=r"ResNet18 expects input of shape \(N, 3, H, W\), got \(2, 1, 32, 32\)"):
        m(torch.rand(2, 1, 32, 32))


@pytest.mark.parametrize(
    "cls,kwargs,match",
    [
        (LeNet300100, {"num_classes": 0}, "num_classes"),
        (LeNet300100, {"in_features": 2.5}, "in_features"),
        (LeNet5, {"num_classes": -1}, "num_classes"),
        (SmallVGG, {"widths": ()}, "widths"),
        (SmallVGG, {"widths": (8, 0)}, "widths"),
        (ResNet18, {"num_classes": 0}, "num_classes"),
        (ResNet18, {"in_channels": 2.0}, "in_channels"),
    ],
)
def test_bad_arguments(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


def test_registry():
    assert list_models() == ["lenet300100", "lenet5", "resnet18", "smallvgg", "sparse_autoencoder"]
    assert isinstance(make_model("LeNet5"), LeNet5)
    with pytest.raises(UnknownNameError, match="lenet300100, lenet5, resnet18, smallvgg, sparse_autoencoder"):
        make_model("resnet50")
