"""Pruning procedures against their defining properties: IMP/LTH resets, round counts, rewinding, controls."""

import pytest
import torch
from torch import nn

import sparsenn as sn
from sparsenn.create.procedures import LotteryTicket, RoundInfo, attach_sparsifier, iterative_prune, one_shot_prune
from sparsenn.train.rewind import take_snapshot
from conftest import TinyMLP, make_batches

BATCHES = make_batches(n=3)


def _fit(model, opt, batches, step=None):
    for x, y in batches:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        if step is not None:
            step()
    return loss.item()


def _model(seed=0):
    torch.manual_seed(seed)
    return TinyMLP()


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_state(model, state):
    now = model.state_dict()
    return set(now) == set(state) and all(torch.equal(now[k], v) for k, v in state.items())


def _train_fn(log=None, lr=0.05):
    def fn(model, info: RoundInfo):
        if log is not None:
            masks = {n: m.clone() for n, m in info.sparsifier.masks.items()}
            log.append((info, {n: p.detach().clone() for n, p in model.named_parameters()}, masks))
        opt = info.sparsifier.wrap(torch.optim.SGD(model.parameters(), lr=lr * info.lr_scale, momentum=0.9))
        return {"loss": _fit(model, opt, BATCHES, info.sparsifier.step)}
    return fn


def _lambda(start):
    return lambda t: 0.9 ** (t + start)


# -------------------------------------------------------------------- lottery ticket


def test_lottery_ticket_resets_survivors_exactly_to_theta0():
    model = _model()
    theta0 = _state(model)
    lt = LotteryTicket(model, prune_fraction=0.2)
    for _ in range(3):
        opt = lt.wrap(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
        _fit(model, opt, BATCHES, lt.step)
        lt.prune()
        masks = lt.sparsifier.masks
        for name, p in model.named_parameters():
            expected = theta0[name] * masks[name] if name in masks else theta0[name]
            assert torch.equal(p, expected), name


def test_lottery_ticket_rewinds_exactly_to_theta_k():
    k = 2
    reference = _model()  # a recorded run: theta_k = the weights after k steps
    _fit(reference, torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9), BATCHES[:k])
    theta_k = _state(reference)
    model = _model()
    lt = LotteryTicket(model, prune_fraction=0.5, rewind_step=k)
    assert lt.snapshot is None
    _fit(model, lt.wrap(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)), BATCHES, lt.step)
    assert lt.snapshot.step == k
    lt.prune()
    assert lt.iteration == k
    masks = lt.sparsifier.masks
    for name, p in model.named_parameters():
        assert torch.equal(p, theta_k[name] * masks[name] if name in masks else theta_k[name]), name


def test_each_round_prunes_fraction_of_remaining_per_layer():
    p = 0.2
    model = _model()
    lt = LotteryTicket(model, prune_fraction=p)
    kept = {n: m.numel() for n, m in lt.sparsifier.masks.items()}
    total = sum(kept.values())
    for r in range(1, 6):
        _fit(model, lt.wrap(torch.optim.SGD(model.parameters(), lr=0.05)), BATCHES[:1], lt.step)
        prev = {n: int(m.sum()) for n, m in lt.sparsifier.masks.items()}
        achieved = lt.prune()
        for name, m in lt.sparsifier.masks.items():
            now = int(m.sum())
            assert abs(now - prev[name] * (1 - p)) <= 1.0, (r, name, prev[name], now)  # rounding per layer
            assert (model.get_parameter(name)[~m] == 0).all()
            assert lt.ticket_sparsities()[name] == pytest.approx(1 - now / m.numel())
        assert achieved == pytest.approx(1 - (1 - p) ** r, abs=len(kept) / total)
        assert sn.sparsity(model) == pytest.approx(achieved, abs=1e-6)


def test_lottery_ticket_pruned_weights_stay_pruned():
    model = _model()
    lt = LotteryTicket(model, prune_fraction=0.3, distribution="global")
    previous = None
    for _ in range(3):
        _fit(model, lt.wrap(torch.optim.SGD(model.parameters(), lr=0.1)), BATCHES, lt.step)
        lt.prune()
        masks = {n: m.clone() for n, m in lt.sparsifier.masks.items()}
        if previous is not None:
            assert all(not (masks[n] & ~previous[n]).any() for n in masks)
        previous = masks
    assert lt.rounds == 3


def test_lottery_ticket_overrides_are_per_layer_fractions():
    model = _model()
    lt = LotteryTicket(model, prune_fraction=0.2, overrides={"fc3.weight": 0.1})
    for r in (1, 2):
        _fit(model, lt.wrap(torch.optim.SGD(model.parameters(), lr=0.05)), BATCHES[:1], lt.step)
        lt.prune()
        s = lt.ticket_sparsities()
        assert s["fc3.weight"] == pytest.approx(1 - 0.9 ** r, abs=1 / 128)
        assert s["fc1.weight"] == pytest.approx(1 - 0.8 ** r, abs=1 / 512)


def test_controls_random_reinit_and_random_mask():
    model = _model()
    lt = LotteryTicket(model, prune_fraction=0.5)
    _fit(model, lt.wrap(torch.optim.SGD(model.parameters(), lr=0.1)), BATCHES, lt.step)
    lt.prune()
    ticket = _state(model)
    masks = {n: m.clone() for n, m in lt.sparsifier.masks.items()}

    reinit = lt.random_reinit(seed=1)
    assert _same_state(model, ticket)  # the ticket is untouched
    got = sn.get_masks(reinit)
    assert all(torch.equal(got[n], masks[n]) for n in masks)
    for n, m in masks.items():
        w = reinit.get_parameter(n)
        assert (w[~m] == 0).all() and not torch.equal(w[m], model.get_parameter(n)[m])
    assert _same_state(lt.random_reinit(seed=1), _state(reinit))  # seeded

    rmask = lt.random_mask(seed=1)
    got = sn.get_masks(rmask)
    for n, m in masks.items():
        assert int(got[n].sum()) == int(m.sum()) and not torch.equal(got[n], m)
        w = rmask.get_parameter(n)
        assert torch.equal(w, lt.snapshot.params[n] * got[n])  # theta_k weights on the random mask

    sp = attach_sparsifier(reinit)  # the benchmark's way to train a control
    assert LotteryTicket.for_model(rmask).names == list(masks)
    _fit(reinit, sp.wrap(torch.optim.SGD(reinit.parameters(), lr=0.1, momentum=0.9)), BATCHES, sp.step)
    assert all(torch.equal(sp.masks[n], masks[n]) for n in masks)
    assert all((reinit.get_parameter(n)[~m] == 0).all() for n, m in masks.items())
    assert sp.sparsity == pytest.approx(0.5, abs=0.01)


def test_lottery_ticket_bad_input():
    model = _model()
    before = _state(model)
    for bad in (0, 1, 1.5, -0.1, True, "0.2"):
        with pytest.raises(ValueError, match="prune_fraction"):
            LotteryTicket(model, prune_fraction=bad)
    with pytest.raises(ValueError, match="uniform"):
        LotteryTicket(model, distribution="nope")
    with pytest.raises(ValueError, match="fc9"):
        LotteryTicket(model, overrides={"fc9.weight": 0.1})
    assert _same_state(model, before)  # no masks attached by failed constructors

    lt = LotteryTicket(model, rewind_step=5)
    _fit(model, lt.wrap(torch.optim.SGD(model.parameters(), lr=0.1)), BATCHES[:2], lt.step)
    state = _state(model)
    with pytest.raises(ValueError, match="rewind_step 5 is beyond the 2 trained iterations"):
        lt.prune()
    assert _same_state(model, state) and lt.rounds == 0
    with pytest.raises(ValueError, match="rewind_step 5"):
        lt.random_mask(0)


# -------------------------------------------------------------------- iterative pruning


def test_iterative_prune_follows_levels_and_reports_rounds():
    model = _model()
    log, seen = [], []
    levels = [0.5, 0.8, 0.9, 0.95]
    results = iterative_prune(model, levels=levels, train_fn=_train_fn(log), on_round=seen.append)
    assert [r.index for r in results] == [0, 1, 2, 3] and seen == results
    for (info, _, _), level, res in zip(log, levels, results):
        assert info.sparsity == level and info.lr_scale == 0.1 and info.start_step == 0
        assert res.target == level and res.sparsity == pytest.approx(level, abs=0.01)
        assert "loss" in res.metrics
    masks = sn.get_masks(model)
    assert all((model.get_parameter(n)[~m] == 0).all() for n, m in masks.items())
    assert len(log[-1][0].sparsifier._optimizers) == 0  # each round's optimizer is released


def test_iterative_prune_rounds_times_fraction_is_monotone():
    model = _model()
    log = []
    results = iterative_prune(model, rounds=3, fraction=0.5, train_fn=_train_fn(log), lr_scale=0.5)
    assert [r.target for r in results] == pytest.approx([0.5, 0.75, 0.875])
    assert all(info.lr_scale == 0.5 for info, _, _ in log)
    # weights fine-tuned from the trained values (no rewinding): round r+1 starts where round r ended
    first_after = log[1][1]
    assert not torch.equal(first_after["fc1.weight"], log[0][1]["fc1.weight"])


def test_iterative_prune_rewind_weights_restores_theta_k():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _fit(model, opt, BATCHES[:2])
    snap = take_snapshot(model, 2)
    _fit(model, opt, BATCHES)
    log = []
    iterative_prune(model, levels=[0.5, 0.75], train_fn=_train_fn(log), rewind="weights", snapshot=snap)
    assert len(log) == 2
    for info, weights, masks in log:
        assert info.start_step == 2 and info.lr_scale == 1.0
        for name, w in weights.items():
            expected = snap.params[name] * masks[name] if name in masks else snap.params[name]
            assert torch.equal(w, expected), name
    assert not torch.equal(log[0][2]["fc1.weight"], log[1][2]["fc1.weight"])


def test_iterative_prune_rewind_lr_keeps_weights_and_restarts_schedule_at_k():
    k = 3
    ref_opt = torch.optim.SGD(_model().parameters(), lr=0.1)
    ref = torch.optim.lr_scheduler.LambdaLR(ref_opt, _lambda(0))
    for _ in range(k):
        ref_opt.step()
        ref.step()
    lr_k = ref_opt.param_groups[0]["lr"]

    model = _model()
    pruned_weights, lrs = [], []

    def fn(model, info):
        pruned_weights.append({n: p.detach().clone() for n, p in model.named_parameters()})
        opt = info.sparsifier.wrap(torch.optim.SGD(model.parameters(), lr=0.1 * info.lr_scale))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _lambda(info.start_step))
        lrs.append(opt.param_groups[0]["lr"])
        _fit(model, opt, BATCHES, info.sparsifier.step)
        sched.step()

    trained = _state(model)
    iterative_prune(model, levels=[0.5], train_fn=fn, rewind="lr", rewind_step=k)
    assert lrs == [pytest.approx(lr_k)]
    masks = sn.get_masks(model)
    for name, w in pruned_weights[0].items():  # trained weights kept, only pruned ones zeroed
        expected = trained[name] * masks[name] if name in masks else trained[name]
        assert torch.equal(w, expected), name


def test_iterative_prune_bad_input_leaves_model_unchanged():
    model = _model()
    before = _state(model)
    fn = _train_fn()
    cases = [
        (dict(levels=[0.5, 0.5]), "strictly increasing"),
        (dict(levels=[0.8, 0.5]), "strictly increasing"),
        (dict(levels=[0.5, 1.0]), r"levels\[1\]"),
        (dict(levels=[]), "non-empty"),
        (dict(rounds=3, fraction=1.2), "fraction"),
        (dict(rounds=0, fraction=0.2), "rounds"),
        (dict(levels=[0.5], rounds=2, fraction=0.2), "not both"),
        (dict(), "levels"),
        (dict(levels=[0.5], rewind="theta"), "'weights', 'lr'"),
        (dict(levels=[0.5], rewind="weights"), "snapshot"),
        (dict(levels=[0.5], rewind_step=3), "rewind"),
        (dict(levels=[0.5], schedule="linear"), "schedule"),
        (dict(levels=[0.5], method="nope"), "magnitude"),
        (dict(levels=[0.2, 0.9], overrides={"fc1.weight": 0.95}), "cannot reach"),
        (dict(levels=[0.5], lr_scale=0), "lr_scale"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            iterative_prune(model, train_fn=fn, **kwargs)
        assert _same_state(model, before), kwargs
    with pytest.raises(ValueError, match="fc1.weight"):
        iterative_prune(model, levels=[0.5], train_fn=fn, rewind="weights", snapshot=take_snapshot(TinyMLP(8), 0))
    assert _same_state(model, before)


# -------------------------------------------------------------------- one-shot


def test_one_shot_prune_reaches_sparsity_and_fine_tunes():
    model = _model()
    log = []
    sp = one_shot_prune(model, 0.8, train_fn=_train_fn(log), distribution="global", lr_scale=0.3)
    info, at_start, _ = log[0]
    assert info.lr_scale == 0.3 and info.sparsity == 0.8 and info.start_step == 0
    assert sn.sparsity(model) == pytest.approx(0.8, abs=1e-3)
    changed = [not torch.equal(at_start[n], p) for n, p in model.named_parameters()]
    assert all(changed)  # fine-tuned
    assert all((model.get_parameter(n)[~m] == 0).all() for n, m in sp.masks.items())

    plain = _model()
    sp = one_shot_prune(plain, 0.5, method="random", seed=3)
    assert sn.sparsity(plain) == pytest.approx(0.5, abs=1e-3) and sp.method.name == "random"
    with pytest.raises(ValueError, match="schedule"):
        one_shot_prune(_model(), 0.5, schedule="linear")
    with pytest.raises(ValueError, match="sparsity"):
        one_shot_prune(_model(), 1.5)
