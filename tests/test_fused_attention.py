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


def test_threads_sharing_the_rotary_tables_never_get_each_others():
    import threading

    tables, errors = _RotaryTables(), []

    def work(seed):
        cos, sin = torch.randn(1, 1, 4), torch.full((1, 1, 4), float(seed))
        for _ in range(3000):
            if float(tables.get(cos, sin)[1][0, 0, 0, 3]) != seed:
                errors.append(seed)
                return

    threads = [threading.Thread(target=work, args=(s,)) for s in (1, 2, 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


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


# ----------------------------------------------------------------------------- decoding: the kernel and the KV buffer

@settings(max_examples=40, deadline=None)
@given(groups=st.integers(1, 3), per=st.integers(1, 4), d=st.integers(1, 40), length=st.integers(1, 30),
       spare=st.integers(0, 5), seed=st.integers(0, 2**16))
def test_the_decode_kernel_is_sdpa_of_one_query(groups, per, d, length, spare, seed):
    import numpy as np

    from sparsenn.backend.kernels.attention import decode_attention

    g = torch.Generator().manual_seed(seed)
    q = torch.randn(groups * per, d, generator=g) * 2
    keys = torch.randn(groups, length + spare, d, generator=g) * 2
    values = torch.randn(groups, length + spare, d, generator=g)
    keys[:, length:], values[:, length:] = float("nan"), float("nan")  # rows past the length are never read
    out = np.empty((groups * per, d), dtype=np.float32)
    decode_attention(q.numpy(), keys.numpy(), values.numpy(), length, d ** -0.5, out)
    want = torch.nn.functional.scaled_dot_product_attention(
        q[None, :, None], keys[None, :, :length], values[None, :, :length], scale=d ** -0.5, enable_gqa=True)
    torch.testing.assert_close(torch.from_numpy(out), want[0, :, 0], rtol=1e-5, atol=1e-5)


def _filled_cache(layers=2, length=5, heads=2, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    cache = transformers.DynamicCache()
    for i in range(layers):
        cache.update(torch.randn(1, heads, length, d, generator=g), torch.randn(1, heads, length, d, generator=g), i)
    return cache


def test_appending_in_place_gives_what_cat_gives_and_never_writes_a_view_handed_out():
    from sparsenn.backend.runtime.kv_cache import append

    g = torch.Generator().manual_seed(1)
    fast, slow = _filled_cache(), _filled_cache()
    handed = []
    for step in range(80):  # past the first buffer's spare rows: it grows once
        n = 1 if step % 7 else 3
        k, v = torch.randn(1, 2, n, 4, generator=g), torch.randn(1, 2, n, 4, generator=g)
        got = append(fast, 1, k, v)
        want = slow.update(k, v, 1)
        assert got is not None and torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        assert fast.get_seq_length(1) == slow.get_seq_length(1)
        handed.append((got[0], got[0].clone()))
    assert all(torch.equal(view, copy_) for view, copy_ in handed)
    # cropped, reordered or copied: the next append starts from what the cache holds now
    for change in (lambda c: c.crop(-4), lambda c: c.batch_repeat_interleave(2), lambda c: c.batch_select_indices(
            torch.tensor([1]))):
        change(fast)
        change(slow)
        k, v = (torch.randn(*slow.layers[1].keys.shape[:2], 1, 4, generator=g) for _ in range(2))
        got, want = append(fast, 1, k, v), slow.update(k, v, 1)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    twin = copy.deepcopy(fast)
    k = torch.randn(1, 2, 1, 4, generator=g)
    append(twin, 1, k, k)
    assert fast.get_seq_length(1) + 1 == twin.get_seq_length(1)


def test_appending_declines_what_it_does_not_handle():
    from sparsenn.backend.runtime.kv_cache import append

    cache = _filled_cache()
    k = torch.randn(1, 2, 1, 4)
    assert append(cache, 5, k, k) is None  # no such layer
    assert append(transformers.DynamicCache(), 0, k, k) is None  # not filled yet: the prefill goes through update
    assert append(cache, 0, torch.randn(1, 3, 1, 4), torch.randn(1, 3, 1, 4)) is None  # other heads
    assert append(cache, 0, k.double(), k.double()) is None
    assert append(cache, 0, k.requires_grad_(True), k) is None  # autograd: cat keeps the graph
    assert append(object(), 0, k, k) is None
    # inference tensors and normal ones are not mixed: leaving inference mode starts new buffers
    with torch.inference_mode():
        append(cache, 0, torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4))
    out = append(cache, 0, torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4))
    assert out is not None and not out[2].is_inference() and cache.get_seq_length(0) == 7


def test_a_converted_decoder_decodes_with_the_kernel_and_the_buffers():
    """Greedy tokens equal the dense model's, with the buffers and the attention kernel in use at batch 1
    (through the attention module where its decoder layer runs the original forward: a hook on the
    attention makes the layer's one-token step decline; through the layer's step otherwise)."""
    import sparsenn.backend.runtime.attention as attention_module
    from sparsenn.backend.runtime.decoder_layer import FusedDecoderLayer
    from sparsenn.backend.runtime.kv_cache import _STATE

    model = _model("llama")
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(1))
    c = sn.convert(model, {"input_ids": ids}, batch_sizes=(1, 9), time_limit=None, verify=False)
    assert all(isinstance(layer, FusedDecoderLayer) for layer in c.model.layers)
    with torch.inference_mode():
        want = model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0)
    for hooked in (True, False):
        handles = [layer.self_attn.register_forward_hook(lambda *a: None) for layer in c.model.layers] if hooked else []
        calls, steps = [], []
        kernel, step = attention_module.decode_attention, FusedDecoderLayer.step
        attention_module.decode_attention = lambda *a: calls.append(1) or kernel(*a)
        FusedDecoderLayer.step = lambda self, x, kw: (lambda out: steps.append(out is not None) or out)(step(self, x, kw))
        try:
            with torch.inference_mode():
                cache = transformers.DynamicCache()
                got = c.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0, cache=cache)
        finally:
            attention_module.decode_attention, FusedDecoderLayer.step = kernel, step
            for h in handles:
                h.remove()
        assert torch.equal(got, want)
        assert _STATE in cache.layers[0].__dict__
        assert len(calls) == (9 * 2 if hooked else 0)  # 9 decoding steps, 2 blocks
        assert sum(steps) == (0 if hooked else 9 * 2)


@pytest.mark.parametrize("how", ["beams", "static", "continued"])
def test_other_generation_modes_give_the_dense_models_tokens(how):
    """Beam search (the cache reordered), a static cache (no in-place append: cache.update), and a cache
    continued by a second generate call all decode as the dense model does."""
    model = _model("llama")
    ids = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(2))
    c = sn.convert(model, {"input_ids": ids}, batch_sizes=(1, 7), time_limit=None, verify=False)
    with torch.inference_mode():
        if how == "beams":
            kw = dict(num_beams=3, num_return_sequences=2, max_new_tokens=8, do_sample=False, pad_token_id=0)
            assert torch.equal(c.generate(ids, **kw), model.generate(ids, **kw))
        elif how == "static":
            kw = dict(cache_implementation="static", max_new_tokens=8, do_sample=False, pad_token_id=0)
            assert torch.equal(c.generate(ids, **kw), model.generate(ids, **kw))
        else:
            outs = []
            for m in (c, model):
                cache = transformers.DynamicCache()
                first = m.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0, cache=cache)
                outs.append(m.generate(first, max_new_tokens=5, do_sample=False, pad_token_id=0, cache=cache))
            assert torch.equal(*outs)
