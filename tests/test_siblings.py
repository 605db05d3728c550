"""Sibling Linear layers (same input) run as one stacked product: found, fused, converted, saved, loaded."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from conftest import forge_runtime_archive
from torch import nn

import sparsenn as sn
from sparsenn.backend.runtime import SparseLinear
from sparsenn.backend.runtime.errors import ArchiveError
from sparsenn.backend.runtime.siblings import (
    SIBLINGS_ATTR,
    FusedSiblings,
    SiblingGroup,
    SiblingSlice,
    find_siblings,
    fuse_siblings,
)

transformers = pytest.importorskip("transformers")


class Block(nn.Module):
    """q, k, v read x; gate, up read h; o reads the attention-like product; ``side`` reads x only sometimes."""

    def __init__(self, d=16, bias=True):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d, bias=bias), nn.Linear(d, 8, bias=False), nn.Linear(d, 8, bias=bias)
        self.o = nn.Linear(8, d)
        self.gate, self.up, self.down = nn.Linear(d, 32), nn.Linear(d, 32), nn.Linear(32, d)

    def forward(self, x):
        a = torch.softmax(self.q(x)[..., :8] * self.k(x), -1) * self.v(x)
        h = x + self.o(a)
        return h + self.down(torch.nn.functional.silu(self.gate(h)) * self.up(h))


def _fused(model, x):
    m = copy.deepcopy(model)
    fuse_siblings(m, find_siblings(m, x))
    return m


def test_finds_the_groups_in_call_order_and_the_output_is_unchanged():
    torch.manual_seed(0)
    model, x = Block().eval(), torch.randn(3, 5, 16)
    groups = find_siblings(model, x)
    assert groups == [SiblingGroup("", "fused_q_k_v", ("q", "k", "v")),
                      SiblingGroup("", "fused_gate_up", ("gate", "up"))]
    fused = _fused(model, x)
    assert isinstance(fused.q, SiblingSlice) and isinstance(fused.fused_q_k_v, FusedSiblings)
    assert list(dict(fused.named_children())) == ["fused_q_k_v", "q", "k", "v", "o", "fused_gate_up", "gate", "up",
                                                  "down"]
    # the stacked weight: rows in member order; a member without bias adds zeros
    lin = fused.fused_q_k_v.linear
    assert torch.equal(lin.weight, torch.cat([model.q.weight, model.k.weight, model.v.weight]))
    assert torch.equal(lin.bias, torch.cat([model.q.bias, torch.zeros(8), model.v.bias]))
    # one parameter set, nothing duplicated in state_dict; k's 8 zero biases are the only addition
    assert sum(p.numel() for p in fused.parameters()) == sum(p.numel() for p in model.parameters()) + 8
    assert not any(k.startswith(("q.", "k.", "v.")) for k in fused.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-6, atol=1e-6)
    # gradients flow to the stacked weight (fusion is structure only)
    fused(x).sum().backward()
    assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0


def test_the_stacked_product_runs_once_per_input():
    torch.manual_seed(0)
    model, x = Block().eval(), torch.randn(2, 16)
    fused = _fused(model, x)
    calls = []
    fused.fused_q_k_v.linear.register_forward_hook(lambda m, a, o: calls.append(1))
    with torch.no_grad():
        fused(x)
        assert len(calls) == 1 and fused.fused_q_k_v._cache is None  # every member took its part: nothing kept
        # a member called on another tensor, or twice on the same one, computes again (and stays right)
        y = torch.randn(2, 16)
        torch.testing.assert_close(fused.k(y), model.k(y))
        torch.testing.assert_close(fused.q(x), model.q(x))
        torch.testing.assert_close(fused.q(x), model.q(x))
        torch.testing.assert_close(fused.v(x), model.v(x))
    assert len(calls) == 4


def test_an_input_changed_in_place_between_siblings_is_seen():
    torch.manual_seed(0)
    model, x = Block().eval(), torch.randn(2, 16)
    fused = _fused(model, x)
    x = torch.randn(2, 16)
    with torch.no_grad():
        fused.q(x)
        x.mul_(2)  # version counter moves: k must not read the cached product of the old values
        torch.testing.assert_close(fused.k(x), model.k(x))


class VAlsoElsewhere(Block):
    def forward(self, x):
        self.v(x + 1)  # v also reads a tensor q and k do not: no group holds v, nor q and k without it
        return super().forward(x)


class GateAlsoReadsX(Block):
    def forward(self, x):
        self.gate(x)  # x is read by q, k, v and gate; h by gate and up: no set is the same everywhere
        return super().forward(x)


@pytest.mark.parametrize("case", ["hook", "tied", "other_input", "twice"])
def test_layers_that_are_not_siblings_are_left_alone(case):
    torch.manual_seed(0)
    x = torch.randn(2, 16)
    model = {"other_input": VAlsoElsewhere, "twice": GateAlsoReadsX}.get(case, Block)().eval()
    if case == "hook":
        model.k.register_forward_hook(lambda m, a, o: None)
    elif case == "tied":
        model.up.weight = model.gate.weight
    want = {"hook": [("q", "v"), ("gate", "up")], "tied": [("q", "k", "v")], "other_input": [("gate", "up")], "twice": []}
    assert [g.members for g in find_siblings(model, x)] == want[case]
    fused = _fused(model, x)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-6, atol=1e-6)


def test_bad_groups_are_refused_before_anything_changes():
    model = Block()
    before = copy.deepcopy(model.state_dict())
    bad = [
        (SiblingGroup("", "fused_q_o", ("q", "o")), "does not read what"),
        (SiblingGroup("", "q", ("q", "k")), "cannot be added"),
        (SiblingGroup("", "fused.x", ("q", "k")), "cannot be added"),
        (SiblingGroup("nope", "fused_q_k", ("q", "k")), "no module 'nope'"),
        (SiblingGroup("", "fused_q", ("q",)), "two or more"),
        (SiblingGroup("", "fused_q_q", ("q", "q")), "two or more"),
    ]
    for g, msg in bad:
        with pytest.raises(ValueError, match=msg):
            fuse_siblings(model, [SiblingGroup("", "fused_gate_up", ("gate", "up")), g])
        assert isinstance(model.gate, nn.Linear) and not hasattr(model, "fused_gate_up")
    with pytest.raises(ValueError, match="two sibling groups"):
        fuse_siblings(model, [SiblingGroup("", "fused_q_k", ("q", "k")), SiblingGroup("", "fused_k_v", ("k", "v"))])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_copies_and_pickles_keep_one_stacked_layer():
    torch.manual_seed(0)
    model, x = Block().eval(), torch.randn(2, 16)
    fused = _fused(model, x)
    for other in (copy.deepcopy(fused), pickle.loads(pickle.dumps(fused))):
        assert other.q.fused is other.fused_q_k_v and other.v.fused is other.fused_q_k_v
        with torch.no_grad():
            torch.testing.assert_close(other(x), model(x), rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    m = transformers.LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if ".layers." in n and p.dim() == 2:
                p[torch.rand(p.shape, generator=g) < 0.7] = 0
    return m


def test_a_converted_decoder_generates_as_before_and_saves_and_loads(llama, tmp_path):
    ids = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(1))
    c = sn.convert(llama, {"input_ids": ids}, batch_sizes=(1, 10), force="bitmask", time_limit=None)
    groups = c.__dict__[SIBLINGS_ATTR]
    assert [g.name for g in groups] == ["fused_q_proj_k_proj_v_proj", "fused_gate_proj_up_proj"] * 2
    assert "run as one product" in str(c.conversion_summary)
    ref = llama.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(c.generate(ids, max_new_tokens=8, do_sample=False), ref)
    path = sn.backend.runtime.save(c, tmp_path / "m.safetensors")
    arch = copy.deepcopy(llama)
    loaded = sn.backend.runtime.load(path, arch)
    assert isinstance(loaded.model.layers[0].self_attn.fused_q_proj_k_proj_v_proj.linear, SparseLinear)
    assert torch.equal(loaded.generate(ids, max_new_tokens=8, do_sample=False), ref)
    # a tampered group is refused, the architecture unchanged
    for bad in ([["model.layers.0.self_attn", "fused_x", ["model.layers.0.self_attn.q_proj",
                                                           "model.layers.0.mlp.up_proj"]]],
                [["model.layers.0.self_attn", "fused_q", "q_proj"]]):
        forged = forge_runtime_archive(path, tmp_path / "bad.safetensors", siblings=bad)
        fresh = copy.deepcopy(llama)
        with pytest.raises(ArchiveError, match="siblings"):
            sn.backend.runtime.load(forged, fresh)
        assert isinstance(fresh.model.layers[0].self_attn.q_proj, nn.Linear)


def test_fuse_siblings_false_keeps_every_layer(llama):
    ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(1))
    c = sn.convert(llama, {"input_ids": ids}, batch_sizes=(1,), force="bitmask", time_limit=None,
                   fuse_siblings=False, verify=False)
    assert c.__dict__[SIBLINGS_ATTR] == [] and isinstance(c.model.layers[0].self_attn.q_proj, SparseLinear)
    with pytest.raises(TypeError, match="fuse_siblings must be True or False"):
        sn.convert(llama, {"input_ids": ids}, fuse_siblings="yes")


# ----------------------------------------------------------------------------- gated MLPs over the stacked product

class SwiGLU(nn.Module):
    def __init__(self, d=16, hidden=24, swapped=False):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(d, hidden, bias=False), nn.Linear(d, hidden, bias=False)
        self.down_proj, self.act_fn, self.swapped = nn.Linear(hidden, d, bias=False), nn.SiLU(), swapped

    def forward(self, x):
        if self.swapped:  # another formula under the same names: must not be replaced
            return self.down_proj(self.gate_proj(x) * self.act_fn(self.up_proj(x)))
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


@pytest.mark.parametrize("swapped", [False, True])
def test_a_gated_mlp_calls_its_stacked_product_directly_only_where_it_computes_the_same(swapped):
    from sparsenn.backend.runtime.gated_mlp import GatedMLP, fuse_gated_mlps

    torch.manual_seed(0)
    model, x = nn.Sequential(SwiGLU(swapped=swapped)).eval(), torch.randn(2, 5, 16)
    fused = _fused(model, x)
    names = fuse_gated_mlps(fused)
    assert names == ([] if swapped else ["0"])
    assert isinstance(fused[0], GatedMLP) != swapped
    assert set(fused.state_dict()) == {"0.fused_gate_proj_up_proj.linear.weight", "0.down_proj.weight"}
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-6, atol=1e-6)
    if swapped:
        with pytest.raises(ValueError, match="not gated MLPs"):
            fuse_gated_mlps(fused, ["0"])
    with pytest.raises(ValueError, match="not gated MLPs"):
        fuse_gated_mlps(fused, ["0.down_proj"])


def test_converted_llama_runs_gated_mlps_and_archives_refuse_forged_names(llama, tmp_path):
    from sparsenn.backend.runtime.gated_mlp import MLPS_ATTR, GatedMLP

    ids = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(1))
    c = sn.convert(llama, {"input_ids": ids}, batch_sizes=(1,), force="bitmask", time_limit=None, verify=False)
    assert c.__dict__[MLPS_ATTR] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert all(isinstance(c.get_submodule(n), GatedMLP) for n in c.__dict__[MLPS_ATTR])
    with torch.inference_mode():
        torch.testing.assert_close(c(ids).logits, llama(ids).logits, rtol=1e-4, atol=1e-4)
    path = sn.backend.runtime.save(c, tmp_path / "m.safetensors")
    loaded = sn.backend.runtime.load(path, copy.deepcopy(llama))
    assert isinstance(loaded.model.layers[1].mlp, GatedMLP)
    for names in (["model.layers.0.self_attn"], "model.layers.0.mlp", ["model.layers.0.mlp", "model.layers.0.mlp"]):
        forged = forge_runtime_archive(path, tmp_path / "bad.safetensors", gated_mlps=names)
        fresh = copy.deepcopy(llama)
        with pytest.raises(ArchiveError, match="gated_mlps"):
            sn.backend.runtime.load(forged, fresh)
        assert isinstance(fresh.model.layers[0].mlp.gate_proj, nn.Linear)
