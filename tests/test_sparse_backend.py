"""``Sparsifier(backend="sparse")``: the same training as the masked-dense path, with sparse layers.

Reference: the masked-dense path (``backend="dense"``) on the same model, masks, data and
seed; losses, weights and masks must match to float tolerance over hundreds of steps, for
the optimizers of the masked-optimizer tests, static masks, SET, RigL and gradual pruning.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

import sparsenn as sn
from sparsenn.backend.training import SparseTrainingLinear
from sparsenn.backend.training.swap import SparseLinearBackend
from sparsenn.train import layer_swap

OPTIMIZERS = {
    "sgd_momentum_wd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-2),
    "nesterov": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "adam_amsgrad": lambda p: torch.optim.Adam(p, lr=1e-3, amsgrad=True, weight_decay=1e-3),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.1),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-3, momentum=0.5, centered=True, weight_decay=1e-3),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=1e-2, initial_accumulator_value=0.1, weight_decay=1e-3),
}


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 5))


def batches(steps: int, batch: int = 16, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(5, 20, generator=g)
    for _ in range(steps):
        y = torch.randint(0, 5, (batch,), generator=g)
        yield centers[y] + 0.5 * torch.randn(batch, 20, generator=g), y


def train_steps(model, opt, sp, data, loss_fn=F.cross_entropy) -> list[float]:
    """The user's loop: zero_grad, forward, loss, backward, step, sp.step(); the loss of every step."""
    losses = []
    for x, y in data:
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        sp.step()
        losses.append(loss.item())
    return losses


def run(backend: str, opt_name: str = "sgd_momentum_wd", steps: int = 300, swap: str = "always", **kw):
    model = mlp()
    sp = sn.Sparsifier(model, backend=backend, swap=swap, seed=3, **kw)
    opt = sp.wrap(OPTIMIZERS[opt_name](model.parameters()))
    losses, kinds = [], set()
    for x, y in batches(steps):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        sp.step()
        losses.append(loss.item())
        kinds.add(type(model[2]).__name__)
    masks = {k: v.clone() for k, v in sp.masks.items()}
    sp.finalize()
    return torch.tensor(losses), model, masks, kinds


def assert_same_training(a, b, atol=2e-5):
    la, ma, ka, _ = a
    lb, mb, kb, _ = b
    assert torch.allclose(la, lb, atol=atol, rtol=1e-4), (la - lb).abs().max()
    assert ka.keys() == kb.keys() and all(torch.equal(ka[n], kb[n]) for n in ka)
    for (name, pa), (_, pb) in zip(ma.named_parameters(), mb.named_parameters()):
        assert torch.allclose(pa, pb, atol=atol, rtol=1e-4), name
    for n, mask in ka.items():  # exact zeros where masked, in the finalized sparse-backend model
        assert (mb.get_parameter(n)[~mask] == 0).all()


@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
def test_static_masks_match_masked_dense(opt_name):
    dense, sparse = run("dense", opt_name, sparsity=0.9), run("sparse", opt_name, sparsity=0.9)
    assert sparse[3] == {"SparseTrainingLinear"}
    assert_same_training(dense, sparse)


@pytest.mark.parametrize("opt_name", ["nesterov", "adamw"])
@pytest.mark.parametrize("method", ["rigl", "set"])
def test_dynamic_sparse_training_matches_masked_dense(method, opt_name):
    kw = dict(sparsity=0.9, method=method, distribution="erk", update_every=25, total_steps=300)
    dense, sparse = run("dense", opt_name, **kw), run("sparse", opt_name, **kw)
    assert_same_training(dense, sparse)
    # RigL trains one step masked-dense before each update (its dense gradient); SET never needs it
    assert sparse[3] == ({"SparseTrainingLinear", "Linear"} if method == "rigl" else {"SparseTrainingLinear"})
    masks0 = run("dense", opt_name, steps=1, **kw)[2]
    assert any(not torch.equal(masks0[n], sparse[2][n]) for n in masks0)  # the masks did move


def test_gradual_pruning_matches_masked_dense():
    kw = dict(sparsity=0.9, schedule=sn.Polynomial(begin_step=0, end_step=200, frequency=20))
    dense, sparse = run("dense", "nesterov", **kw), run("sparse", "nesterov", **kw)
    assert_same_training(dense, sparse)


def test_rigl_trains_sparse_between_updates_and_dense_on_the_gradient_step():
    model = mlp()
    sp = sn.Sparsifier(model, sparsity=0.9, method="rigl", update_every=10, total_steps=100, backend="sparse",
                       swap="always")
    opt = sp.wrap(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))
    seen = []
    for x, y in batches(25):
        seen.append(type(model[0]).__name__)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        sp.step()
    # step k (1-based) uses the dense gradient when k is an update step: 10 and 20
    dense_steps = [i + 1 for i, kind in enumerate(seen) if kind == "Linear"]
    assert dense_steps == [10, 20]


def test_optimizer_built_before_the_sparsifier_moves_to_the_values():
    torch.manual_seed(0)
    ref, model = mlp(), mlp()
    opts = []
    for m, backend in ((ref, "dense"), (model, "sparse")):
        opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
        for x, y in batches(3, seed=5):  # momentum exists before the sparsifier comes
            opt.zero_grad()
            F.cross_entropy(m(x), y).backward()
            opt.step()
        sp = sn.Sparsifier(m, sparsity=0.8, backend=backend, swap="always")
        opts.append((m, sp, sp.wrap(opt)))
    values = {id(p) for p in opts[1][2].param_groups[0]["params"]}
    assert id(model[0].values) in values and id(model[0].bias) in values
    assert opts[1][2].state[model[0].values]["momentum_buffer"].shape == model[0].values.shape
    losses = []
    for m, sp, opt in opts:
        losses.append(torch.tensor(train_steps(m, opt, sp, batches(50))))
        sp.finalize()
    assert torch.allclose(losses[0], losses[1], atol=2e-5)


def test_adagrad_state_scatters_back_with_its_initial_value():
    model = mlp()
    sp = sn.Sparsifier(model, sparsity=0.9, backend="sparse", swap="always")
    opt = sp.wrap(torch.optim.Adagrad(model.parameters(), lr=0.01, initial_accumulator_value=0.25))
    x, y = next(batches(1))
    F.cross_entropy(model(x), y).backward()
    opt.step()
    with sp.densified():
        state = opt.state[model[0].weight]["sum"]
        assert state.shape == model[0].weight.shape
        assert (state[~sp.masks["0.weight"]] == 0.25).all()


def test_finalize_gives_back_the_same_modules_and_parameters():
    model = mlp()
    first, weight = model[0], model[0].weight
    sp = sn.Sparsifier(model, sparsity=0.9, backend="sparse", swap="always")
    assert isinstance(model[0], SparseTrainingLinear) and model[0].bias is first.bias
    opt = sp.wrap(torch.optim.SGD(model.parameters(), lr=0.1))
    train_steps(model, opt, sp, batches(5))
    values = model[0].dense_weight()
    out = sp.finalize()
    assert out is model and model[0] is first and model[0].weight is weight
    assert torch.equal(model[0].weight.detach(), values)
    assert not any(n.endswith("_mask") for n, _ in model.named_buffers())


def test_outputs_and_weight_view_match_the_masked_model():
    model = mlp()
    sp = sn.Sparsifier(model, sparsity=0.9, backend="sparse", swap="always")
    x = torch.randn(7, 20)
    got = model(x)
    with sp.densified():
        want = model(x)
        dense_w = model[2].weight.detach().clone()
    assert torch.allclose(got, want, atol=1e-5)
    w = model[2].weight  # the differentiable dense view
    assert torch.equal(w.detach(), dense_w)
    w.pow(2).sum().backward()
    assert torch.allclose(model[2].values.grad, 2 * model[2].values.detach())


@pytest.mark.parametrize("save_backend,load_backend", [("sparse", "dense"), ("dense", "sparse"), ("sparse", "sparse")])
def test_checkpoints_load_with_either_backend_and_resume_exactly(tmp_path, save_backend, load_backend):
    kw = dict(sparsity=0.9, method="rigl", update_every=20, total_steps=200, seed=3)

    data = list(batches(60))
    ref = mlp()
    sp = sn.Sparsifier(ref, backend="dense", **kw)
    opt = sp.wrap(torch.optim.AdamW(ref.parameters(), lr=1e-3))
    want = train_steps(ref, opt, sp, data)

    model = mlp()
    sp = sn.Sparsifier(model, backend=save_backend, swap="always", **kw)
    opt = sp.wrap(torch.optim.AdamW(model.parameters(), lr=1e-3))
    first = train_steps(model, opt, sp, data[:30])
    path = sn.save(tmp_path / "ck.safetensors", model, sp, optimizer=opt)

    resumed = mlp(seed=9)
    sp2 = sn.Sparsifier(resumed, backend=load_backend, swap="always", **kw)
    opt2 = sp2.wrap(torch.optim.AdamW(resumed.parameters(), lr=1e-3))
    sn.load(path, resumed, sp2, optimizer=opt2)
    if load_backend == "sparse":
        assert isinstance(resumed[0], SparseTrainingLinear)
    second = train_steps(resumed, opt2, sp2, data[30:])
    assert torch.allclose(torch.tensor(first + second), torch.tensor(want), atol=2e-5, rtol=1e-4)
    sp2.finalize()
    sp.finalize()


def test_a_bad_checkpoint_leaves_the_sparse_layers_as_they_were(tmp_path):
    model = mlp()
    sp = sn.Sparsifier(model, sparsity=0.9, backend="sparse", swap="always")
    other = nn.Sequential(nn.Linear(3, 3))
    sn.save(tmp_path / "other.safetensors", other)
    before = model[0].dense_weight()
    with pytest.raises(sn.CheckpointError):
        sn.load(tmp_path / "other.safetensors", model, sp)
    assert isinstance(model[0], SparseTrainingLinear) and torch.equal(model[0].dense_weight(), before)


class FakeBackend(SparseLinearBackend):
    """Measures what it is told: layer name -> (dense s, sparse s)."""

    def __init__(self, times):
        self.times, self.calls = times, []

    def measure(self, module, mask, x, *, needs_input_grad, budget=0.05):
        self.calls.append((module.out_features, tuple(x.shape), needs_input_grad))
        d, s = self.times[module.out_features]
        return {"dense": d, "sparse": s}


def test_measured_swap_takes_only_the_faster_layers(monkeypatch):
    fake = FakeBackend({64: (2.0, 1.0), 5: (1.0, 3.0)})
    monkeypatch.setitem(sn.train.backends.TRAINING_BACKENDS._items, "sparse", fake)
    model = mlp()
    sp = sn.Sparsifier(model, sparsity=0.9, backend="sparse")  # swap="measured"
    opt = sp.wrap(torch.optim.SGD(model.parameters(), lr=0.1))
    assert all(isinstance(m, nn.Linear) for m in model if not isinstance(m, nn.ReLU))
    assert all("not measured yet" in r["reason"] for r in sp.backend_report())
    batch = next(batches(1))
    train_steps(model, opt, sp, [batch])
    assert [type(m).__name__ for m in model] == ["SparseTrainingLinear", "ReLU", "SparseTrainingLinear", "ReLU",
                                                 "Linear"]
    # the first layer's input needs no gradient; the others' do; each timed on the recorded batch
    assert fake.calls == [(64, (16, 20), False), (64, (16, 64), True), (5, (16, 64), True)]
    report = {r["name"]: r for r in sp.backend_report()}
    assert report["4.weight"]["swapped"] is False and "not faster" in report["4.weight"]["reason"]
    assert report["0.weight"]["dense_ms"] == 2000.0 and report["0.weight"]["batch"] == 16
    train_steps(model, opt, sp, [batch] * 3)  # decisions stand while the number of active weights does not change
    assert len(fake.calls) == 3


def test_gradual_pruning_measures_again_when_the_density_changes(monkeypatch):
    fake = FakeBackend({64: (2.0, 1.0), 5: (2.0, 1.0)})
    monkeypatch.setitem(sn.train.backends.TRAINING_BACKENDS._items, "sparse", fake)
    model = mlp()
    sp = sn.Sparsifier(model, sparsity=0.9, backend="sparse",
                       schedule=sn.Polynomial(begin_step=0, end_step=4, frequency=2))
    opt = sp.wrap(torch.optim.SGD(model.parameters(), lr=0.1))
    train_steps(model, opt, sp, batches(6))
    # at step 1 the masks are still all True (sparsity 0 at step 0): nothing to time; then after the
    # updates at steps 2 and 4, each changing every layer's number of active weights
    assert len(fake.calls) == 2 * 3
    assert all(r["swapped"] for r in sp.backend_report())


def test_layers_that_cannot_train_sparse_stay_masked_dense_and_say_why():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(8, 8)
            self.b = self.a
            self.conv = nn.Conv2d(1, 4, 3)
            self.hooked = nn.Linear(8, 8)
            self.hooked.register_forward_hook(lambda m, i, o: None)

    model = Tied()
    sp = sn.Sparsifier(model, sparsity=0.5, backend="sparse", swap="always")
    report = {r["name"]: r for r in sp.backend_report()}
    assert "more than one name" in report["a.weight"]["reason"]
    assert "Conv2d" in report["conv.weight"]["reason"]
    assert "hooks" in report["hooked.weight"]["reason"]
    assert not any(r["swapped"] for r in report.values())


def test_bad_choices_name_the_valid_ones():
    with pytest.raises(ValueError, match="valid backends: 'dense', 'sparse'"):
        sn.Sparsifier(mlp(), sparsity=0.5, backend="fast")
    with pytest.raises(ValueError, match="'measured', 'always'"):
        sn.Sparsifier(mlp(), sparsity=0.5, backend="sparse", swap="sometimes")
    with pytest.raises(ValueError, match="movement.*backend='dense'"):
        sn.Sparsifier(mlp(), sparsity=0.5, method="movement", backend="sparse")


def test_an_optimizer_with_state_that_is_not_per_element_is_refused_unchanged():
    model = mlp()
    weight = model[0].weight
    sp = sn.Sparsifier(model, sparsity=0.9, backend="sparse", swap="always")
    opt = torch.optim.SGD([weight], lr=0.1)  # the dense weight, now set aside
    opt.state[weight]["rows"] = torch.zeros(64)
    before = list(opt.param_groups[0]["params"])
    with pytest.raises(ValueError, match="'rows' of shape \\(64,\\).*per-element"):
        sp.wrap(opt)
    assert opt.param_groups[0]["params"] == before and not sp._optimizers


def test_replace_in_optimizer_moves_state_by_identity():
    old = nn.Parameter(torch.arange(6.0).reshape(2, 3))
    new = nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([old], lr=0.1, momentum=0.9)
    opt.state[old] = {"momentum_buffer": torch.arange(6.0).reshape(2, 3), "step": torch.tensor(4.0)}
    layer_swap.replace_in_optimizer(opt, old, new, lambda t, fill: t.reshape(-1)[[1, 5]], (2, 3))
    assert opt.param_groups[0]["params"][0] is new and old not in opt.state
    assert torch.equal(opt.state[new]["momentum_buffer"], torch.tensor([1.0, 5.0]))
    assert opt.state[new]["step"] == 4.0


def test_real_measurement_times_both_ways():
    lin = nn.Linear(256, 256)
    mask = torch.rand(256, 256) < 0.05
    t = SparseLinearBackend().measure(copy.deepcopy(lin), mask, torch.randn(32, 256), needs_input_grad=True,
                                      budget=0.005)
    assert set(t) == {"dense", "sparse"} and all(v > 0 for v in t.values())


@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.integers(1, 24), min_size=2, max_size=4), sparsity=st.sampled_from([0.0, 0.5, 0.9, 0.99]),
       batch=st.integers(1, 9), opt_name=st.sampled_from(sorted(OPTIMIZERS)), seed=st.integers(0, 2**16))
def test_any_shape_trains_the_same_as_masked_dense(sizes, sparsity, batch, opt_name, seed):
    def make():
        torch.manual_seed(seed)
        layers = []
        for a, b in zip(sizes, sizes[1:]):
            layers += [nn.Linear(a, b), nn.Tanh()]
        return nn.Sequential(*layers)

    g = torch.Generator().manual_seed(seed)
    data = [(torch.randn(batch, sizes[0], generator=g), torch.randn(batch, sizes[-1], generator=g)) for _ in range(4)]
    out = {}
    for backend in ("dense", "sparse"):
        model = make()
        sp = sn.Sparsifier(model, sparsity=sparsity, method="random", seed=seed, backend=backend, swap="always")
        opt = sp.wrap(OPTIMIZERS[opt_name](model.parameters()))
        losses = train_steps(model, opt, sp, data, loss_fn=F.mse_loss)
        if backend == "sparse":
            assert all(isinstance(m, SparseTrainingLinear) for m in model[::2])
        masks = sp.masks
        sp.finalize()
        out[backend] = (losses, [p.detach() for p in model.parameters()], masks)
    assert torch.allclose(torch.tensor(out["dense"][0]), torch.tensor(out["sparse"][0]), atol=1e-5, rtol=1e-4)
    for a, b in zip(out["dense"][1], out["sparse"][1]):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
    for name, mask in out["sparse"][2].items():
        assert torch.equal(mask, out["dense"][2][name])
