"""Pruning criteria against independent references (sparsenn.create.criteria)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsenn.core.methods import METHODS, ScoreContext, make_method
from sparsenn.create.criteria import GraSP, Movement, preserved_model_state

DATA_SCORES = ["snip", "grasp", "taylor", "obd", "movement"]
ALL_SCORES = ["magnitude", "random", *DATA_SCORES]


def ctx_for(model, data=None, loss_fn=None, num_batches=1, generator=None):
    params = dict(model.named_parameters())
    masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in params.items()}
    return ScoreContext(model, params, masks, data, loss_fn, num_batches, generator)


def batches(n, d_in=4, classes=3, size=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, d_in, generator=g), torch.randint(classes, (size,), generator=g)) for _ in range(n)]


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))


def test_registered():
    for name in ALL_SCORES:
        assert name in METHODS
        assert make_method(name).name == name
    assert make_method("grasp", temperature=200).config() == {"temperature": 200.0}


def test_magnitude_hand_written():
    model = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.5, -2.0], [0.0, -0.25]]))
    s = make_method("magnitude").score(ctx_for(model))
    assert s["weight"].dtype == torch.float32
    assert torch.equal(s["weight"], torch.tensor([[1.5, 2.0], [0.0, 0.25]]))


def test_random_reproducible_per_seed():
    model = mlp()
    score = make_method("random").score
    a = score(ctx_for(model, generator=torch.Generator().manual_seed(1)))
    b = score(ctx_for(model, generator=torch.Generator().manual_seed(1)))
    c = score(ctx_for(model, generator=torch.Generator().manual_seed(2)))
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not torch.equal(a["0.weight"], c["0.weight"])
    assert all(a[n].shape == p.shape for n, p in model.named_parameters())
    d, e = score(ctx_for(model)), score(ctx_for(model))  # no generator: default seed
    assert all(torch.equal(d[n], e[n]) for n in d)


def test_snip_matches_backward_over_two_batches():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    data = batches(2)
    ref = copy.deepcopy(model)
    for x, y in data:
        F.cross_entropy(ref(x), y).backward()
    s = make_method("snip").score(ctx_for(model, data, num_batches=2))
    for (n, p), r in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(s[n], (r.grad * p).abs().detach())


def _functional_model(d_in=3, hidden=4, classes=2):
    """A tiny MLP whose only parameter is one flat vector, so the Hessian is a matrix."""
    sizes = [hidden * d_in, hidden, classes * hidden, classes]

    def f(theta, x):
        w1, b1, w2, b2 = torch.split(theta, sizes)
        h = torch.tanh(x @ w1.view(hidden, d_in).T + b1)
        return h @ w2.view(classes, hidden).T + b2

    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            g = torch.Generator().manual_seed(3)
            self.theta = nn.Parameter(torch.randn(sum(sizes), generator=g, dtype=torch.float64))

        def forward(self, x):
            return f(self.theta, x)

    return Flat(), f


def test_grasp_hg_equals_exact_hessian_product():
    model, f = _functional_model()
    g = torch.Generator().manual_seed(4)
    data = [(torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randint(2, (6,), generator=g)) for _ in range(2)]

    def total_loss(theta):
        return sum(F.cross_entropy(f(theta, x), y) for x, y in data)

    theta = model.theta.detach().clone()
    hess = torch.autograd.functional.hessian(total_loss, theta)
    grad = torch.autograd.functional.jacobian(total_loss, theta)
    hg = hess @ grad
    s = GraSP().score(ctx_for(model, data, num_batches=2))["theta"]
    # Sign convention: keep-importance = w * Hg = -(the paper's S).
    torch.testing.assert_close(s, (theta * hg).float(), rtol=1e-5, atol=1e-7)
    assert (s != 0).any()


def test_grasp_temperature_validated():
    for bad in (0, -1.0, float("nan"), "2"):
        with pytest.raises(ValueError, match="temperature"):
            GraSP(temperature=bad)


def _linear_mse():
    model = nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.25, -0.5]]))
        model.bias.copy_(torch.tensor([0.1, -0.2]))
    x = torch.tensor([[1.0, 2.0, -1.0], [0.5, -1.0, 3.0], [2.0, 0.0, 1.0], [-1.0, 1.0, 0.5]])
    y = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, 1.0], [0.5, 0.5]])
    # Hand gradient of mean((xW^T + b - y)^2) over N*O elements.
    r = x @ model.weight.detach().T + model.bias.detach() - y
    gw = 2.0 / r.numel() * r.T @ x
    gb = 2.0 / r.numel() * r.sum(0)
    return model, [(x, y)], {"weight": gw, "bias": gb}


def test_taylor_and_obd_hand_computed():
    model, data, g = _linear_mse()
    ctx = ctx_for(model, data, loss_fn=F.mse_loss)
    taylor = make_method("taylor").score(ctx)
    obd = make_method("obd").score(ctx)
    for n, p in model.named_parameters():
        w = p.detach()
        torch.testing.assert_close(taylor[n], (g[n] * w) ** 2)
        torch.testing.assert_close(obd[n], 0.5 * g[n] ** 2 * w**2)


def test_movement_accumulates_and_round_trips():
    model = nn.Linear(3, 2)
    ctx = ctx_for(model)
    m = Movement()
    w1 = model.weight.detach().clone()
    g1 = torch.randn(2, 3)
    model.weight.grad, model.bias.grad = g1, None
    m.observe(ctx)
    with torch.no_grad():
        model.weight.add_(0.3)
    w2 = model.weight.detach().clone()
    g2 = torch.randn(2, 3)
    model.weight.grad = g2
    m.observe(ctx)
    s = m.score(ctx)
    torch.testing.assert_close(s["weight"], -(w1 * g1 + w2 * g2))
    assert torch.equal(s["bias"], torch.zeros(2))  # no gradient was ever seen

    restored = Movement()
    restored.load_state_dict(m.state_dict())
    assert set(m.state_dict()) == {"weight", "bias"}
    for meth in (m, restored):
        meth.observe(ctx)
    a, b = m.score(ctx), restored.score(ctx)
    assert all(torch.equal(a[n], b[n]) for n in a)
    with pytest.raises(ValueError, match="'k'"):
        Movement().load_state_dict({"k": 1.0})


def test_movement_one_shot_without_observe():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    data = batches(1)
    ref = copy.deepcopy(model)
    F.cross_entropy(ref(data[0][0]), data[0][1]).backward()
    s = Movement().score(ctx_for(model, data))
    for (n, p), r in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(s[n], -(p * r.grad).detach())


@pytest.mark.parametrize("name", DATA_SCORES)
def test_data_score_without_data(name):
    with pytest.raises(ValueError, match="data"):
        make_method(name).score(ctx_for(mlp()))


@pytest.mark.parametrize("name", ALL_SCORES)
def test_nan_weight_names_parameter(name):
    model = mlp()
    with torch.no_grad():
        model[2].weight[0, 1] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"'2\.weight'.*NaN or Inf"):
        make_method(name).score(ctx_for(model, batches(1)))
    after = model.state_dict()
    assert all(torch.equal(before[k].nan_to_num(), after[k].nan_to_num()) for k in before)


def test_nan_loss_names_parameter():
    def nan_loss(out, y):
        return (out * float("nan")).sum()

    with pytest.raises(ValueError, match=r"'0\.weight'.*NaN or Inf"):
        make_method("snip").score(ctx_for(mlp(), batches(1), loss_fn=nan_loss))


@pytest.mark.parametrize("name", ALL_SCORES)
@pytest.mark.parametrize("training", [True, False])
def test_scoring_leaves_model_unchanged(name, training):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
    model.train(training)
    model[1].eval()  # mixed modes must come back per module
    model[1].running_mean.add_(0.5)
    model[0].bias.requires_grad_(False)
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    grads = {n: p.grad for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modes = {n: m.training for n, m in model.named_modules()}
    state = copy.deepcopy(model.state_dict())
    model[1].train()  # BatchNorm now updates running stats in the forward pass
    modes["1"] = True

    scores = make_method(name).score(ctx_for(model, batches(2), num_batches=2))

    assert set(scores) == {n for n, _ in model.named_parameters()}
    assert all(s.dtype == torch.float32 and torch.isfinite(s).all() for s in scores.values())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    for n, p in model.named_parameters():
        assert p.grad is grads[n] and torch.equal(p.grad, torch.full_like(p, 7.0))
        assert p.requires_grad == flags[n]
    assert {n: m.training for n, m in model.named_modules()} == modes


def test_preserved_model_state_restores_on_error():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(RuntimeError):
        with preserved_model_state(model, [model[0].weight]):
            model(torch.randn(4, 2))
            model.eval()
            raise RuntimeError("boom")
    assert model.training
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_scores_under_no_grad_and_masked_zeros():
    model = mlp()
    with torch.no_grad():
        model[0].weight[:, 0] = 0.0
        for name in ["snip", "grasp", "taylor", "obd"]:
            s = make_method(name).score(ctx_for(model, batches(1)))
            assert torch.equal(s["0.weight"][:, 0], torch.zeros(6))
            assert s["0.weight"].abs().sum() > 0
