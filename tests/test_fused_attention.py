"""LLaMA-style attention over a stacked q/k/v product with the rotary embedding fused: checked, converted, saved."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import forge_runtime_archive
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import sparsenn as sn
from sparsenn.backend.runtime.attention import ATTENTIONS_ATTR, FusedAttention, _rotate, _RotaryTables, fuse_attentions
from sparsenn.backend.runtime.errors import ArchiveError
from sparsenn.backend.runtime.siblings import find_siblings, fuse_siblings

transformers = pytest.importorskip("transformers")


def _rotate_half_reference(x, cos, sin):
    """transformers' formula: ``x * cos + rotate_half(x) * sin``."""
    h = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., h:], x[..., :h]), dim=-1) * sin


@settings(max_examples=30, deadline=None)
@given(half=st.integers(1, 8), heads=st.integers(1, 4), n=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_the_rotation_is_rotate_half(half, heads, n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, n, heads, 2 * half, generator=g)
    cos, sin = torch.randn(2, n, 2 * half, generator=g), torch.randn(2, n, 2 * half, generator=g)
    c, s = _RotaryTables().get(cos, sin)
    torch.testing.assert_close(_rotate(x, c, s), _rotate_half_reference(x, cos[:, :, None], sin[:, :, None]))


def test_the_rotary_tables_follow_new_and_changed_inputs():
    tables = _RotaryTables()
    cos, sin = torch.randn(1, 2, 4), torch.randn(1, 2, 4)
    first = tables.get(cos, sin)
    assert tables.get(cos, sin) is first  # the same pair: computed once
    sin.mul_(2)  # changed in place: recomputed
    torch.testing.assert_close(tables.get(cos, sin)[1][..., 0, 2:], sin[..., 2:])
    other = torch.randn(1, 2, 4)
    torch.testing.assert_close(tables.get(cos, other)[1][..., 0, :2], -other[..., :2])


def _model(kind: str, impl: str = "sdpa", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, attn_implementation=impl)
    if kind == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common)).eval()
    if kind == "qwen2":  # biases on q/k/v
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common)).eval()
    if kind == "qwen3":  # per-head RMSNorm of q and k before the rotation: another formula
        return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(head_dim=16, **common)).eval()
    raise ValueError(kind)


def _stacked(model, ids):
    fuse_siblings(model, find_siblings(model, {"input_ids": ids}))
    return model


@pytest.mark.parametrize("kind,impl", [("llama", "sdpa"), ("llama", "eager"), ("qwen2", "sdpa")])
def test_fused_attention_computes_what_the_module_did_with_the_kv_cache(kind, impl):
    model = _model(kind, impl)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    fused = _stacked(copy.deepcopy(model), ids)
    names = fuse_attentions(fused)
    assert names == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert all(isinstance(fused.get_submodule(n), FusedAttention) for n in names)
    assert set(fused.state_dict()) == set(_stacked(copy.deepcopy(model), ids).state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fused(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
        # decoding with the KV cache: greedy tokens, and sampled ones under the same seed
        prompt = ids[:1]
        want = model.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
        assert torch.equal(fused.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0), want)
        torch.manual_seed(5)
        want = model.generate(prompt, max_new_tokens=8, do_sample=True, top_k=20, pad_token_id=0)
        torch.manual_seed(5)
        assert torch.equal(fused.generate(prompt, max_new_tokens=8, do_sample=True, top_k=20, pad_token_id=0), want)
        # a padded batch: the attention mask reaches the attention function as before
        mask = torch.ones_like(ids)
        mask[1, :3] = 0
        want = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(fused.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                          pad_token_id=0), want)


class ScaledQuery(transformers.models.llama.modeling_llama.LlamaAttention):
    """Another formula under the same names (the query doubled): must not be replaced."""

    def forward(self, hidden_states, *args, **kwargs):
        return super().forward(hidden_states * 2, *args, **kwargs)


@pytest.mark.parametrize("case", ["qwen3", "other_formula", "hook", "not_stacked"])
def test_attentions_that_compute_something_else_are_left_alone(case):
    model = _model("qwen3" if case == "qwen3" else "llama")
    ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(1))
    if case == "other_formula":
        layer = model.model.layers[0]
        scaled = ScaledQuery(model.config, 0)
        scaled.load_state_dict(layer.self_attn.state_dict())
        layer.self_attn = scaled
    fused = copy.deepcopy(model) if case == "not_stacked" else _stacked(copy.deepcopy(model), ids)
    if case == "hook":
        fused.model.layers[0].self_attn.register_forward_hook(lambda *a: None)
    names = fuse_attentions(fused)
    expected = {"qwen3": [], "not_stacked": [], "other_formula": ["model.layers.1.self_attn"],
                "hook": ["model.layers.1.self_attn"]}[case]
    assert names == expected
    with torch.no_grad():
        torch.testing.assert_close(fused(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="not attention modules"):
        fuse_attentions(fused, ["model.layers.0.self_attn"])


def test_converted_decoder_runs_fused_attention_and_archives_refuse_forged_names(tmp_path):
    model = _model("llama")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".layers." in n and p.dim() == 2:
                p[torch.rand(p.shape, generator=g) < 0.7] = 0
    ids = torch.randint(0, 128, (1, 10), generator=torch.Generator().manual_seed(1))
    c = sn.convert(model, {"input_ids": ids}, batch_sizes=(1, 10), weights="int8", force="bitmask_int8",
                   time_limit=None)
    assert c.__dict__[ATTENTIONS_ATTR] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert "rotary embedding fused" in str(c.conversion_summary)
    with torch.inference_mode():
        torch.testing.assert_close(c(ids).logits, model(ids).logits, rtol=0.05, atol=0.05)
    path = sn.backend.runtime.save(c, tmp_path / "m.safetensors")
    loaded = sn.backend.runtime.load(path, copy.deepcopy(model))
    assert isinstance(loaded.model.layers[1].self_attn, FusedAttention)
    with torch.inference_mode():
        assert torch.equal(loaded.generate(ids, max_new_tokens=6, do_sample=False),
                           c.generate(ids, max_new_tokens=6, do_sample=False))
    for names in (["model.layers.0.mlp"], "model.layers.0.self_attn", ["model.layers.0.self_attn"] * 2):
        forged = forge_runtime_archive(path, tmp_path / "bad.safetensors", attentions=names)
        fresh = copy.deepcopy(model)
        with pytest.raises(ArchiveError, match="attentions"):
            sn.backend.runtime.load(forged, fresh)
        assert isinstance(fresh.model.layers[0].self_attn.q_proj, nn.Linear)
