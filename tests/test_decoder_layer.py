"""A LLaMA-style decoder layer decoding a token in nine calls: the kernels against PyTorch, the layer against the
original (tokens, logits, KV cache), its refusals and fallbacks, archives, threads."""

from __future__ import annotations

import copy
import io
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import forge_runtime_archive
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import sparsenn as sn
from sparsenn.backend.kernels import decoder_step
from sparsenn.backend.runtime.attention import fuse_attentions
from sparsenn.backend.runtime.decoder_layer import LAYERS_ATTR, FusedDecoderLayer, fusable, fuse_decoder_layers
from sparsenn.backend.runtime.errors import ArchiveError
from sparsenn.backend.runtime.gated_mlp import fuse_gated_mlps
from sparsenn.backend.runtime.norms import fuse_rms_norms
from sparsenn.backend.runtime.siblings import find_siblings, fuse_siblings

transformers = pytest.importorskip("transformers")


# ----------------------------------------------------------------------------- the kernels against PyTorch


def _rotate_half(x, cos, sin):
    h = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., h:], x[..., :h]), dim=-1) * sin


@settings(max_examples=40, deadline=None)
@given(groups=st.integers(1, 3), per=st.integers(1, 4), half=st.integers(1, 20), length=st.integers(0, 20),
       spare=st.integers(1, 4), order=st.permutations([0, 1, 2]), seed=st.integers(0, 2**16))
def test_rotate_append_attend_is_rotary_then_cat_then_sdpa(groups, per, half, length, spare, order, seed):
    g = torch.Generator().manual_seed(seed)
    d, heads = 2 * half, groups * per
    sizes = {0: heads * d, 1: groups * d, 2: groups * d}  # q, k, v in the stacked output in `order`
    offsets, at = {}, 0
    for part in order:
        offsets[part] = at
        at += sizes[part]
    qkv = torch.randn(at, generator=g) * 2
    cos, sin = torch.randn(d, generator=g), torch.randn(d, generator=g)
    keys = torch.randn(1, groups, length + spare, d, generator=g)
    values = torch.randn(1, groups, length + spare, d, generator=g)
    past_k, past_v = keys[:, :, :length].clone(), values[:, :, :length].clone()
    q_out, out = np.zeros((heads, d), np.float32), np.zeros((heads, d), np.float32)
    decoder_step.rotate_append_attend(qkv.numpy(), offsets[0], offsets[1], offsets[2], cos.numpy(), sin.numpy(),
                                      keys.numpy(), values.numpy(), length, 0.3, q_out, out)
    q = _rotate_half(qkv[offsets[0]:offsets[0] + heads * d].view(heads, d), cos, sin)
    k = _rotate_half(qkv[offsets[1]:offsets[1] + groups * d].view(groups, d), cos, sin)
    v = qkv[offsets[2]:offsets[2] + groups * d].view(groups, d)
    torch.testing.assert_close(torch.from_numpy(q_out), q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(keys[0, :, length], k, rtol=1e-5, atol=1e-5)
    assert torch.equal(values[0, :, length], v)
    assert torch.equal(keys[:, :, :length], past_k) and torch.equal(values[:, :, :length], past_v)
    all_k = torch.cat((past_k, k[None, :, None]), dim=2).repeat_interleave(per, dim=1)
    all_v = torch.cat((past_v, v[None, :, None]), dim=2).repeat_interleave(per, dim=1)
    want = F.scaled_dot_product_attention(q[None, :, None].double(), all_k.double(), all_v.double(), scale=0.3)
    torch.testing.assert_close(torch.from_numpy(out), want[0, :, 0].float(), rtol=1e-4, atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(d=st.integers(1, 300), eps=st.sampled_from([1e-6, 1e-5, 0.1]), seed=st.integers(0, 2**16))
def test_residual_rms_norm_silu_mul_and_add_match_pytorch(d, eps, seed):
    g = torch.Generator().manual_seed(seed)
    x, a, w = torch.randn(d, generator=g) * 3, torch.randn(d, generator=g), torch.randn(d, generator=g)
    r, h = np.zeros(d, np.float32), np.zeros(d, np.float32)
    decoder_step.residual_rms_norm(x.numpy(), a.numpy(), w.numpy(), eps, r, h)
    assert torch.equal(torch.from_numpy(r), x + a)
    torch.testing.assert_close(torch.from_numpy(h), F.rms_norm(x + a, (d,), w, eps), rtol=1e-5, atol=1e-6)
    gu = torch.cat((torch.randn(2 * d, generator=g) * 8, torch.tensor([-100.0, 100.0, 0.0])))
    out = np.zeros(d, np.float32)
    decoder_step.silu_mul(gu.numpy(), d, 0, out)  # the up half first, the gate second
    torch.testing.assert_close(torch.from_numpy(out), F.silu(gu[d:2 * d]) * gu[:d], rtol=1e-5, atol=1e-6)
    big = np.zeros(2, np.float32)
    decoder_step.silu_mul(gu.numpy(), 2 * d, 2 * d + 1, big)  # silu(-100) * 100 and silu(100) * 0
    torch.testing.assert_close(torch.from_numpy(big), F.silu(gu[2 * d:2 * d + 2]) * gu[2 * d + 1:2 * d + 3])
    s = np.zeros(d, np.float32)
    decoder_step.add(x.numpy(), a.numpy(), s)
    assert torch.equal(torch.from_numpy(s), x + a)


def test_silu_mul_of_special_values_in_vectors_and_in_the_tail():
    special = [float("inf"), float("-inf"), float("nan"), 0.0, -0.0, 100.0, -100.0, 88.0, -88.0, 1e-30, -1e-30, 20.0,
               -20.0, 0.5, -0.5, 3.0]
    g = torch.tensor(special + special[:7])  # 16 in a vector, 7 in the scalar tail
    u = torch.linspace(-2, 2, g.numel())
    out = np.zeros(g.numel(), np.float32)
    decoder_step.silu_mul(torch.cat((u, g)).numpy(), g.numel(), 0, out)
    torch.testing.assert_close(torch.from_numpy(out), F.silu(g) * u, rtol=1e-6, atol=1e-7, equal_nan=True)


# ----------------------------------------------------------------------------- the layer against the original


def _model(kind: str = "llama", impl: str = "sdpa", seed: int = 0, window: int | None = None) -> nn.Module:
    torch.manual_seed(seed)
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, attn_implementation=impl)
    cls = {"llama": (transformers.LlamaForCausalLM, transformers.LlamaConfig),
           "qwen2": (transformers.Qwen2ForCausalLM, transformers.Qwen2Config),
           "mistral": (transformers.MistralForCausalLM, transformers.MistralConfig),
           "qwen3": (transformers.Qwen3ForCausalLM, transformers.Qwen3Config)}[kind]
    extra = {"head_dim": 16} if kind == "qwen3" else {"sliding_window": window} if kind == "mistral" else {}
    return cls[0](cls[1](**common, **extra)).eval()


def _fused(model: nn.Module, ids: torch.Tensor) -> nn.Module:
    """``model`` (a copy) with its norms, siblings, MLPs and attentions fused, decoder layers not yet."""
    out = copy.deepcopy(model)
    fuse_rms_norms(out)
    fuse_siblings(out, find_siblings(out, {"input_ids": ids}))
    fuse_gated_mlps(out)
    fuse_attentions(out)
    return out


class _Steps:
    """Counts the one-token steps taken (not declined) while active."""

    def __enter__(self):
        self.taken, self._step = [], FusedDecoderLayer.step
        step, taken = self._step, self.taken

        def counting(layer, x, kwargs):
            out = step(layer, x, kwargs)
            taken.append(out is not None)
            return out

        FusedDecoderLayer.step = counting
        return self

    def __exit__(self, *exc):
        FusedDecoderLayer.step = self._step

    @property
    def count(self) -> int:
        return sum(self.taken)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
def test_the_fused_layer_decodes_what_the_original_does(kind):
    model = _model(kind)
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(1))
    fused = _fused(model, ids)
    names = fuse_decoder_layers(fused)
    assert names == ["model.layers.0", "model.layers.1"]
    layer = fused.model.layers[0]
    assert isinstance(layer, FusedDecoderLayer) and isinstance(layer, type(model.model.layers[0]))
    assert set(fused.state_dict()) == set(_fused(model, ids).state_dict())
    with torch.no_grad(), _Steps() as steps:
        kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
        want, got = model.generate(ids, **kw), fused.generate(ids, **kw)
        assert torch.equal(got.sequences, want.sequences)
        for w, g in zip(want.scores, got.scores):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
        assert steps.count == 11 * 2  # 11 one-token steps, 2 blocks
        torch.manual_seed(5)
        want = model.generate(ids, max_new_tokens=8, do_sample=True, top_k=20, pad_token_id=0)
        torch.manual_seed(5)
        assert torch.equal(fused.generate(ids, max_new_tokens=8, do_sample=True, top_k=20, pad_token_id=0), want)


@pytest.mark.parametrize("how", ["padded batch", "autograd", "hook", "static cache", "beams", "no cache",
                                 "eager", "attentions recorded", "sliding window"])
def test_calls_the_step_does_not_take_run_the_original_forward(how):
    model = _model("mistral", window=4) if how == "sliding window" else _model("llama")
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(2))
    fused = _fused(model, ids)
    fuse_decoder_layers(fused)
    kw = dict(max_new_tokens=8 if how == "sliding window" else 5, do_sample=False, pad_token_id=0)
    prompt = ids[:1]
    if how == "padded batch":
        mask = torch.ones_like(ids)
        mask[1, :3] = 0
        prompt, kw = ids, {**kw, "attention_mask": mask}
    elif how == "hook":
        fused.model.layers[0].mlp.down_proj.register_forward_hook(lambda *a: None)
    elif how == "static cache":
        kw["cache_implementation"] = "static"
    elif how == "beams":
        kw.update(num_beams=3, num_return_sequences=2)
    elif how == "no cache":
        kw["use_cache"] = False
    elif how == "eager":  # attention switched after fusion: the step reproduces SDPA only
        for m in (model, fused):
            m.config._attn_implementation = "eager"
    with _Steps() as steps:
        if how == "autograd":  # a forward pass with autograd on one token and a cache
            cache = transformers.DynamicCache()
            fused(prompt, cache=cache, use_cache=True)
            want_cache = transformers.DynamicCache()
            model(prompt, cache=want_cache, use_cache=True)
            nxt = torch.tensor([[3]])
            out = fused(nxt, cache=cache, use_cache=True).logits
            out.sum().backward()
            torch.testing.assert_close(out, model(nxt, cache=want_cache, use_cache=True).logits, rtol=1e-5, atol=1e-5)
            assert fused.model.layers[0].input_layernorm.weight.grad is not None
        elif how == "attentions recorded":
            with torch.no_grad():
                got = fused(prompt, output_attentions=True)
                want = model(prompt, output_attentions=True)
            torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)
        else:
            with torch.no_grad():
                assert torch.equal(fused.generate(prompt, **kw), model.generate(prompt, **kw))
    if how == "hook":
        assert steps.count == 4  # 4 one-token steps in layer 1; layer 0 (its down_proj hooked) declines
    else:
        assert steps.count == 0


def test_the_step_declines_before_touching_the_cache():
    model = _model("llama")
    ids = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(3))
    fused = _fused(model, ids)
    fuse_decoder_layers(fused)
    layer = fused.model.layers[0]
    cache = transformers.DynamicCache()
    with torch.no_grad():
        fused(ids, cache=cache, use_cache=True)
    before = (cache.layers[0].keys.clone(), cache.layers[0].values.clone())
    x, pe = torch.randn(1, 1, 64), (torch.randn(1, 1, 16), torch.randn(1, 1, 16))
    bad = [dict(position_embeddings=pe, cache=cache, attention_mask=torch.zeros(1, 1, 1, 6)),
           dict(position_embeddings=pe, cache=cache, output_attentions=True),
           dict(position_embeddings=(pe[0].double(), pe[1]), cache=cache),
           dict(position_embeddings=(torch.randn(1, 1, 8), pe[1]), cache=cache),
           dict(position_embeddings=pe),
           dict(position_embeddings=pe, cache=object())]
    with torch.no_grad():
        for kwargs in bad:
            assert layer.step(x, kwargs) is None
        for xx in (torch.randn(1, 2, 64), torch.randn(2, 1, 64), x.double(), torch.randn(1, 64, 2)[..., 0]):
            assert layer.step(xx, dict(position_embeddings=pe, cache=cache)) is None
        layer.train()
        assert layer.step(x, dict(position_embeddings=pe, cache=cache)) is None
        layer.eval()
    assert torch.equal(cache.layers[0].keys, before[0]) and torch.equal(cache.layers[0].values, before[1])
    with torch.no_grad():
        assert layer.step(x, dict(position_embeddings=pe, cache=cache)) is not None
    assert cache.get_seq_length(0) == 6


class _DoubledMLP(transformers.models.llama.modeling_llama.LlamaDecoderLayer):
    """Another formula under the same names (the MLP's output doubled): must not be replaced."""

    def forward(self, hidden_states, *args, **kwargs):
        out = super().forward(hidden_states, *args, **kwargs)
        return out + self.mlp(self.post_attention_layernorm(out)) * 0.0 + out * 0.5


@pytest.mark.parametrize("case", ["qwen3", "other_formula", "hook", "extra child", "gelu", "eager", "not fused"])
def test_layers_that_compute_something_else_are_left_alone(case):
    model = _model("qwen3" if case == "qwen3" else "llama", impl="eager" if case == "eager" else "sdpa")
    ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(1))
    if case == "other_formula":
        old = model.model.layers[0]
        new = _DoubledMLP(model.config, 0).eval()
        new.load_state_dict(old.state_dict())
        model.model.layers[0] = new
    if case == "gelu":
        model.model.layers[0].mlp.act_fn = nn.GELU()
    fused = model if case == "not fused" else _fused(model, ids)
    if case == "hook":
        fused.model.layers[0].register_forward_pre_hook(lambda *a: None)
    if case == "extra child":
        fused.model.layers[0].extra = nn.Identity()
    names = fuse_decoder_layers(fused)
    expected = ["model.layers.1"] if case in ("other_formula", "hook", "extra child", "gelu") else []
    assert names == expected
    with torch.no_grad():
        torch.testing.assert_close(fused(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="not decoder layers"):
        fuse_decoder_layers(fused, ["model.layers.0"])
    assert not fusable(fused.model.layers[1]) or case in ("other_formula", "hook", "extra child", "gelu")


def test_threads_decoding_one_model_get_their_own_tokens():
    model = _model("llama")
    ids = torch.randint(0, 128, (4, 6), generator=torch.Generator().manual_seed(4))
    fused = _fused(model, ids)
    fuse_decoder_layers(fused)
    with torch.no_grad():
        want = [model.generate(ids[i:i + 1], max_new_tokens=20, do_sample=False, pad_token_id=0) for i in range(4)]
    got, errors = [None] * 4, []

    def work(i):
        try:
            with torch.no_grad():
                for _ in range(3):
                    got[i] = fused.generate(ids[i:i + 1], max_new_tokens=20, do_sample=False, pad_token_id=0)
                    if not torch.equal(got[i], want[i]):
                        return
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and all(torch.equal(g, w) for g, w in zip(got, want))


# ----------------------------------------------------------------------------- converted models, copies and archives


def _pruned(model: nn.Module, sparsity: float = 0.7) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".layers." in n and p.dim() == 2:
                p[torch.rand(p.shape, generator=g) < sparsity] = 0
    return model


def _saved_and_loaded(model: nn.Module) -> nn.Module:
    """``torch.save`` then ``torch.load`` (plain ``pickle`` cannot: PyTorch 2.13 does not unpickle uint64 tensors)."""
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("weights,kernel", [("fp32", "bitmask"), ("int8", "bitmask_int8"), ("bf16", "bitmask_bf16"),
                                            ("fp32", "csr")])
def test_converted_decoders_step_through_their_sparse_products_and_survive_copies(weights, kernel, tmp_path):
    model = _pruned(_model("llama"))
    ids = torch.randint(0, 128, (1, 10), generator=torch.Generator().manual_seed(1))
    c = sn.convert(model, {"input_ids": ids}, batch_sizes=(1, 10), weights=weights, force=kernel, time_limit=None)
    assert c.__dict__[LAYERS_ATTR] == ["model.layers.0", "model.layers.1"]
    assert "decoder layers decode a token at batch 1 in nine calls" in str(c.conversion_summary)
    layer = c.model.layers[0]
    assert layer.self_attn.stacked.linear.kernel_for(1) == kernel  # csr has no one-row path: its matmul runs
    assert (layer.mlp.down_proj.one_row() is None) == (kernel == "csr")
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    with torch.inference_mode():
        for layer in c.model.layers:  # the same model with every step declined: the modules' own path
            layer.__dict__["step"] = lambda x, kwargs: None
        want = c.generate(ids, **kw)
        for layer in c.model.layers:
            del layer.__dict__["step"]
        with _Steps() as steps:
            got = c.generate(ids, **kw)
        assert steps.count == 7 * 2
        assert torch.equal(got.sequences, want.sequences)
        for w, g in zip(want.scores, got.scores):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
        for other in (copy.deepcopy(c), _saved_and_loaded(c)):
            with _Steps() as steps:
                assert torch.equal(other.generate(ids, **kw).sequences, want.sequences)
            assert steps.count == 7 * 2
    path = sn.backend.runtime.save(c, tmp_path / "m.safetensors")
    loaded = sn.backend.runtime.load(path, copy.deepcopy(model))
    assert isinstance(loaded.model.layers[1], FusedDecoderLayer)
    assert loaded.__dict__[LAYERS_ATTR] == c.__dict__[LAYERS_ATTR]
    with torch.inference_mode(), _Steps() as steps:
        assert torch.equal(loaded.generate(ids, **kw).sequences, want.sequences)
    assert steps.count == 7 * 2


def test_archives_with_forged_decoder_layers_are_refused_and_the_model_kept(tmp_path):
    model = _pruned(_model("llama"))
    ids = torch.randint(0, 128, (1, 10), generator=torch.Generator().manual_seed(1))
    c = sn.convert(model, {"input_ids": ids}, batch_sizes=(1,), weights="int8", force="bitmask_int8",
                   time_limit=None, verify=False)
    path = sn.backend.runtime.save(c, tmp_path / "m.safetensors")
    for names in (["model.layers.0.mlp"], "model.layers.0", ["model.layers.0"] * 2, ["model.layers.7"], [3]):
        forged = forge_runtime_archive(path, tmp_path / "bad.safetensors", decoder_layers=names)
        fresh = copy.deepcopy(model)
        with pytest.raises(ArchiveError, match="decoder_layers"):
            sn.backend.runtime.load(forged, fresh)
        assert type(fresh.model.layers[0]) is type(model.model.layers[0])
        assert isinstance(fresh.model.layers[0].self_attn.q_proj, nn.Linear)


def test_one_row_is_the_planned_kernels_product():
    from sparsenn.backend.runtime import SparseLinear

    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(70, 33)
    with torch.no_grad():
        lin.weight[torch.rand(lin.weight.shape, generator=g) < 0.6] = 0
    layer = SparseLinear.from_linear(lin, {1: "bitmask", 8: "dense"}, {"bitmask": sn.kernels.pack(lin.weight, "bitmask")})
    row = layer.one_row()
    assert row is not None
    x, y = torch.randn(70, generator=g), torch.empty(33)
    row(x, y)
    torch.testing.assert_close(y, lin(x).detach(), rtol=1e-5, atol=1e-5)
    layer.set_plan(1, "dense")
    assert layer.one_row() is None


def test_one_row_products_of_padded_layers_are_safe_across_threads():
    """A layer whose input width is not a multiple of 64 pads its row; threads sharing the layer each pad their own."""
    from sparsenn.backend.runtime import SparseLinear

    g = torch.Generator().manual_seed(1)
    lin = nn.Linear(70, 40)
    with torch.no_grad():
        lin.weight[torch.rand(lin.weight.shape, generator=g) < 0.5] = 0
    layer = SparseLinear.from_linear(lin, {1: "bitmask"}, {"bitmask": sn.kernels.pack(lin.weight, "bitmask")})
    row = layer.one_row()
    xs = [torch.randn(70, generator=g) for _ in range(4)]
    with torch.no_grad():
        want = [lin(x) for x in xs]
    errors = []

    def work(i):
        y = torch.empty(40)
        for _ in range(2000):
            row(xs[i], y)
            if not torch.allclose(y, want[i], rtol=1e-5, atol=1e-5):
                errors.append(i)
                return

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
