"""``sn.shrink(..., hidden=...)``: the hidden size (a transformer's residual stream width) through
Embeddings, tied LM heads, RMSNorm, LayerNorm and GroupNorm.

Reference for every exact construct (RMSNorm, per-channel GroupNorm, Embeddings, tied heads,
LLaMA with grouped-query attention): the masked model, i.e. the same model with the removed
channels zeroed in every producer row and bias, Embedding column and norm weight (and the
``o_proj`` columns of removed heads). LayerNorm cannot be exact (the zeros enter its mean and
variance): its reference is the LayerNorm of the kept channels, written out by hand.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import sparsenn as sn
from sparsenn.core.recording import indexed_dim
from sparsenn.structured.attention import attention_modules
from sparsenn.structured.graph import build_graph
from sparsenn.structured.shrink import ShrinkError

IDS = torch.randint(0, 120, (2, 12), generator=torch.Generator().manual_seed(1))


def masked_like(model, shrunk):
    """``model`` with what ``shrunk`` removed set to zero: producer rows and biases, Embedding columns, norm
    weights and biases of every shrunk group, and the ``o_proj`` columns of removed attention heads."""
    masked = copy.deepcopy(model).eval()
    mods, smods = dict(masked.named_modules()), dict(shrunk.named_modules())
    kept_columns = {}
    with torch.no_grad():
        for g in shrunk.shrink_graph.groups:
            kept = shrunk.shrink_kept.get(g.label) if g.producers or g.embeddings else None
            if kept is None:
                continue
            for mod, _, _ in g.consumers:
                kept_columns[mod] = torch.tensor(kept)
            gone = torch.tensor([c for c in range(g.size) if c not in set(kept)], dtype=torch.long)
            for n in g.producers:
                mods[n].weight[gone] = 0
                if mods[n].bias is not None:
                    mods[n].bias[gone] = 0
            for n in g.embeddings:
                mods[n].weight[:, gone] = 0
            for n in g.norms + g.layer_norms:
                for t in (getattr(mods[n], "weight", None), getattr(mods[n], "bias", None)):
                    if t is not None:
                        t[gone] = 0
        for name, m in attention_modules(masked):
            s, d = smods[name], m.head_dim
            if s.q_proj.out_features == m.q_proj.out_features:
                continue
            cols = kept_columns.get(f"{name}.q_proj", torch.arange(m.q_proj.in_features))
            q = m.q_proj.weight[:, cols].reshape(-1, d, len(cols))
            sq = s.q_proj.weight.reshape(-1, d, len(cols))
            gone = [i for i in range(q.shape[0]) if not any(torch.equal(q[i], sq[j]) for j in range(sq.shape[0]))]
            m.o_proj.weight[:, [h * d + k for h in gone for k in range(d)]] = 0
    return masked


def unchanged(model):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    return lambda: all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# --- transformers LLaMA -------------------------------------------------------------------------------------

transformers = pytest.importorskip("transformers")


def llama(tied=False, heads=6, kv=2):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=120, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=64,
                                   tie_word_embeddings=tied)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # RMSNorm weights start at one: make them (and so their rescaling) matter
        for m in model.modules():
            if type(m).__name__ == "LlamaRMSNorm":
                m.weight.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("attention", ["query", "none"])
def test_llama_hidden_size_shrinks_exactly_and_round_trips(tied, attention, tmp_path):
    model = llama(tied)
    same = unchanged(model)
    shrunk = sn.shrink(model, {"input_ids": IDS}, ratio=0.5, attention=attention, hidden=True)
    assert same() and model.config.hidden_size == 48 and model.model.embed_tokens.embedding_dim == 48
    emb, layer = shrunk.model.embed_tokens, shrunk.model.layers[0]
    assert emb.embedding_dim == shrunk.config.hidden_size == shrunk.lm_head.in_features == 24
    assert layer.self_attn.q_proj.in_features == layer.self_attn.o_proj.out_features == 24
    assert layer.mlp.gate_proj.in_features == layer.mlp.down_proj.out_features == 24
    assert layer.mlp.up_proj.out_features == shrunk.config.intermediate_size == 48
    assert tuple(shrunk.model.norm.weight.shape) == (24,) and layer.hidden_size == 24
    assert (shrunk.lm_head.weight is emb.weight) == tied
    assert shrunk.config.head_dim == 8 and shrunk.config.num_attention_heads == (4 if attention == "query" else 6)
    assert shrunk.config.rms_norm_eps == layer.input_layernorm.variance_epsilon == pytest.approx(2e-6)
    with torch.no_grad():
        torch.testing.assert_close(shrunk(IDS).logits, masked_like(model, shrunk)(IDS).logits, rtol=1e-4, atol=1e-5)
    assert not any("from_pretrained" in n for n in shrunk.shrink_notes)
    shrunk.save_pretrained(tmp_path)
    again = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert (again.lm_head.weight.data_ptr() == again.model.embed_tokens.weight.data_ptr()) == tied
    with torch.no_grad():
        assert torch.equal(again(IDS).logits, shrunk(IDS).logits)
        out = shrunk.generate(IDS[:1], max_new_tokens=3, do_sample=False)
        assert out.shape == (1, 15) and torch.equal(again.generate(IDS[:1], max_new_tokens=3, do_sample=False), out)


def test_llama_hidden_ratio_of_its_own_is_rounded_to_the_heads_kept():
    model = llama()
    shrunk = sn.shrink(model, {"input_ids": IDS}, ratio=0.5, attention="kv_groups", hidden=0.3, importance="wanda")
    # kv_groups: 1 of 2 key-value groups, 3 query heads; hidden: 48 - int(14.4) = 34, up to a multiple of 3
    assert shrunk.config.num_attention_heads == 3 and shrunk.config.hidden_size == 36
    assert shrunk.model.layers[1].mlp.up_proj.out_features == 48
    with torch.no_grad():
        torch.testing.assert_close(shrunk(IDS).logits, masked_like(model, shrunk)(IDS).logits, rtol=1e-4, atol=1e-5)


def test_the_hidden_size_is_kept_by_default_and_a_note_says_so():
    shrunk = sn.shrink(llama(), {"input_ids": IDS}, ratio=0.5)
    assert shrunk.config.hidden_size == 48 and shrunk.model.embed_tokens.embedding_dim == 48
    assert shrunk.model.layers[0].mlp.up_proj.out_features == 48 and shrunk.config.num_attention_heads == 4
    assert any(n.startswith("the hidden size (48 channels") and "hidden=True" in n for n in shrunk.shrink_notes)
    g = shrunk.shrink_graph.group_of("model.embed_tokens")
    assert g.hidden and g.frozen is None and g.embeddings == ["model.embed_tokens"]
    assert {"model.norm", "model.layers.0.input_layernorm"} <= set(g.layer_norms)
    assert "lm_head" in {c[0] for c in g.consumers} and "model.layers.1.mlp.down_proj" in g.producers


@pytest.mark.parametrize("zeroed, kept", [(12, 36), (10, 42)])
def test_ratio_none_removes_zeroed_hidden_channels_exactly(zeroed, kept):
    model = llama(tied=True)
    gone = torch.randperm(48, generator=torch.Generator().manual_seed(3))[:zeroed]
    with torch.no_grad():
        model.model.embed_tokens.weight[:, gone] = 0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[gone] = 0
            layer.mlp.down_proj.weight[gone] = 0
        ref = model(IDS).logits
    assert sn.shrink(model, {"input_ids": IDS}).config.hidden_size == 48  # hidden=False: kept
    shrunk = sn.shrink(model, {"input_ids": IDS}, hidden=True)
    assert shrunk.config.hidden_size == kept  # 38 channels are not zero: rounded up to 42, a multiple of 6 heads
    with torch.no_grad():
        torch.testing.assert_close(shrunk(IDS).logits, ref, rtol=1e-4, atol=1e-5)


def test_bert_mlm_head_tied_to_another_group_couples_it_and_the_config_says_it_cannot_round_trip():
    """BERT's MLM decoder is tied to the word embeddings but reads its own transform's output: tying
    couples the two groups; BERT's attention derives its head size from hidden_size, so the config
    cannot describe the result (a LayerNorm model: not compared with the masked one)."""
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=120, hidden_size=48, num_hidden_layers=1, num_attention_heads=4,
                                  intermediate_size=96, max_position_embeddings=64)
    model = transformers.BertForMaskedLM(cfg).eval()
    shrunk = sn.shrink(model, {"input_ids": IDS}, ratio=0.5, hidden=True)
    emb = shrunk.bert.embeddings
    assert emb.word_embeddings.embedding_dim == emb.position_embeddings.embedding_dim == 24
    assert shrunk.cls.predictions.decoder.weight is emb.word_embeddings.weight
    assert shrunk.cls.predictions.transform.dense.out_features == 24
    assert shrunk(IDS).logits.shape == (2, 12, 120)
    assert any("from_pretrained would build" in n for n in shrunk.shrink_notes)


# --- hand-built models ----------------------------------------------------------------------------------------


class PreNorm(nn.Module):
    """An Embedding, pre-norm residual MLP blocks with ``nn.RMSNorm``, a final RMSNorm and a head (optionally tied)."""

    def __init__(self, d=12, width=8, blocks=2, eps=1e-6, tied=False, bias=True, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(30, d)
        self.norms = nn.ModuleList(nn.RMSNorm(d, eps=eps) for _ in range(blocks))
        self.up = nn.ModuleList(nn.Linear(d, width, bias=bias) for _ in range(blocks))
        self.down = nn.ModuleList(nn.Linear(width, d, bias=bias) for _ in range(blocks))
        self.final = nn.RMSNorm(d, eps=eps)
        self.head = nn.Linear(d, 30, bias=False)
        if tied:
            self.head.weight = self.emb.weight
        with torch.no_grad():
            for norm in [*self.norms, self.final]:
                norm.weight.uniform_(0.5, 2.0)

    def forward(self, ids):
        h = self.emb(ids)
        for norm, up, down in zip(self.norms, self.up, self.down):
            h = h + down(F.gelu(up(norm(h))))
        return self.head(self.final(h))


TOKENS = torch.randint(0, 30, (3, 7), generator=torch.Generator().manual_seed(2))


@settings(max_examples=30, deadline=None)
@given(d=st.integers(3, 16), width=st.integers(2, 10), blocks=st.integers(1, 3),
       eps=st.sampled_from([None, 1e-6, 1e-2, 0.5]), tied=st.booleans(), bias=st.booleans(),
       ratio=st.floats(0.0, 0.5), importance=st.sampled_from(["l1", "l2", "random", "wanda", "bn_scale", "taylor"]),
       global_ratio=st.booleans(), seed=st.integers(0, 1000))
def test_rmsnorm_residual_stream_shrinks_exactly(d, width, blocks, eps, tied, bias, ratio, importance, global_ratio,
                                                 seed):
    """Whatever the sizes, epsilon (a large one shows the eps * d / d' rescaling), tying, criterion or
    ranking, the shrunk model computes what the masked one does."""
    model = PreNorm(d, width, blocks, eps, tied, bias, seed).eval()
    kw = {"loss_fn": lambda out: out.pow(2).mean()} if importance == "taylor" else {}
    shrunk = sn.shrink(model, TOKENS, ratio=ratio, importance=importance, global_ratio=global_ratio, hidden=True, **kw)
    assert shrunk.emb.embedding_dim == shrunk.final.normalized_shape[0] == shrunk.head.in_features
    if not global_ratio:
        assert shrunk.emb.embedding_dim == d - int(ratio * d)
    assert (shrunk.head.weight is shrunk.emb.weight) == tied
    groups = shrunk.shrink_graph.prunable()
    removed = sum(g.size - len(shrunk.shrink_kept.get(g.label, range(g.size))) for g in groups)
    if global_ratio:  # ratio of all channels, the hidden size ranked with the MLP channels
        assert removed == int(ratio * sum(g.size for g in groups))
    with torch.no_grad():
        torch.testing.assert_close(shrunk(TOKENS), masked_like(model, shrunk)(TOKENS), rtol=1e-4, atol=1e-5)


def test_a_hidden_ratio_of_its_own_stays_out_of_the_global_ranking():
    model = PreNorm(d=12, width=8, blocks=2).eval()
    shrunk = sn.shrink(model, TOKENS, ratio=0.25, global_ratio=True, hidden=0.5)
    assert shrunk.emb.embedding_dim == 6
    assert sum(shrunk.up[i].out_features for i in range(2)) == 16 - int(0.25 * 16)
    with torch.no_grad():
        torch.testing.assert_close(shrunk(TOKENS), masked_like(model, shrunk)(TOKENS), rtol=1e-4, atol=1e-5)


def test_rmsnorm_rescaling_is_what_makes_it_exact():
    """Without ``w * sqrt(d / d')`` and ``eps * d / d'`` the shrunk norm would differ from the masked one."""
    model = PreNorm(eps=0.5).eval()
    shrunk = sn.shrink(model, TOKENS, ratio=0.5, hidden=True)
    kept = torch.tensor(shrunk.shrink_kept[shrunk.shrink_graph.group_of("emb").label])
    assert shrunk.final.eps == 1.0
    torch.testing.assert_close(shrunk.final.weight, model.final.weight[kept] * 2 ** 0.5)
    plain = nn.RMSNorm(6, eps=0.5)
    with torch.no_grad():
        plain.weight.copy_(model.final.weight[kept])
        x = torch.randn(4, 12)
        x[:, [c for c in range(12) if c not in kept.tolist()]] = 0
        masked = model.final(x)[:, kept]
        torch.testing.assert_close(shrunk.final(x[:, kept]), masked)
        assert not torch.allclose(plain(x[:, kept]), masked)


class LayerNormed(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(30, 12)
        self.ln = nn.LayerNorm(12)
        self.fc = nn.Linear(12, 5)
        with torch.no_grad():
            self.ln.weight.uniform_(0.5, 2.0)
            self.ln.bias.uniform_(-1, 1)

    def forward(self, ids):
        return self.fc(F.relu(self.ln(self.emb(ids))))


def test_layernorm_takes_its_statistics_over_the_kept_channels():
    model = LayerNormed().eval()
    shrunk = sn.shrink(model, TOKENS, ratio=0.5, hidden=True)
    kept = torch.tensor(shrunk.shrink_kept["emb"])
    assert len(kept) == 6 and shrunk.ln.normalized_shape == (6,) and shrunk.ln.eps == model.ln.eps
    with torch.no_grad():
        x = model.emb.weight[:, kept][TOKENS]
        mean = x.mean(-1, keepdim=True)
        var = (x - mean).pow(2).mean(-1, keepdim=True)
        y = (x - mean) / torch.sqrt(var + model.ln.eps) * model.ln.weight[kept] + model.ln.bias[kept]
        ref = F.relu(y) @ model.fc.weight[:, kept].T + model.fc.bias
        torch.testing.assert_close(shrunk(TOKENS), ref, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(shrunk(TOKENS), masked_like(model, shrunk)(TOKENS), atol=1e-3)  # not exact


def test_ratio_none_never_shrinks_a_layernorm_group():
    model = LayerNormed().eval()
    with torch.no_grad():
        model.emb.weight[:, :4] = 0
    shrunk = sn.shrink(model, TOKENS, hidden=True)
    assert shrunk.emb.embedding_dim == 12
    assert any("LayerNorm ln takes its statistics over every channel" in n for n in shrunk.shrink_notes)


class GroupNormed(nn.Module):
    def __init__(self, groups):
        super().__init__()
        torch.manual_seed(0)
        self.c1, self.gn = nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(groups, 8)
        self.c2, self.fc = nn.Conv2d(8, 6, 3, padding=1), nn.Linear(6, 4)
        with torch.no_grad():
            self.gn.weight.uniform_(0.5, 2.0)
            self.gn.bias.uniform_(-1, 1)

    def forward(self, x):
        return self.fc(F.relu(self.c2(F.relu(self.gn(self.c1(x))))).mean((2, 3)))


def test_groupnorm_with_one_group_per_channel_shrinks_exactly_and_others_are_kept():
    x = torch.randn(2, 3, 8, 8)
    model = GroupNormed(8).eval()
    shrunk = sn.shrink(model, x, ratio=0.5)  # a per-channel norm: not a hidden size, shrunk by default
    assert shrunk.c1.out_channels == shrunk.gn.num_channels == shrunk.gn.num_groups == 4
    with torch.no_grad():
        torch.testing.assert_close(shrunk(x), masked_like(model, shrunk)(x), rtol=1e-4, atol=1e-5)
    grouped = GroupNormed(2).eval()
    assert "GroupNorm with 2 groups of 8 channels" in build_graph(grouped, x).group_of("c1").frozen
    shrunk = sn.shrink(grouped, x, ratio=0.5, hidden=True)
    assert shrunk.c1.out_channels == 8 and shrunk.c2.out_channels == 3


def test_norms_that_are_not_understood_freeze_their_channels_with_a_note():
    class GemmaRMSNorm(nn.Module):  # x / rms * (1 + weight): not the RMSNorm formula
        def __init__(self, d):
            super().__init__()
            self.weight, self.eps = nn.Parameter(torch.zeros(d)), 1e-6

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1 + self.weight)

    class Net(nn.Module):
        def __init__(self, norm):
            super().__init__()
            self.emb, self.norm, self.fc = nn.Embedding(30, 8), norm, nn.Linear(8, 3)

        def forward(self, ids):
            return self.fc(self.norm(self.emb(ids)))

    for norm, why in [(GemmaRMSNorm(8), "does not compute x * rsqrt(mean(x^2) + eps) * weight"),
                      (nn.RMSNorm(8, elementwise_affine=False), "has no weight to rescale")]:
        model = Net(norm).eval()
        graph = build_graph(model, TOKENS)
        assert why in graph.group_of("emb").frozen and any(why in n for n in graph.notes)
        assert sn.shrink(model, TOKENS, ratio=0.5, hidden=True).emb.embedding_dim == 8


def test_embeddings_max_norm_freezes_and_a_tensor_shared_outside_the_group_is_refused():
    class Net(nn.Module):
        def __init__(self, max_norm=None, spare=False):
            super().__init__()
            self.emb, self.fc = nn.Embedding(30, 8, max_norm=max_norm), nn.Linear(8, 3)
            if spare:  # holds the embedding's weight but is never called
                self.spare = nn.Linear(8, 30, bias=False)
                self.spare.weight = self.emb.weight

        def forward(self, ids):
            return self.fc(F.relu(self.emb(ids)))

    assert "max_norm" in build_graph(Net(max_norm=1.0).eval(), TOKENS).group_of("emb").frozen
    model = Net().eval()
    shrunk = sn.shrink(model, TOKENS, ratio=0.5, hidden=True)
    assert shrunk.emb.embedding_dim == shrunk.fc.in_features == 4
    with torch.no_grad():
        torch.testing.assert_close(shrunk(TOKENS), masked_like(model, shrunk)(TOKENS))
    spare = Net(spare=True).eval()
    same = unchanged(spare)
    with pytest.raises(ShrinkError, match=r"spare.weight is the same tensor as emb.weight, which the plan shrinks"):
        sn.shrink(spare, TOKENS, ratio=0.5, hidden=True)
    assert same() and spare.emb.embedding_dim == 8


def test_indexing_that_keeps_the_channels_whole_is_followed():
    assert indexed_dim((slice(None), slice(-1, None), slice(None)), (2, 5, 8), 2) == 2
    assert indexed_dim((slice(None), -1), (2, 5, 8), 2) == 1
    assert indexed_dim((Ellipsis, None, slice(None)), (2, 5, 8), 2) == 3
    assert indexed_dim((Ellipsis, slice(0, 4)), (2, 5, 8), 2) is None  # part of the channels
    assert indexed_dim(torch.tensor([0, 1]), (2, 5, 8), 2) is None

    class Last(nn.Module):
        def __init__(self, part=False):
            super().__init__()
            self.a, self.b, self.part = nn.Linear(4, 8), nn.Linear(6 if part else 8, 3), part

        def forward(self, x):
            h = F.relu(self.a(x))
            return self.b(h[..., :6] if self.part else h[:, -1, :])

    x = torch.randn(2, 5, 4)
    model = Last().eval()
    shrunk = sn.shrink(model, x, ratio=0.5)
    assert shrunk.a.out_features == 4
    with torch.no_grad():
        torch.testing.assert_close(shrunk(x), masked_like(model, shrunk)(x))
    assert "indexing into their channel dimension" in build_graph(Last(part=True).eval(), x).group_of("a").frozen


def test_bad_hidden_values_are_named():
    model = PreNorm().eval()
    with pytest.raises(ValueError, match=r"hidden must be False, True or a ratio in \[0, 1\), got 1.5"):
        sn.shrink(model, TOKENS, ratio=0.5, hidden=1.5)
    with pytest.raises(ValueError, match="hidden=0.3 is a ratio for the hidden size and needs ratio="):
        sn.shrink(model, TOKENS, hidden=0.3)
    assert sn.shrink(model, TOKENS, ratio=0.5).emb.embedding_dim == 12  # default: kept
