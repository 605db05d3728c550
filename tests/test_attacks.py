"""FGSM and PGD against their definitions: the closed form on a linear model, the eps ball and the
valid range (hypothesis), the loss they reach, random starts, modes restored, no parameter gradients."""

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from sparsenn.core.registry import UnknownNameError
from sparsenn.robust import FGSM, PGD, fgsm, list_attacks, make_attack, pgd


def _linear():
    """Two classes, ``W[1] = -W[0]``: for x = 0.5 and y = 0 the input gradient of the cross-entropy is
    ``(1 - p0) (W[1] - W[0]) = (1 - p0) [-2, 4, -6, 2]`` (p0 = sigmoid(1) > 0), by hand."""
    model = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, -2.0, 3.0, -1.0], [-1.0, 2.0, -3.0, 1.0]]))
    return model


def _mlp():
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


@functools.cache
def _trained_state(seed=0):
    """Trained once per session (tiny ops are slow on a busy machine): weights, inputs, labels."""
    torch.manual_seed(seed)
    model = _mlp()
    x = torch.rand(64, 16)
    y = x[:, :4].argmax(1)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(60):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, x, y


def _trained_mlp(seed=0):
    """A fresh copy of the trained MLP (no .grad) with its batch."""
    state, x, y = _trained_state(seed)
    model = _mlp()
    model.load_state_dict(state)
    return model, x.clone(), y.clone()


def _loss(model, x, y):
    with torch.no_grad():
        return F.cross_entropy(model(x), y).item()


# ----------------------------------------------------------------------------- closed forms


def test_fgsm_equals_its_closed_form_on_a_linear_model():
    model, x, y = _linear(), torch.full((1, 4), 0.5), torch.tensor([0])
    out = fgsm(model, x, y, eps=0.1)
    assert torch.allclose(out, torch.tensor([[0.4, 0.6, 0.4, 0.6]]), atol=1e-7)  # x + eps sign([-2, 4, -6, 2])
    # the valid range clips: from x = [0.05, 0.98, 0.5, 0.5] the step leaves [0, 1] in the first two coordinates
    out = fgsm(model, torch.tensor([[0.05, 0.98, 0.5, 0.5]]), y, eps=0.1)
    assert torch.allclose(out, torch.tensor([[0.0, 1.0, 0.4, 0.6]]), atol=1e-7)
    assert torch.allclose(fgsm(model, x, y, eps=0.1, clamp=None), torch.tensor([[0.4, 0.6, 0.4, 0.6]]), atol=1e-7)


def test_fast_gradient_method_l2_equals_its_closed_form():
    model, x, y = _linear(), torch.full((1, 4), 0.5), torch.tensor([0])
    out = fgsm(model, x, y, eps=0.3, norm="l2")
    expected = 0.5 + 0.3 * torch.tensor([[-2.0, 4.0, -6.0, 2.0]]) / math.sqrt(60.0)
    assert torch.allclose(out, expected, atol=1e-6)


def test_targeted_fgsm_descends_toward_the_target():
    model, x = _linear(), torch.full((1, 4), 0.5)
    # target 1: the loss of class 1 falls along -grad = -(p0 [2, -4, 6, -2]), sign [-1, 1, -1, 1]
    out = fgsm(model, x, torch.tensor([1]), eps=0.1, targeted=True)
    assert torch.allclose(out, torch.tensor([[0.4, 0.6, 0.4, 0.6]]), atol=1e-7)
    assert _loss(model, out, torch.tensor([1])) < _loss(model, x, torch.tensor([1]))


def test_one_pgd_step_of_size_eps_from_x_is_fgsm():
    model, x, y = _trained_mlp()
    for norm in ("linf", "l2"):
        a = pgd(model, x, y, eps=0.2, norm=norm, steps=1, step_size=0.2, random_start=False)
        assert torch.equal(a, fgsm(model, x, y, eps=0.2, norm=norm))


# ----------------------------------------------------------------------------- invariants


@settings(max_examples=25, deadline=None)
@given(eps=st.floats(0.0, 1.0), steps=st.integers(1, 6), norm=st.sampled_from(["linf", "l2"]),
       random_start=st.booleans(), step_scale=st.sampled_from([None, 0.5, 3.0]), seed=st.integers(0, 2**16))
def test_pgd_never_leaves_the_eps_ball_or_the_valid_range(eps, steps, norm, random_start, step_scale, seed):
    torch.manual_seed(seed % 7)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 3))
    x = torch.rand(5, 1, 3, 4, generator=torch.Generator().manual_seed(seed))
    x[0] = 0.0  # corners of the range: the ball sticks out of [0, 1]
    x[1] = 1.0
    y = torch.randint(0, 3, (5,), generator=torch.Generator().manual_seed(seed + 1))
    step_size = None if step_scale is None or eps < 1e-9 else step_scale * eps  # (a subnormal eps: no step)
    out = pgd(model, x, y, eps=eps, norm=norm, steps=steps, step_size=step_size, random_start=random_start,
              generator=torch.Generator().manual_seed(seed))
    d = (out - x).flatten(1)
    size = d.abs().amax(1) if norm == "linf" else d.norm(dim=1)
    assert (size <= eps * (1 + 1e-5) + 1e-6).all()
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert out.shape == x.shape and out.dtype == x.dtype and not out.requires_grad


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 0.5)])
def test_pgd_loss_is_at_least_the_clean_and_the_fgsm_loss(norm, eps):
    model, x, y = _trained_mlp()
    clean = _loss(model, x, y)
    one_step = _loss(model, fgsm(model, x, y, eps=eps, norm=norm), y)
    from_x = _loss(model, pgd(model, x, y, eps=eps, norm=norm, random_start=False), y)
    assert clean < one_step <= from_x
    started = _loss(model, pgd(model, x, y, eps=eps, norm=norm, generator=torch.Generator().manual_seed(0)), y)
    assert started > clean


def test_random_start_differs_from_none_and_is_deterministic_given_a_generator():
    model, x, y = _trained_mlp()
    plain = pgd(model, x, y, eps=0.1, steps=2, random_start=False)
    a = pgd(model, x, y, eps=0.1, steps=2, generator=torch.Generator().manual_seed(3))
    b = pgd(model, x, y, eps=0.1, steps=2, generator=torch.Generator().manual_seed(3))
    c = pgd(model, x, y, eps=0.1, steps=2, generator=torch.Generator().manual_seed(4))
    assert not torch.equal(a, plain) and torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(plain, pgd(model, x, y, eps=0.1, steps=2, random_start=False))  # no start: no randomness


def test_eps_zero_returns_the_input():
    model, x, y = _trained_mlp()
    assert torch.equal(pgd(model, x, y, eps=0.0), x) and torch.equal(fgsm(model, x, y, eps=0), x)


# ----------------------------------------------------------------------------- the model is left alone


class _Recorder(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 3)
        self.drop = nn.Dropout(0.5)
        self.bn = nn.BatchNorm1d(3)
        self.seen = []

    def forward(self, x):
        self.seen.append((self.training, self.drop.training, self.bn.training))
        return self.bn(self.drop(self.fc(x)))


def test_attack_runs_in_eval_mode_and_restores_every_modules_own_mode():
    model = _Recorder()
    model.train()
    model.bn.eval()  # a mixed state (frozen BatchNorm) must come back as it was
    stats = model.bn.running_mean.clone()
    x, y = torch.rand(4, 6), torch.tensor([0, 1, 2, 0])
    pgd(model, x, y, eps=0.1, steps=3)
    assert model.seen == [(False, False, False)] * 3
    assert model.training and model.drop.training and not model.bn.training
    assert torch.equal(model.bn.running_mean, stats)  # eval: BatchNorm statistics untouched


def test_no_gradient_is_left_on_the_parameters_and_existing_ones_are_kept():
    model, x, y = _trained_mlp()
    pgd(model, x, y, eps=0.1, steps=2)
    assert all(p.grad is None for p in model.parameters())
    F.cross_entropy(model(x), y).backward()
    before = [p.grad.clone() for p in model.parameters()]
    fgsm(model, x, y, eps=0.1)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), before))


def test_attack_works_under_no_grad():
    model, x, y = _trained_mlp()
    with torch.no_grad():
        out = pgd(model, x, y, eps=0.1, steps=2, random_start=False)
    assert _loss(model, out, y) > _loss(model, x, y)


# ----------------------------------------------------------------------------- configurations and errors


def test_attack_objects_run_the_functions_and_round_trip_through_dicts():
    model, x, y = _trained_mlp()
    attack = PGD(eps=0.1, steps=3, random_start=False)
    assert torch.equal(attack(model, x, y), pgd(model, x, y, eps=0.1, steps=3, random_start=False))
    assert make_attack(attack.to_dict()) == attack
    rs = make_attack("fgsm", eps=0.1, random_start=True)
    assert isinstance(rs, FGSM) and rs.label == "FGSM-RS (linf)" and attack.label == "PGD-3 (linf)"
    assert attack.with_eps(0.3).eps == 0.3 and sorted(list_attacks()) == ["fgsm", "pgd"]


@pytest.mark.parametrize("kwargs,match", [
    ({"norm": "l3"}, "norm must be one of linf, l2; got 'l3'"),
    ({"eps": -0.1}, "eps must be"),
    ({"steps": 0}, "steps must be an int >= 1, got 0"),
    ({"step_size": 0.0}, "step_size must be"),
    ({"clamp": (1.0, 0.0)}, "low < high"),
    ({"random_start": 1}, "random_start and targeted must be True or False"),
])
def test_bad_arguments_raise_naming_the_value(kwargs, match):
    model, x, y = _trained_mlp()
    with pytest.raises((ValueError, TypeError), match=match):
        pgd(model, x, y, **{"eps": 0.1, **kwargs})


def test_inputs_outside_the_valid_range_are_refused():
    model, x, y = _trained_mlp()
    with pytest.raises(ValueError, match=r"outside clamp=\(0.0, 1.0\).*clamp=None"):
        pgd(model, x * 3 - 1, y, eps=0.1)
    pgd(model, x * 3 - 1, y, eps=0.1, steps=1, clamp=None)


def test_unknown_attack_names_list_the_valid_ones():
    with pytest.raises(UnknownNameError, match="valid attacks: fgsm, pgd"):
        make_attack("cw")
    with pytest.raises(ValueError, match="does not take 'steps'"):
        make_attack("fgsm", steps=3)
