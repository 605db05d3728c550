"""Tests for sparsenn.core.distributions against hand-computed densities."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsenn.core.registry import UnknownNameError
from sparsenn.core.distributions import DISTRIBUTIONS, layer_densities, list_distributions

SHAPES = {"a": (10, 20), "b": (20, 30), "c": (30, 2)}  # numel 200, 600, 60; total 860


def kept(dens, shapes):
    return sum(dens[n] * math.prod(s) for n, s in shapes.items())


def test_registry_names():
    assert list_distributions() == ["er", "erk", "global", "uniform"]
    assert sorted(DISTRIBUTIONS.names()) == list_distributions()


def test_uniform():
    d = layer_densities("uniform", SHAPES, 0.7)
    assert list(d) == ["a", "b", "c"]
    assert d == {"a": 1 - 0.7, "b": 1 - 0.7, "c": 1 - 0.7}


def test_erk_small_layer_goes_dense():
    # raw = sum(shape)/prod(shape): a 30/200 = 0.15, b 50/600 = 1/12, c 32/60 = 8/15.
    # sparsity 0.5 keeps 430 of 860. First pass: sum(raw*numel) = 30 + 50 + 32 = 112,
    # eps = 430/112 = 3.84; c would get 8/15*3.84 = 2.05 > 1 -> c dense (keeps 60).
    # Second pass: 370 left for a, b; sum(raw*numel) = 30 + 50 = 80; eps = 370/80 = 4.625.
    # a = 0.15*4.625 = 0.69375, b = 4.625/12 = 0.3854166...
    d = layer_densities("erk", SHAPES, 0.5)
    assert list(d) == ["a", "b", "c"]
    assert d["c"] == 1.0
    assert d["a"] == pytest.approx(0.69375, abs=1e-12)
    assert d["b"] == pytest.approx(4.625 / 12, abs=1e-12)
    assert kept(d, SHAPES) == pytest.approx(430, abs=1e-9)
    # For 2-D shapes ER and ERK coincide.
    assert layer_densities("er", SHAPES, 0.5) == pytest.approx(d, abs=1e-12)


def test_erk_no_layer_dense_at_high_sparsity():
    # sparsity 0.9 keeps 86; eps = 86/112; c = 8/15*86/112 = 0.4095 < 1, nothing dense.
    d = layer_densities("erk", SHAPES, 0.9)
    eps = 86 / 112
    assert d == pytest.approx({"a": 0.15 * eps, "b": eps / 12, "c": 8 / 15 * eps}, abs=1e-12)


def test_er_vs_erk_on_conv():
    shapes = {"conv": (16, 8, 3, 3), "fc": (10, 16)}  # numel 1152, 160; total 1312
    # sparsity 0.9 keeps 131.2.
    # ERK: conv raw = (16+8+3+3)/1152 = 30/1152, fc raw = 26/160; sum(raw*numel) = 30+26 = 56
    #      eps = 131.2/56; conv = 30/1152*eps = 0.06101, fc = 26/160*eps = 0.38071
    # ER:  conv raw = (16+8)/(16*8) = 0.1875 (kernel ignored), fc raw = 26/160;
    #      sum(raw*numel) = 216 + 26 = 242; eps = 131.2/242; conv = 0.10165, fc = 0.08810
    erk = layer_densities("erk", shapes, 0.9)
    er = layer_densities("er", shapes, 0.9)
    assert erk == pytest.approx({"conv": 30 / 1152 * 131.2 / 56, "fc": 26 / 160 * 131.2 / 56})
    assert er == pytest.approx({"conv": 0.1875 * 131.2 / 242, "fc": 26 / 160 * 131.2 / 242})
    assert erk["conv"] < er["conv"] and erk["fc"] > er["fc"]
    for d in (erk, er):
        assert kept(d, shapes) == pytest.approx(131.2, abs=1e-9)


def test_erk_power_scale_and_bias():
    shapes = {"w": (4, 4), "bias": (4,)}  # bias treated as (4, 1): raw = 5/4; w raw = 8/16
    # power 0 -> all raw = 1 -> uniform.
    assert layer_densities("erk", shapes, 0.5, erk_power_scale=0.0) == pytest.approx(
        {"w": 0.5, "bias": 0.5}
    )
    # power 1, sparsity 0.5 keeps 10 of 20: sum(raw*numel) = 8 + 5 = 13, eps = 10/13;
    # bias = 5/4*10/13 = 0.9615 < 1, w = 0.5*10/13.
    assert layer_densities("erk", shapes, 0.5) == pytest.approx(
        {"w": 5 / 13, "bias": 12.5 / 13}
    )
    # er on the bias: (4 + 1)/(4 * 1) = 5/4 as well.
    assert layer_densities("er", shapes, 0.5) == pytest.approx({"w": 5 / 13, "bias": 12.5 / 13})


def test_global_with_ties():
    shapes = {"a": (2, 2), "b": (3,)}
    scores = {"a": torch.tensor([[3.0, 1.0], [2.0, 2.0]]), "b": torch.tensor([2.0, 5.0, 0.0])}
    # concat (a, b) = [3, 1, 2, 2 | 2, 5, 0]; k = round(0.6*7) = round(4.2) = 4.
    # stable descending: 5(b1), 3(a0), then the ties 2 at a2, a3, b0 -> a2, a3 kept first.
    # kept: a = {a0, a2, a3} -> 3/4; b = {b1} -> 1/3.
    d = layer_densities("global", shapes, 0.4, scores=scores)
    assert d == {"a": 0.75, "b": 1 / 3}
    # Key order decides ties: concat (b, a) = [2, 5, 0 | 3, 1, 2, 2]; top 4 = b1, a0, b0, a2.
    d = layer_densities("global", {"b": (3,), "a": (2, 2)}, 0.4, scores=scores)
    assert list(d) == ["b", "a"] and d == {"b": 2 / 3, "a": 0.5}
    assert kept(d, shapes) == 4


def test_global_needs_scores():
    with pytest.raises(ValueError, match="global.*needs scores"):
        layer_densities("global", SHAPES, 0.5)
    with pytest.raises(ValueError, match=r"scores for layers \['c'\]"):
        layer_densities("global", SHAPES, 0.5, scores={"a": torch.ones(10, 20), "b": torch.ones(20, 30)})
    bad = {n: torch.ones(s) for n, s in SHAPES.items()} | {"c": torch.ones(60)}
    with pytest.raises(ValueError, match=r"scores\['c'\] has shape \(60,\), expected \(30, 2\)"):
        layer_densities("global", SHAPES, 0.5, scores=bad)
    nan = {n: torch.ones(s) for n, s in SHAPES.items()}
    nan["a"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        layer_densities("global", SHAPES, 0.5, scores=nan)


CONV = {"conv1.weight": (4, 2, 3, 3), "conv2.weight": (8, 4, 3, 3), "fc.weight": (10, 32)}
# numel 72, 288, 320; total 680


def test_overrides_keep_global_count():
    # sparsity 0.5 keeps 340. conv1 dense keeps 72 -> 268 left over 288 + 320 = 608.
    d = layer_densities("uniform", CONV, 0.5, overrides={"conv1.weight": 0.0})
    assert d == pytest.approx({"conv1.weight": 1.0, "conv2.weight": 268 / 608, "fc.weight": 268 / 608})
    assert kept(d, CONV) == pytest.approx(340)
    # glob: both convs at sparsity 0.25 keep 0.75*360 = 270 -> fc gets 70/320 = 0.21875.
    d = layer_densities("erk", CONV, 0.5, overrides={"conv*.weight": 0.25})
    assert d == pytest.approx({"conv1.weight": 0.75, "conv2.weight": 0.75, "fc.weight": 0.21875})
    # exact name beats pattern: conv1 at 0 sparsity (72), conv2 at 0.25 (216) -> fc 52/320.
    d = layer_densities("er", CONV, 0.5, overrides={"conv*": 0.25, "conv1.weight": 0.0})
    assert d == pytest.approx({"conv1.weight": 1.0, "conv2.weight": 0.75, "fc.weight": 52 / 320})
    for dist in ("uniform", "erk", "er"):
        d = layer_densities(dist, CONV, 0.8, overrides={"fc.weight": 0.9})
        assert d["fc.weight"] == pytest.approx(0.1)
        assert kept(d, CONV) == pytest.approx(0.2 * 680)


def test_overrides_global():
    shapes = {"a": (2, 2), "b": (3,)}
    scores = {"a": torch.tensor([[3.0, 1.0], [2.0, 2.0]]), "b": torch.tensor([2.0, 5.0, 0.0])}
    # keep round(0.6*7) = 4 overall; b forced dense (3) -> 1 left for a: its top score a0.
    d = layer_densities("global", shapes, 0.4, scores=scores, overrides={"b": 0.0})
    assert d == {"a": 0.25, "b": 1.0}
    # All layers overridden consistently with the target: fine.
    assert layer_densities("erk", CONV, 0.5, overrides={"*": 0.5}) == dict.fromkeys(CONV, 0.5)


def test_override_errors():
    with pytest.raises(ValueError, match=r"'bn\*' matches no layer; layers: conv1.weight, conv2"):
        layer_densities("uniform", CONV, 0.5, overrides={"bn*": 0.0})
    # fc pruned fully at sparsity 0.1: keep 612, but only 360 conv weights remain.
    with pytest.raises(ValueError, match=r"cannot reach sparsity 0.1.*density 1.7"):
        layer_densities("uniform", CONV, 0.1, overrides={"fc.weight": 1.0})
    # fc dense at sparsity 0.9: keep 68 < 320.
    with pytest.raises(ValueError, match=r"cannot reach sparsity 0.9.*must be in \[0, 1\]"):
        layer_densities("erk", CONV, 0.9, overrides={"fc.weight": 0.0})
    with pytest.raises(ValueError, match="every layer is overridden"):
        layer_densities("uniform", CONV, 0.5, overrides={"*": 0.3})
    with pytest.raises(ValueError, match=r"override sparsity for 'fc.weight' must be a number in \[0, 1\], got 1.5"):
        layer_densities("uniform", CONV, 0.5, overrides={"fc.weight": 1.5})
    with pytest.raises(ValueError, match="different values"):
        layer_densities("uniform", CONV, 0.5, overrides={"conv*": 0.1, "*.weight": 0.2})


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), "0.5", True])
def test_bad_sparsity(bad):
    with pytest.raises(ValueError, match=r"sparsity must be a number in \[0, 1\), got"):
        layer_densities("uniform", SHAPES, bad)


def test_other_errors():
    with pytest.raises(UnknownNameError, match="unknown distribution 'erk2'.*er, erk, global, uniform"):
        layer_densities("erk2", SHAPES, 0.5)
    with pytest.raises(ValueError, match="non-empty"):
        layer_densities("uniform", {}, 0.5)
    with pytest.raises(ValueError, match="shape of 'x' must be a tuple of positive ints, got"):
        layer_densities("uniform", {"x": (3, 0)}, 0.5)
    with pytest.raises(ValueError, match="erk_power_scale"):
        layer_densities("erk", SHAPES, 0.5, erk_power_scale=-1.0)


shape_st = st.lists(st.integers(1, 12), min_size=1, max_size=4).map(tuple)


@settings(max_examples=60, deadline=None)
@given(
    shapes=st.lists(shape_st, min_size=1, max_size=5),
    sparsity=st.floats(0.0, 0.999),
    dist=st.sampled_from(["uniform", "erk", "er", "global"]),
    seed=st.integers(0, 2**16),
)
def test_invariants(shapes, sparsity, dist, seed):
    shapes = {f"l{i}": s for i, s in enumerate(shapes)}
    g = torch.Generator().manual_seed(seed)
    scores = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    d = layer_densities(dist, shapes, sparsity, scores=scores)
    assert list(d) == list(shapes)
    assert all(0.0 <= v <= 1.0 for v in d.values())
    total = sum(math.prod(s) for s in shapes.values())
    if dist == "global":
        counts = [d[n] * math.prod(s) for n, s in shapes.items()]
        assert all(abs(c - round(c)) < 1e-9 for c in counts)
        assert sum(round(c) for c in counts) == round((1 - sparsity) * total)
    else:
        assert kept(d, shapes) == pytest.approx((1 - sparsity) * total, rel=1e-9, abs=1e-9)
