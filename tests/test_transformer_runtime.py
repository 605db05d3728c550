"""sparsenn.convert on transformers models: dict inputs, weights="fp32"|"bf16"|"int8", generate, errors."""

from __future__ import annotations

import pytest
import torch

import sparsenn as sn
from sparsenn.backend.runtime import SparseLinear

transformers = pytest.importorskip("transformers")


def _prune(model, sparsity=0.7, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 2 and ".layers." in n or ".layer." in n and p.dim() == 2:
                p[torch.rand(p.shape, generator=g) < sparsity] = 0
    return model


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return _prune(transformers.LlamaForCausalLM(cfg).eval())


@pytest.fixture(scope="module")
def bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=256, max_position_embeddings=64)
    return _prune(transformers.BertModel(cfg).eval())


def _ids(n, vocab=512, seed=1):
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("weights", ["fp32", "bf16", "int8"])
def test_decoder_converts_every_block_linear_and_generates(llama, weights):
    ids = _ids(16)
    c = sn.convert(llama, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, batch_sizes=(1, 16),
                   weights=weights, force=None if weights != "fp32" else "bitmask", time_limit=None)
    s = c.conversion_summary
    assert s.tokens and s.weights == weights and "1 token (decode)" in str(s)
    # the model's own generate: KV cache, greedy and sampling
    ref = llama.generate(ids, max_new_tokens=6, do_sample=False)
    out = c.generate(ids, max_new_tokens=6, do_sample=False)
    assert out.shape == ref.shape
    if weights == "fp32":
        assert torch.equal(out, ref)
    torch.manual_seed(0)
    sampled = c.generate(ids, max_new_tokens=4, do_sample=True, top_k=20)
    assert sampled.shape == (1, 20)
    # the output change is measured and reported (max abs error of the logits)
    assert "max_abs_error" in s.accuracy and s.accuracy["max_abs_output"] > 0
    with torch.no_grad():
        err = (c(input_ids=ids).logits - llama(input_ids=ids).logits).abs().max().item()
    assert err <= s.accuracy["max_abs_error"] + 1e-5 or weights == "fp32"


def test_forced_int8_layers_match_the_dequantized_weights(llama):
    ids = _ids(8)
    c = sn.convert(llama, {"input_ids": ids}, batch_sizes=(1, 8), weights="int8", force="bitmask_int8",
                   time_limit=None)
    layers = dict((n, m) for n, m in c.named_modules() if isinstance(m, SparseLinear))
    # per block: q/k/v stacked, o, gate/up stacked, down; and the head
    assert sorted(n.split(".")[-2] + "." + n.split(".")[-1] if ".fused_" in n else n.split(".")[-1]
                  for n in layers) == sorted(["fused_q_proj_k_proj_v_proj.linear", "o_proj",
                                              "fused_gate_proj_up_proj.linear", "down_proj"] * 2 + ["lm_head"])
    for m in layers.values():
        assert set(m.plan.values()) == {"bitmask_int8"}
    # every layer's output equals the float32 layer with the rounded weight (one row and many)
    for name, rows_of in (("model.layers.1.mlp.down_proj", ["model.layers.1.mlp.down_proj"]),
                          ("model.layers.0.self_attn.fused_q_proj_k_proj_v_proj.linear",
                           [f"model.layers.0.self_attn.{p}_proj" for p in "qkv"])):
        layer = layers[name]
        dense_w = torch.cat([llama.get_submodule(n).weight for n in rows_of])
        w = torch.from_numpy(layer.packed("bitmask_int8").to_dense())
        assert w.shape == dense_w.shape and not w[dense_w == 0].any()  # the stacked rows, rounded per row
        step = dense_w.abs().amax(1, keepdim=True) / 127
        assert ((w - dense_w).abs() <= step / 2 + 1e-7).all()
        for rows in (1, 9):
            x = torch.randn(1, rows, w.shape[1])
            torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, w), rtol=1e-4, atol=1e-5)
    unfused = sn.convert(llama, {"input_ids": ids}, batch_sizes=(1,), weights="int8", force="bitmask_int8",
                         time_limit=None, fuse_siblings=False, verify=False)
    assert sum(isinstance(m, SparseLinear) for m in unfused.modules()) == 2 * 7 + 1
    # int8 changes the logits a little, never much
    s = c.conversion_summary
    assert 0 < s.accuracy["max_abs_error"] < 0.05 * s.accuracy["max_abs_output"]
    assert all(r.error for r in s.layers if r.converted)


def test_perplexity_change_is_reported_with_text(llama):
    ids = _ids(8)
    text = torch.randint(0, 512, (200,), generator=torch.Generator().manual_seed(3))
    c = sn.convert(llama, {"input_ids": ids}, batch_sizes=(1,), weights="int8", force="dense_int8", text=text,
                   time_limit=None)
    acc = c.conversion_summary.accuracy
    assert abs(acc["perplexity_converted"] / acc["perplexity_dense"] - 1) < 0.01
    assert "perplexity" in str(c.conversion_summary)


def test_encoder_with_dict_inputs(bert):
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    example = {"input_ids": ids, "attention_mask": mask}
    c = sn.convert(bert, example, batch_sizes=(2, 4), force="csr_panel", time_limit=None)
    assert not c.conversion_summary.tokens  # an encoder: batch sizes count sequences
    with torch.no_grad():
        torch.testing.assert_close(c(**example).last_hidden_state, bert(**example).last_hidden_state,
                                   rtol=1e-4, atol=1e-4)
    ci = sn.convert(bert, example, batch_sizes=(2,), weights="int8", force="bitmask_int8", time_limit=None)
    with torch.no_grad():
        out, ref = ci(**example).last_hidden_state, bert(**example).last_hidden_state
    assert (out - ref).abs().max() < 0.1 * ref.abs().max()
    n = sum(isinstance(m, SparseLinear) for m in ci.modules())
    assert n == 2 * 4 + 1  # q/k/v stacked, attention output, intermediate, output per layer; the pooler


def test_bad_inputs(llama):
    ids = _ids(8)
    with pytest.raises(ValueError, match="weights must be one of 'fp32', 'bf16', 'int8'"):
        sn.convert(llama, {"input_ids": ids}, weights="int4")
    with pytest.raises(ValueError, match="tolerance"):
        sn.convert(llama, {"input_ids": ids}, weights="int8", tolerance=-1)
    with pytest.raises(TypeError, match="token ids"):
        sn.convert(llama, {"input_ids": ids}, weights="int8", text="some words")
    # a tolerance no int8 layer can meet: refused, naming the layer
    with pytest.raises(sn.ConversionError, match="model.layers.0.self_attn.fused_q_proj_k_proj_v_proj.linear"):
        sn.convert(llama, {"input_ids": ids}, batch_sizes=(1,), weights="int8", force="bitmask_int8",
                   tolerance=1e-7, time_limit=None)
    c = sn.convert(llama, {"input_ids": ids}, batch_sizes=(1,), weights="int8", force="bitmask_int8",
                   time_limit=None)
    layer = c.model.layers[0].mlp.down_proj
    with pytest.raises(TypeError, match="expects float32 input, got float64"):
        layer(torch.randn(1, 1, 384, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"expects input of shape \(\*, 384\)"):
        layer(torch.randn(1, 1, 383))


def test_generation_speed(llama):
    ids = _ids(8)
    speed = sn.generation_speed(llama, ids, new_tokens=3, repeats=1)
    assert speed.prompt_tokens == 8 and speed.new_tokens == 3
    assert speed.prefill_s > 0 and speed.decode_s_per_token > 0 and speed.decode_tokens_per_s > 0
    assert "tokens/s" in str(speed)
    with pytest.raises(ValueError, match=r"\(1, L\) integer tensor"):
        sn.generation_speed(llama, torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="no generate"):
        sn.generation_speed(torch.nn.Linear(2, 2), ids)


def test_save_and_load_int8(llama, tmp_path):
    ids = _ids(8)
    c = sn.convert(llama, {"input_ids": ids}, batch_sizes=(1,), weights="int8", force="bitmask_int8",
                   time_limit=None)
    path = tmp_path / "m.safetensors"
    sn.runtime.save(c, path)
    fresh = type(llama)(llama.config).eval()
    loaded = sn.runtime.load(path, fresh)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, c(input_ids=ids).logits)
