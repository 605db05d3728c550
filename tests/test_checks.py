"""Sparsities and densities are numbers: NumPy scalars and 0-d tensors too; bools, NaN and out-of-range
values are refused with a message that names the value."""

import fractions

import numpy as np
import pytest
import torch

import sparsenn as sn
from conftest import TinyMLP
from sparsenn.core import checks

NUMBERS = [0.5, np.float32(0.5), np.float64(0.5), np.array(0.5), torch.tensor(0.5), torch.tensor(0.5).double(),
           fractions.Fraction(1, 2)]
ZEROS = [0, np.int64(0), torch.tensor(0)]
BAD = [(True, "a bool, not a number"), (np.bool_(False), "a bool, not a number"), (float("nan"), "nan"),
       (1.0, "1.0"), (-0.1, "-0.1"), (np.float32(1.5), "1.5"), (torch.tensor([0.5, 0.5]), r"shape \(2,\)"),
       ("0.5", "'0.5'"), (torch.tensor(0.5j), "tensor"), (torch.tensor(True), "tensor")]


@pytest.mark.parametrize("value", NUMBERS + ZEROS)
def test_sparsity_accepts_real_numbers(value):
    assert checks.sparsity("sparsity", value) == float(value)
    sp = sn.Sparsifier(TinyMLP(), sparsity=value)
    assert sp.target == float(value) and isinstance(sp.target, float)


@pytest.mark.parametrize("value, shown", BAD)
def test_sparsity_refuses_non_numbers_with_a_clear_message(value, shown):
    with pytest.raises(ValueError, match=rf"sparsity must be a number in \[0, 1\), got .*{shown}"):
        sn.Sparsifier(TinyMLP(), sparsity=value)


@pytest.mark.parametrize("value", NUMBERS[1:])
def test_every_public_sparsity_argument_takes_numpy_and_tensor_scalars(value):
    torch.manual_seed(0)
    sp = sn.Sparsifier(TinyMLP(), sparsity=value, overrides={"fc1.weight": value})
    sp.update(value)
    assert sp.sparsity == 0.5
    assert sn.one_shot_prune(TinyMLP(), value).target == 0.5
    rounds = sn.iterative_prune(TinyMLP(), levels=[np.float32(0.25), value], train_fn=lambda m, info: None)
    assert [r.target for r in rounds] == [0.25, 0.5]
    sn.sparse_init(TinyMLP(), value, distribution="uniform")
    sn.LotteryTicket(TinyMLP(), prune_fraction=value, overrides={"fc3.weight": value})
    assert sn.Polynomial(end_step=4).sparsity_at(4, value) == 0.5
    assert sn.topk_mask(torch.rand(4, 4), density=value).sum() == 8


@pytest.mark.parametrize("call", [
    lambda v: sn.Sparsifier(TinyMLP(), sparsity=0.5, overrides={"fc1.weight": v}),
    lambda v: sn.one_shot_prune(TinyMLP(), v),
    lambda v: sn.iterative_prune(TinyMLP(), levels=[v], train_fn=lambda m, info: None),
    lambda v: sn.sparse_init(TinyMLP(), v),
    lambda v: sn.LotteryTicket(TinyMLP(), prune_fraction=v),
    lambda v: sn.topk_mask(torch.rand(4, 4), density=v),
])
@pytest.mark.parametrize("value", [True, float("nan"), torch.tensor([0.5, 0.5])])
def test_every_public_sparsity_argument_refuses_non_numbers(call, value):
    with pytest.raises(ValueError, match="must be a number in"):
        call(value)
