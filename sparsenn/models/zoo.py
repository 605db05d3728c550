"""Reference models from the pruning literature, available by name via :func:`make_model`.

* ``lenet300100`` -- LeNet-300-100 MLP (LeCun et al., 1998), the MNIST benchmark of
  Han et al., 2015 ("Learning both Weights and Connections", arXiv:1506.02626).
* ``lenet5`` -- the Caffe LeNet-5 variant (20/50 convs, 500 hidden) used by Han et al., 2015.
* ``smallvgg`` -- a small VGG-style CNN (Simonyan & Zisserman, 2015) with BatchNorm after
  every conv, the target of channel pruning by Network Slimming (Liu et al., 2017,
  arXiv:1708.06519).
* ``sparse_autoencoder`` -- a one-hidden-layer autoencoder with sigmoid hidden units, the
  model of the sparse autoencoder (Ng, 2011, CS294A lecture notes), trained with
  :class:`sparsenn.create.regularize.activations.ActivationKL` on its ``hidden`` module.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..core.registry import Registry

__all__ = ["MODELS", "LeNet300100", "LeNet5", "SmallVGG", "SparseAutoencoder", "list_models", "make_model"]

MODELS: Registry = Registry("model")


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


@MODELS.register("lenet300100")
class LeNet300100(nn.Module):
    """LeNet-300-100: ``in -> 300 -> 100 -> classes`` with ReLU (LeCun et al., 1998).

    Accepts ``(N, in_features)`` or image batches ``(N, C, H, W)``, flattened in forward.
    """

    def __init__(self, in_features: int = 784, num_classes: int = 10):
        super().__init__()
        self.in_features = _positive_int("in_features", in_features)
        self.num_classes = _positive_int("num_classes", num_classes)
        self.fc1 = nn.Linear(in_features, 300)
        self.fc2 = nn.Linear(300, 100)
        self.fc3 = nn.Linear(100, num_classes)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        if x.shape[1] != self.in_features:
            raise ValueError(
                f"LeNet300100 expects {self.in_features} input features per sample, got {x.shape[1]}"
            )
        return self.fc3(self.relu(self.fc2(self.relu(self.fc1(x)))))


@MODELS.register("lenet5")
class LeNet5(nn.Module):
    """Caffe LeNet-5 for 28x28 inputs, as pruned by Han et al., 2015 (431,080 parameters).

    conv1 1->20 k5, maxpool 2, conv2 20->50 k5, maxpool 2, fc1 800->500, ReLU, fc2.
    As in Caffe's ``lenet_train_test.prototxt`` there is no activation after the convs.
    """

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.num_classes = _positive_int("num_classes", num_classes)
        self.conv1 = nn.Conv2d(1, 20, kernel_size=5)
        self.conv2 = nn.Conv2d(20, 50, kernel_size=5)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(800, 500)
        self.fc2 = nn.Linear(500, num_classes)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and x.shape[1] == 784:  # flattened MNIST
            x = x.view(-1, 1, 28, 28)
        if x.dim() != 4 or tuple(x.shape[1:]) != (1, 28, 28):
            raise ValueError(f"LeNet5 expects input of shape (N, 1, 28, 28), got {tuple(x.shape)}")
        x = self.pool(self.conv2(self.pool(self.conv1(x))))
        return self.fc2(self.relu(self.fc1(x.flatten(1))))


@MODELS.register("smallvgg")
class SmallVGG(nn.Module):
    """VGG-style CNN: per stage two Conv3x3-BN-ReLU blocks, maxpool between stages,
    global average pool and a linear classifier (Simonyan & Zisserman, 2015).

    The BatchNorm scales are the channel gates pruned by Network Slimming (Liu et al., 2017).
    Sized for 28x28 inputs but works for any input large enough for the pooling.
    """

    def __init__(
        self, in_channels: int = 1, num_classes: int = 10, widths: Sequence[int] = (32, 64, 128)
    ):
        super().__init__()
        _positive_int("in_channels", in_channels)
        self.num_classes = _positive_int("num_classes", num_classes)
        widths = tuple(widths)
        if not widths:
            raise ValueError("widths must list at least one stage width, got ()")
        for w in widths:
            _positive_int("every entry of widths", w)
        layers: list[nn.Module] = []
        c = in_channels
        for i, w in enumerate(widths):
            if i > 0:
                layers.append(nn.MaxPool2d(2))
            for _ in range(2):
                layers += [
                    nn.Conv2d(c, w, kernel_size=3, padding=1, bias=False),
                    nn.BatchNorm2d(w),
                    nn.ReLU(inplace=True),
                ]
                c = w
        self.widths = widths
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))


@MODELS.register("sparse_autoencoder")
class SparseAutoencoder(nn.Module):
    """``in -> hidden (sigmoid) -> in`` autoencoder with a linear decoder (Ng, 2011).

    ``encoder`` and ``decoder`` are Linear layers; ``hidden`` is the ``nn.Sigmoid`` whose
    output, the code in (0, 1), an activation penalty hooks. Accepts ``(N, in_features)``
    or image batches, flattened in forward; returns ``(N, in_features)`` reconstructions.
    """

    def __init__(self, in_features: int = 784, hidden_features: int = 196):
        super().__init__()
        self.in_features = _positive_int("in_features", in_features)
        self.hidden_features = _positive_int("hidden_features", hidden_features)
        self.encoder = nn.Linear(in_features, hidden_features)
        self.hidden = nn.Sigmoid()
        self.decoder = nn.Linear(hidden_features, in_features)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The hidden code ``(N, hidden_features)``."""
        x = x.flatten(1)
        if x.shape[1] != self.in_features:
            raise ValueError(
                f"SparseAutoencoder expects {self.in_features} input features per sample, got {x.shape[1]}"
            )
        return self.hidden(self.encoder(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encode(x))


def make_model(name: str, **kwargs) -> nn.Module:
    """Build a registered model by name, e.g. ``make_model("lenet5", num_classes=10)``."""
    return MODELS.get(name)(**kwargs)


def list_models() -> list[str]:
    """Names accepted by :func:`make_model`."""
    return MODELS.names()
