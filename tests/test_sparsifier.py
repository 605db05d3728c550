"""The Sparsifier: selection, lifecycle, deepcopy/state_dict/compile/finalize, bad input."""

import copy

import pytest
import torch
from torch import nn

import sparsenn as sn
from sparsenn.core.registry import UnknownNameError
from conftest import TinyMLP


def test_one_shot_magnitude_exact(mlp):
    sp = sn.Sparsifier(mlp, sparsity=0.9)
    assert sn.sparsity(mlp) == pytest.approx(0.9, abs=1e-3)
    for name, p, mask in sn.iter_masks(mlp):
        k = round(0.1 * p.numel())
        assert mask.sum() == k
        assert (p[~mask] == 0).all()
        # magnitude keeps the largest |w| of the weights it saw
    assert sp.names == ["fc1.weight", "fc2.weight", "fc3.weight"]


def test_magnitude_keeps_largest(mlp):
    w = mlp.fc1.weight.detach().clone()
    sn.Sparsifier(mlp, sparsity=0.75, include=["fc1.weight"])
    kept = mlp.fc1.weight_mask
    assert w.abs()[kept].min() >= w.abs()[~kept].max()


def test_registries_enumerate():
    assert {"magnitude", "random", "snip", "grasp", "taylor", "obd", "movement"} <= set(sn.list_methods())
    assert set(sn.list_distributions()) >= {"uniform", "global", "erk", "er"}
    assert "N:M" in sn.list_patterns()


class Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.kernel_weight = nn.Parameter(torch.randn(8, 8))
        self.scale = nn.Parameter(torch.ones(8))

    def forward(self, x):
        return x @ self.kernel_weight * self.scale


class Zoo(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.c1 = nn.Conv1d(8, 8, 3, padding=1)
        self.c2 = nn.Conv2d(1, 8, 3, padding=1)
        self.c3 = nn.Conv3d(1, 4, 2)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.custom = Custom()
        self.head = nn.Linear(8, 3)

    def forward(self, tokens):
        h = self.emb(tokens)  # (B, L, 8)
        h = self.c1(h.transpose(1, 2)).transpose(1, 2)
        h, _ = self.attn(h, h, h)
        h = self.custom(h)
        return self.head(h.mean(1))


def test_selection_by_type_name_and_list():
    z = Zoo()
    default = sn.Sparsifier(copy.deepcopy(z), sparsity=0.5).names
    assert default == ["c1.weight", "c2.weight", "c3.weight", "attn.in_proj_weight", "attn.out_proj.weight",
                       "head.weight"]
    everything = sn.Sparsifier(copy.deepcopy(z), sparsity=0.5,
                               include=[nn.Embedding, nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d,
                                        nn.MultiheadAttention, Custom]).names
    assert "emb.weight" in everything and "custom.kernel_weight" in everything
    assert "custom.scale" not in everything
    assert sn.Sparsifier(copy.deepcopy(z), sparsity=0.5, include="c?").names == ["c1.weight", "c2.weight",
                                                                                    "c3.weight"]
    assert sn.Sparsifier(copy.deepcopy(z), sparsity=0.5, include=["emb.weight", "attn"]).names == [
        "emb.weight", "attn.in_proj_weight", "attn.out_proj.weight"]
    assert sn.Sparsifier(copy.deepcopy(z), sparsity=0.5, exclude=["c1", "head.weight"]).names == [
        "c2.weight", "c3.weight", "attn.in_proj_weight", "attn.out_proj.weight"]


def test_masked_zoo_forward_backward_and_zeros():
    torch.manual_seed(0)
    z = Zoo()
    sp = sn.Sparsifier(z, sparsity=0.7, include=[nn.Embedding, nn.Linear, nn.Conv1d, nn.MultiheadAttention, Custom])
    opt = sp.wrap(torch.optim.Adam(z.parameters(), lr=1e-2))
    tokens = torch.randint(0, 20, (4, 6))
    for _ in range(3):
        opt.zero_grad()
        z(tokens).sum().backward()
        opt.step()
        sp.step()
    for name, p, mask in sn.iter_masks(z):
        assert (p[~mask] == 0).all(), name
    assert sn.sparsity(z) == pytest.approx(0.7, abs=0.01)


def test_state_dict_round_trip_and_deepcopy(mlp, batches):
    sn.Sparsifier(mlp, sparsity=0.8)
    sd = mlp.state_dict()
    assert "fc1.weight_mask" in sd and sd["fc1.weight_mask"].dtype == torch.bool
    fresh = TinyMLP()
    sn.Sparsifier(fresh, sparsity=0.3, method="random")  # a masked model of the same structure
    fresh.load_state_dict(sd)
    x = batches[0][0]
    assert torch.equal(fresh(x), mlp(x))
    assert all(torch.equal(a, b) for a, b in zip(sn.get_masks(fresh).values(), sn.get_masks(mlp).values()))
    twin = copy.deepcopy(mlp)
    assert torch.equal(twin(x), mlp(x))
    twin.fc1.weight_mask[:] = True  # independent buffers
    assert not mlp.fc1.weight_mask.all()


def test_torch_compile_of_masked_model(mlp, batches):
    sp = sn.Sparsifier(mlp, sparsity=0.8)
    opt = sp.wrap(torch.optim.SGD(mlp.parameters(), lr=0.1, momentum=0.9))
    compiled = torch.compile(mlp, backend="eager")
    x, y = batches[0]
    assert torch.allclose(compiled(x), mlp(x))
    for x, y in batches:
        opt.zero_grad()
        nn.functional.cross_entropy(compiled(x), y).backward()
        for _, p, mask in sn.iter_masks(mlp):
            assert (p.grad[~mask] == 0).all()
        opt.step()
        sp.step()
    for _, p, mask in sn.iter_masks(mlp):
        assert (p[~mask] == 0).all()


def test_finalize_leaves_plain_parameters(mlp, batches):
    sp = sn.Sparsifier(mlp, sparsity=0.8)
    x = batches[0][0]
    out = mlp(x)
    model = sp.finalize()
    assert model is mlp
    assert not any(k.endswith("_mask") for k in mlp.state_dict())
    assert set(mlp.state_dict()) == set(TinyMLP().state_dict())
    assert torch.equal(mlp(x), out)
    assert sn.sparsity(mlp) == pytest.approx(0.8, abs=1e-3)
    mlp(x).sum().backward()
    assert (mlp.fc1.weight.grad != 0).any()  # no hooks left
    with pytest.raises(RuntimeError, match="finalized"):
        sp.step()


def test_gradual_cubic_schedule(mlp, batches):
    sched = sn.Polynomial(begin_step=0, end_step=10, frequency=2)
    sp = sn.Sparsifier(mlp, sparsity=0.9, schedule=sched)
    opt = sp.wrap(torch.optim.SGD(mlp.parameters(), lr=0.01))
    seen = {}
    for t in range(1, 13):
        x, y = batches[t % len(batches)]
        opt.zero_grad()
        nn.functional.cross_entropy(mlp(x), y).backward()
        opt.step()
        if sp.step():
            seen[t] = sn.sparsity(mlp)
    assert sorted(seen) == [2, 4, 6, 8, 10]
    for t, s in seen.items():
        expected = 0.9 * (1 - (1 - t / 10) ** 3)
        assert s == pytest.approx(expected, abs=2e-3)
    assert sn.sparsity(mlp) == pytest.approx(0.9, abs=1e-3)


def test_pruned_weights_stay_pruned_as_sparsity_grows(mlp):
    sp = sn.Sparsifier(mlp, sparsity=0.9, method="random", schedule=sn.Iterative(rounds=3, begin_step=0, end_step=2))
    m0 = {k: v.clone() for k, v in sp.masks.items()}
    sp.step(); sp.step()
    for k, v in sp.masks.items():
        assert not (v & ~m0[k]).any()  # nothing revived


def test_nm_default_sparsity_and_2_4(mlp):
    sp = sn.Sparsifier(mlp, pattern="2:4")
    assert sp.target == 0.5
    for _, p, mask in sn.iter_masks(mlp):
        assert sn.NM(2, 4).obeys(mask) and mask.sum() * 2 == mask.numel()


@pytest.mark.parametrize("kwargs, error, match", [
    ({"sparsity": 1.0}, ValueError, r"sparsity must be a number in \[0, 1\), got 1.0"),
    ({"sparsity": -0.1}, ValueError, r"\[0, 1\)"),
    ({"sparsity": float("nan")}, ValueError, r"\[0, 1\)"),
    ({"sparsity": 0.5, "method": "magnitud"}, UnknownNameError, "valid methods: .*magnitude.*snip"),
    ({"sparsity": 0.5, "pattern": "diag"}, UnknownNameError, "valid patterns"),
    ({"sparsity": 0.5, "distribution": "erk2"}, UnknownNameError, "valid distributions: .*erk"),
    ({"sparsity": 0.5, "pattern": "4:4"}, ValueError, "0 < N < M"),
    ({"sparsity": 0.3, "pattern": "2:4"}, ValueError, "sparsity must be >= 0.5"),
    ({"sparsity": 0.5, "include": ["fc9.weight"]}, ValueError, "'fc9.weight' matches no parameter"),
    ({"sparsity": 0.5, "exclude": ["nope"]}, ValueError, "'nope' matches no parameter"),
    ({"sparsity": 0.5, "overrides": {"fc7.weight": 0.2}}, ValueError, "fc7.weight"),
    ({"sparsity": 0.5, "method": "snip"}, ValueError, "data"),
    ({"sparsity": 0.5, "update_every": 10}, ValueError, "method 'magnitude' does not take 'update_every'"),
    ({"sparsity": 0.5, "include": ["fc1"], "pattern": "block3x3"}, ValueError, r"'fc1.weight' with shape \(32, 16\)"),
])
def test_bad_input_raises_and_leaves_model_unchanged(mlp, kwargs, error, match):
    before = copy.deepcopy(mlp.state_dict())
    with pytest.raises(error, match=match):
        sn.Sparsifier(mlp, **kwargs)
    after = mlp.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_nm_on_indivisible_layer_names_it():
    model = nn.Sequential(nn.Linear(10, 8), nn.Linear(8, 4))
    with pytest.raises(ValueError, match=r"'0.weight' with shape \(8, 10\).*not divisible by 4"):
        sn.Sparsifier(model, pattern="2:4")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_weights_when_scoring(mlp, bad):
    with torch.no_grad():
        mlp.fc2.weight[3, 3] = bad
    before = copy.deepcopy(mlp.state_dict())
    with pytest.raises(ValueError, match="'fc2.weight' contains NaN or Inf"):
        sn.Sparsifier(mlp, sparsity=0.5)
    assert set(mlp.state_dict()) == set(before)
    sp = None
    with torch.no_grad():
        mlp.fc2.weight[3, 3] = 0.0
    sp = sn.Sparsifier(mlp, sparsity=0.5, schedule=sn.Iterative(rounds=2, begin_step=0, end_step=1))
    masks = {k: v.clone() for k, v in sp.masks.items()}
    with torch.no_grad():
        mlp.fc1.weight[0, 0] = bad
    with pytest.raises(ValueError, match="'fc1.weight' contains NaN or Inf"):
        sp.step()
    assert all(torch.equal(masks[k], v) for k, v in sp.masks.items())  # masks unchanged


def test_data_dependent_method_with_data(mlp, batches):
    sp = sn.Sparsifier(mlp, sparsity=0.9, method="snip", data=batches)
    assert sn.sparsity(mlp) == pytest.approx(0.9, abs=1e-3)
    assert sp.method.name == "snip"


def test_global_distribution_ranks_across_layers(mlp):
    with torch.no_grad():
        mlp.fc3.weight.abs_().add_(1.0)  # every fc3 weight beats every other layer's
    sn.Sparsifier(mlp, sparsity=0.9, distribution="global")
    assert mlp.fc3.weight_mask.all()
    assert sn.sparsity(mlp) == pytest.approx(0.9, abs=1e-3)


def test_overrides_keep_global_target(mlp):
    sn.Sparsifier(mlp, sparsity=0.8, overrides={"fc3.weight": 0.0})
    assert mlp.fc3.weight_mask.all()
    assert sn.sparsity(mlp) == pytest.approx(0.8, abs=1e-3)


def test_snip_mask_is_global_topk_of_grad_times_weight(mlp, batches):
    """Lee et al. 2019: keep the k connections with the largest |g * w| on the given batch."""
    x, y = batches[0]
    ref = copy.deepcopy(mlp)
    nn.functional.cross_entropy(ref(x), y).backward()
    names = ["fc1.weight", "fc2.weight", "fc3.weight"]
    params = dict(ref.named_parameters())
    saliency = torch.cat([(params[n].grad * params[n]).abs().flatten() for n in names])
    k = round(0.05 * saliency.numel())
    keep = torch.zeros_like(saliency, dtype=torch.bool)
    keep[torch.sort(saliency, descending=True, stable=True).indices[:k]] = True
    sp = sn.Sparsifier(mlp, sparsity=0.95, method="snip", distribution="global", data=[(x, y)])
    got = torch.cat([sp.masks[n].flatten() for n in names])
    assert torch.equal(got, keep)


def test_seed_is_independent_of_torch_manual_seed():
    """``torch.manual_seed(s)`` then ``Sparsifier(seed=s)``: the random mask must not be the one the
    weight init's uniform draws would give (unsalted, it kept exactly the largest initial weights)."""
    torch.manual_seed(0)
    model = nn.Linear(400, 300)  # kaiming-uniform: w = bound * (2u - 1), u the global uniform stream
    w = model.weight.detach().clone()
    sp = sn.Sparsifier(model, 0.5, method="random", seed=0, include=["weight"])
    kept = sp.masks["weight"]
    assert w[kept].mean().abs() < 0.1 * w.abs().mean()  # kept weights: no sign or size bias
    largest = w >= w.flatten().kthvalue(w.numel() // 2 + 1).values
    assert (kept & largest).sum() < 0.6 * kept.sum()  # about half, not all, of the kept are the largest


def test_seed_must_be_an_int():
    with pytest.raises(TypeError, match="seed must be an int"):
        sn.Sparsifier(nn.Linear(4, 4), 0.5, seed="0")


def _model_state(model):
    """Everything a failed constructor must leave alone: tensors, buffers, module and tensor hooks."""
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "buffers": [n for n, _ in model.named_buffers()],
        "module_hooks": [(n, dict(m._forward_pre_hooks), dict(m._forward_hooks), dict(m._load_state_dict_post_hooks),
                          dict(m._load_state_dict_pre_hooks), dict(m.__dict__.get("_sparsenn_patterns", {})))
                         for n, m in model.named_modules()],
        "param_hooks": [(n, dict(getattr(p, "_post_accumulate_grad_hooks", None) or {}),
                         dict(getattr(p, "_backward_hooks", None) or {})) for n, p in model.named_parameters()],
    }


def _same(a, b):
    assert a["buffers"] == b["buffers"] and a["module_hooks"] == b["module_hooks"]
    assert a["param_hooks"] == b["param_hooks"]
    assert list(a["state"]) == list(b["state"])
    assert all(torch.equal(a["state"][k], b["state"][k]) for k in a["state"])


@pytest.mark.parametrize("case", ["frozen", "integer"])
def test_unmaskable_parameters_are_refused_before_the_model_is_touched(case):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    if case == "frozen":
        model[2].weight.requires_grad_(False)
        error, match = ValueError, r"2\.weight do not require grad \(frozen\).*exclude"
    else:
        model[2].weight = nn.Parameter(torch.randint(-3, 3, (3, 5)), requires_grad=False)
        error, match = TypeError, r"only floating-point parameters can be masked, not 2\.weight \(torch\.int64\)"
    before = _model_state(model)
    with pytest.raises(error, match=match):
        sn.Sparsifier(model, sparsity=0.5)
    _same(before, _model_state(model))
    sp = sn.Sparsifier(model, sparsity=0.5, exclude=["2"])  # the way out the message names
    assert sp.names == ["0.weight"]


@pytest.mark.parametrize("field,value", [("sparsity", float("nan")), ("step_count", -3), ("history", "abc"),
                                          ("generator", torch.zeros(3))])
def test_load_state_dict_checks_everything_before_changing_anything(mlp, field, value):
    sp = sn.Sparsifier(mlp, sparsity=0.5)
    before = sp.state_dict()
    bad = {**sp.state_dict(), field: value}
    with pytest.raises(sn.CheckpointError, match=field):
        sp.load_state_dict(bad)
    after = sp.state_dict()
    assert after["step_count"] == before["step_count"] and after["sparsity"] == before["sparsity"]
    assert torch.equal(after["generator"], before["generator"]) and after["history"] == before["history"]
