"""One conformance suite over every registered method (timm/sklearn style).

For each method x pattern: the achieved sparsity equals the target, every mask obeys
its pattern, the same seed gives the same masks, and the state round-trips.
"""

import copy

import pytest
import torch

import sparsenn as sn
from conftest import TinyMLP, make_batches

PATTERNS = {"unstructured": 0.8, "2:4": 0.5, "1:4": 0.75, "block4x4": 0.75, "channel": 0.5}


def _build(method, pattern, seed=0, model_seed=0):
    torch.manual_seed(model_seed)
    model = TinyMLP()
    sp = sn.Sparsifier(model, sparsity=PATTERNS[pattern], method=method, pattern=pattern,
                       data=make_batches(n=2), score_batches=2, seed=seed)
    return model, sp


@pytest.mark.parametrize("pattern", sorted(PATTERNS))
@pytest.mark.parametrize("method", sn.list_methods())
def test_method_conformance(method, pattern):
    model, sp = _build(method, pattern)
    target = PATTERNS[pattern]
    for name, p, mask in sn.iter_masks(model):
        assert sp.pattern.obeys(mask), name
        units = sp.pattern.units(tuple(p.shape))
        assert mask.sum().item() == round((1 - target) * units) * (p.numel() // units), name
        assert (p[~mask] == 0).all()
    assert sn.sparsity(model) == pytest.approx(target, abs=0.02)

    twin, sp2 = _build(method, pattern)  # same seed, same data: same masks
    assert all(torch.equal(a, b) for a, b in zip(sp.masks.values(), sp2.masks.values()))

    state = copy.deepcopy(sp.state_dict())
    _, sp3 = _build(method, pattern, seed=99)
    sp3.load_state_dict(state)
    assert sp3.state_dict()["step_count"] == state["step_count"]
    assert torch.equal(sp3.generator.get_state(), sp.generator.get_state())
