"""Proximal maps and proximal optimizers: the prox is the exact argmin, the optimizers are
SGD/Adam/ISTA/FISTA to the letter, they create exact zeros, and they respect masks."""

import copy
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import sparsenn as sn
from conftest import TinyMLP, make_batches
from sparsenn.create.regularize.proximal import FISTA, ProximalAdam, ProximalSGD, group_soft_threshold, soft_threshold
from sparsenn.core.patterns import Channel

floats = st.floats(-10, 10, allow_nan=False, width=32)


# ----------------------------------------------------------------------------- soft-thresholding


@settings(max_examples=200, deadline=None)
@given(v=floats, lam=st.floats(0, 5, allow_nan=False, width=32))
def test_soft_threshold_satisfies_the_prox_optimality_condition(v, lam):
    # z = argmin 0.5 (z - v)^2 + lam |z|  <=>  0 in z - v + lam * d|z|
    z = soft_threshold(torch.tensor([v], dtype=torch.float64), lam).item()
    if z == 0:
        assert abs(v) <= lam
    else:
        assert z - v + lam * math.copysign(1, z) == pytest.approx(0, abs=1e-12)


def test_soft_threshold_is_the_argmin_on_a_grid():
    grid = np.linspace(-6, 6, 240_001)  # spacing 5e-5
    for v in (-4.3, -1.0, -0.2, 0.0, 0.7, 2.5):
        for lam in (0.0, 0.5, 1.0, 3.0):
            brute = grid[np.argmin(0.5 * (grid - v) ** 2 + lam * np.abs(grid))]
            assert soft_threshold(torch.tensor(v, dtype=torch.float64), lam).item() == pytest.approx(brute, abs=1e-4)


def test_soft_threshold_hand_values_and_exact_zeros():
    out = soft_threshold(torch.tensor([-2.0, -0.5, 0.0, 0.5, 1.0, 2.0]), 1.0)
    assert torch.equal(out, torch.tensor([-1.0, 0.0, 0.0, 0.0, 0.0, 1.0]))
    assert not torch.signbit(out[1:5]).any()  # +0.0, not -0.0
    per_coordinate = soft_threshold(torch.tensor([2.0, 2.0]), torch.tensor([0.5, 3.0]))
    assert torch.equal(per_coordinate, torch.tensor([1.5, 0.0]))


@pytest.mark.parametrize("threshold", [-0.1, float("nan"), float("inf"), torch.tensor([0.1, -1.0])])
def test_soft_threshold_rejects_bad_thresholds(threshold):
    with pytest.raises(ValueError, match="threshold"):
        soft_threshold(torch.ones(2), threshold)


# ----------------------------------------------------------------------------- group soft-thresholding


def _reference_groups(shape, groups):
    """Index expressions of every group, written out independently of sparsenn.core.groups."""
    if groups == "channel":
        return [(i,) for i in range(shape[0])]
    if groups == "channel_in":
        return [(slice(None), j) for j in range(shape[1])]
    h, w = map(int, groups[len("block"):].split("x"))
    return [(slice(r, r + h), slice(c, c + w)) for r in range(0, shape[0], h) for c in range(0, shape[1], w)]


@settings(max_examples=60, deadline=None)
@given(data=st.data(), groups=st.sampled_from(["channel", "channel_in", "block2x3", "block1x2"]),
       t=st.floats(0, 4, allow_nan=False))
def test_group_soft_threshold_zeroes_small_groups_and_shrinks_the_rest(data, groups, t):
    values = data.draw(st.lists(floats, min_size=24, max_size=24))
    x = torch.tensor(values, dtype=torch.float64).reshape(4, 6)
    out = group_soft_threshold(x, t, groups)
    for idx in _reference_groups(x.shape, groups):
        g, z = x[idx], out[idx]
        norm = torch.linalg.vector_norm(g).item()
        if norm <= t:
            assert torch.equal(z, torch.zeros_like(z))
        else:
            torch.testing.assert_close(z, g * (1 - t / norm))


def test_group_soft_threshold_is_the_group_lasso_prox():
    # the prox minimizes 0.5 ||z - v||^2 + t sum_g ||z_g||: no perturbation does better
    torch.manual_seed(0)
    v = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    for groups in ("filter", "channel_in", "block2x9"):
        pattern = sn.core.groups.parse_groups(groups)
        t = sn.core.groups.group_norms(v, pattern).median().item()  # about half the groups die

        def objective(z, t=t, pattern=pattern):
            return 0.5 * ((z - v) ** 2).sum() + t * sn.core.groups.group_norms(z, pattern).sum()

        z = group_soft_threshold(v, t, groups)
        assert (sn.core.groups.group_norms(z, pattern) == 0).sum() >= 2
        best = objective(z)
        for _ in range(200):
            assert objective(z + 1e-3 * torch.randn_like(z)) >= best


def test_group_soft_threshold_per_group_thresholds():
    x = torch.tensor([[3.0, 4.0], [3.0, 4.0]])
    out = group_soft_threshold(x, torch.tensor([1.0, 6.0]), "row")
    torch.testing.assert_close(out, torch.tensor([[2.4, 3.2], [0.0, 0.0]]))


@pytest.mark.parametrize("groups,shape,match", [
    ("block4x4", (5, 6), "block4x4 groups do not tile"),
    ("channel_in", (5,), "input dimension"),
    ("2:4", (4, 4), "valid groups"),
    ("unstructured", (4, 4), "valid groups"),
    ("blocks", (4, 4), "valid groups"),
])
def test_groups_that_do_not_tile_are_errors(groups, shape, match):
    with pytest.raises(ValueError, match=match):
        group_soft_threshold(torch.ones(shape), 0.1, groups)


# ----------------------------------------------------------------------------- the optimizers are SGD / Adam


def _run(model, opt, batches, steps_per_batch=1):
    for x, y in batches:
        for _ in range(steps_per_batch):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return model


def _same_params(a, b):
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("kwargs", [
    dict(lr=0.1),
    dict(lr=0.1, momentum=0.9),
    dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2),
    dict(lr=0.1, momentum=0.5, dampening=0.3, weight_decay=1e-3),
])
def test_proximal_sgd_without_l1_is_sgd_exactly(mlp, batches, kwargs):
    ours, ref = copy.deepcopy(mlp), copy.deepcopy(mlp)
    _run(ours, ProximalSGD(ours.parameters(), l1=0.0, **kwargs), batches, 2)
    _run(ref, torch.optim.SGD(ref.parameters(), foreach=False, **kwargs), batches, 2)
    assert _same_params(ours, ref)


@pytest.mark.parametrize("kwargs", [dict(lr=1e-2), dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=1e-2)])
def test_proximal_adam_without_l1_is_adam_exactly(mlp, batches, kwargs):
    ours, ref = copy.deepcopy(mlp), copy.deepcopy(mlp)
    _run(ours, ProximalAdam(ours.parameters(), l1=0.0, **kwargs), batches, 2)
    _run(ref, torch.optim.Adam(ref.parameters(), foreach=False, **kwargs), batches, 2)
    assert _same_params(ours, ref)


def test_proximal_adam_uses_adams_per_coordinate_step_as_threshold():
    # first step: m_hat = g, v_hat = g^2, so w' = w - lr g / (|g| + eps), threshold lr l1 / (|g| + eps)
    w0, g = torch.tensor([1.0, 0.5, -0.02, 0.3]), torch.tensor([0.1, -2.0, 0.5, 1e-3])
    lr, l1, eps = 0.1, 0.4, 1e-8
    w = nn.Parameter(w0.clone())
    opt = ProximalAdam([w], lr=lr, l1=l1, eps=eps)
    w.grad = g.clone()
    opt.step()
    denom = g.abs() + eps
    expected = soft_threshold(w0 - lr * g / denom, lr * l1 / denom)
    torch.testing.assert_close(w.detach(), expected)
    assert (w == 0).sum() >= 1


def test_ista_and_fista_without_acceleration_are_the_same_steps(mlp, batches):
    a, b = copy.deepcopy(mlp), copy.deepcopy(mlp)
    _run(a, ProximalSGD(a.parameters(), lr=0.1, l1=1e-2), batches, 3)
    _run(b, FISTA(b.parameters(), lr=0.1, l1=1e-2, accelerated=False), batches, 3)
    assert _same_params(a, b)


# ----------------------------------------------------------------------------- FISTA


def test_fista_restarts():
    # restarting after every step is ISTA; restarting every 3 steps resets t to 1 and y to x_k there
    batch = make_batches(n=1)
    torch.manual_seed(0)
    ista = TinyMLP()
    every1, every3 = copy.deepcopy(ista), copy.deepcopy(ista)
    _run(ista, ProximalSGD(ista.parameters(), lr=0.1, l1=1e-2), batch, 5)
    _run(every1, FISTA(every1.parameters(), lr=0.1, l1=1e-2, restart_every=1), batch, 5)
    assert _same_params(ista, every1)
    opt = FISTA(every3.parameters(), lr=0.1, l1=1e-2, restart_every=3)
    w = every3.fc1.weight
    ts = []
    for step in range(1, 8):
        _run(every3, opt, batch)
        ts.append(opt.state[w]["t"])
        assert torch.equal(w, opt.state[w]["iterate"]) == (step % 3 in (0, 1))  # y = x at and after a restart
    t2 = FISTA.next_t(1.0)
    assert ts == pytest.approx([t2, FISTA.next_t(t2), 1.0, t2, FISTA.next_t(t2), 1.0, t2])
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="restart_every"):
            FISTA(ista.parameters(), lr=0.1, restart_every=bad)


def test_fista_momentum_sequence():
    t = [1.0]
    for _ in range(50):
        t.append(FISTA.next_t(t[-1]))
    assert t[1] == pytest.approx((1 + math.sqrt(5)) / 2)
    for k, (tk, tk1) in enumerate(zip(t, t[1:]), start=1):
        assert tk1 ** 2 - tk1 == pytest.approx(tk ** 2)  # the defining identity t_{k+1}^2 - t_{k+1} = t_k^2
        assert tk >= (k + 1) / 2  # Beck & Teboulle, Lemma 4.3
    w = nn.Parameter(torch.tensor([1.0]))
    opt = FISTA([w], lr=0.1, l1=0.1)
    for k in range(5):
        w.grad = torch.tensor([0.3])
        opt.step()
        assert opt.state[w]["t"] == pytest.approx(t[k + 1])


def test_fista_iterates_by_hand():
    # f(w) = 0.5 (w - c)^2 on a scalar; every quantity of Beck & Teboulle's scheme written out
    c, lr, lam, w0 = 2.0, 0.5, 0.3, -1.0
    w = nn.Parameter(torch.tensor([w0], dtype=torch.float64))
    opt = FISTA([w], lr=lr, l1=lam)

    def prox(v):
        return math.copysign(max(abs(v) - lr * lam, 0.0), v)

    x_prev, y, t = w0, w0, 1.0
    for _ in range(6):
        w.grad = torch.tensor([w.item() - c], dtype=torch.float64)
        opt.step()
        x = prox(y - lr * (y - c))
        t_next = (1 + math.sqrt(1 + 4 * t * t)) / 2
        y = x + (t - 1) / t_next * (x - x_prev)
        x_prev, t = x, t_next
        assert w.item() == pytest.approx(y, abs=1e-12)  # the parameters hold y_k
        assert opt.state[w]["iterate"].item() == pytest.approx(x, abs=1e-12)
    opt.load_iterate()
    assert w.item() == pytest.approx(x_prev, abs=1e-12) and opt.state[w]["t"] == 1.0


def _lasso_problem(seed=0, n=60, d=12):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d)) @ np.diag(np.logspace(0, -1.5, d))  # ill-conditioned
    X[:, 1] += X[:, 0]
    w_true = np.zeros(d)
    w_true[:3] = [2.0, -1.5, 1.0]
    y = X @ w_true + 0.1 * rng.standard_normal(n)
    return torch.tensor(X), torch.tensor(y)


def _solve(opt_cls, X, y, alpha, steps, **kw):
    n = X.shape[0]
    lr = 1.0 / torch.linalg.eigvalsh(X.T @ X / n).max().item()  # 1/L
    w = nn.Parameter(torch.zeros(X.shape[1], dtype=torch.float64))
    opt = opt_cls([w], lr=lr, l1=alpha, **kw)
    for _ in range(steps):
        opt.zero_grad()
        (0.5 / n * ((X @ w - y) ** 2).sum()).backward()
        opt.step()
    if isinstance(opt, FISTA):
        opt.load_iterate()
    return w.detach()


def _lasso_objective(X, y, w, alpha):
    return (0.5 / X.shape[0] * ((X @ w - y) ** 2).sum() + alpha * w.abs().sum()).item()


def test_ista_and_fista_solve_the_lasso_and_fista_is_faster():
    from sklearn.linear_model import Lasso

    X, y = _lasso_problem()
    alpha = 0.05
    ref = Lasso(alpha=alpha, fit_intercept=False, tol=1e-12, max_iter=100_000).fit(X.numpy(), y.numpy()).coef_
    for cls in (ProximalSGD, FISTA):
        w = _solve(cls, X, y, alpha, 2000)
        np.testing.assert_allclose(w.numpy(), ref, atol=1e-6)
        assert torch.equal(w == 0, torch.tensor(ref == 0))  # exact zeros where the lasso has them
    best = _lasso_objective(X, y, torch.tensor(ref), alpha)
    gap_ista = _lasso_objective(X, y, _solve(ProximalSGD, X, y, alpha, 30), alpha) - best
    gap_fista = _lasso_objective(X, y, _solve(FISTA, X, y, alpha, 30), alpha) - best
    assert 0 <= gap_fista < gap_ista / 10


def test_fista_state_dict_round_trip(mlp, batches):
    a = copy.deepcopy(mlp)
    opt_a = FISTA(a.parameters(), lr=0.1, l1=1e-3)
    _run(a, opt_a, batches[:2])
    b = copy.deepcopy(a)
    opt_b = FISTA(b.parameters(), lr=0.1, l1=1e-3)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    _run(a, opt_a, batches[2:])
    _run(b, opt_b, batches[2:])
    assert _same_params(a, b)


# ----------------------------------------------------------------------------- exact zeros


def _mlp_zeros(model):
    return sum(int((m.weight == 0).sum()) for m in (model.fc1, model.fc2, model.fc3))


@pytest.mark.parametrize("make", [
    lambda p: ProximalSGD(p, lr=0.1, l1=0.05, momentum=0.9),
    lambda p: FISTA(p, lr=0.1, l1=0.05),
    lambda p: ProximalAdam(p, lr=1e-2, l1=0.05),
])
def test_proximal_optimizers_make_exact_zeros_where_the_subgradient_makes_none(mlp, batches, make):
    prox, sub = copy.deepcopy(mlp), copy.deepcopy(mlp)
    opt = make(prox.parameters())
    _run(prox, opt, batches, 5)
    if isinstance(opt, FISTA):
        opt.load_iterate()
    penalty = sn.L1(sub, strength=0.05)
    opt = torch.optim.SGD(sub.parameters(), lr=0.1, momentum=0.9)
    for x, y in batches * 5:
        opt.zero_grad()
        (nn.functional.cross_entropy(sub(x), y) + penalty()).backward()
        opt.step()
    assert _mlp_zeros(prox) > 0.3 * sum(m.weight.numel() for m in (prox.fc1, prox.fc2, prox.fc3))
    assert _mlp_zeros(sub) == 0


@pytest.mark.parametrize("cls,kw", [(ProximalSGD, dict(lr=0.1, momentum=0.9, l1=0.3)), (FISTA, dict(lr=0.1, l1=0.15)),
                                    (ProximalAdam, dict(lr=1e-2, l1=0.02))])
def test_group_option_zeroes_whole_filters(mlp, batches, cls, kw):
    weights = [m.weight for m in (mlp.fc1, mlp.fc2)]
    others = [p for p in mlp.parameters() if all(p is not w for w in weights)]
    opt = cls([{"params": weights, "groups": "neuron"}, {"params": others, "l1": 0.0}], **kw)
    _run(mlp, opt, batches, 5)
    if isinstance(opt, FISTA):
        opt.load_iterate()
    dead = 0
    for w in weights:
        assert Channel("out").obeys(w != 0)
        dead += int((w == 0).all(1).sum())
    assert 0 < dead < 64
    assert (mlp.fc3.weight != 0).all()  # l1 = 0 there


# ----------------------------------------------------------------------------- masks


@pytest.mark.parametrize("make", [
    lambda p: ProximalSGD(p, lr=0.1, l1=1e-3, momentum=0.9),
    lambda p: FISTA(p, lr=0.1, l1=1e-3),
    lambda p: ProximalAdam(p, lr=1e-2, l1=1e-3),
    lambda p: FISTA(p, lr=0.1, l1=1e-3, groups="block2x4"),
])
def test_masked_weights_stay_zero_under_a_sparsifier(mlp, make):
    # gradual magnitude pruning: masks change during training, optimizer state is reset there
    sched = sn.Polynomial(begin_step=0, end_step=12, frequency=3)
    sp = sn.Sparsifier(mlp, sparsity=0.7, method="magnitude", schedule=sched)
    opt = sp.wrap(make([m.weight for m in (mlp.fc1, mlp.fc2, mlp.fc3)]))
    for x, y in make_batches(n=20):
        opt.zero_grad()
        nn.functional.cross_entropy(mlp(x), y).backward()
        opt.step()
        sp.step()
        for _, p, mask in sn.iter_masks(mlp):
            assert (p[~mask] == 0).all()
            state = opt.state[p]
            if "iterate" in state:
                assert (state["iterate"][~mask] == 0).all()
    if isinstance(opt, FISTA):
        opt.load_iterate()
    assert sn.sparsity(mlp) >= 0.7


def test_masks_from_zeros_then_training_keeps_the_zeros(mlp, batches):
    opt = ProximalSGD(mlp.parameters(), lr=0.1, l1=0.05)
    _run(mlp, opt, batches, 5)
    zeros = _mlp_zeros(mlp)
    masks = sn.masks_from_zeros(mlp)
    assert sum(int((~m).sum()) for m in masks.values()) == zeros
    sp = sn.attach_sparsifier(mlp)
    opt = sp.wrap(torch.optim.SGD(mlp.parameters(), lr=0.1, momentum=0.9))
    _run(mlp, opt, batches)
    for _, p, mask in sn.iter_masks(mlp):
        assert (p[~mask] == 0).all()


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("cls,kwargs,match", [
    (ProximalSGD, dict(lr=-0.1), "lr"),
    (ProximalSGD, dict(lr=0.1, l1=-1e-4), "l1"),
    (ProximalSGD, dict(lr=0.1, l1=float("nan")), "l1"),
    (ProximalSGD, dict(lr=0.1, momentum=-0.9), "momentum"),
    (ProximalSGD, dict(lr=0.1, nesterov=True), "nesterov"),
    (ProximalSGD, dict(lr=0.1, weight_decay=-1.0), "weight_decay"),
    (FISTA, dict(lr=0.1, l1=-1.0), "l1"),
    (FISTA, dict(lr=0.1, l1=0.1, groups="block3x3"), "block3x3 groups do not tile"),
    (FISTA, dict(lr=0.1, l1=0.1, groups="2:4"), "valid groups"),
    (ProximalAdam, dict(lr=1e-3, l1=-1e-4), "l1"),
    (ProximalAdam, dict(betas=(0.9, 1.0)), r"betas\[1\]"),
    (ProximalAdam, dict(eps=0.0), "eps"),
])
def test_bad_arguments(mlp, cls, kwargs, match):
    before = copy.deepcopy(mlp.state_dict())
    with pytest.raises(ValueError, match=match):
        cls(mlp.parameters(), **kwargs)
    assert all(torch.equal(before[k], v) for k, v in mlp.state_dict().items())


def test_a_bad_param_group_leaves_the_optimizer_unchanged(mlp):
    opt = ProximalSGD([mlp.fc1.weight], lr=0.1, l1=1e-3)
    with pytest.raises(ValueError, match="block3x3 groups do not tile"):
        opt.add_param_group({"params": [mlp.fc2.weight], "groups": "block3x3"})
    with pytest.raises(ValueError, match="l1"):
        opt.add_param_group({"params": [mlp.fc2.weight], "l1": -1.0})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": [mlp.fc2.weight], "groups": "block4x4"})
    assert opt.param_groups[1]["groups"] == "block4x4" and opt.param_groups[1]["l1"] == 1e-3


def test_top_level_exports():
    assert sn.ProximalSGD is ProximalSGD and sn.FISTA is FISTA and sn.ProximalAdam is ProximalAdam
    assert sn.soft_threshold is soft_threshold and sn.group_soft_threshold is group_soft_threshold
