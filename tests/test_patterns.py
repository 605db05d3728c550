"""topk_mask keeps exactly the requested count, obeys its pattern, and breaks ties deterministically."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsenn import NM, Block, Channel, PatternError, Unstructured, list_patterns, parse_pattern, topk_mask
from sparsenn.core.registry import UnknownNameError


@pytest.mark.parametrize(
    "spec, expected",
    [("unstructured", Unstructured()), ("2:4", NM(2, 4)), (" 1:4 ", NM(1, 4)), ("4:8", NM(4, 8)),
     ("block4x4", Block(4, 4)), ("BLOCK2x8", Block(2, 8)), ("channel", Channel("out")),
     ("filter", Channel("out")), ("neuron", Channel("out")), ("channel_in", Channel("in"))],
)
def test_parse_pattern(spec, expected):
    assert parse_pattern(spec) == expected
    assert parse_pattern(parse_pattern(spec).name) == expected  # names round-trip


def test_unknown_pattern_lists_valid_ones():
    with pytest.raises(UnknownNameError, match="unknown pattern 'diagonal'.*'N:M'.*blockHxW.*channel"):
        parse_pattern("diagonal")
    assert set(list_patterns()) == {"unstructured", "N:M", "blockHxW", "channel", "channel_in", "per_row"}
    assert parse_pattern("row").name == "channel"  # an old alias, not the per-row budget pattern


@pytest.mark.parametrize("spec", ["4:4", "5:4", "0:4"])
def test_nm_needs_n_below_m(spec):
    with pytest.raises(PatternError, match=r"0 < N < M, got"):
        parse_pattern(spec)


def test_hand_computed_unstructured_and_ties():
    s = torch.tensor([[0.5, 0.1, 0.9], [0.5, 0.3, 0.5]])
    # density 0.5 of 6 -> 3 kept: 0.9, then three ties at 0.5: the two lowest flat indices (0 and 3)
    m = topk_mask(s, "unstructured", 0.5)
    assert m.tolist() == [[True, False, True], [True, False, False]]


def test_hand_computed_2_4():
    s = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, 9.0, 9.0, 1.0]])
    assert topk_mask(s, "2:4", 0.5).tolist() == [[True, True, False, False, False, True, True, False]]
    # density 0.25 < 2/4: 2 kept overall, among each group's best two: 9, 9
    assert topk_mask(s, "2:4", 0.25).tolist() == [[False] * 5 + [True, True, False]]


def test_hand_computed_block_and_channel():
    s = torch.arange(16.0).reshape(4, 4)
    m = topk_mask(s, "block2x2", 0.25)  # the bottom-right block has the largest sum
    assert m.nonzero().tolist() == [[2, 2], [2, 3], [3, 2], [3, 3]]
    conv = torch.ones(4, 3, 2, 2)
    conv[1] *= 5
    conv[:, 2] *= 3
    assert topk_mask(conv, "channel", 0.25)[1].all() and topk_mask(conv, "channel", 0.25).sum() == 12
    assert topk_mask(conv, "channel_in", 1 / 3)[:, 2].all() and topk_mask(conv, "channel_in", 1 / 3).sum() == 16


def test_shape_that_cannot_carry_pattern_names_layer_and_shape():
    with pytest.raises(PatternError, match=r"'fc1.weight' with shape \(3, 10\).*2:4.*10 is not divisible by 4"):
        topk_mask(torch.randn(3, 10), "2:4", 0.5, name="fc1.weight")
    with pytest.raises(PatternError, match=r"'c.weight'.*block4x4"):
        topk_mask(torch.randn(6, 8), "block4x4", 0.5, name="c.weight")


def test_nm_density_out_of_reach():
    with pytest.raises(PatternError, match="at most 0.5"):
        topk_mask(torch.randn(2, 8), "2:4", 0.75)


def test_nan_scores_rejected():
    with pytest.raises(ValueError, match="NaN"):
        topk_mask(torch.tensor([1.0, float("nan")]), "unstructured", 0.5)


shapes = st.sampled_from([(8, 16), (4, 8, 3, 3), (16, 8), (12, 4, 2), (8, 32)])
patterns = st.sampled_from(["unstructured", "2:4", "1:4", "4:8", "block4x4", "block2x2", "channel", "channel_in"])


@settings(max_examples=80, deadline=None)
@given(shape=shapes, pattern=patterns, density=st.floats(0, 1), seed=st.integers(0, 2**16),
       quantize=st.booleans())
def test_topk_exact_count_and_pattern(shape, pattern, density, seed, quantize):
    p = parse_pattern(pattern)
    density = min(density, p.max_density)
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(shape, generator=g)
    if quantize:  # many ties
        scores = scores.round()
    mask = topk_mask(scores, p, density)
    assert mask.dtype == torch.bool and mask.shape == scores.shape
    assert p.obeys(mask)
    units = p.units(shape)
    kept_units = round(density * units)
    assert mask.sum().item() == kept_units * (mask.numel() // units)
    assert torch.equal(mask, topk_mask(scores.clone(), p, density))  # deterministic
    if pattern == "unstructured" and 0 < kept_units < mask.numel():  # keeps the top scores
        assert scores[mask].min() >= scores[~mask].max()
