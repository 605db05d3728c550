"""Activation penalties: hand values, the KL's defining property (zero iff rho_hat = rho),
hook lifecycle, the sparse autoencoder, and activation sparsity measured by sparsenn.core.metrics."""

import copy
import math

import pytest
import torch
from torch import nn

import sparsenn as sn
from sparsenn.create.regularize.activations import ActivationKL, ActivationL1
from sparsenn.data.datasets import load_digits_tensors
from sparsenn.core.metrics import activation_sparsity
from sparsenn.models.zoo import SparseAutoencoder, make_model


def _relu_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))


def _hooks(model):
    return sum(len(m._forward_hooks) for m in model.modules())


# ----------------------------------------------------------------------------- values


def test_activation_l1_is_the_mean_per_sample_l1_norm():
    model = _relu_mlp()
    x = torch.randn(5, 8)
    pen = ActivationL1(model, ["1", "3"], strength=0.1)
    model(x)
    h1 = torch.relu(model[0](x))
    h2 = torch.relu(model[2](h1))
    expected = 0.1 * (h1.abs().sum() + h2.abs().sum()) / 5
    torch.testing.assert_close(pen(), expected)


def test_activation_kl_hand_value():
    model = nn.Sequential(nn.Identity())
    a = torch.tensor([[0.2, 0.5], [0.4, 0.1]])  # rho_hat = [0.3, 0.3]
    pen = ActivationKL(model, "0", rho=0.1, strength=2.0)
    model(a.requires_grad_(True))
    per_unit = 0.1 * math.log(0.1 / 0.3) + 0.9 * math.log(0.9 / 0.7)
    assert pen().item() == pytest.approx(2.0 * 2 * per_unit, rel=1e-6)


def test_activation_kl_is_zero_exactly_at_rho_and_pulls_rho_hat_towards_it():
    model = nn.Sequential(nn.Identity())
    pen = ActivationKL(model, "0", rho=0.2)
    model(torch.tensor([[0.1, 0.4], [0.3, 0.0]]).requires_grad_(True))  # rho_hat = [0.2, 0.2]
    assert pen().item() == pytest.approx(0.0, abs=1e-7)
    a = torch.tensor([[0.5, 0.05], [0.7, 0.15]], requires_grad=True)  # rho_hat = [0.6, 0.1]
    model(a)
    value = pen()
    value.backward()
    assert value.item() > 0
    assert (a.grad[:, 0] > 0).all() and (a.grad[:, 1] < 0).all()  # descent lowers unit 0, raises unit 1


# ----------------------------------------------------------------------------- hooks


def test_recording_lifecycle():
    model = _relu_mlp()
    x = torch.randn(4, 8)
    pen = ActivationL1(model, nn.ReLU, strength=1.0)
    assert [n for n, _ in pen.modules] == ["1", "3"] and _hooks(model) == 2
    with torch.no_grad():
        model(x)  # evaluation: nothing recorded
    with pytest.raises(RuntimeError, match="recorded no activation"):
        pen()
    model(x)
    once = pen()
    model(x)
    model(x)
    torch.testing.assert_close(pen(), 2 * once)  # two passes before one call are summed
    model(x)
    pen.clear()
    with pytest.raises(RuntimeError, match="recorded no activation"):
        pen()
    pen.remove()
    assert _hooks(model) == 0
    with pytest.raises(RuntimeError, match="removed"):
        pen()


def test_context_manager_detaches_hooks_and_modules_by_object():
    model = _relu_mlp()
    with ActivationL1(model, model[3], strength=1.0) as pen:
        assert [n for n, _ in pen.modules] == ["3"] and _hooks(model) == 1
    assert _hooks(model) == 0


# ----------------------------------------------------------------------------- training


def test_activation_l1_raises_the_exact_zero_fraction_of_relus():
    torch.manual_seed(0)
    x = torch.randn(256, 8)
    y = (x[:, 0] > 0).long()

    def train(strength):
        model = _relu_mlp()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        with ActivationL1(model, nn.ReLU, strength=strength) as pen:
            for _ in range(150):
                loss = nn.functional.cross_entropy(model(x), y) + pen()
                opt.zero_grad()
                loss.backward()
                opt.step()
        return activation_sparsity(model, x)

    plain, sparse = train(0.0), train(0.05)
    assert sparse["1"] > plain["1"] + 0.2 and sparse["3"] > plain["3"] + 0.2


def test_sparse_autoencoder_with_kl_reaches_the_target_mean_activation():
    x = load_digits_tensors()[0].tensors[0]

    def train(strength):
        torch.manual_seed(0)
        model = SparseAutoencoder(64, 32)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        with ActivationKL(model, "hidden", rho=0.05, strength=strength) as kl:
            for _ in range(150):
                batch = x[torch.randint(0, len(x), (128,))]
                loss = nn.functional.mse_loss(model(batch), batch) + kl()
                opt.zero_grad()
                loss.backward()
                opt.step()
        with torch.no_grad():
            return model.encode(x).mean().item()

    assert train(0.0) > 0.2
    assert train(0.1) == pytest.approx(0.05, abs=0.01)


def test_sparse_autoencoder_model():
    model = make_model("sparse_autoencoder", in_features=64, hidden_features=10)
    assert isinstance(model, SparseAutoencoder) and isinstance(model.hidden, nn.Sigmoid)
    x = torch.rand(3, 1, 8, 8)
    assert model(x).shape == (3, 64) and model.encode(x).shape == (3, 10)
    assert ((model.encode(x) > 0) & (model.encode(x) < 1)).all()
    assert sum(p.numel() for p in SparseAutoencoder().parameters()) == 784 * 196 * 2 + 196 + 784
    with pytest.raises(ValueError, match="64 input features"):
        model(torch.rand(2, 65))
    with pytest.raises(ValueError, match="hidden_features"):
        SparseAutoencoder(hidden_features=0)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("make,match", [
    (lambda m: ActivationL1(m, "1", strength=-1.0), "strength"),
    (lambda m: ActivationKL(m, "1", rho=0.0), "rho"),
    (lambda m: ActivationKL(m, "1", rho=1.0), "rho"),
    (lambda m: ActivationKL(m, "1", rho=float("nan")), "rho"),
    (lambda m: ActivationKL(m, "1", rho=0.05, strength=float("inf")), "strength"),
    (lambda m: ActivationL1(m, ["1", "relu9"], strength=1.0), "relu9.*modules: 0, 1, 2, 3, 4"),
    (lambda m: ActivationL1(m, nn.Sigmoid, strength=1.0), "Sigmoid"),
    (lambda m: ActivationL1(m, [], strength=1.0), "no modules"),
])
def test_bad_arguments_attach_no_hooks(make, match):
    model = _relu_mlp()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=match):
        make(model)
    assert _hooks(model) == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_kl_needs_activations_in_the_unit_interval():
    model = _relu_mlp()
    pen = ActivationKL(model, "0", rho=0.05)  # a Linear's output is not in [0, 1]
    model(torch.randn(4, 8))
    with pytest.raises(ValueError, match=r"activations in \[0, 1\].*'0'"):
        pen()


def test_top_level_exports():
    assert sn.ActivationL1 is ActivationL1 and sn.ActivationKL is ActivationKL
