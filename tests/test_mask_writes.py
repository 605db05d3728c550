"""Masked weights are exactly +0.0 after every optimizer step, whatever wrote the weights, the optimizer
state or the mask in between: in-place ops, ``.data`` writes, ``p.data = ...``, ``vector_to_parameters``
and NumPy views (none of which a version counter sees)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import sparsenn as sn
from conftest import TinyMLP, make_batches
from sparsenn.core.masks import apply_masks, zero_masked_

OPTIMIZERS = {
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-3),
    "nesterov": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-3),
    "adam_amsgrad": lambda p: torch.optim.Adam(p, lr=1e-2, amsgrad=True),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    "adamw_foreach": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, foreach=True),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-2, momentum=0.5),
}


def _write_weight(how: str, model: nn.Module, p: nn.Parameter, mask: torch.Tensor) -> None:
    """Make every masked weight of ``p`` non-zero, the way a user might."""
    if how == "data_index":
        p.data[~mask] = 0.5
    elif how == "data_add":
        p.data.add_(0.5)
    elif how == "data_assign":
        p.data = p.data + 0.5
    elif how == "vector_to_parameters":
        vec = torch.nn.utils.parameters_to_vector(model.parameters())
        torch.nn.utils.vector_to_parameters(vec + 0.5, model.parameters())
    elif how == "numpy":
        p.detach().numpy()[...] += 0.5
    elif how == "in_place":
        with torch.no_grad():
            p.add_(0.5)
    else:
        raise AssertionError(how)


WRITES = ["data_index", "data_add", "data_assign", "vector_to_parameters", "numpy", "in_place"]


def _write_state(how: str, opt: torch.optim.Optimizer, p: nn.Parameter) -> None:
    for t in opt.state.get(p, {}).values():
        if torch.is_tensor(t) and t.shape == p.shape:
            if how == "data":
                t.data.add_(1.0)
            else:
                t.numpy()[...] += 1.0


def _step(model, opt, batch):
    x, y = batch
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


def _assert_exact_zeros(model):
    for name, p, mask in sn.iter_masks(model):
        bits = p.detach()[~mask].view(torch.int32)
        assert (bits == 0).all(), f"{name}: {int((bits != 0).sum())} masked weights are not +0.0"


@pytest.mark.parametrize("opt_name", ["sgd_momentum", "adam", "adamw"])
@pytest.mark.parametrize("write", WRITES)
def test_writes_outside_version_counters_are_undone_by_the_next_step(write, opt_name):
    torch.manual_seed(0)
    model = TinyMLP()
    sp = sn.Sparsifier(model, sparsity=0.7)
    opt = sp.wrap(OPTIMIZERS[opt_name](model.parameters()))
    batches = make_batches(n=4)
    _step(model, opt, batches[0])
    _step(model, opt, batches[1])  # past the first step: the old fast path skipped the write-back from here
    for _, p, mask in sn.iter_masks(model):
        _write_weight(write, model, p, mask)
    for batch in batches[2:]:
        _step(model, opt, batch)
        _assert_exact_zeros(model)


@pytest.mark.parametrize("opt_name", ["sgd_momentum", "adam", "adamw"])
@pytest.mark.parametrize("how", ["data", "numpy"])
def test_optimizer_state_written_at_masked_positions_cannot_revive_weights(how, opt_name):
    torch.manual_seed(0)
    model = TinyMLP()
    sp = sn.Sparsifier(model, sparsity=0.7)
    opt = sp.wrap(OPTIMIZERS[opt_name](model.parameters()))
    batches = make_batches(n=4)
    _step(model, opt, batches[0])
    _step(model, opt, batches[1])
    for _, p, _ in sn.iter_masks(model):
        _write_state(how, opt, p)
    for batch in batches[2:]:
        _step(model, opt, batch)
        _assert_exact_zeros(model)


@pytest.mark.parametrize("how", ["data", "numpy", "data_assign"])
def test_mask_edited_outside_version_counters_is_followed(how):
    """No stale derived copy of a mask is ever used: weights (and gradients) follow the mask as it is."""
    torch.manual_seed(0)
    model = TinyMLP()
    sp = sn.Sparsifier(model, sparsity=0.5)
    opt = sp.wrap(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    batches = make_batches(n=4)
    _step(model, opt, batches[0])
    _step(model, opt, batches[1])
    name, p, mask = next(sn.iter_masks(model))
    new = torch.zeros_like(mask)
    new[:, :3] = True  # keep only three input columns
    if how == "data":
        mask.data.copy_(new)
    elif how == "numpy":
        mask.numpy()[...] = new.numpy()
    else:
        mask.data = new.clone()
    _step(model, opt, batches[2])
    assert torch.equal(sn.get_masks(model)[name], new)
    _assert_exact_zeros(model)
    assert (p[:, 3:] == 0).all() and (p[:, :3] != 0).any()
    # the gradient hook and apply_masks read the mask as it is, too
    opt.zero_grad()
    x, y = batches[3]
    nn.functional.cross_entropy(model(x), y).backward()
    assert (p.grad[:, 3:] == 0).all()
    with torch.no_grad():
        p.data.fill_(1.0)
    apply_masks(model)
    assert torch.equal(p.detach() != 0, new)


def test_zero_masked_reads_the_mask_each_call():
    w = torch.ones(4, 5)
    mask = torch.ones(4, 5, dtype=torch.bool)
    zero_masked_(w, mask)
    mask.data[0] = False  # no version bump
    zero_masked_(w, mask)
    assert (w[0] == 0).all() and (w[1:] == 1).all()
    mask.numpy()[1] = False
    zero_masked_(w, mask)
    assert (w[:2] == 0).all() and (w[2:] == 1).all()


EVENTS = ["step", "step", "step", "remask", "write_state_data", "write_state_numpy", "lr_change",
          "reload_state", "edit_mask_data", *(f"weight_{w}" for w in WRITES)]


@settings(max_examples=15, deadline=None)
@given(events=st.lists(st.sampled_from(EVENTS), min_size=3, max_size=8),
       opt_name=st.sampled_from(sorted(OPTIMIZERS)), dense_first=st.booleans(), seed=st.integers(0, 1000))
def test_masked_weights_are_exact_zero_after_every_step(events, opt_name, dense_first, seed):
    """Whatever happens between steps, every masked weight is +0.0 (sign bit clear) after each step,
    and kept weights still train."""
    import copy

    torch.manual_seed(seed)
    model = TinyMLP()
    opt = OPTIMIZERS[opt_name](model.parameters())
    batches = make_batches(n=len(events) + 1, seed=seed)
    if dense_first:  # dense optimizer state everywhere before the sparsifier wraps the optimizer
        _step(model, opt, batches[-1])
    sp = sn.Sparsifier(model, sparsity=0.6, method="random", seed=seed)
    sp.wrap(opt)
    g = torch.Generator().manual_seed(seed)
    for i, event in enumerate(events):
        name, p, mask = next(sn.iter_masks(model))
        if event == "remask":
            sp.set_masks({name: torch.rand(p.shape, generator=g) < 0.5})
        elif event.startswith("write_state"):
            _write_state(event.rpartition("_")[2], opt, p)
        elif event == "lr_change":
            opt.param_groups[0]["lr"] *= 0.5
        elif event == "reload_state":
            opt.load_state_dict(copy.deepcopy(opt.state_dict()))
        elif event == "edit_mask_data":
            mask.data.copy_(torch.rand(p.shape, generator=g) < 0.5)
        elif event.startswith("weight_"):
            _write_weight(event[len("weight_"):], model, p, mask)
        _step(model, opt, batches[i])
        _assert_exact_zeros(model)
