"""plain_copy: models masked by torch.nn.utils.prune or parametrized, copied without touching the original."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrizations, prune

import sparsenn as sn
from sparsenn.core.plain import plain_copy


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def test_a_torch_pruned_model_copies_with_its_zeros_and_keeps_its_hooks():
    model = _mlp()
    prune.l1_unstructured(model[0], "weight", amount=0.9)
    x = torch.randn(5, 64)
    copy = plain_copy(model)
    assert isinstance(copy[0].weight, nn.Parameter) and not hasattr(copy[0], "weight_orig")
    assert int((copy[0].weight == 0).sum()) == round(0.9 * 64 * 128)
    assert torch.equal(copy(x), model(x))
    assert prune.is_pruned(model) and hasattr(model[0], "weight_orig")  # the original still pruned by torch


def test_a_parametrized_model_copies_and_the_original_keeps_working():
    model = _mlp()
    parametrizations.weight_norm(model[2])
    x = torch.randn(3, 64)
    expected = model(x)
    copy = plain_copy(model)
    assert not hasattr(copy[2], "parametrizations")
    torch.testing.assert_close(copy(x), expected)
    torch.testing.assert_close(model(x), expected)  # the injected class of the original is intact


def test_sparsenn_masks_removed_or_kept():
    model = _mlp()
    sn.one_shot_prune(model, 0.8)
    assert sn.get_masks(plain_copy(model)) == {}
    kept = plain_copy(model, masks=True)
    assert set(sn.get_masks(kept)) == set(sn.get_masks(model))


def test_convert_takes_a_model_pruned_with_torch_nn_utils_prune():
    model = _mlp().eval()
    for layer in (model[0], model[2]):
        prune.l1_unstructured(layer, "weight", amount=0.95)
    x = torch.randn(16, 64)
    converted = sn.convert(model, x, batch_sizes=(16,), budget=0.05)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), model(x), rtol=1e-5, atol=1e-5)
    assert prune.is_pruned(model)
