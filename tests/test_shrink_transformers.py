"""``sn.shrink`` on ``transformers`` models (tiny random configs): MLP channels and attention heads,
grouped-query attention, equality with the masked model, and the config round trip."""

import copy

import pytest
import torch

import sparsenn as sn
from sparsenn.structured.attention import attention_modules
from sparsenn.structured.shrink import ShrinkError

transformers = pytest.importorskip("transformers")


def llama(heads=6, kv=2, layers=2):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=120, hidden_size=48, intermediate_size=96, num_hidden_layers=layers,
                                   num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


def bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=120, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=96, max_position_embeddings=64)
    return transformers.BertModel(cfg).eval()


IDS = torch.randint(0, 120, (2, 12), generator=torch.Generator().manual_seed(1))


def masked_like(model, shrunk):
    """The model with what ``shrunk`` removed set to zero: MLP rows (the graph's groups) and, per attention
    module, the ``o_proj`` columns of removed query heads (their contribution to the output)."""
    masked = copy.deepcopy(model)
    mods, smods = dict(masked.named_modules()), dict(shrunk.named_modules())
    with torch.no_grad():
        for g in shrunk.shrink_graph.groups:
            kept = shrunk.shrink_kept.get(g.producers[0]) if g.producers else None
            if kept is not None:
                gone = [c for c in range(g.size) if c not in set(kept)]
                for p in g.producers:
                    mods[p].weight[gone] = 0
        for name, m in attention_modules(masked):
            s = smods[name]
            if s.q_proj.out_features == m.q_proj.out_features:
                continue
            d = m.head_dim
            q = m.q_proj.weight.reshape(-1, d, m.q_proj.in_features)
            sq = s.q_proj.weight.reshape(-1, d, s.q_proj.in_features)
            kept = [i for i in range(q.shape[0]) if any(torch.equal(q[i], sq[j]) for j in range(sq.shape[0]))]
            gone = [i for i in range(q.shape[0]) if i not in kept]
            cols = torch.tensor([h * d + k for h in gone for k in range(d)], dtype=torch.long)
            m.o_proj.weight[:, cols] = 0
    return masked


@pytest.mark.parametrize("importance", ["l1", "wanda"])
@pytest.mark.parametrize("attention", ["query", "kv_groups", "none"])
def test_llama_gqa_shrunk_equals_masked_and_round_trips(attention, importance, tmp_path):
    model = llama()
    shrunk = sn.shrink(model, {"input_ids": IDS}, ratio=0.5, attention=attention, importance=importance)
    attn = shrunk.model.layers[0].self_attn
    expect = {"query": (4, 2), "kv_groups": (3, 1), "none": (6, 2)}[attention]  # 3 per group - int(1.5)
    assert (attn.q_proj.out_features // attn.head_dim, attn.k_proj.out_features // attn.head_dim) == expect
    assert shrunk.model.layers[0].mlp.up_proj.out_features == 48 and shrunk.config.intermediate_size == 48
    assert (shrunk.config.num_attention_heads, shrunk.config.num_key_value_heads) == expect
    with torch.no_grad():
        torch.testing.assert_close(shrunk(IDS).logits, masked_like(model, shrunk)(IDS).logits, rtol=1e-4,
                                   atol=1e-5)
    shrunk.save_pretrained(tmp_path)
    again = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(again(IDS).logits, shrunk(IDS).logits)
        assert shrunk.generate(IDS[:1], max_new_tokens=3, do_sample=False).shape == (1, 15)
    assert model.config.num_attention_heads == 6 and model.model.layers[0].mlp.up_proj.out_features == 96


def test_ratio_none_removes_zeroed_heads_and_refuses_uneven_groups():
    model = llama()
    with torch.no_grad():
        for layer in model.model.layers:  # zero query heads 1 and 4 (one per key-value group of 3)
            o = layer.self_attn.o_proj.weight
            o[:, 8:16] = 0
            o[:, 32:40] = 0
    shrunk = sn.shrink(model, {"input_ids": IDS})
    assert shrunk.config.num_attention_heads == 4 and shrunk.config.num_key_value_heads == 2
    with torch.no_grad():
        torch.testing.assert_close(shrunk(IDS).logits, model(IDS).logits, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight[:, 0:8] = 0  # a third head of group 0 only
    with pytest.raises(ShrinkError, match="model.layers.0.self_attn: every kept key-value group must keep"):
        sn.shrink(model, {"input_ids": IDS})


def test_ignored_layers_keep_their_size_and_the_config_says_it_cannot_round_trip():
    model = llama()
    shrunk = sn.shrink(model, {"input_ids": IDS}, ratio=0.5, ignore=["model.layers.1"])
    assert shrunk.model.layers[0].mlp.up_proj.out_features == 48
    assert shrunk.model.layers[1].mlp.up_proj.out_features == 96
    assert any("layers differ in num_attention_heads, intermediate_size" in n for n in shrunk.shrink_notes)


def test_bert_intermediate_channels_shrink_and_round_trip(tmp_path):
    model = bert()
    mask = torch.ones_like(IDS)
    shrunk = sn.shrink(model, {"input_ids": IDS, "attention_mask": mask}, ratio=0.25)
    assert shrunk.encoder.layer[0].intermediate.dense.out_features == 72 and shrunk.config.intermediate_size == 72
    assert shrunk.encoder.layer[0].output.dense.in_features == 72
    with torch.no_grad():
        ref = masked_like(model, shrunk)(input_ids=IDS, attention_mask=mask).last_hidden_state
        torch.testing.assert_close(shrunk(input_ids=IDS, attention_mask=mask).last_hidden_state, ref,
                                   rtol=1e-4, atol=1e-5)
    shrunk.save_pretrained(tmp_path)
    again = transformers.BertModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(again(input_ids=IDS).last_hidden_state, shrunk(input_ids=IDS).last_hidden_state)


def test_bad_attention_mode_is_named():
    with pytest.raises(ValueError, match="unknown attention 'heads'; valid: query, kv_groups, none"):
        sn.shrink(llama(), {"input_ids": IDS}, ratio=0.5, attention="heads")
