"""int8 weights by GPTQ with a fixed sparsity mask (``sn.quantize``) and their exact round trip into
``sn.convert(weights="int8")``: the solver against its defining properties, the grid detection of
``quantize_int8``, the model-level entry point on a tiny LLaMA (tied head, masks), hostile input."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sparsenn as sn
from sparsenn.backend.formats.quantized import quantize_int8
from sparsenn.backend.runtime import SparseLinear
from sparsenn.create.oneshot import (
    QuantizeError,
    gptq_int8,
    reconstruction_error,
    rtn_int8,
)
from sparsenn.create.oneshot.gptq import off_grid_rows, round_to_grid, row_scales

transformers = pytest.importorskip("transformers")


def _correlated(tokens=600, features=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, features, generator=g) @ torch.randn(features, features, generator=g) \
        + 0.1 * torch.randn(tokens, features, generator=g)


def _layer(rows=24, features=48, sparsity=0.0, seed=0):
    g = torch.Generator().manual_seed(seed + 100)
    W = torch.randn(rows, features, generator=g)
    if sparsity == "2:4":
        W.view(rows, -1, 4)[..., :2] = 0
    elif sparsity:
        W[torch.rand(W.shape, generator=g) < sparsity] = 0
    X = _correlated(features=features, seed=seed).double()
    return W, X.T @ X


def _llama(tie=True, seed=0, vocab=96):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM(cfg).eval()


def _calibration(n=4, length=32, vocab=96, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (2, length), generator=g) for _ in range(n)]


def _linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def _on_grid(q: torch.Tensor, scale: torch.Tensor) -> bool:
    x = q / scale.unsqueeze(1)
    return bool(((x - x.round()).abs() <= 1e-4).all() and (x.abs() <= 127 + 1e-4).all())


# ----------------------------------------------------------------------------- the solver


@pytest.mark.parametrize("seed", range(4))
def test_gptq_reconstruction_error_is_at_most_rtn_on_correlated_inputs(seed):
    """GPTQ's defining property (Frantar et al. 2023): on the calibration inputs, rounding column by column
    with the error compensated by later columns reconstructs the layer's output better than rounding
    each weight to nearest on the same grid."""
    W, H = _layer(seed=seed)
    Q, scale = gptq_int8(W, H, block_size=16)
    R, scale_rtn = rtn_int8(W)
    assert torch.equal(scale, scale_rtn)
    assert reconstruction_error(W, Q, H) < 0.9 * reconstruction_error(W, R, H)


@pytest.mark.parametrize("sparsity", [0.5, "2:4"])
def test_gptq_keeps_the_zeros_and_beats_rtn_on_sparse_layers(sparsity):
    """With the mask fixed (SparseGPT's joint scheme), the zeros stay exactly zero, and the kept weights'
    compensation still beats round to nearest (over several layers: the margin is smaller than dense)."""
    gptq, rtn = 0.0, 0.0
    for seed in range(4):
        W, H = _layer(rows=32, features=64, sparsity=sparsity, seed=seed)
        Q, scale = gptq_int8(W, H, block_size=16)
        assert bool((Q[W == 0] == 0).all())
        assert _on_grid(Q, scale)
        gptq += reconstruction_error(W, Q, H)
        rtn += reconstruction_error(W, rtn_int8(W)[0], H)
    assert gptq < rtn


def test_gptq_entries_are_exactly_on_the_grid_of_the_original_weight():
    W, H = _layer(sparsity=0.3, seed=5)
    W[3] = 0  # an all-zero row: scale 1, stays zero
    Q, scale = gptq_int8(W, H)
    assert Q.dtype == torch.float32 and Q.shape == W.shape
    assert torch.equal(scale, row_scales(W)) and scale[3] == 1 and bool((Q[3] == 0).all())
    assert torch.allclose(scale[:3], W[:3].abs().amax(1) / 127)
    q = Q / scale.unsqueeze(1)
    assert torch.equal(q.round() * scale.unsqueeze(1), Q)  # every entry is q * s in float32, bit for bit
    assert _on_grid(Q, scale) and off_grid_rows(Q, scale) == 0 and off_grid_rows(Q.double(), scale) == 0
    assert bool((Q[W == 0] == 0).all())


def test_gptq_first_column_is_round_to_nearest_and_later_ones_compensate():
    """Column 0 is processed first, with nothing to compensate yet: it is exactly round to nearest."""
    W, H = _layer(seed=2)
    Q, scale = gptq_int8(W, H, block_size=8)
    assert torch.equal(Q[:, 0], round_to_grid(W[:, 0], scale))
    assert not torch.equal(Q, rtn_int8(W)[0])


def test_gptq_block_size_changes_only_float_rounding():
    W, H = _layer(seed=3)
    a, _ = gptq_int8(W, H, block_size=128)
    b, _ = gptq_int8(W, H, block_size=5)
    assert (a != b).float().mean() < 0.01  # a grid step apart at most where float rounding tips a tie
    assert abs(reconstruction_error(W, a, H) - reconstruction_error(W, b, H)) < 1e-4


def test_gptq_dead_inputs_are_rounded_to_nearest():
    """An input never active in the calibration (H_jj = 0) cannot be measured: its weights are rounded to
    nearest and kept (not zeroed), nothing propagated from them."""
    W, H = _layer(seed=4)
    H[7, :] = 0
    H[:, 7] = 0
    Q, _ = gptq_int8(W, H)
    R, _ = rtn_int8(W)
    assert torch.equal(Q[:, 7], R[:, 7])


@pytest.mark.parametrize("bad", [{"block_size": 0}, {"block_size": 2.5}, {"damp": 0}, {"damp": float("nan")}])
def test_gptq_rejects_bad_arguments(bad):
    W, H = _layer()
    with pytest.raises(ValueError):
        gptq_int8(W, H, **bad)


def test_gptq_rejects_nan_and_wrong_shapes():
    W, H = _layer()
    with pytest.raises(ValueError, match="NaN"):
        gptq_int8(W, H * float("nan"))
    with pytest.raises(ValueError, match="Hessian shape"):
        gptq_int8(W, H[:-1, :-1])
    W[0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        gptq_int8(W, H)


# ----------------------------------------------------------------------------- grid detection


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 12), cols=st.integers(1, 70), top=st.integers(1, 127), seed=st.integers(0, 2 ** 31 - 1),
       zeros=st.floats(0.0, 0.9))
def test_quantize_int8_recovers_any_int8_grid(rows, cols, top, seed, zeros):
    """Any matrix ``q * s`` (int8 ``q``, a random positive scale per row, max|q| per row in [1, 127]: GPTQ may
    leave a row's largest value below 127) is stored exactly: the dequantized weight is the input to
    float32 rounding (the grid may be a finer one that also fits, e.g. for a row of one value; a max|q|
    below 64 is found through a multiple of it)."""
    rng = np.random.default_rng(seed)
    m = rng.integers(1, top + 1, size=rows)
    if top >= 64:
        m = rng.integers(64, top + 1, size=rows)
    q = np.clip(np.rint(rng.standard_normal((rows, cols)) * m[:, None] / 2), -m[:, None], m[:, None])
    q[rng.random((rows, cols)) < zeros] = 0
    q[np.arange(rows), rng.integers(0, cols, size=rows)] = m * rng.choice([-1, 1], size=rows)
    s = np.exp(rng.uniform(np.log(1e-5), np.log(10.0), size=rows)).astype(np.float32)
    w = (q * s[:, None]).astype(np.float32)
    codes, scale = quantize_int8(w)
    deq = codes.astype(np.float32) * scale[:, None]
    assert np.all(np.abs(deq - w) <= 4e-7 * np.abs(w).max(axis=1, keepdims=True))
    steps = np.abs(w).max(axis=1) / scale  # the grid found: amax / m with m in [64, 127] (the first that fits)
    assert np.allclose(steps, np.rint(steps), rtol=0, atol=1e-4) and np.all((steps > 63.9) & (steps < 127.1))
    assert np.all(np.abs(codes).max(axis=1) == np.rint(steps))


def _rtn_reference(w):
    amax = np.abs(w).max(axis=1)
    scale = (amax / 127.0).astype(np.float32)
    scale[scale == 0] = 1.0
    return np.clip(np.rint(w / scale[:, None]), -127, 127).astype(np.int8), scale


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 20), cols=st.integers(16, 200), seed=st.integers(0, 2 ** 31 - 1),
       zeros=st.floats(0.0, 0.7), spread=st.floats(1e-3, 1e3))
def test_quantize_int8_quantizes_ordinary_weights_as_before(rows, cols, seed, zeros, spread):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((rows, cols)) * spread).astype(np.float32)
    w[rng.random((rows, cols)) < zeros] = 0
    w[:, 0] = rng.standard_normal(rows).astype(np.float32) * spread  # at least one nonzero per row
    q, scale = quantize_int8(w)
    q_ref, scale_ref = _rtn_reference(w)
    assert np.array_equal(scale, scale_ref) and np.array_equal(q, q_ref)


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 6), cols=st.integers(0, 6), seed=st.integers(0, 2 ** 31 - 1))
def test_quantize_int8_never_worse_than_round_to_nearest(rows, cols, seed):
    """Tiny rows may happen to lie on some grid ``amax/m`` (then they are stored on it, within GRID_TOL of a
    step); the error never exceeds round to nearest's bound of half a step of ``amax/127``."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols)).astype(np.float32) * rng.choice([0.0, 1.0], size=(rows, cols))
    q, scale = quantize_int8(w)
    assert q.shape == (rows, cols) and scale.shape == (rows,) and scale.dtype == np.float32
    if cols:
        err = np.abs(q.astype(np.float32) * scale[:, None] - w)
        bound = np.abs(w).max(axis=1, keepdims=True) / 127 / 2
        assert np.all(err <= bound * (1 + 1e-5) + 1e-30)


def test_quantize_int8_rows_with_few_steps_and_special_values():
    w = np.zeros((4, 8), np.float32)
    w[1, :3] = [0.5, -0.25, 0.125]  # max|q| = 4 on step 0.125: found as 4 * 31 = 124 on step 0.125 / 31
    w[2, 0] = 1e-3  # one value: q = 127
    w[3] = np.sqrt(np.arange(1, 9))  # on no grid: round to nearest on amax / 127
    q, scale = quantize_int8(w)
    assert scale[0] == 1 and not q[0].any()
    assert np.allclose(q[1, :3] * scale[1], w[1, :3], rtol=1e-6, atol=0)
    assert q[2, 0] == 127
    assert np.array_equal(q[3], _rtn_reference(w[3:])[0][0])
    row = np.linspace(-1, 1, 8, dtype=np.float32)[None]  # odd multiples of 1/7: on the grid of step 1/126
    q, scale = quantize_int8(row)
    assert np.array_equal(q[0], [-126, -90, -54, -18, 18, 54, 90, 126])
    assert np.allclose(q * scale[:, None], row, rtol=1e-6, atol=0)


# ----------------------------------------------------------------------------- sn.quantize on a model


def test_quantize_untied_head_keeps_the_embedding_float32_and_every_linear_on_its_grid():
    model = _llama(tie=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    embedding = model.model.embed_tokens.weight.detach().clone()
    before = {n: m.weight.detach().clone() for n, m in _linears(model).items()}
    out = sn.quantize(model, _calibration())
    assert out is model
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert torch.equal(model.model.embed_tokens.weight, embedding)
    assert model.config.tie_word_embeddings is False
    report = model.quantize_report
    assert report.untied == ["lm_head"] and report.off_grid_rows == 0 and report.method == "gptq"
    assert {r.name for r in report.layers} == set(before) and len(before) == 15
    for n, m in _linears(model).items():
        assert _on_grid(m.weight.detach(), row_scales(before[n]))
        assert not torch.equal(m.weight, before[n])
    rtn = sum(r.rtn_error for r in report.layers)
    gptq = sum(r.gptq_error for r in report.layers)
    assert gptq < 0.95 * rtn and all(r.gptq_error <= r.rtn_error * 1.05 for r in report.layers)
    d = report.to_dict()
    assert d["off_grid_rows"] == 0 and len(d["layers"]) == 15 and "lm_head" in report.table()


def test_quantize_keeps_masks_and_zeros():
    model = _llama(tie=True)
    sn.oneshot(model, method="wanda", sparsity=0.5, calibration=_calibration())
    masks = {k: v.clone() for k, v in sn.get_masks(model).items()}
    assert len(masks) == 14
    sn.quantize(model, _calibration(seed=2))
    after = sn.get_masks(model)
    assert set(after) == set(masks) and all(torch.equal(after[k], masks[k]) for k in masks)
    for name, p, mask in sn.iter_masks(model):
        assert bool((p[~mask] == 0).all()), name
    assert abs(sn.sparsity(model.model.layers) - 0.5) < 0.02


def test_quantize_untied_head_with_a_mask_gets_its_own_mask():
    model = _llama(tie=True)
    keep = torch.rand(model.lm_head.weight.shape, generator=torch.Generator().manual_seed(0)) > 0.3
    sn.masks.attach_mask_by_name(model, "lm_head.weight", keep)
    sn.quantize(model, _calibration())
    assert model.lm_head.weight_mask is not model.model.embed_tokens.weight_mask
    assert torch.equal(model.lm_head.weight_mask, keep)
    assert bool((model.lm_head.weight[~keep] == 0).all())


def test_quantize_rtn_equals_what_convert_does_to_a_float_weight():
    model = _llama(tie=False)
    reference = {n: m.weight.detach().clone() for n, m in _linears(model).items()}
    sn.quantize(model, method="rtn")
    assert model.quantize_report.layers[0].rtn_error is None  # no calibration: no errors
    for n, m in _linears(model).items():
        q, s = quantize_int8(reference[n].numpy())
        assert torch.equal(m.weight.detach(), torch.from_numpy(q.astype(np.float32) * s[:, None]))


def test_quantize_include_and_exclude_select_layers():
    model = _llama(tie=True)
    embedding = model.model.embed_tokens.weight
    sn.quantize(model, _calibration(), exclude="lm_head")
    assert model.lm_head.weight is embedding  # not quantized, not untied
    assert "lm_head" not in {r.name for r in model.quantize_report.layers}
    model = _llama(tie=False)
    sn.quantize(model, _calibration(), include=["mlp."])
    assert {r.name.split(".")[-1] for r in model.quantize_report.layers} == {"gate_proj", "up_proj", "down_proj"}


@pytest.mark.parametrize("kernel", ["bitmask_int8", "dense_int8"])
def test_convert_int8_after_quantize_stores_exactly_the_quantized_weights(kernel):
    model = _llama(tie=True)
    sn.oneshot(model, method="wanda", sparsity=0.5, calibration=_calibration())
    sn.quantize(model, _calibration(seed=3))
    ids = _calibration(n=1, length=12, seed=4)[0][:1]
    converted = sn.convert(model, {"input_ids": ids}, batch_sizes=(1, 12), weights="int8", force=kernel)
    layers = {n: m for n, m in converted.named_modules() if isinstance(m, SparseLinear)}
    assert len(layers) == 2 * 4 + 1  # q/k/v and gate/up each run as one stacked product (siblings)

    def dense_weight(name):
        members = [name]
        if ".fused_" in name:
            members = converted.get_submodule(name.rpartition(".")[0]).members
        return np.concatenate([model.get_submodule(n).weight.detach().numpy() for n in members])

    for name, layer in layers.items():
        w = dense_weight(name)
        scale = np.abs(w).max(axis=1, keepdims=True)
        for key in layer.kernel_meta:
            packed = layer.packed(key).to_dense()
            assert np.all(np.abs(packed - w) <= 4e-7 * scale), (name, key)
    with torch.no_grad():
        ref, out = model(ids).logits, converted(ids).logits
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def test_quantized_untied_model_round_trips_through_save_pretrained(tmp_path):
    model = _llama(tie=True)
    sn.quantize(model, _calibration())
    model.save_pretrained(tmp_path)
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.lm_head.weight is not loaded.model.embed_tokens.weight
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    assert torch.equal(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight)


# ----------------------------------------------------------------------------- hostile input


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a, b):
    return a.shape == b.shape and a.dtype == b.dtype and (torch.equal(a, b) or bool(
        a.is_floating_point() and torch.allclose(a, b, rtol=0, atol=0, equal_nan=True)))


def _unchanged(model, state, tied=True):
    now = model.state_dict()
    return set(now) == set(state) and all(_same(now[k], state[k]) for k in state) and \
        (model.lm_head.weight is model.model.embed_tokens.weight) == tied and \
        not hasattr(model, "quantize_report") and model.config.tie_word_embeddings == tied


@pytest.mark.parametrize("kwargs,match", [
    ({"bits": 4}, "bits=4 is not supported; valid: 8"),
    ({"bits": True}, "valid: 8"),
    ({"method": "awq"}, "unknown quantization method 'awq'; valid: gptq, rtn"),
    ({"damp": -1}, "damp"),
    ({"block_size": 0}, "block_size"),
    ({"include": "nothing_matches"}, "no Linear layer to quantize"),
    ({"exclude": [3]}, "strings"),
])
def test_bad_arguments_are_refused_and_leave_the_model_unchanged(kwargs, match):
    model = _llama(tie=True)
    state = _state(model)
    with pytest.raises(QuantizeError, match=match):
        sn.quantize(model, _calibration(), **kwargs)
    assert _unchanged(model, state)


@pytest.mark.parametrize("calibration,match", [
    ([], "needs calibration data"),
    (None, "needs calibration data"),
    (torch.zeros(2, 8, dtype=torch.long), "wrap it in a list"),
    ([torch.full((1, 8), 500)], "vocabulary"),
    ([torch.rand(1, 8)], "integer tensor"),
])
def test_bad_calibration_is_refused_and_leaves_the_model_unchanged(calibration, match):
    model = _llama(tie=True)
    state = _state(model)
    with pytest.raises(QuantizeError, match=match):
        sn.quantize(model, calibration)
    assert _unchanged(model, state)


def test_nan_weights_and_nan_activations_are_refused_and_leave_the_model_unchanged():
    model = _llama(tie=True)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    state = _state(model)
    with pytest.raises(QuantizeError, match="up_proj: the weight holds NaN"):
        sn.quantize(model, _calibration())
    assert _unchanged(model, state)
    model = _llama(tie=True)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = float("nan")  # every activation after the embedding
    state = _state(model)
    with pytest.raises(QuantizeError, match="NaN or Inf"):
        sn.quantize(model, _calibration(), exclude="lm_head")
    assert _unchanged(model, state)


def test_half_precision_weights_are_refused():
    model = _llama(tie=False).to(torch.bfloat16)
    state = _state(model)
    with pytest.raises(QuantizeError, match="model.float"):
        sn.quantize(model, _calibration())
    assert _unchanged(model, state, tied=False)


def test_a_singular_hessian_beyond_dampening_is_refused_without_changes(monkeypatch):
    from sparsenn.create.oneshot import gptq

    def failing(*a, **k):
        raise sn.create.oneshot.HessianError("layer: not positive definite")

    monkeypatch.setattr(gptq, "_inverse_hessian_factor", failing)
    model = _llama(tie=True)
    state = _state(model)
    with pytest.raises(QuantizeError, match="not positive definite. Nothing was changed"):
        sn.quantize(model, _calibration())
    assert _unchanged(model, state)


def test_quantize_restores_training_mode_and_copies_are_independent():
    model = _llama(tie=True).train()
    clone = copy.deepcopy(model)
    sn.quantize(clone, _calibration())
    assert clone.training and model.lm_head.weight is model.model.embed_tokens.weight
