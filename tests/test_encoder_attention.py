"""BERT-style self-attention over a stacked q/k/v product (runtime/encoder_attention.py), and replacements that
stay instances of the replaced class (replace.KeepsClass): against the dense transformers model."""

import copy
import io as pyio

import pytest
import torch

import sparsenn as sn
from sparsenn.backend.runtime import io
from sparsenn.backend.runtime.attention import ATTENTIONS_ATTR, FusedAttention, fuse_attentions
from sparsenn.backend.runtime.encoder_attention import FusedSelfAttention, fusable

transformers = pytest.importorskip("transformers")
from transformers.models.bert.modeling_bert import BertSelfAttention  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaAttention  # noqa: E402


def prune(model, keep=0.2, prefix=("encoder.", "bert.encoder.", "model.layers.")):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 2 and n.startswith(prefix):
                p.mul_(torch.rand_like(p) < keep)
    return model


def bert_config(implementation="sdpa", **kw):
    return transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                   vocab_size=100, max_position_embeddings=64, attn_implementation=implementation, **kw)


def inputs(batch, seq, pad=0):
    mask = torch.ones(batch, seq, dtype=torch.long)
    if pad:
        mask[:, -pad:] = 0
    return {"input_ids": torch.randint(0, 100, (batch, seq)), "attention_mask": mask}


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def bert(request):
    torch.manual_seed(0)
    cfg = bert_config(request.param)
    m = prune(transformers.BertModel(cfg).eval())
    c = sn.convert(m, inputs(2, 16), batch_sizes=(2,), force="csr_panel", time_limit=None)
    return cfg, m, c


def test_bert_self_attentions_read_views_of_the_stacked_product(bert):
    cfg, m, c = bert
    names = c.__dict__[ATTENTIONS_ATTR]
    assert names == ["encoder.layer.0.attention.self", "encoder.layer.1.attention.self"]
    for n in names:
        a = c.get_submodule(n)
        assert isinstance(a, FusedSelfAttention) and isinstance(a, BertSelfAttention)
    with torch.inference_mode():
        for batch, seq, pad in ((2, 16, 0), (1, 1, 0), (3, 9, 4), (5, 40, 7)):
            x = inputs(batch, seq, pad)
            torch.testing.assert_close(c(**x).last_hidden_state, m(**x).last_hidden_state, rtol=1e-4, atol=1e-5)


def test_attention_weights_are_still_recorded():
    """``output_attentions=True`` (transformers records weights with eager attention) hooks modules by class."""
    torch.manual_seed(4)
    m = prune(transformers.BertModel(bert_config("eager")).eval())
    c = sn.convert(m, inputs(2, 16), batch_sizes=(2,), force="csr_panel", time_limit=None)
    assert isinstance(c.encoder.layer[0].attention.self, FusedSelfAttention)
    x = inputs(2, 12, 3)
    with torch.inference_mode():
        want, got = m(**x, output_attentions=True).attentions, c(**x, output_attentions=True).attentions
    assert len(got) == len(want) == 2
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_pickled_copied_and_archived_models_keep_the_fused_attention(bert, tmp_path):
    cfg = bert[0]
    x = inputs(2, 16)
    # a fresh model: once asked for output_attentions, transformers' recording hooks (local functions) are on
    # the model and on copies of it, and no model pickles with them
    c = sn.convert(prune(transformers.BertModel(cfg).eval()), x, batch_sizes=(2,), force="csr_panel", time_limit=None)
    buf = pyio.BytesIO()
    torch.save(c, buf)
    buf.seek(0)
    path = tmp_path / "bert.safetensors"
    io.save(c, path)
    for other in (torch.load(buf, weights_only=False), copy.deepcopy(c), io.load(path, transformers.BertModel(cfg))):
        a = other.encoder.layer[1].attention.self
        assert isinstance(a, FusedSelfAttention) and isinstance(a, BertSelfAttention)
        with torch.inference_mode():
            assert torch.equal(other(**x).last_hidden_state, c(**x).last_hidden_state)


def test_a_bert_decoder_with_a_cache_runs_the_original_forward():
    torch.manual_seed(1)
    cfg = bert_config(is_decoder=True)
    m = prune(transformers.BertLMHeadModel(cfg).eval(), prefix=("bert.encoder.",))
    ids = torch.randint(0, 100, (1, 6))
    c = sn.convert(m, {"input_ids": ids}, batch_sizes=(1, 6), force="csr", time_limit=None)
    assert isinstance(c.bert.encoder.layer[0].attention.self, FusedSelfAttention)
    with torch.inference_mode():
        want = m.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True)
        got = c.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True)
    assert torch.equal(got, want)


def test_other_formulas_and_hooked_modules_stay():
    torch.manual_seed(2)
    m = prune(transformers.BertModel(bert_config()).eval())
    c = sn.convert(m, inputs(2, 8), batch_sizes=(2,), force="csr_panel", time_limit=None)
    layer = c.encoder.layer[0].attention
    original = copy.deepcopy(m.encoder.layer[0].attention.self)
    assert not fusable(original)  # no stacked product: nothing to read views of

    class Scaled(BertSelfAttention):  # the same names, another formula
        def forward(self, hidden_states, attention_mask=None, **kwargs):
            out, w = super().forward(hidden_states, attention_mask, **kwargs)
            return out * 2, w

    fused = layer.self
    other = Scaled(c.config).eval()
    other.query, other.key, other.value = fused.query, fused.key, fused.value  # the stacked product's slices
    assert not fusable(other)
    hooked = copy.deepcopy(m.encoder.layer[1].attention.self)
    hooked.register_forward_hook(lambda *a: None)
    assert not fusable(hooked)
    with pytest.raises(ValueError, match="not attention modules over a stacked q/k/v product"):
        fuse_attentions(c, ["encoder.layer.0.attention.output"])


def test_llama_attention_weights_and_pickling_survive_the_fusion():
    """The LLaMA-style FusedAttention is an instance of the replaced class too (output_attentions was empty)."""
    torch.manual_seed(3)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=100, attn_implementation="eager")
    m = prune(transformers.LlamaForCausalLM(cfg).eval(), keep=0.3)
    ids = torch.randint(0, 100, (1, 8))
    c = sn.convert(m, {"input_ids": ids}, batch_sizes=(1, 8), force="csr", time_limit=None)
    a = c.model.layers[0].self_attn
    assert isinstance(a, FusedAttention) and isinstance(a, LlamaAttention) and type(a).__name__ == "FusedAttention"
    buf = pyio.BytesIO()
    torch.save(c, buf)  # before any output_attentions call: transformers' recording hooks do not pickle
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    with torch.inference_mode():
        assert torch.equal(loaded(ids).logits, c(ids).logits)
        want, got = m(ids, output_attentions=True).attentions, c(ids, output_attentions=True).attentions
    assert len(got) == len(want) == 2
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
