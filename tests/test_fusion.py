"""Folding eval-mode BatchNorm into the convolution before it (:mod:`sparsenn.backend.runtime.fusion`).

Reference: the unfolded model's output; the folding's defining properties (zeros kept,
BatchNorm gone) and the cases where folding would be wrong (the convolution's output used
twice, a module called twice, training mode, a model that does not trace).
"""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

import sparsenn as sn
from sparsenn.backend import runtime
from sparsenn.backend.runtime import ArchiveError
from sparsenn.backend.runtime.fusion import fold_batchnorm, foldable_pairs
from sparsenn.backend.runtime.io import digest
from sparsenn.models import ResNet18


def randomize_bn(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g))
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.randn(m.num_features, generator=g))
                    m.bias.copy_(torch.randn(m.num_features, generator=g))
    return model.eval()


def prune(model, sparsity=0.8):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.mul_(torch.rand_like(m.weight) >= sparsity)
    return model


class ConvBN(nn.Module):
    def __init__(self, bias=False, affine=True):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=bias)
        self.bn = nn.BatchNorm2d(8, affine=affine)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("affine", [False, True])
def test_folded_output_equals_unfolded_and_zeros_stay(bias, affine):
    torch.manual_seed(0)
    model = prune(randomize_bn(ConvBN(bias, affine)))
    x = torch.randn(2, 3, 10, 10)
    ref = model(x)
    zeros = model.conv.weight == 0
    pairs, why = fold_batchnorm(model)
    assert pairs == [("conv", "bn")] and why is None
    assert isinstance(model.bn, nn.Identity) and model.conv.bias is not None
    assert bool((model.conv.weight[zeros] == 0).all())  # a pruned weight stays pruned
    torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)


def test_resnet18_folds_every_conv_batchnorm_pair():
    torch.manual_seed(0)
    model = randomize_bn(ResNet18(num_classes=10))
    x = torch.randn(1, 3, 64, 64)
    ref = model(x)
    assert foldable_pairs(model)[0] == []  # its input check on x.shape stops torch.fx: a recorded run finds them
    pairs, _ = fold_batchnorm(model, x)
    assert len(pairs) == 20 and ("layer2.0.downsample.0", "layer2.0.downsample.1") in pairs
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-4)


class SharedOutput(nn.Module):  # the convolution's output is also used unnormalized
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class CalledTwice(nn.Module):  # one convolution module at two call sites
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        return self.conv(self.bn(self.conv(x)))


class Untraceable(ConvBN):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            return self.bn(self.conv(x))
        return self.bn(self.conv(-x))


class Returned(Untraceable):  # the convolution's output is also a model output
    def forward(self, x):
        assert x.sum() == x.sum()
        y = self.conv(x)
        return self.bn(y), y


class ReadInPlace(Untraceable):
    def forward(self, x):
        assert x.sum() == x.sum()
        y = self.conv(x)
        y.clamp_(min=0)  # changed before the BatchNorm reads it
        return self.bn(y)


@pytest.mark.parametrize("recorded", [False, True], ids=["graph", "recorded run"])
def test_unsafe_pairs_are_not_folded(recorded):
    class Check(nn.Module):  # stops torch.fx, so the recorded run decides
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            if x.shape[0] < 0 or x.sum() != x.sum():
                raise ValueError
            return self.inner(x)

    def pairs(model):
        x = torch.randn(2, 3, 6, 6) if not isinstance(model, CalledTwice) else torch.randn(2, 8, 6, 6)
        return foldable_pairs(Check(model) if recorded else model, x)[0]

    assert pairs(randomize_bn(ConvBN())) == ([("inner.conv", "inner.bn")] if recorded else [("conv", "bn")])
    assert pairs(randomize_bn(SharedOutput())) == []
    assert pairs(randomize_bn(CalledTwice())) == []
    assert pairs(ConvBN().train()) == []
    for model in (Returned(), ReadInPlace()):
        assert foldable_pairs(randomize_bn(model), torch.randn(1, 3, 6, 6))[0] == []
    assert foldable_pairs(randomize_bn(Untraceable()), torch.randn(1, 3, 6, 6))[0] == [("conv", "bn")]
    pairs_, why = fold_batchnorm(Untraceable().eval())  # no example input: nothing to run
    assert pairs_ == [] and "does not trace with torch.fx" in why
    assert foldable_pairs(nn.Sequential(nn.Conv2d(3, 3, 1))) == ([], None)  # no BatchNorm: not even traced


def test_convert_folds_and_save_load_rebuild_the_structure(tmp_path):
    torch.manual_seed(0)
    model = prune(randomize_bn(ResNet18(num_classes=10)), 0.9)
    x = torch.randn(1, 3, 32, 32)
    conv = sn.convert(model, x, batch_sizes=(1,), force="conv")
    assert isinstance(model.bn1, nn.BatchNorm2d)  # the given model is untouched
    assert isinstance(conv.bn1, nn.Identity) and len(conv.folded_batchnorm) == 20
    assert any("20 BatchNorm2d folded" in n for n in conv.conversion_summary.notes)
    with torch.inference_mode():
        torch.testing.assert_close(conv(x), model(x), rtol=1e-4, atol=1e-4)
    path = runtime.save(conv, tmp_path / "r.safetensors")
    arch = ResNet18(num_classes=10)
    loaded = runtime.load(path, arch)
    assert loaded is arch and isinstance(arch.bn1, nn.Identity) and arch.folded_batchnorm == conv.folded_batchnorm
    with torch.inference_mode():
        assert torch.equal(loaded(x), conv(x))
    unfolded = sn.convert(model, x, batch_sizes=(1,), force="conv", fold_batchnorm=False)
    assert isinstance(unfolded.bn1, nn.BatchNorm2d) and not unfolded.folded_batchnorm


def test_hostile_folded_metadata_is_refused_and_the_model_unchanged(tmp_path):
    torch.manual_seed(0)
    model = prune(randomize_bn(ConvBN()), 0.9)
    conv = sn.convert(model, torch.randn(1, 3, 8, 8), batch_sizes=(1,), force="conv")
    path = runtime.save(conv, tmp_path / "m.safetensors")
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        meta = dict(f.metadata())
    from safetensors.torch import save as st_save

    for bad, match in ((["conv", "bn"], "list of \\[convolution, batchnorm\\]"),
                       ([["bn", "conv"]], "is not a Conv2d and a BatchNorm2d"),
                       ([["conv", "bn"], ["conv", "bn"]], "names a module twice")):
        m = {**meta, "folded": json.dumps(bad)}
        m["sha256"] = digest(tensors, m)
        p = tmp_path / "bad.safetensors"
        p.write_bytes(st_save(tensors, metadata=m))
        arch = ConvBN()
        before = {k: v.clone() for k, v in arch.state_dict().items()}
        with pytest.raises(ArchiveError, match=match):
            runtime.load(p, arch)
        assert isinstance(arch.bn, nn.BatchNorm2d) and arch.conv.bias is None
        assert all(torch.equal(v, before[k]) for k, v in arch.state_dict().items())
