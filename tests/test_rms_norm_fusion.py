"""RMSNorm modules run as one F.rms_norm call in converted models (runtime/norms.py)."""

from __future__ import annotations

import pytest
import torch
from conftest import forge_runtime_archive
from torch import nn

import sparsenn as sn
from sparsenn.backend.runtime.errors import ArchiveError
from sparsenn.backend.runtime.norms import (
    NORMS_ATTR,
    FusedRMSNorm,
    fusable,
    fuse_rms_norms,
)

transformers = pytest.importorskip("transformers")


class PlainRMSNorm(nn.Module):  # the LLaMA definition, step by step
    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(d) + 0.5)
        self.variance_epsilon = eps

    def forward(self, x):
        v = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(v + self.variance_epsilon))


class OnePlusRMSNorm(PlainRMSNorm):  # Gemma's: (1 + weight)
    def forward(self, x):
        return (1 + self.weight) * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


class BiasedRMSNorm(PlainRMSNorm):
    def forward(self, x):
        return super().forward(x) + 0.1


def _llama(tied=True):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=tied, rms_norm_eps=1e-5)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)  # not all ones: the weight must be applied
            elif p.dim() == 2 and ".layers." in n:
                p[torch.rand(p.shape) < 0.7] = 0
    return model


@pytest.mark.parametrize("cls,ok", [(PlainRMSNorm, True), (OnePlusRMSNorm, False), (BiasedRMSNorm, False)])
def test_only_modules_that_compute_rms_norm_exactly_are_fusable(cls, ok):
    m = cls(16)
    assert fusable(m) is ok
    if ok:
        x = torch.randn(2, 3, 16)
        fused = FusedRMSNorm(m.weight, m.variance_epsilon)
        torch.testing.assert_close(fused(x), m(x), rtol=1e-6, atol=1e-6)


def test_other_dtypes_and_non_norms_are_left_alone():
    m = PlainRMSNorm(8)
    m.weight.data = m.weight.data.to(torch.bfloat16)
    assert not fusable(m)
    assert not fusable(nn.LayerNorm(8)) and not fusable(nn.Linear(8, 8))
    model = nn.Sequential(nn.Linear(8, 8), PlainRMSNorm(8), OnePlusRMSNorm(8))
    assert fuse_rms_norms(model) == ["1"]
    assert isinstance(model[1], FusedRMSNorm) and isinstance(model[2], OnePlusRMSNorm)
    with pytest.raises(ValueError, match="'2'"):
        fuse_rms_norms(model, ["2"])


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("weights", ["fp32", "int8"])
def test_converted_llama_runs_fused_norms_and_generates_the_same_text(tied, weights):
    model = _llama(tied)
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(1))
    c = sn.convert(model, {"input_ids": ids}, batch_sizes=(1, 12), weights=weights, budget=0.02, time_limit=None,
                   fuse_siblings=False)  # only the norms rewritten here
    fused = [n for n, m in c.named_modules() if isinstance(m, FusedRMSNorm)]
    assert len(fused) == 2 * 2 + 1 and c.__dict__[NORMS_ATTR] == fused
    assert any("RMSNorm modules run as one F.rms_norm call" in n for n in c.conversion_summary.notes)
    converted = tuple(f"{n}." for n, m in c.named_modules() if isinstance(m, sn.backend.runtime.SparseLinear))

    def kept(keys):  # the names outside the layers that converted (which ones do depends on the timing)
        return {k for k in keys if not k.startswith(converted)}

    assert kept(c.state_dict()) == kept(model.state_dict())  # the same parameters, under the same names
    with torch.inference_mode():
        if weights == "fp32":
            torch.testing.assert_close(c(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)
            a = model.generate(ids, max_new_tokens=6, do_sample=False)
            b = c.generate(ids, max_new_tokens=6, do_sample=False)
            assert torch.equal(a, b)
        else:
            assert c.generate(ids, max_new_tokens=6, do_sample=False).shape == (1, 18)
    off = sn.convert(model, {"input_ids": ids}, batch_sizes=(1,), budget=0.02, time_limit=None, fuse_norms=False)
    assert not any(isinstance(m, FusedRMSNorm) for m in off.modules())
    assert not any(isinstance(m, FusedRMSNorm) for m in model.modules())  # the input model is never changed
    with pytest.raises(TypeError, match="fuse_norms"):
        sn.convert(model, {"input_ids": ids}, fuse_norms="yes")


def test_save_and_load_rebuild_the_fused_norms_and_refuse_forged_names(tmp_path):
    model = _llama()
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(2))
    c = sn.convert(model, {"input_ids": ids}, batch_sizes=(1,), budget=0.02, time_limit=None, force="bitmask",
                   verify=False)
    path = sn.runtime.save(c, tmp_path / "m.snrt")
    fresh = sn.runtime.load(path, _llama())
    assert [n for n, m in fresh.named_modules() if isinstance(m, FusedRMSNorm)] == c.__dict__[NORMS_ATTR]
    with torch.inference_mode():
        torch.testing.assert_close(fresh(ids).logits, c(ids).logits)
    for forged in (["model.layers.0.mlp.up_proj"], ["model.norm", "model.norm"], "model.norm", ["nowhere"]):
        bad = forge_runtime_archive(path, tmp_path / "forged.snrt", rms_norms=forged)
        target = _llama()
        before = {k: v.clone() for k, v in target.state_dict().items()}
        with pytest.raises(ArchiveError, match="rms_norms"):
            sn.runtime.load(bad, target)
        assert not any(isinstance(m, FusedRMSNorm) for m in target.modules())
        assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())


@pytest.mark.parametrize("shape", [(1, 1, 48), (3, 48), (2, 8, 48), (17, 48), (48,)])
@pytest.mark.parametrize("mode", ["inference", "no_grad", "grad"])
def test_the_compiled_few_rows_path_equals_f_rms_norm(shape, mode):
    """Up to COMPILED_MAX_ROWS rows without autograd run the compiled kernel; the result, and the
    gradients where autograd is on, equal F.rms_norm's."""
    import copy
    import pickle
    import warnings

    from sparsenn.backend.runtime.norms import COMPILED_MAX_ROWS, FusedRMSNorm

    g = torch.Generator().manual_seed(0)
    weight = nn.Parameter(torch.randn(48, generator=g))
    norm = FusedRMSNorm(weight, 1e-6)
    x = torch.randn(*shape, generator=g) * 3
    want = torch.nn.functional.rms_norm(x, (48,), weight, 1e-6)
    if mode == "grad":
        x.requires_grad_(True)
        got = norm(x)
        got.sum().backward()
        assert weight.grad is not None and x.grad is not None
    else:
        with torch.inference_mode() if mode == "inference" else torch.no_grad():
            got = norm(x)
    torch.testing.assert_close(got.detach(), want.detach(), rtol=1e-6, atol=1e-6)
    assert x.numel() // 48 > COMPILED_MAX_ROWS or mode == "grad" or "_array" in norm.__dict__
    # the weight changed through .data, in place, or by a load: the next call sees it
    with torch.no_grad():
        weight.data = torch.randn(48, generator=g)
        torch.testing.assert_close(norm(x), torch.nn.functional.rms_norm(x, (48,), weight, 1e-6))
        weight.mul_(2)
        torch.testing.assert_close(norm(x), torch.nn.functional.rms_norm(x, (48,), weight, 1e-6))
        norm.load_state_dict({"weight": torch.ones(48)})
        torch.testing.assert_close(norm(x), torch.nn.functional.rms_norm(x, (48,), torch.ones(48), 1e-6))
        for other in (copy.deepcopy(norm), pickle.loads(pickle.dumps(norm))):
            torch.testing.assert_close(other(x), norm(x))
            other.weight.mul_(3)
            torch.testing.assert_close(other(x), torch.nn.functional.rms_norm(x, (48,), other.weight, 1e-6))
        # non-contiguous and other dtypes take F.rms_norm
        xt = torch.randn(48, 4, generator=g).t()
        torch.testing.assert_close(norm(xt), torch.nn.functional.rms_norm(xt, (48,), norm.weight, 1e-6))
        xd = x.double()
        with warnings.catch_warnings():  # PyTorch notes that mixed dtypes cannot use its fused implementation
            warnings.simplefilter("ignore")
            torch.testing.assert_close(norm(xd), torch.nn.functional.rms_norm(xd, (48,), norm.weight.double(), 1e-6))
