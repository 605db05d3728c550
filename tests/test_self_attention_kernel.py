"""The compiled encoder self-attention (kernels/self_attention.py) against F.scaled_dot_product_attention, and
FusedSelfAttention's use of it (runtime/encoder_attention.py): when it runs, when PyTorch's attention runs instead."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsenn.backend.kernels import self_attention as SA


def stacked(b, s, heads, d, lead=8, seed=0):
    """A ``(b, s, lead + 3 heads d)`` product with q, k, v from column ``lead``, and the three as head views."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(b, s, lead + 3 * heads * d, generator=g) * 2
    offsets = tuple(lead + i * heads * d for i in range(3))
    q, k, v = (y[..., o:o + heads * d].view(b, s, heads, d).transpose(1, 2) for o in offsets)
    return y, offsets, q, k, v


def reference(q, k, v, mask, scale):
    b, heads, s, d = q.shape
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale).transpose(1, 2).reshape(b, s, -1)


def run(y, offsets, heads, d, scale, mask):
    out = np.full((y.shape[0], y.shape[1], heads * d), np.nan, dtype=np.float32)
    masked = SA.attend(y.numpy(), offsets, heads, d, scale, None if mask is None else mask.numpy(), out)
    return masked, torch.from_numpy(out)


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 3), s=st.integers(1, 70), heads=st.integers(1, 3), c=st.sampled_from([1, 2, 4, 8]),
       kind=st.sampled_from(["none", "full", "keys", "per_head", "bool"]), seed=st.integers(0, 2**16))
def test_attend_equals_sdpa(b, s, heads, c, kind, seed):
    d = 16 * c
    y, offsets, q, k, v = stacked(b, s, heads, d, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    mask = {"none": None, "full": torch.randn(b, 1, s, s, generator=g), "keys": torch.randn(b, 1, 1, s, generator=g),
            "per_head": torch.randn(1, heads, s, s, generator=g)}.get(kind)
    if kind == "bool":  # -inf where masked; every row keeps key 0
        keep = torch.rand(b, 1, s, s, generator=g) > 0.4
        keep[..., 0] = True
        mask = torch.zeros(b, 1, s, s).masked_fill(~keep, float("-inf"))
    scale = d ** -0.5
    masked, out = run(y, offsets, heads, d, scale, mask)
    assert masked == 0
    # against the float64 result: float32 rounding (the kernel's and SDPA's alike, about 1e-6 of the largest
    # output for 128-wide heads) scales with the outputs' size, so the absolute slack does too: 2e-6 of the
    # largest output, or 1.5x PyTorch's own float32 error on the same input where that is larger (SDPA in
    # float32 exceeded 2e-6 on 1 of 200 random 3 x 67 x 2 x 128 inputs, by 15%, as the kernel did; CI failed once)
    want = reference(q.double(), k.double(), v.double(), None if mask is None else mask.double(), scale)
    fp32 = reference(q, k, v, mask, scale).double()
    slack = max(2e-6 * max(1.0, float(want.abs().max())), 1.5 * float((fp32 - want).abs().max()))
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=slack)


def test_a_row_with_every_key_masked_is_reported_and_left_unwritten():
    y, offsets, q, k, v = stacked(2, 5, 2, 16)
    mask = torch.zeros(2, 1, 5, 5)
    mask[1, 0, 3] = float("-inf")  # sequence 1, query row 3: no key left
    masked, out = run(y, offsets, 2, 16, 0.25, mask)
    assert masked == 2  # the row, in both heads
    assert torch.isnan(out[1, 3]).all() and not torch.isnan(out[1, :3]).any() and not torch.isnan(out[0]).any()
    want = reference(q, k, v, mask, 0.25)
    torch.testing.assert_close(out[0], want[0], rtol=1e-5, atol=2e-6)


def test_attend_rejects_what_it_cannot_run():
    y, offsets, *_ = stacked(1, 4, 2, 16)
    out = np.zeros((1, 4, 32), dtype=np.float32)
    with pytest.raises(ValueError, match="head_size must be a positive multiple of 16 up to 128, got 24"):
        SA.attend(y.numpy(), offsets, 2, 24, 1.0, None, out)
    with pytest.raises(ValueError, match="do not fit a product of width"):
        SA.attend(y.numpy(), (0, 0, 90), 2, 16, 1.0, None, out)
    with pytest.raises(ValueError, match=r"mask must be float32 C-contiguous of shape \(B\|1, H\|1, S\|1, S\)"):
        SA.attend(y.numpy(), offsets, 2, 16, 1.0, np.zeros((1, 3, 4, 4), dtype=np.float32), out)
    with pytest.raises(ValueError, match="out of shape"):
        SA.attend(y.numpy(), offsets, 2, 16, 1.0, None, np.zeros((1, 4, 16), dtype=np.float32))
    assert SA.supported(64) and SA.supported(128) and not SA.supported(24) and not SA.supported(256)


transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def bert():
    import sparsenn as sn

    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                  vocab_size=100, max_position_embeddings=64)
    m = transformers.BertModel(cfg).eval()
    ids = torch.randint(0, 100, (3, 9))
    return m, sn.convert(m, {"input_ids": ids}, batch_sizes=(3,), time_limit=None), ids


def count_calls(monkeypatch):
    calls = []
    real = SA.attend

    def spy(*a, **k):
        calls.append(real(*a, **k))
        return calls[-1]

    monkeypatch.setattr(SA, "attend", spy)
    return calls


@pytest.mark.parametrize("pad", [None, "some", "a whole sequence"])
def test_converted_bert_runs_the_kernel_and_matches_the_dense_model(bert, monkeypatch, pad):
    m, c, ids = bert
    calls = count_calls(monkeypatch)
    kw = {"input_ids": ids}
    if pad:
        mask = torch.ones(3, 9, dtype=torch.long)
        mask[1, 5:] = 0
        if pad == "a whole sequence":
            mask[2] = 0  # no key left for any query of sequence 2: PyTorch's attention runs instead
        kw["attention_mask"] = mask
    with torch.inference_mode():
        torch.testing.assert_close(c(**kw).last_hidden_state, m(**kw).last_hidden_state, rtol=1e-4, atol=1e-5,
                                   equal_nan=True)
    assert len(calls) == 2  # once per layer
    assert calls == ([0, 0] if pad != "a whole sequence" else [4 * 9, 4 * 9])


def test_training_with_dropout_and_eager_attention_use_the_attention_function(bert, monkeypatch):
    m, c, ids = bert
    calls = count_calls(monkeypatch)
    layer = next(a for a in c.modules() if hasattr(a, "_compiled_applies"))
    layer.train()
    try:
        torch.manual_seed(1)
        with torch.no_grad():
            layer(torch.randn(2, 5, 64))
    finally:
        layer.eval()
    assert calls == []
    impl = c.config._attn_implementation
    c.config._attn_implementation = "eager"
    try:
        with torch.inference_mode():
            torch.testing.assert_close(c(input_ids=ids).last_hidden_state, m(input_ids=ids).last_hidden_state,
                                       rtol=1e-4, atol=1e-5)
    finally:
        c.config._attn_implementation = impl
    assert calls == []
