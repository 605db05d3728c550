"""GELU in the kernels' epilogue (kernels/_activations.py) and Linear + GELU modules run as one product
(runtime/linear_activation.py): against F.gelu and the dense model."""

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
from sparsenn.backend.kernels import _tiles
from sparsenn.backend.kernels._activations import activate_rows
from sparsenn.backend.runtime import io
from sparsenn.backend.runtime.errors import ArchiveError
from sparsenn.backend.runtime.layers import SparseLinear
from sparsenn.backend.runtime.linear_activation import (
    ACTIVATIONS_ATTR,
    LinearActivation,
    activation_of,
    fusable,
    fuse_linear_activations,
)

transformers = pytest.importorskip("transformers")


def gelu_error(y: np.ndarray, x: np.ndarray) -> float:
    """Largest ``|y - gelu(x)| / max(1, |x|)`` over the finite references."""
    ref = F.gelu(torch.from_numpy(x)).numpy()
    fin = np.isfinite(ref)
    return float((np.abs(y - ref)[fin] / np.maximum(1.0, np.abs(x[fin]))).max(initial=0.0))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(width=32) | st.floats(-20, 20, width=32), min_size=1, max_size=70))
def test_gelu_epilogue_matches_torch(values):
    x = np.array(values, dtype=np.float32)[None]  # rows of any length: whole vectors and the scalar tail
    y = x.copy()
    activate_rows(y, 1)
    assert gelu_error(y[0], x[0]) <= 1e-6
    ref = F.gelu(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(np.isnan(y), np.isnan(ref))  # NaN stays NaN, gelu(-inf) is NaN in both
    np.testing.assert_array_equal(y[np.isinf(ref)], ref[np.isinf(ref)])


def test_gelu_epilogue_on_a_dense_range():
    x = np.linspace(-12, 12, 480030, dtype=np.float32).reshape(30, -1)
    y = x.copy()
    activate_rows(y, 1)
    assert gelu_error(y.ravel(), x.ravel()) < 5e-7
    assert (y[x < -9.5] <= 0).all() and (y[x < -9.5] > -1e-18).all()  # the far left tail goes to zero, not below


def sparse_weight(out, cols, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, cols, generator=g) * (torch.rand(out, cols, generator=g) > 0.8)


@pytest.mark.parametrize("kernel,options", [("csr", {}), ("csr_panel", {}), ("nm", {"n": 2, "m": 4}),
                                            ("bsr", {"h": 4, "w": 1})])
@pytest.mark.parametrize("rows", [1, 3, 5, 17, 70, 130])
def test_kernels_apply_gelu_as_they_write(kernel, options, rows):
    out, cols = 260, 96
    if kernel == "nm":
        w = torch.randn(out, cols // 4, 4).scatter(-1, torch.rand(out, cols // 4, 4).argsort(-1)[..., :2], 0.0)
        w = w.reshape(out, cols)
    elif kernel == "bsr":  # 4 x 1 blocks: no epilogue, the GELU runs as a pass after the product
        w = sparse_weight(out // 4, cols).repeat_interleave(4, 0)
    else:
        w = sparse_weight(out, cols)
    packed, b = K.pack(w, kernel, **options), torch.randn(out)
    x = torch.randn(rows, cols)
    ref = F.gelu(F.linear(x, w, b))
    for order in (True, False):
        _tiles.FORCE_TILE_MAJOR = order
        try:
            y = K.linear(x, packed, b, activation="gelu")
        finally:
            _tiles.FORCE_TILE_MAJOR = None
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    torch.testing.assert_close(K.linear(x, packed, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)  # none by default


def test_unknown_activation_is_named():
    packed = K.pack(sparse_weight(16, 16), "csr")
    with pytest.raises(ValueError, match=r"unknown activation 'relu'; choose from \['gelu'\] or None"):
        K.linear(torch.randn(2, 16), packed, activation="relu")


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
    return cfg, m


@pytest.fixture(scope="module")
def converted():
    cfg, m = tiny_bert()
    x = {"input_ids": torch.randint(0, 100, (2, 16)), "attention_mask": torch.ones(2, 16, dtype=torch.long)}
    c = sn.convert(m, x, batch_sizes=(2,), force="csr_panel", time_limit=None)
    return cfg, m, c, x


def test_bert_intermediates_apply_gelu_in_the_kernel(converted):
    cfg, m, c, x = converted
    names = c.__dict__[ACTIVATIONS_ATTR]
    assert names == ["encoder.layer.0.intermediate", "encoder.layer.1.intermediate"]
    assert all(isinstance(c.get_submodule(n), LinearActivation) for n in names)
    assert any("apply the GELU" in note for note in c.conversion_summary.notes)
    assert set(dict(c.named_parameters())) | set(dict(c.named_buffers())) >= {
        "encoder.layer.0.intermediate.dense.bias"}  # the same children under the same names
    with torch.inference_mode():
        for batch, seq in ((2, 16), (1, 1), (3, 7), (5, 40)):  # row counts through every product path
            xb = {"input_ids": torch.randint(0, 100, (batch, seq)),
                  "attention_mask": torch.ones(batch, seq, dtype=torch.long)}
            torch.testing.assert_close(c(**xb).last_hidden_state, m(**xb).last_hidden_state, rtol=1e-4, atol=1e-5)


class Pair(nn.Module):
    def __init__(self, linear, act):
        super().__init__()
        self.linear, self.act = linear, act

    def forward(self, x):
        return self.act(self.linear(x))


def sparse_linear(seed=0):
    lin = nn.Linear(32, 48)
    with torch.no_grad():
        lin.weight.mul_(torch.rand_like(lin.weight) > 0.7)
    return lin, SparseLinear.from_linear(lin, {16: "csr"}, {"csr": K.pack(lin.weight, "csr")})


def test_only_exact_gelu_after_a_sparse_linear_is_fused():
    lin, sparse = sparse_linear()
    assert activation_of(nn.GELU()) == "gelu" and activation_of(transformers.activations.GELUActivation()) == "gelu"
    assert activation_of(nn.GELU(approximate="tanh")) is None and activation_of(nn.ReLU()) is None
    assert fusable(Pair(sparse, nn.GELU()))
    assert not fusable(Pair(lin, nn.GELU()))  # a dense Linear: nothing to fuse into
    assert not fusable(Pair(sparse, nn.GELU(approximate="tanh")))
    assert not fusable(Pair(sparse, nn.SiLU()))

    class Residual(Pair):  # the right children, another formula
        def forward(self, x):
            return self.act(self.linear(x)) + 1

    assert not fusable(Residual(sparse, nn.GELU()))
    hooked = Pair(sparse, nn.GELU())
    hooked.act.register_forward_hook(lambda *a: None)
    assert not fusable(hooked)
    model = nn.ModuleList([Pair(sparse, nn.GELU()), Pair(copy.deepcopy(sparse), nn.ReLU())])
    x = torch.randn(4, 32)
    want = [b(x) for b in model]
    assert fuse_linear_activations(model) == ["0"]
    assert isinstance(model[0], LinearActivation) and type(model[1]) is Pair
    for b, w in zip(model, want):
        torch.testing.assert_close(b(x), w, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"not a sparse Linear followed by GELU: \['1'\]"):
        fuse_linear_activations(model, ["1"])


def test_every_path_applies_the_activation_once():
    """Dense rows, one-row and batched kernel rows, and a child restored to its dense module."""
    lin = nn.Linear(32, 48)
    with torch.no_grad():
        lin.weight.mul_(torch.rand_like(lin.weight) > 0.7)
    packed = {"csr": K.pack(lin.weight, "csr"), "bitmask": K.pack(lin.weight, "bitmask")}
    sparse = SparseLinear.from_linear(lin, {1: "bitmask", 6: "dense", 40: "csr"}, packed)  # bitmask: no epilogue
    block = LinearActivation(Pair(sparse, nn.GELU()), "linear", "act")
    for rows in (1, 6, 40, 200):
        x = torch.randn(rows, 32)
        torch.testing.assert_close(block(x), F.gelu(lin(x)), rtol=1e-5, atol=1e-5)
    block.linear = lin  # restored to nn.Linear (the whole-model check does this to layers it runs dense)
    x = torch.randn(3, 5, 32)
    torch.testing.assert_close(block(x), F.gelu(lin(x)))


def test_archives_keep_the_fusion_and_refuse_forged_names(converted, tmp_path):
    cfg, m, c, x = converted
    path = tmp_path / "bert.safetensors"
    io.save(c, path)
    loaded = io.load(path, transformers.BertModel(cfg).eval())
    assert loaded.__dict__[ACTIVATIONS_ATTR] == c.__dict__[ACTIVATIONS_ATTR]
    assert isinstance(loaded.encoder.layer[1].intermediate, LinearActivation)
    with torch.inference_mode():
        assert torch.equal(loaded(**x).last_hidden_state, c(**x).last_hidden_state)
    for forged in (["encoder.layer.0.output"], ["encoder.layer.0.intermediate.dense"], ["nope"], [""]):
        bad = forge_runtime_archive(path, tmp_path / "forged.safetensors", linear_activations=forged)
        fresh = transformers.BertModel(cfg).eval()
        before = copy.deepcopy(fresh.state_dict())
        with pytest.raises(ArchiveError, match="linear_activations"):
            io.load(bad, fresh)
        assert type(fresh.encoder.layer[0].intermediate).__name__ == "BertIntermediate"
        assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())
