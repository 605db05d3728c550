"""Penalties: hand values, their defining properties (Huber = Moreau envelope of |w|,
log-sum-exp within log(2)/beta of |w|), parameter selection, masks from exact zeros."""

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import sparsenn as sn
from conftest import TinyMLP
from sparsenn.create.regularize.proximal import soft_threshold
from sparsenn.create.regularize.penalties import L1, GroupLasso, HuberL1, LogSumExpL1, Penalty

ws = st.lists(st.floats(-5, 5, allow_nan=False), min_size=1, max_size=20)


def _conv_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(4, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 2 * 2, 8))


# ----------------------------------------------------------------------------- values


def test_l1_hand_value_and_subgradient():
    a = torch.tensor([1.0, -2.0, 0.0], requires_grad=True)
    b = torch.tensor([[0.5, -0.5]], requires_grad=True)
    pen = L1([a, b], strength=0.5)
    value = pen()
    assert value.item() == pytest.approx(0.5 * 4.0)
    value.backward()
    assert torch.equal(a.grad, torch.tensor([0.5, -0.5, 0.0]))
    assert torch.equal(b.grad, torch.tensor([[0.5, -0.5]]))


def test_group_lasso_matches_norms_written_out():
    model = _conv_model()
    w = model[0].weight.detach()  # (6, 4, 3, 3)
    cases = {
        "filter": sum(w[i].norm() for i in range(6)),
        "channel_in": sum(w[:, j].norm() for j in range(4)),
        "block3x9": sum(w.reshape(6, 36)[r:r + 3, c:c + 9].norm() for r in (0, 3) for c in range(0, 36, 9)),
    }
    for groups, expected in cases.items():
        pen = GroupLasso(model, strength=0.1, groups=groups, include="0")
        assert pen().item() == pytest.approx(0.1 * expected.item(), rel=1e-6)


def test_group_lasso_gradient_is_finite_at_a_zero_group():
    w = torch.zeros(3, 4)
    w[0] = 1.0
    w.requires_grad_(True)
    GroupLasso([w], strength=1.0, groups="row")().backward()
    assert torch.isfinite(w.grad).all()
    torch.testing.assert_close(w.grad[0], torch.full((4,), 0.5))  # w_g / ||w_g||


@settings(max_examples=50, deadline=None)
@given(values=ws, delta=st.floats(1e-3, 3))
def test_huber_is_the_moreau_envelope_of_abs(values, delta):
    # huber_delta(w) = min_z |z| + (z - w)^2 / (2 delta), attained at z = soft_threshold(w, delta)
    w = torch.tensor(values, dtype=torch.float64)
    z = soft_threshold(w, delta)
    envelope = (z.abs() + (z - w) ** 2 / (2 * delta)).sum()
    assert HuberL1([w], strength=1.0, delta=delta)().item() == pytest.approx(envelope.item(), rel=1e-9, abs=1e-12)
    assert (w.abs() - delta / 2).sum() - 1e-9 <= envelope <= w.abs().sum() + 1e-9


def test_huber_hand_values_and_gradient():
    w = torch.tensor([0.0, 0.05, -0.2, 1.0], requires_grad=True)
    pen = HuberL1([w], strength=2.0, delta=0.1)
    value = pen()
    assert value.item() == pytest.approx(2.0 * (0 + 0.05 ** 2 / 0.2 + (0.2 - 0.05) + (1.0 - 0.05)))
    value.backward()
    torch.testing.assert_close(w.grad, 2.0 * torch.tensor([0.0, 0.5, -1.0, 1.0]))


@settings(max_examples=50, deadline=None)
@given(values=ws, beta=st.floats(0.1, 1e4))
def test_log_sum_exp_is_within_log2_over_beta_of_abs(values, beta):
    w = torch.tensor(values, dtype=torch.float64)
    value = LogSumExpL1([w], strength=1.0, beta=beta)().item()
    l1 = w.abs().sum().item()
    assert l1 - 1e-9 <= value <= l1 + len(values) * math.log(2) / beta + 1e-9


def test_log_sum_exp_hand_values_gradient_and_no_overflow():
    beta = 4.0
    w = torch.tensor([0.0, 0.5, -1.0], requires_grad=True)
    pen = LogSumExpL1([w], strength=1.0, beta=beta)
    expected = sum(math.log(math.exp(beta * x) + math.exp(-beta * x)) / beta for x in (0.0, 0.5, -1.0))
    value = pen()
    assert value.item() == pytest.approx(expected, rel=1e-6)
    value.backward()
    torch.testing.assert_close(w.grad, torch.tanh(beta * w.detach()))
    huge = LogSumExpL1([torch.tensor([10.0, -10.0])], strength=1.0, beta=1e6)()
    assert huge.item() == pytest.approx(20.0)


# ----------------------------------------------------------------------------- selection


def test_default_selection_is_the_weights_of_linear_and_conv_layers():
    model = _conv_model()
    assert L1(model, strength=1e-4).names == ["0.weight", "3.weight"]
    assert L1(model, strength=1e-4, include="3").names == ["3.weight"]
    assert L1(model, strength=1e-4, include="*.bias").names == ["0.bias", "3.bias"]
    assert L1(model, strength=1e-4, exclude="0").names == ["3.weight"]
    mlp = TinyMLP()
    expected = 1e-4 * sum(m.weight.abs().sum() for m in (mlp.fc1, mlp.fc2, mlp.fc3))
    assert L1(mlp, strength=1e-4)().item() == pytest.approx(expected.item())


def test_penalty_base_class_and_repr():
    assert issubclass(HuberL1, Penalty)
    assert "groups='channel'" in repr(GroupLasso(TinyMLP(), 0.1, groups="neuron"))
    with pytest.raises(NotImplementedError):
        Penalty([torch.ones(1)], 1.0)()


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("make,match", [
    (lambda m: L1(m, strength=-1e-4), "strength"),
    (lambda m: L1(m, strength=float("nan")), "strength"),
    (lambda m: L1(m, strength=True), "strength"),
    (lambda m: GroupLasso(m, strength=1e-4, groups="block5x5"), "block5x5 groups do not tile 'fc1.weight'"),
    (lambda m: GroupLasso(m, strength=1e-4, groups="2:4"), "valid groups"),
    (lambda m: HuberL1(m, strength=1e-4, delta=0.0), "delta"),
    (lambda m: HuberL1(m, strength=1e-4, delta=-1.0), "delta"),
    (lambda m: LogSumExpL1(m, strength=1e-4, beta=0.0), "beta"),
    (lambda m: LogSumExpL1(m, strength=1e-4, beta=float("inf")), "beta"),
    (lambda m: L1(m, strength=1e-4, include="fc9"), "fc9"),
    (lambda m: L1(list(m.parameters()), strength=1e-4, include="fc1"), "include/exclude"),
    (lambda m: L1([], strength=1e-4), "non-empty"),
])
def test_bad_arguments(make, match):
    model = TinyMLP()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=match):
        make(model)
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_source_must_be_a_model_or_tensors():
    with pytest.raises(TypeError, match="nn.Module or an iterable of tensors"):
        L1(3.0, strength=1.0)


# ----------------------------------------------------------------------------- masks from zeros


def test_masks_from_zeros_makes_zeros_visible_to_report_and_sparsity():
    model = TinyMLP()
    with torch.no_grad():
        model.fc1.weight[:, :8] = 0
        model.fc2.weight[0] = 0
    assert sn.get_masks(model) == {}
    masks = sn.masks_from_zeros(model)
    assert list(masks) == ["fc1.weight", "fc2.weight", "fc3.weight"]
    assert torch.equal(masks["fc1.weight"], model.fc1.weight != 0)
    zeros = 32 * 8 + 32
    total = sum(m.weight.numel() for m in (model.fc1, model.fc2, model.fc3))
    assert sn.sparsity(model) == pytest.approx(zeros / total)
    rows = {r["name"]: r for r in sn.report(model).to_records()}
    assert rows["fc1.weight"]["sparsity"] == pytest.approx(0.5)
    assert sn.masks_from_zeros(model, include="fc2").keys() == {"fc2.weight"}  # idempotent on masked weights


def test_masks_from_zeros_bad_selector_leaves_the_model_unchanged():
    model = TinyMLP()
    with pytest.raises(ValueError, match="nope"):
        sn.masks_from_zeros(model, include=["fc1", "nope"])
    assert sn.get_masks(model) == {}


def test_slimming_penalty_is_reused_not_duplicated():
    from sparsenn import structured
    from sparsenn.create.regularize import penalties

    assert penalties.SlimmingPenalty is structured.SlimmingPenalty is sn.SlimmingPenalty
