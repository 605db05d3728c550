"""One conformance suite over every registered method (timm/sklearn style).

For each method x pattern: the achieved sparsity equals the target, every mask obeys
its pattern, the same seed gives the same masks, and the state round-trips.
"""

import copy

import pytest
import torch

import sparsenn as sn
from conftest import TinyMLP, make_batches

PATTERNS = {"unstructured": 0.8, "per_row": 0.75, "2:4": 0.5, "1:4": 0.75, "block4x4": 0.75, "channel": 0.5}


def _conv_bn():
    return torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                               torch.nn.Conv2d(8, 16, 3), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
                               torch.nn.Flatten(), torch.nn.Linear(16 * 4 * 4, 4))


def _build(method, pattern, seed=0, model_seed=0):
    torch.manual_seed(model_seed)
    if getattr(sn.core.methods.METHODS.get(method), "needs_batchnorm", False):  # e.g. bn_gamma: Conv-BN layers
        model, exclude = _conv_bn(), ["7"]
        g = torch.Generator().manual_seed(0)
        data = [(torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(2)]
    else:
        model, exclude, data = TinyMLP(), None, make_batches(n=2)
    dst = {"total_steps": 100, "update_every": 10} if getattr(sn.core.methods.METHODS.get(method), "dynamic", False) else {}
    sp = sn.Sparsifier(model, sparsity=PATTERNS[pattern], method=method, pattern=pattern, exclude=exclude,
                       data=data, score_batches=2, seed=seed, **dst)
    return model, sp


@pytest.mark.parametrize("pattern", sorted(PATTERNS))
@pytest.mark.parametrize("method", sn.list_methods())
def test_method_conformance(method, pattern):
    cls = sn.core.methods.METHODS.get(method)
    if not cls.supports(sn.parse_pattern(pattern)):
        pytest.skip(f"method {method!r} only produces patterns {cls.patterns}")
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
