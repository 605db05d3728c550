"""A residual add and LayerNorm in one compiled pass (kernels/norms.py) and BERT's output modules run through it
(runtime/residual_norm.py): against PyTorch's add + layer_norm and the dense model."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import sparsenn as sn
from conftest import forge_runtime_archive
from sparsenn import kernels as K
from sparsenn.backend.kernels.norms import add_layer_norm_rows
from sparsenn.backend.runtime import io
from sparsenn.backend.runtime.errors import ArchiveError
from sparsenn.backend.runtime.layers import SparseLinear
from sparsenn.backend.runtime.residual_norm import (
    RESIDUAL_NORMS_ATTR,
    ResidualLayerNorm,
    fusable,
    fuse_residual_norms,
)

transformers = pytest.importorskip("transformers")


def reference(h, r, w, b, eps):
    t = [torch.from_numpy(a) for a in (h, r, w, b)]
    return F.layer_norm(t[0] + t[1], (w.shape[0],), t[2], t[3], eps).numpy()


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 9), d=st.integers(1, 70), offset=st.sampled_from([0.0, 1.0, 1000.0]),
       eps=st.sampled_from([1e-12, 1e-5, 0.1]), seed=st.integers(0, 2**16))
def test_kernel_matches_torch(rows, d, offset, eps, seed):
    """Any width (whole vectors and the scalar tail), rows far from zero (the two-pass variance), any epsilon."""
    rng = np.random.default_rng(seed)
    h = (rng.standard_normal((rows, d)) * 3 + offset).astype(np.float32)
    r = rng.standard_normal((rows, d)).astype(np.float32)
    w, b = rng.standard_normal(d).astype(np.float32), rng.standard_normal(d).astype(np.float32)
    out = np.empty_like(h)
    add_layer_norm_rows(h, r, w, b, eps, out)
    np.testing.assert_allclose(out, reference(h, r, w, b, eps), rtol=1e-4, atol=1e-4 if offset < 1000 else 2e-3)


def test_kernel_in_place_and_bad_arguments():
    rng = np.random.default_rng(0)
    h, r = rng.standard_normal((2, 3, 40)).astype(np.float32), rng.standard_normal((2, 3, 40)).astype(np.float32)
    w, b = np.ones(40, np.float32), np.zeros(40, np.float32)
    want = reference(h, r, w, b, 1e-5)
    add_layer_norm_rows(h, r, w, b, 1e-5, h)  # out may be h
    np.testing.assert_allclose(h, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="float32 C-contiguous"):
        add_layer_norm_rows(h.astype(np.float64), r, w, b, 1e-5, h)
    with pytest.raises(ValueError, match="float32 C-contiguous"):
        add_layer_norm_rows(h[..., ::2], r[..., ::2], w[::2], b[::2], 1e-5, h[..., ::2])
    with pytest.raises(ValueError, match="shapes do not fit"):
        add_layer_norm_rows(h, r[:1], w, b, 1e-5, h)
    with pytest.raises(ValueError, match="shapes do not fit"):
        add_layer_norm_rows(h, r, w[:8], b[:8], 1e-5, h)


def test_kernel_runs_on_torchs_thread_count():
    import numba

    before = torch.get_num_threads()
    h = np.ones((64, 32), np.float32)
    w, b = np.ones(32, np.float32), np.zeros(32, np.float32)
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            add_layer_norm_rows(h, h, w, b, 1e-5, np.empty_like(h))
            assert numba.get_num_threads() == min(n, numba.config.NUMBA_NUM_THREADS)
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------ the rewrite on a tiny BERT


def tiny_bert(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
                                  vocab_size=100, max_position_embeddings=64)
    m = transformers.BertModel(cfg).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if p.dim() == 2 and n.startswith("encoder."):
                p.mul_(torch.rand_like(p) > 0.8)
            if "LayerNorm" in n:  # not the identity norm of a fresh model
                p.add_(torch.randn_like(p) * 0.3)
    return cfg, m


@pytest.fixture(scope="module")
def converted():
    cfg, m = tiny_bert()
    x = {"input_ids": torch.randint(0, 100, (2, 16)), "attention_mask": torch.ones(2, 16, dtype=torch.long)}
    c = sn.convert(m, x, batch_sizes=(2,), force="csr_panel", time_limit=None)
    return cfg, m, c, x


NAMES = ["encoder.layer.0.attention.output", "encoder.layer.0.output",
         "encoder.layer.1.attention.output", "encoder.layer.1.output"]


def test_bert_output_modules_run_the_compiled_norm(converted):
    cfg, m, c, x = converted
    assert c.__dict__[RESIDUAL_NORMS_ATTR] == NAMES
    assert all(isinstance(c.get_submodule(n), ResidualLayerNorm) for n in NAMES)
    assert any("LayerNorm after them run as one compiled pass" in note for note in c.conversion_summary.notes)
    assert "encoder.layer.0.output.LayerNorm.weight" in dict(c.named_parameters())  # same children, same names
    with torch.inference_mode():
        for batch, seq in ((2, 16), (1, 1), (3, 7), (5, 40)):
            xb = {"input_ids": torch.randint(0, 100, (batch, seq)),
                  "attention_mask": torch.ones(batch, seq, dtype=torch.long)}
            torch.testing.assert_close(c(**xb).last_hidden_state, m(**xb).last_hidden_state, rtol=1e-4, atol=1e-5)


class Output(nn.Module):
    """BERT's output module: LayerNorm(dropout(dense(h)) + residual)."""

    def __init__(self, dense, norm=None):
        super().__init__()
        self.dense, self.dropout = dense, nn.Dropout(0.1)
        self.LayerNorm = norm if norm is not None else nn.LayerNorm(dense.out_features)
        with torch.no_grad():
            self.LayerNorm.weight.normal_() if self.LayerNorm.weight is not None else None

    def forward(self, hidden_states, input_tensor):
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + input_tensor)


def sparse_linear(cols=32, out=48):
    lin = nn.Linear(cols, out)
    with torch.no_grad():
        lin.weight.mul_(torch.rand_like(lin.weight) > 0.7)
    return lin, SparseLinear.from_linear(lin, {16: "csr"}, {"csr": K.pack(lin.weight, "csr")})


def test_only_the_exact_pattern_is_fused():
    lin, sparse = sparse_linear()
    assert fusable(Output(sparse).eval())
    assert not fusable(Output(lin).eval())  # a dense Linear: nothing sparse before the norm
    assert not fusable(Output(sparse, nn.LayerNorm(48, elementwise_affine=False)).eval())
    assert not fusable(Output(sparse, nn.LayerNorm(48, bias=False)).eval())
    assert not fusable(Output(sparse, nn.RMSNorm(48)).eval())

    class OwnNorm(nn.LayerNorm):  # a subclass may compute something else
        pass

    assert not fusable(Output(sparse, OwnNorm(48)).eval())

    class PreNorm(Output):  # the right children, another formula
        def forward(self, hidden_states, input_tensor):
            return self.dropout(self.dense(hidden_states)) + self.LayerNorm(input_tensor)

    assert not fusable(PreNorm(sparse).eval())
    training = Output(sparse).train()  # checked in eval mode (dropout off), and left in training mode
    assert fusable(training) and all(x.training for x in training.modules())
    hooked = Output(sparse).eval()
    hooked.LayerNorm.register_forward_hook(lambda *a: None)
    assert not fusable(hooked)
    model = nn.ModuleList([Output(sparse), Output(lin)]).eval()
    h, r = torch.randn(4, 32), torch.randn(4, 48)
    want = [b(h, r) for b in model]
    assert fuse_residual_norms(model) == ["0"]
    assert isinstance(model[0], ResidualLayerNorm) and type(model[1]) is Output
    for b, w in zip(model, want):
        torch.testing.assert_close(b(h, r), w, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"not a sparse Linear, dropout and LayerNorm.*\['1'\]"):
        fuse_residual_norms(model, ["1"])


def test_fallbacks_give_the_same_result(monkeypatch):
    """Without autograd the kernel runs (in eval and training mode, on a restored dense child too); autograd, a
    non-contiguous residual and a hook added after fusing take the module's own formula. Same values either way."""
    from sparsenn.backend.runtime import residual_norm

    calls = []
    kernel = residual_norm.add_layer_norm_rows
    monkeypatch.setattr(residual_norm, "add_layer_norm_rows", lambda *a: calls.append(1) or kernel(*a))
    lin, sparse = sparse_linear()
    original = Output(sparse).eval()
    block = ResidualLayerNorm(copy.deepcopy(original), "dense", "dropout", "LayerNorm").eval()
    h, r = torch.randn(3, 5, 32), torch.randn(3, 5, 48)
    with torch.no_grad():
        want = original(h, r)
        torch.testing.assert_close(block(h, r), want, rtol=1e-5, atol=1e-5)
        assert len(calls) == 1  # the compiled pass
        rt = torch.randn(3, 48, 5).transpose(1, 2)  # non-contiguous
        torch.testing.assert_close(block(h, rt), original(h, rt), rtol=1e-5, atol=1e-5)
        assert len(calls) == 1
    rg = r.clone().requires_grad_()
    out = block(h, rg)
    out.sum().backward()  # the PyTorch path: gradients flow to the residual and the norm's parameters
    assert rg.grad is not None and block.LayerNorm.weight.grad is not None and len(calls) == 1
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        block.train()
        original.train()
        torch.manual_seed(0)
        got = block(h, r)
        torch.manual_seed(0)
        torch.testing.assert_close(got, original(h, r), rtol=1e-5, atol=1e-5)  # the same dropout draw, compiled
        assert len(calls) == 2
        block.eval()
        block.dense = lin  # restored to nn.Linear (the whole-model check does this to layers it runs dense)
        torch.testing.assert_close(block(h, r), block.LayerNorm(lin(h) + r), rtol=1e-5, atol=1e-5)
        assert len(calls) == 3
        seen = []
        block.LayerNorm.register_forward_hook(lambda mod, a, o: seen.append(o))
        torch.testing.assert_close(block(h, r), block.LayerNorm(lin(h) + r), rtol=1e-5, atol=1e-5)
        assert len(seen) == 2 and len(calls) == 3  # the hook ran in the module's own formula (and in the reference)


def test_archives_keep_the_fusion_and_refuse_forged_names(converted, tmp_path):
    cfg, m, c, x = converted
    path = tmp_path / "bert.safetensors"
    io.save(c, path)
    loaded = io.load(path, transformers.BertModel(cfg).eval())
    assert loaded.__dict__[RESIDUAL_NORMS_ATTR] == NAMES
    assert isinstance(loaded.encoder.layer[1].output, ResidualLayerNorm)
    with torch.inference_mode():
        assert torch.equal(loaded(**x).last_hidden_state, c(**x).last_hidden_state)
    for forged in (["encoder.layer.0.intermediate"], ["encoder.layer.0.output.dense"], ["nope"], [""]):
        bad = forge_runtime_archive(path, tmp_path / "forged.safetensors", residual_norms=forged)
        fresh = transformers.BertModel(cfg).eval()
        before = copy.deepcopy(fresh.state_dict())
        with pytest.raises(ArchiveError, match="residual_norms"):
            io.load(bad, fresh)
        assert type(fresh.encoder.layer[0].output).__name__ == "BertOutput"
        assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())


def test_a_module_whose_linear_went_back_to_dense_saves_and_loads(converted, tmp_path):
    """The whole-model check may give a layer its dense module back: the archive then lists the module as
    not fused (and the Linear + GELU alike), and loading gives the same outputs."""
    cfg, m, c, x = converted
    c = copy.deepcopy(c)
    c.encoder.layer[0].output.dense = copy.deepcopy(m.encoder.layer[0].output.dense)
    c.encoder.layer[1].intermediate.dense = copy.deepcopy(m.encoder.layer[1].intermediate.dense)
    path = tmp_path / "restored.safetensors"
    io.save(c, path)
    loaded = io.load(path, transformers.BertModel(cfg).eval())
    assert loaded.__dict__[RESIDUAL_NORMS_ATTR] == [n for n in NAMES if n != "encoder.layer.0.output"]
    assert type(loaded.encoder.layer[0].output).__name__ == "BertOutput"
    assert type(loaded.encoder.layer[1].intermediate).__name__ == "BertIntermediate"
    with torch.inference_mode():
        torch.testing.assert_close(loaded(**x).last_hidden_state, c(**x).last_hidden_state, rtol=1e-5, atol=1e-5)
