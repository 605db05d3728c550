"""Masked optimizers: masked weights stay exactly 0.0 and get no update, whatever the optimizer."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import sparsenn as sn
from conftest import TinyMLP, make_batches

OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1),
    "sgd_momentum_wd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-2),
    "nesterov": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-2),
    "adam_amsgrad": lambda p: torch.optim.Adam(p, lr=1e-2, amsgrad=True),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-2, momentum=0.5, centered=True, weight_decay=1e-3),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=1e-1, initial_accumulator_value=0.1, weight_decay=1e-3),
}


def _train(model, opt, sp, batches, accumulate=1, clip=None):
    for i, (x, y) in enumerate(batches):
        loss = nn.functional.cross_entropy(model(x), y) / accumulate
        loss.backward()
        if (i + 1) % accumulate == 0:
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            opt.zero_grad()
            if sp is not None:
                sp.step()


def _assert_masked_zero(model):
    for name, p, mask in sn.iter_masks(model):
        assert (p[~mask] == 0).all(), name  # exact 0.0, not merely small


@settings(max_examples=30, deadline=None)
@given(opt_name=st.sampled_from(sorted(OPTIMIZERS)), sparsity=st.sampled_from([0.3, 0.5, 0.9, 0.97]),
       pattern=st.sampled_from(["unstructured", "2:4", "block4x4", "channel"]),
       accumulate=st.sampled_from([1, 2]), clip=st.sampled_from([None, 0.5]), seed=st.integers(0, 1000))
def test_masked_weights_stay_exactly_zero(opt_name, sparsity, pattern, accumulate, clip, seed):
    torch.manual_seed(seed)
    model = TinyMLP()
    if pattern == "2:4":
        sparsity = max(sparsity, 0.5)
    sp = sn.Sparsifier(model, sparsity=sparsity, pattern=pattern, method="random", seed=seed)
    opt = sp.wrap(OPTIMIZERS[opt_name](model.parameters()))
    before = {n: p.detach().clone() for n, p, _ in sn.iter_masks(model)}
    batches = make_batches(n=12, seed=seed)
    probe = copy.deepcopy(model)  # does the loss reach any kept weight at all? (at 97% it may not)
    nn.functional.cross_entropy(probe(batches[0][0]), batches[0][1]).backward()
    reachable = any((p.grad[m] != 0).any() for _, p, m in sn.iter_masks(probe))
    _train(model, opt, sp, batches, accumulate=accumulate, clip=clip)
    _assert_masked_zero(model)
    trained = False
    for name, p, mask in sn.iter_masks(model):
        assert torch.equal(p[~mask], before[name][~mask])
        trained |= not torch.equal(p[mask], before[name][mask])
    if reachable:
        assert trained  # kept weights do train (unless no path from input to loss survived the mask)


@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
def test_state_at_masked_positions_is_initial(opt_name):
    torch.manual_seed(0)
    model = TinyMLP()
    sp = sn.Sparsifier(model, sparsity=0.8, schedule=sn.Iterative(rounds=2, begin_step=3, end_step=6))
    opt = sp.wrap(OPTIMIZERS[opt_name](model.parameters()))
    _train(model, opt, sp, make_batches(n=8))
    init = 0.1 if opt_name == "adagrad" else 0.0
    for name, p, mask in sn.iter_masks(model):
        for key, value in opt.state[p].items():
            if torch.is_tensor(value) and value.shape == p.shape:
                assert (value[~mask] == init).all(), (name, key)
    _assert_masked_zero(model)


def test_reenabled_weight_state_reset_to_initial():
    torch.manual_seed(0)
    model = TinyMLP()
    sp = sn.Sparsifier(model, sparsity=0.5)
    opt = sp.wrap(torch.optim.Adagrad(model.parameters(), lr=0.1, initial_accumulator_value=0.25))
    _train(model, opt, sp, make_batches(n=3))
    name, p, mask = next(sn.iter_masks(model))
    mask = mask.clone()  # the buffer itself is updated in place
    revived = ~mask
    kept_state = opt.state[p]["sum"][mask].clone()
    sp.set_masks({name: torch.ones_like(mask)})  # re-enable every pruned weight
    assert (opt.state[p]["sum"][revived] == 0.25).all()
    assert torch.equal(opt.state[p]["sum"][mask], kept_state)  # untouched where unchanged
    assert (p[revived] == 0).all()  # revived weights start at zero


def test_wrap_returns_same_optimizer_and_lr_scheduler_works(mlp):
    sp = sn.Sparsifier(mlp, sparsity=0.5)
    opt = torch.optim.SGD(mlp.parameters(), lr=0.1)
    assert sp.wrap(opt) is opt
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    _train(mlp, opt, sp, make_batches(n=2))
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)


def test_wrap_rejects_non_optimizer(mlp):
    sp = sn.Sparsifier(mlp, sparsity=0.5)
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        sp.wrap(object())


def test_clipping_sees_only_unmasked_gradients(mlp, batches):
    sn.Sparsifier(mlp, sparsity=0.9)  # its gradient hooks zero masked gradients as backward computes them
    x, y = batches[0]
    nn.functional.cross_entropy(mlp(x), y).backward()
    for _, p, mask in sn.iter_masks(mlp):
        assert (p.grad[~mask] == 0).all()
    # the reference: the gradient of the explicitly masked network
    ref = copy.deepcopy(mlp)
    for p in ref.parameters():
        p.grad = None
    nn.functional.cross_entropy(ref(x), y).backward()  # deepcopy drops the hooks: dense gradient
    dense_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 1e9)
    ref_norm = sn.clip_grad_norm_(ref, 1e9)
    own_norm = torch.nn.utils.clip_grad_norm_(mlp.parameters(), 1e9)
    assert torch.allclose(ref_norm, own_norm) and dense_norm > own_norm


def test_unwrapped_optimizer_params_unaffected(mlp):
    """An optimizer over other parameters is left alone; finalize removes the hooks."""
    sp = sn.Sparsifier(mlp, sparsity=0.5)
    opt = sp.wrap(torch.optim.SGD(mlp.parameters(), lr=0.1))
    sp.finalize()
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks


@pytest.mark.parametrize("write", ["replace", "in_place", "mask_changed", "accumulate_onto_manual"])
def test_gradients_written_after_backward_are_zeroed_before_the_step(write):
    """The gradient hook zeroes ``.grad`` as backward accumulates it, and the optimizer pre-hook skips a
    second pass only for that very, unwritten gradient: any later write is zeroed before the step, so
    Adam's moments at masked positions stay 0."""
    torch.manual_seed(0)
    model = TinyMLP()
    sp = sn.Sparsifier(model, sparsity=0.7)
    opt = sp.wrap(torch.optim.Adam(model.parameters(), lr=1e-2))
    (x, y), = make_batches(n=1)
    name, p, _ = next(sn.iter_masks(model))
    if write == "accumulate_onto_manual":  # a dense gradient set by hand, then backward adds to it
        p.grad = torch.ones_like(p)
    nn.functional.cross_entropy(model(x), y).backward()
    if write == "replace":
        p.grad = torch.ones_like(p)
    elif write == "in_place":
        p.grad.add_(1.0)
    elif write == "mask_changed":  # more pruned after backward: the old zeroing does not cover it
        sp.set_masks({name: torch.rand(p.shape) < 0.1})
    opt.step()
    for n, q, mask in sn.iter_masks(model):
        assert (opt.state[q]["exp_avg"][~mask] == 0).all(), n
        assert (q[~mask] == 0).all(), n


def test_step_writes_back_exactly_the_masked_weights(monkeypatch):
    """The mask work of a step: the gradient hook zeroes each gradient once in backward; the optimizer
    writes every masked weight back after every step (unconditionally: a skip based on version
    counters can be fooled, tests/test_mask_writes.py) and touches neither the gradients again nor
    the optimizer state."""
    import sparsenn.train.masked_optim as masked_module

    torch.manual_seed(0)
    model = TinyMLP()
    sp = sn.Sparsifier(model, sparsity=0.7)
    opt = sp.wrap(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3))
    calls = []
    real = masked_module.zero_masked_
    monkeypatch.setattr(masked_module, "zero_masked_", lambda t, m: calls.append(t) or real(t, m))
    batches = make_batches(n=3)
    params = [id(mp.param) for mp in sp.masked]
    for x, y in batches:
        calls.clear()
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        assert [id(t) for t in calls] == params
    _assert_masked_zero(model)
