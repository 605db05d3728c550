"""k-th value selection gives exactly the masks of the former stable-sort implementation.

``top_k_stable`` replaced two stable sorts of every score per mask update (the global
distribution's ranking and each layer's top-k). The references below are the sort-based
code it replaced, verbatim in behaviour; inputs are tie-heavy (a few distinct values,
``-inf`` runs of pruned weights, ``-0.0`` next to ``0.0``) and large enough to take the
sampled path (>= 65,536 entries), where a strided sample brackets the k-th value.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsenn.core.distributions import layer_densities
from sparsenn.core.patterns import NM, Block, Channel, Unstructured
from sparsenn.core.selection import kth_largest, top_k_stable

VALUES = [-math.inf, -1.0, -0.0, 0.0, 0.5, 1.0, 2.0, math.inf]


def _sorted_top_k(s: torch.Tensor, k: int) -> torch.Tensor:
    """The former implementation: the first k of a stable descending sort."""
    keep = torch.zeros(s.numel(), dtype=torch.bool)
    if k > 0:
        keep[torch.sort(s, descending=True, stable=True).indices[:k]] = True
    return keep


def _sorted_global(shapes, density, scores):
    """The former ``global`` distribution: one stable sort over the float64 concatenation."""
    flat = [scores[n].reshape(-1).to(torch.float64) for n in shapes]
    allscores = torch.cat(flat)
    keep = _sorted_top_k(allscores, round(density * allscores.numel()))
    kept = [int(c.sum()) for c in keep.split([t.numel() for t in flat])]
    return {n: c / math.prod(shapes[n]) for n, c in zip(shapes, kept)}


def _scores(n: int, seed: int, layout: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if layout == "few_values":  # nearly every entry ties with many others
        return torch.tensor(VALUES)[torch.randint(0, len(VALUES), (n,), generator=g)]
    s = torch.rand(n, generator=g)
    if layout == "pruned":  # a pruned layer: long -inf runs, the rest continuous with some exact ties
        s[torch.rand(n, generator=g) < 0.6] = -math.inf
        s[: n // 10] = 0.25
    elif layout == "sorted":  # a strided sample of a sorted input sees a biased slice
        s = s.sort().values
    elif layout == "zeros":  # all-equal scores (the degenerate case): ties decide everything
        s = torch.zeros(n)
    return s


@settings(max_examples=30, deadline=None)
@given(n=st.sampled_from([1, 7, 300, 4099, 65_536, 70_001]), frac=st.floats(0.0, 1.0),
       layout=st.sampled_from(["few_values", "pruned", "sorted", "zeros", "random"]), seed=st.integers(0, 10**6))
def test_top_k_stable_is_the_stable_sort_prefix(n, frac, layout, seed):
    s = _scores(n, seed, layout)
    k = round(frac * n)
    assert torch.equal(top_k_stable(s, k), _sorted_top_k(s, k))
    if k:
        assert kth_largest(s, k) == torch.sort(s, descending=True).values[k - 1]


def test_top_k_stable_nan_and_float64():
    s = torch.tensor([1.0, math.nan, 3.0, 3.0, math.nan, 0.0, -0.0], dtype=torch.float64)
    for k in range(8):
        assert torch.equal(top_k_stable(s, k), _sorted_top_k(s, k))
    with pytest.raises(ValueError, match=r"k must be in \[1, 7\]"):
        kth_largest(s, 0)


@settings(max_examples=30, deadline=None)
@given(pattern=st.sampled_from([Unstructured(), NM(2, 4), NM(1, 4), Block(2, 4), Channel("out"), Channel("in")]),
       density=st.floats(0.0, 1.0), layout=st.sampled_from(["few_values", "pruned", "zeros", "random"]),
       rows=st.sampled_from([8, 64, 512]), seed=st.integers(0, 10**6))
def test_pattern_topk_matches_the_sort_reference(pattern, density, layout, rows, seed):
    """Every pattern ranks its units (elements, groups, blocks, channels) as the stable sort did."""
    cols = 256
    s = _scores(rows * cols, seed, layout).reshape(rows, cols)
    density = min(density, pattern.max_density)
    mask = pattern.topk(s, density)
    if isinstance(pattern, Unstructured):
        want = _sorted_top_k(s.reshape(-1), round(density * s.numel())).reshape(s.shape)
    elif isinstance(pattern, Block):
        unit = s.reshape(rows // 2, 2, cols // 4, 4).sum(dim=(1, 3)).reshape(-1)
        keep = _sorted_top_k(unit, round(density * unit.numel())).reshape(rows // 2, 1, cols // 4, 1)
        want = keep.expand(-1, 2, -1, 4).reshape(s.shape)
    elif isinstance(pattern, Channel):
        dim = 0 if pattern.axis == "out" else 1
        unit = s.movedim(dim, 0).reshape(s.shape[dim], -1).sum(1)
        keep = _sorted_top_k(unit, round(density * unit.numel()))
        want = (keep[:, None] if dim == 0 else keep[None, :]).expand(s.shape)
    else:  # N:M: the n best of each group, then the best candidates overall
        groups = s.reshape(-1, pattern.m)
        order = torch.sort(groups, dim=1, descending=True, stable=True).indices[:, : pattern.n]
        cand = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, order, True).reshape(-1)
        masked = torch.where(cand, groups.reshape(-1), torch.full_like(groups.reshape(-1), -math.inf))
        k = round(density * s.numel())
        want = (cand if k == int(cand.sum()) else _sorted_top_k(masked, k)).reshape(s.shape)
    assert torch.equal(mask, want)


@settings(max_examples=15, deadline=None)
@given(sizes=st.lists(st.sampled_from([(3, 5), (64, 1), (16, 4, 3, 3), (128, 520)]), min_size=1, max_size=3),
       density=st.floats(0.001, 1.0), layout=st.sampled_from(["few_values", "pruned", "zeros", "random"]),
       seed=st.integers(0, 10**6))
def test_global_distribution_matches_the_sort_reference(sizes, density, layout, seed):
    shapes = {f"l{i}.weight": s for i, s in enumerate(sizes)}
    scores = {n: _scores(math.prod(s), seed + i, layout).reshape(s) for i, (n, s) in enumerate(shapes.items())}
    got = layer_densities("global", shapes, 1.0 - density, scores=scores)
    want = _sorted_global(shapes, 1.0 - (1.0 - density), scores)  # the density layer_densities passes on
    assert got == want


def test_global_distribution_mixed_dtypes_rank_exactly():
    """float64 scores beside float32 ones are compared in float64 (no rounding to float32)."""
    shapes = {"a": (3,), "b": (3,)}
    scores = {"a": torch.tensor([1.0, 1.0 + 1e-12, 0.0], dtype=torch.float64), "b": torch.tensor([1.0, 0.0, 0.0])}
    # keep 2 of 6: 1 + 1e-12 first, then the tie at 1.0 goes to the lower index ("a")
    assert layer_densities("global", shapes, 4 / 6, scores=scores) == {"a": 2 / 3, "b": 0.0}


def test_masks_of_a_big_model_are_not_sorted(monkeypatch):
    """The global ranking and each layer's top-k select by k-th value: no sort of all the scores
    (two stable sorts of 11.7M ResNet-18 scores took ~9 s per mask update; a sort of the
    strided sample, 1 / 16 of the entries at most, is fine)."""
    shapes = {"a": (300, 400), "b": (200, 300)}
    scores = {n: _scores(math.prod(s), i, "random").reshape(s) for i, (n, s) in enumerate(shapes.items())}
    sorted_sizes = []
    real_sort = torch.sort

    def recording_sort(t, *args, **kwargs):
        sorted_sizes.append(t.numel())
        return real_sort(t, *args, **kwargs)

    monkeypatch.setattr(torch, "sort", recording_sort)
    densities = layer_densities("global", shapes, 0.8, scores=scores)
    masks = {n: Unstructured().topk(scores[n], densities[n], n) for n in shapes}
    monkeypatch.undo()
    assert max(sorted_sizes, default=0) <= (120_000 + 60_000) // 16
    assert sum(int(m.sum()) for m in masks.values()) == round(0.2 * (120_000 + 60_000))
