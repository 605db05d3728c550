"""Federated update compressors and error feedback (sparsenn.federated, issue 19).

References: the defining property of each compressor (top-k = the first k of a stable sort by
magnitude; random-k = k entries of the update, unbiased with the d/k scale; STC = top-k then
sign * mean kept magnitude) and the exact conservation of error feedback, bit for bit."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsenn.core.registry import UnknownNameError
from sparsenn.federated import (
    STC,
    Dense,
    ErrorFeedback,
    RandomK,
    TopK,
    UpdateEncoder,
    list_compressors,
    make_compressor,
)

SHAPES = st.sampled_from([(1,), (7,), (3, 5), (2, 3, 4), (40,), (6, 1, 2)])
FRACTIONS = st.sampled_from([0.01, 0.1, 0.3, 0.5, 1.0])
# float32 values over many binades, zeros and ties included: heavy tails are where STC's residual is hard
VALUES = st.one_of(st.floats(-1e6, 1e6, width=32), st.sampled_from([0.0, 1.0, -1.0, 1e-30, -3e-12, 2.5]))


def _tensor(draw, shape):
    n = math.prod(shape)
    return torch.tensor(draw(st.lists(VALUES, min_size=n, max_size=n)), dtype=torch.float32).reshape(shape)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.double().view(torch.int64)


def _compressor(kind: str, fraction: float):
    return {"topk": TopK(fraction), "randomk": RandomK(fraction, seed=3),
            "randomk_unbiased": RandomK(fraction, unbiased=True, seed=3), "stc": STC(fraction),
            "dense": Dense()}[kind]


@settings(max_examples=60, deadline=None)
@given(st.data(), SHAPES, FRACTIONS, st.sampled_from(["topk", "randomk", "randomk_unbiased", "stc", "dense"]),
       st.booleans())
def test_error_feedback_conserves_exactly(data, shape, fraction, kind, masked):
    """sent + new residual == old residual + update, bit for bit, at every step."""
    ef = ErrorFeedback(_compressor(kind, fraction))
    mask = None
    if masked:
        mask = torch.tensor(data.draw(st.lists(st.booleans(), min_size=math.prod(shape),
                                               max_size=math.prod(shape)))).reshape(shape)
    for _ in range(3):
        update = _tensor(data.draw, shape)
        if mask is not None:
            update = update.masked_fill(~mask, 0)
        before = ef.residual("w", update).clone()
        message = ef.compress("w", update, mask=mask)
        sent = ef.compressor.decompress(message, mask=mask).double()
        acc = before + update.double()
        assert torch.equal(_bits(sent + ef.residuals["w"]), _bits(acc))
        if mask is not None:  # nothing outside the mask is ever sent
            assert not bool(sent[~mask].any())


def test_error_feedback_retries_where_float64_cannot_hold_the_difference():
    """STC with a kept entry 2**40 times smaller than the mean: mu - a is not a float64, so the entry
    is excluded from the message and stays, whole, in the residual."""
    update = torch.tensor([1.0, 2.0**-40 * 1.3, 0.0, 0.0], dtype=torch.float32)
    ef = ErrorFeedback(STC(0.5))
    message = ef.compress("w", update)
    sent = ef.compressor.decompress(message).double()
    assert ef.retries >= 1
    assert torch.equal(_bits(sent + ef.residuals["w"]), _bits(update.double()))
    assert sent[1] == 0 and ef.residuals["w"][1] == update.double()[1]


def test_error_feedback_sends_residual_later():
    """What top-1 does not send now is sent later: the sum of what was sent converges to the sum of updates."""
    ef = ErrorFeedback(TopK(0.25))  # 1 of 4
    update = torch.tensor([4.0, 3.0, 2.0, 1.0])
    total = torch.zeros(4, dtype=torch.float64)
    for _ in range(4):
        total += ef.compressor.decompress(ef.compress("w", update)).double()
    assert torch.equal(total + ef.residuals["w"], 4 * update.double())


def test_error_feedback_state_round_trip_and_checks():
    ef = ErrorFeedback("topk")
    ef.compress("w", torch.randn(10))
    other = ErrorFeedback("topk")
    other.load_state_dict(ef.state_dict())
    assert torch.equal(other.residuals["w"], ef.residuals["w"])
    with pytest.raises(ValueError, match="residuals"):
        other.load_state_dict({"residuals": {"w": torch.zeros(3)}})  # float32: not a residual
    with pytest.raises(ValueError, match="shape"):
        ef.compress("w", torch.randn(11))
    with pytest.raises(ValueError, match="max_retries"):
        ErrorFeedback("topk", max_retries=0)


@settings(max_examples=60, deadline=None)
@given(st.data(), SHAPES, FRACTIONS)
def test_topk_keeps_exactly_the_k_largest_magnitudes(data, shape, fraction):
    x = _tensor(data.draw, shape)
    c = TopK(fraction)
    out = c.decompress(c.compress(x))
    k = max(1, round(fraction * x.numel()))
    order = torch.sort(x.reshape(-1).abs(), descending=True, stable=True).indices[:k]
    expected = torch.zeros(x.numel())
    expected[order] = x.reshape(-1)[order]
    assert torch.equal(_bits(out.reshape(-1)), _bits(expected))
    assert c.compress(x).count == k


def test_topk_hand_computed_and_ties_to_lower_index():
    x = torch.tensor([0.5, -3.0, 2.0, -2.0, 0.1])
    assert TopK(0.4).decompress(TopK(0.4).compress(x)).tolist() == [0.0, -3.0, 2.0, 0.0, 0.0]
    mask = torch.tensor([True, False, True, True, True])  # -3 is outside the universe: 2 of the 4 kept
    out = TopK(0.5).decompress(TopK(0.5).compress(x, mask=mask), mask=mask)
    assert out.tolist() == [0.0, 0.0, 2.0, -2.0, 0.0]


@settings(max_examples=40, deadline=None)
@given(st.data(), SHAPES, FRACTIONS, st.integers(0, 2**31))
def test_randomk_sends_k_entries_of_the_update(data, shape, fraction, seed):
    x = _tensor(data.draw, shape)
    c = RandomK(fraction, seed=seed)
    message = c.compress(x)
    out = c.decompress(message)
    k = max(1, round(fraction * x.numel()))
    assert message.count == k
    sent = out != 0
    assert torch.equal(out[sent], x[sent])  # unscaled: the update's own values


def test_randomk_unbiased_expectation():
    """E[decompress(compress(x))] == x with the d/k scale: the mean over many draws is within 4 standard errors."""
    x = torch.tensor([1.0, -2.0, 3.0, 0.5, -1.5, 4.0])
    c = RandomK(2 / 6, unbiased=True, seed=0)
    draws = torch.stack([c.decompress(c.compress(x)) for _ in range(6000)]).double()
    mean, stderr = draws.mean(0), draws.std(0) / math.sqrt(len(draws))
    assert bool(((mean - x.double()).abs() <= 4 * stderr).all())
    counts = (draws != 0).double().mean(0)  # each entry drawn with probability k/d
    assert bool(((counts - 1 / 3).abs() < 0.03).all())


def test_randomk_is_reproducible_from_its_seed():
    x = torch.randn(50)
    a, b = RandomK(0.1, seed=5), RandomK(0.1, seed=5)
    assert [a.compress(x).data for _ in range(3)] == [b.compress(x).data for _ in range(3)]


@settings(max_examples=60, deadline=None)
@given(st.data(), SHAPES, FRACTIONS)
def test_stc_values_are_ternary(data, shape, fraction):
    x = _tensor(data.draw, shape)
    c = STC(fraction)
    out = c.decompress(c.compress(x)).reshape(-1)
    k = max(1, round(fraction * x.numel()))
    top = torch.sort(x.reshape(-1).abs(), descending=True, stable=True).indices[:k]
    mu = np.float32(x.reshape(-1)[top].double().abs().mean().item())
    sent = out != 0
    assert set(out[sent].abs().tolist()) <= {float(mu)}
    assert bool((torch.sign(out[sent]) == torch.sign(x.reshape(-1)[sent])).all())
    assert set(sent.nonzero().squeeze(1).tolist()) <= set(top.tolist())
    assert not bool((sent[top] == (x.reshape(-1)[top] == 0)).any())  # every nonzero top entry is sent


def test_stc_hand_computed():
    x = torch.tensor([0.1, -4.0, 2.0, 0.0, 1.0])
    out = STC(0.4).decompress(STC(0.4).compress(x))
    assert out.tolist() == [0.0, -3.0, 3.0, 0.0, 0.0]  # mu = (4 + 2) / 2


def test_stc_message_size_matches_the_paper():
    """k positions Golomb-coded at p = k/d cost about b* + 1 / (1 - (1 - p)**(2**b*)) bits each (Sattler et
    al. 2019, eq. 17), plus 1 sign bit each and one float32 magnitude."""
    d, k = 100_000, 1000
    x = torch.randn(d, generator=torch.Generator().manual_seed(0))
    message = STC(k / d).compress(x)
    p = k / d
    b = 1 + math.floor(math.log2(math.log((math.sqrt(5) - 1) / 2) / math.log(1 - p)))
    bits_per_position = b + 1 / (1 - (1 - p) ** (2**b))
    expected = k * (bits_per_position + 1) / 8 + 4 + 19  # positions and signs, magnitude, header (1-D)
    assert abs(message.nbytes - expected) < 0.03 * expected
    assert message.index == "golomb"


def test_dense_sends_everything_and_only_kept_entries_under_a_mask():
    x = torch.randn(4, 5)
    assert torch.equal(Dense().decompress(Dense().compress(x)), x)
    mask = torch.rand(4, 5, generator=torch.Generator().manual_seed(1)) < 0.3
    message = Dense().compress(x.masked_fill(~mask, 0), mask=mask)
    assert message.index == "all" and message.count == int(mask.sum())
    assert message.nbytes == 15 + 4 * 2 + 4 * int(mask.sum())  # header + values, no index
    assert torch.equal(Dense().decompress(message, mask=mask), x.masked_fill(~mask, 0))


def test_registry_and_arguments():
    assert set(list_compressors()) >= {"dense", "none", "topk", "randomk", "stc"}
    with pytest.raises(UnknownNameError, match="valid compressors: .*topk"):
        make_compressor("top_k")
    assert make_compressor({"name": "topk", "fraction": 0.1}).fraction == 0.1
    assert isinstance(make_compressor("none"), Dense)
    with pytest.raises(ValueError, match="fraction"):
        TopK(0.0)
    with pytest.raises(ValueError, match="fraction"):
        STC(1.5)
    with pytest.raises(ValueError, match="NaN"):
        TopK(0.5).compress(torch.tensor([1.0, float("nan")]))
    with pytest.raises(TypeError, match="floating"):
        TopK(0.5).compress(torch.tensor([1, 2]))


def test_update_encoder_uses_error_feedback_for_biased_compressors_only():
    assert UpdateEncoder("topk").feedback is not None
    assert UpdateEncoder("stc").feedback is not None
    assert UpdateEncoder("dense").feedback is None
    assert UpdateEncoder(RandomK(0.1, unbiased=True)).feedback is None
    assert UpdateEncoder("topk", error_feedback=False).feedback is None
