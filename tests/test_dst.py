"""Dynamic sparse training (static, SET, RigL): defining properties on a tiny MLP."""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import sparsenn as sn
from conftest import TinyMLP, make_batches

TARGET = {"unstructured": 0.8, "per_row": 0.75, "2:4": 0.5, "3:4": 0.25, "block4x4": 0.75}


def _setup(method="rigl", pattern="unstructured", seed=0, lr=0.05, **kw):
    torch.manual_seed(0)
    model = TinyMLP()
    kw = {"update_every": 1, "total_steps": 40, **kw}
    sp = sn.Sparsifier(model, sparsity=TARGET[pattern], method=method, pattern=pattern, seed=seed, **kw)
    opt = sp.wrap(torch.optim.Adam(model.parameters(), lr=lr))
    return model, sp, opt


def _backward(model, batch):
    x, y = batch
    F.cross_entropy(model(x), y).backward()


def _train(model, sp, opt, steps, batches, accumulate=1):
    updated = []
    for i in range(steps):
        opt.zero_grad()
        for j in range(accumulate):
            _backward(model, batches[(i * accumulate + j) % len(batches)])
        opt.step()
        if sp.step():
            updated.append(sp.step_count)
    return updated


def _masks(sp):
    return {n: m.clone() for n, m in sp.masks.items()}


@pytest.mark.parametrize("pattern", sorted(TARGET))
@pytest.mark.parametrize("method", ["set", "rigl"])
def test_active_counts_constant_and_pattern_kept(method, pattern):
    model, sp, opt = _setup(method, pattern, drop_schedule="constant")
    batches = make_batches(n=4)
    counts = {n: int(m.sum()) for n, m in sp.masks.items()}
    first = _masks(sp)
    for _ in range(8):
        _train(model, sp, opt, 1, batches)
        for name, p, mask in sn.iter_masks(model):
            assert int(mask.sum()) == counts[name], name
            assert sp.pattern.obeys(mask) and (p[~mask] == 0).all()
            if ":" in pattern:  # every group keeps exactly its N (3:4: at most one swap per group)
                assert (mask.reshape(-1, 4).sum(1) == int(pattern[0])).all()
    assert any(not torch.equal(first[n], m) for n, m in sp.masks.items())  # masks did move
    h = sp.method.history[-1]["layers"]["fc2.weight"]
    assert h["dropped"] == h["grown"] > 0 and h["active"] == counts["fc2.weight"]
    assert h["mask_change"] == pytest.approx((h["dropped"] + h["grown"]) / 32 / 32)


@pytest.mark.parametrize("method", ["set", "rigl"])
def test_regrown_weights_zero_and_adam_state_reset(method):
    model, sp, opt = _setup(method, drop_schedule="constant")
    batches = make_batches(n=4)
    _train(model, sp, opt, 3, batches)
    before = _masks(sp)
    _train(model, sp, opt, 1, batches)
    for name, p, mask in sn.iter_masks(model):
        grown, dropped = mask & ~before[name], before[name] & ~mask
        assert grown.any() and dropped.any()
        state = opt.state[p]
        for where in (grown, dropped):
            assert (p[where] == 0).all()
            assert (state["exp_avg"][where] == 0).all() and (state["exp_avg_sq"][where] == 0).all()
        assert (state["exp_avg_sq"][mask & before[name]] != 0).any()  # survivors keep their state


@pytest.mark.parametrize("accumulate", [1, 2])
def test_rigl_grows_top_dense_gradient_and_drops_smallest(accumulate):
    model, sp, opt = _setup("rigl", drop_fraction=0.3, drop_schedule="constant")
    batches = make_batches(n=4)
    _train(model, sp, opt, 2, batches)
    old = _masks(sp)
    twin = copy.deepcopy(model)  # a deep copy has masks but no hooks: a plain dense backward
    opt.zero_grad()
    for j in range(accumulate):
        _backward(twin, batches[j])
        _backward(model, batches[j])
    opt.step()
    weights = {n: p.detach().clone() for n, p, _ in sn.iter_masks(model)}
    assert sp.step()
    grads = dict(twin.named_parameters())
    for name, mask in sp.masks.items():
        active = int(old[name].sum())
        k = round(0.3 * active)
        idx = old[name].reshape(-1).nonzero().squeeze(1)
        order = idx[torch.sort(weights[name].abs().reshape(-1)[idx], stable=True).indices]
        dropped = (old[name] & ~mask).reshape(-1).nonzero().squeeze(1)
        assert sorted(dropped.tolist()) == sorted(order[:k].tolist()), name
        g = grads[name].grad.abs().masked_fill(old[name], -1).reshape(-1)
        top = torch.sort(g, descending=True, stable=True).indices[:k]
        grown = (mask & ~old[name]).reshape(-1).nonzero().squeeze(1)
        assert sorted(grown.tolist()) == sorted(top.tolist()), name
        assert int(mask.sum()) == active


def test_set_growth_reproducible_per_seed_and_differs_across_seeds():
    def grown(seed):
        model, sp, opt = _setup("set", seed=seed, init="magnitude")  # same initial masks for every seed
        old = _masks(sp)
        _train(model, sp, opt, 1, make_batches(n=2))
        return {n: m & ~old[n] for n, m in sp.masks.items()}

    a, b, c = grown(0), grown(0), grown(1)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a)


def test_drop_fraction_schedules_and_default_schedule():
    T, f0, end = 200, 0.3, 0.75
    method = sn.core.methods.METHODS.get("rigl")(total_steps=T, drop_fraction=f0, end_fraction=end, update_every=10)
    for t in (0, 10, 37, 75, 100, 149, 150):
        assert method.drop_fraction_at(t) == pytest.approx(f0 / 2 * (1 + math.cos(math.pi * t / (end * T))))
    assert method.drop_fraction_at(150) == pytest.approx(0.0, abs=1e-12) and method.drop_fraction_at(151) == 0.0
    assert method.default_schedule() == sn.Constant(begin_step=0, end_step=150, frequency=10)
    exp = sn.core.methods.METHODS.get("set")(total_steps=T, drop_schedule="exponential")
    assert exp.drop_fraction_at(75) == pytest.approx(0.3 * math.exp(-3 * 75 / 150))
    const = sn.core.methods.METHODS.get("set")(total_steps=T, drop_schedule="constant")
    assert const.drop_fraction_at(149) == 0.3 and const.drop_fraction_at(151) == 0.0

    model, sp, opt = _setup("rigl", update_every=3, total_steps=20)  # recorded values follow the formula
    _train(model, sp, opt, 12, make_batches(n=4))
    for h in sp.method.history:
        assert h["drop_fraction"] == pytest.approx(0.15 * (1 + math.cos(math.pi * h["step"] / 15)))


@pytest.mark.parametrize("total_steps, every, updates", [
    (2345, 144, 12),    # 5 epochs of 469 batches: isqrt 48; end_step 1758, the last update at 12 * 144 = 1728
    (4690, 204, 17),    # the same at batch 64 (a fixed 100 gave 35 updates 0.1 epoch apart); end_step 3517
    (28140, 501, 42),   # 60 epochs: isqrt 167; end_step 21105, the last update at 42 * 501 = 21042
    (10000, 300, 25),   # end_step 7500 = 25 * 300
    (100, 30, 2),       # end_step 75: 30, 60
    (9, 9, 0),          # shorter than the first interval: no update (as with any update_every > end_step)
])
def test_default_update_every_grows_as_sqrt_of_the_run(total_steps, every, updates):
    for name in ("set", "rigl"):
        method = sn.core.methods.METHODS.get(name)(total_steps=total_steps)
        assert method.update_every == every == sn.create.dst.default_update_every(total_steps)
        assert method.config()["update_every"] == every
        schedule = method.default_schedule()
        assert schedule == sn.Constant(begin_step=0, end_step=int(0.75 * total_steps), frequency=every)
        assert sum(schedule.is_update_step(t) for t in range(1, total_steps + 1)) == updates


def test_explicit_update_every_is_honoured_and_static_needs_no_total_steps():
    method = sn.core.methods.METHODS.get("rigl")(total_steps=2345, update_every=100)
    assert method.update_every == 100 and method.default_schedule().frequency == 100
    assert sn.core.methods.METHODS.get("static")().update_every is None
    assert sn.core.methods.METHODS.get("static")(total_steps=2500).update_every == 150
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match=r"total_steps must be an int >= 1, got"):
            sn.create.dst.default_update_every(bad)


def test_default_interval_in_the_sparsifier():
    torch.manual_seed(0)
    model = TinyMLP()
    sp = sn.Sparsifier(model, sparsity=0.8, method="rigl", total_steps=100, seed=0)
    opt = sp.wrap(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))
    assert _train(model, sp, opt, 100, make_batches(n=4)) == [30, 60]
    assert sp.config()["method_config"]["update_every"] == 30


@pytest.mark.parametrize("method", ["set", "rigl"])
def test_no_updates_after_end_fraction(method):
    model, sp, opt = _setup(method, update_every=3, total_steps=20, end_fraction=0.5, drop_schedule="constant")
    batches = make_batches(n=4)
    assert _train(model, sp, opt, 10, batches) == [3, 6, 9]
    at_end = _masks(sp)
    assert _train(model, sp, opt, 10, batches) == []
    assert all(torch.equal(at_end[n], m) for n, m in sp.masks.items())
    assert [h["step"] for h in sp.method.history] == [3, 6, 9]


def test_static_never_changes_masks_and_init_follows_erk():
    torch.manual_seed(0)
    model = TinyMLP()
    sp = sn.Sparsifier(model, sparsity=0.9, method="static", distribution="erk", update_every=2, total_steps=20)
    shapes = {n: tuple(p.shape) for n, p, _ in sn.iter_masks(model)}
    densities = sn.layer_densities("erk", shapes, 0.9)
    for name, mask in sp.masks.items():
        assert int(mask.sum()) == round(densities[name] * mask.numel())
    first = _masks(sp)
    opt = sp.wrap(torch.optim.SGD(model.parameters(), lr=0.1))
    assert _train(model, sp, opt, 10, make_batches(n=2)) == []
    assert all(torch.equal(first[n], m) for n, m in sp.masks.items())
    sp.update()  # even a forced update keeps them
    assert all(torch.equal(first[n], m) for n, m in sp.masks.items())
    assert not sp.dense_grads


def test_dense_gradient_only_before_update_steps():
    model, sp, opt = _setup("rigl", update_every=3, total_steps=40)
    batches = make_batches(n=4)
    for i in range(9):
        opt.zero_grad()
        _backward(model, batches[i % 4])
        before_update = sp.schedule.is_update_step(sp.step_count + 1)
        for name, p, mask in sn.iter_masks(model):
            masked_grad = p.grad[~mask]
            assert (masked_grad != 0).any() if before_update else (masked_grad == 0).all(), (i, name)
        opt.step()
        for _, p, mask in sn.iter_masks(model):
            assert (p.grad[~mask] == 0).all()  # the optimizer never sees it
        assert not sp.dense_grads  # switched off after the optimizer step
        sp.step()
    assert [h["step"] for h in sp.method.history] == [3, 6, 9]


def test_set_never_asks_for_dense_gradients():
    model, sp, opt = _setup("set")
    opt.zero_grad()
    _backward(model, make_batches(n=1)[0])
    assert all((p.grad[~m] == 0).all() for _, p, m in sn.iter_masks(model))


def test_rigl_without_gradients_on_update_step_raises():
    model, sp, opt = _setup("rigl", update_every=2)
    _train(model, sp, opt, 1, make_batches(n=1))
    opt.zero_grad(set_to_none=True)
    with pytest.raises(RuntimeError, match="RigL needs the gradient of the current batch.*loss.backward"):
        opt.step()  # no backward before it
    model, sp, opt = _setup("rigl", update_every=2)
    _train(model, sp, opt, 1, make_batches(n=1))
    masks = _masks(sp)
    with pytest.raises(RuntimeError, match="RigL needs the gradient"):
        sp.step()  # no optimizer step at all
    assert all(torch.equal(masks[n], m) for n, m in sp.masks.items())


@pytest.mark.parametrize("kwargs, match", [
    ({"method": "rigl", "total_steps": 10, "update_every": 0}, r"update_every must be an int >= 1 \(or None: 3 \* isqrt\(total_steps\)\), got 0"),
    ({"method": "set", "total_steps": 10, "update_every": 2.5}, r"update_every must be an int >= 1"),
    ({"method": "rigl", "total_steps": 10, "drop_fraction": 0.0}, r"drop_fraction must be a number in \(0, 1\)"),
    ({"method": "set", "total_steps": 10, "drop_fraction": 1.0}, r"\(0, 1\), got 1.0"),
    ({"method": "rigl", "total_steps": 10, "end_fraction": 0.0}, r"end_fraction must be a number in \(0, 1\], got 0.0"),
    ({"method": "rigl", "total_steps": 10, "end_fraction": 1.5}, r"\(0, 1\], got 1.5"),
    ({"method": "rigl"}, r"method 'rigl' needs total_steps"),
    ({"method": "set", "total_steps": 0}, r"total_steps must be an int >= 1, got 0"),
    ({"method": "rigl", "total_steps": 10, "drop_schedule": "linear"}, r"drop_schedule must be one of cosine"),
    ({"method": "set", "total_steps": 10, "init": "snip"}, r"init must be one of random, magnitude"),
    ({"method": "rigl", "total_steps": 10, "drop_rate": 0.1}, r"method 'rigl' does not take 'drop_rate'"),
])
def test_bad_input_raises_and_leaves_model_unchanged(kwargs, match):
    torch.manual_seed(0)
    model = TinyMLP()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=match):
        sn.Sparsifier(model, sparsity=0.9, **kwargs)
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_numpy_and_tensor_numbers_are_accepted():
    """Issue 13: NumPy scalars and 0-d tensors are numbers (as for sparsity=)."""
    import numpy as np
    sp = sn.Sparsifier(TinyMLP(), sparsity=np.float32(0.9), method="rigl", total_steps=np.int64(40),
                       update_every=np.int32(4), drop_fraction=torch.tensor(0.25), end_fraction=np.float64(0.5))
    assert (sp.method.update_every, sp.method.total_steps) == (4, 40) and type(sp.method.total_steps) is int
    assert json.loads(json.dumps(sp.config()))["method_config"]["total_steps"] == 40
    assert (sp.method.drop_fraction, sp.method.end_fraction) == (0.25, 0.5)
    with pytest.raises(ValueError, match=r"drop_fraction must be a number in \(0, 1\), got a Tensor of shape \(2,\)"):
        sn.Sparsifier(TinyMLP(), sparsity=0.9, method="set", total_steps=40, drop_fraction=torch.tensor([0.1, 0.2]))


def test_diagnostics_json_and_state_resume(tmp_path):
    model, sp, opt = _setup("rigl", update_every=2, total_steps=40)
    batches = make_batches(n=4)
    _train(model, sp, opt, 6, batches)
    diag = sp.method.diagnostics()
    assert json.loads(json.dumps(diag)) == diag and [h["step"] for h in diag] == [2, 4, 6]
    assert diag[0]["layers"]["fc1.weight"]["survival"] is None
    assert all(0.0 <= h["layers"][n]["survival"] <= 1.0 for h in diag[1:] for n in h["layers"])

    path = sn.save(tmp_path / "ckpt.safetensors", model, sp, optimizer=opt)
    model2, sp2, opt2 = _setup("rigl", update_every=2, total_steps=40, seed=5)
    sn.load(path, model2, sp2, optimizer=opt2)
    assert sp2.method.diagnostics() == diag and sp2.step_count == 6
    assert all(torch.equal(sp.method._grown[n], sp2.method._grown[n]) for n in sp.method._grown)
    assert all(torch.equal(sp.method._dropped[n], sp2.method._dropped[n]) for n in sp.method._dropped)
    _train(model, sp, opt, 2, batches[2:])  # both continue identically
    _train(model2, sp2, opt2, 2, batches[2:])
    assert all(torch.equal(sp.masks[n], sp2.masks[n]) for n in sp.masks)
    assert sp2.method.history == sp.method.history


@pytest.mark.parametrize("bad", [
    {"history": "abc"},
    {"history": [{"step": "x", "layers": {}}]},
    {"history": [{"step": -1, "layers": {}}]},
    {"history": [[2, 0.5]]},
    {"grown": [1, 2]},
    {"dropped": {"fc1.weight": [1, 0]}},
])
def test_malformed_method_state_is_refused_before_anything_changes(bad, tmp_path):
    """Issue 13: a malformed DST history loaded silently; now the method and sn.load refuse it."""
    model, sp, opt = _setup("rigl", update_every=2, total_steps=40)
    _train(model, sp, opt, 4, make_batches(n=4))
    state = sp.state_dict()
    before = copy.deepcopy(sp.method.state_dict())
    with pytest.raises((TypeError, ValueError)):
        sp.method.load_state_dict({**state["method"], **bad})
    with pytest.raises(sn.CheckpointError):
        sp.load_state_dict({**state, "method": {**state["method"], **bad}})
    after = sp.method.state_dict()
    assert after["history"] == before["history"]
    assert all(torch.equal(before["grown"][n], after["grown"][n]) for n in before["grown"])


# ----------------------------------------------------------------------------- diagnostics by hand


def _hand_update(model, sp, opt, weights, grads):
    """Set every layer's weights and gradient by hand, then one optimizer step (lr=0) and one update."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.tensor(weights[name]).reshape(p.shape))
            p.grad = torch.tensor(grads[name]).reshape(p.shape)
    opt.step()  # RigL's observe() stashes |grad| at inactive positions
    assert sp.step()
    return sp.method.history[-1]


def test_diagnostics_hand_computed():
    model = torch.nn.Sequential(torch.nn.Linear(4, 2, bias=False))
    sp = sn.Sparsifier(model, sparsity=0.5, method="rigl", update_every=1, total_steps=100,
                       drop_fraction=0.5, drop_schedule="constant")
    sp.set_masks({"0.weight": torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0]], dtype=torch.bool)})
    opt = sp.wrap(torch.optim.SGD(model.parameters(), lr=0.0))
    # active {0, 1, 4, 5}; k = round(0.5 * 4) = 2 drops: |w| 0.1 (0) and 0.2 (5);
    # grows among inactive {2, 3, 6, 7} (|g| 1, 4, 3, 2): 3 and 6 -> active {1, 3, 4, 6}
    h = _hand_update(model, sp, opt, {"0.weight": [0.1, 0.5, 0, 0, 0.3, 0.2, 0, 0]},
                     {"0.weight": [9.0, 9, 1, 4, 9, 9, 3, 2]})
    assert h["step"] == 1 and h["drop_fraction"] == 0.5
    assert h["layers"]["0.weight"] == {"dropped": 2, "grown": 2, "active": 4, "params": 8, "survived": None,
                                       "survival": None, "regrown": None, "changed": 4, "mask_change": 0.5}
    assert sp.masks["0.weight"].reshape(-1).nonzero().squeeze(1).tolist() == [1, 3, 4, 6]
    # drops |w| 0.05 (3) and 0.4 (1); grows among {0, 2, 5, 7} (|g| 5, 1, 2, 8): 7 and 0 -> {0, 4, 6, 7};
    # of the weights grown at step 1 (3, 6), 6 is still active; of the grown 0 and 7, 0 was dropped at step 1
    h = _hand_update(model, sp, opt, {"0.weight": [0, 0.4, 0, 0.05, 0.6, 0, 0.7, 0]},
                     {"0.weight": [5.0, 9, 1, 9, 9, 2, 9, 8]})
    assert sp.masks["0.weight"].reshape(-1).nonzero().squeeze(1).tolist() == [0, 4, 6, 7]
    assert h["layers"]["0.weight"] == {"dropped": 2, "grown": 2, "active": 4, "params": 8, "survived": 1,
                                       "survival": 0.5, "regrown": 1, "changed": 4, "mask_change": 0.5}
    # the newly grown 0 and 7 are the smallest now (grown at 0): both dropped, 4 and 6 kept -> survival 0;
    # the grown 1 and 3 are exactly what step 2 dropped -> regrown 2 (an oscillation)
    h = _hand_update(model, sp, opt, {"0.weight": [0.0, 0, 0, 0, 0.6, 0, 0.7, 0.0]},
                     {"0.weight": [9.0, 3, 1, 2, 9, 0.5, 9, 9]})
    assert sp.masks["0.weight"].reshape(-1).nonzero().squeeze(1).tolist() == [1, 3, 4, 6]
    assert (h["layers"]["0.weight"]["survived"], h["layers"]["0.weight"]["survival"]) == (0, 0.0)
    assert h["layers"]["0.weight"]["regrown"] == 2


def test_diagnostics_block_pattern_counts_weights():
    model = torch.nn.Sequential(torch.nn.Linear(4, 2, bias=False))  # 2x4 = two 2x2 blocks
    sp = sn.Sparsifier(model, sparsity=0.5, method="rigl", pattern="block2x2", update_every=1, total_steps=100,
                       drop_fraction=0.6, drop_schedule="constant")  # round(0.6 * 1 active block) = 1
    sp.set_masks({"0.weight": torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0]], dtype=torch.bool)})
    opt = sp.wrap(torch.optim.SGD(model.parameters(), lr=0.0))
    h = _hand_update(model, sp, opt, {"0.weight": [0.1, 0.5, 0, 0, 0.3, 0.2, 0, 0]},
                     {"0.weight": [9.0, 9, 1, 4, 9, 9, 3, 2]})
    assert sp.masks["0.weight"].tolist() == [[False, False, True, True], [False, False, True, True]]
    assert h["layers"]["0.weight"] == {"dropped": 4, "grown": 4, "active": 4, "params": 8, "survived": None,
                                       "survival": None, "regrown": None, "changed": 8, "mask_change": 1.0}
    h = _hand_update(model, sp, opt, {"0.weight": [0, 0, 0.5, 0.5, 0, 0, 0.5, 0.5]}, {"0.weight": [1.0] * 8})
    assert sp.masks["0.weight"].tolist() == [[True, True, False, False], [True, True, False, False]]
    assert h["layers"]["0.weight"]["regrown"] == 4  # the block the first update dropped, in weights


def test_top_k_stable_equals_stable_sort():
    from sparsenn.core.selection import top_k_stable as _top_k_stable
    from sparsenn.create.dst import _pick_drops, _pick_grows

    g = torch.Generator().manual_seed(0)
    for n, k, levels in [(1, 1, 2), (50, 7, 3), (200, 60, 5), (200, 0, 4), (300, 300, 2), (1000, 123, 1000)]:
        s = torch.randint(0, levels, (n,), generator=g).float()  # many ties
        want = torch.zeros(n, dtype=torch.bool)
        want[torch.sort(s, descending=True, stable=True).indices[:k]] = True
        assert torch.equal(_top_k_stable(s, k), want), (n, k)
        inactive = torch.rand(1, n, generator=g) < 0.7
        counts = torch.tensor([min(k, int(inactive.sum()))])
        grown = _pick_grows(inactive, s.reshape(1, -1), counts)
        ref = torch.zeros(n, dtype=torch.bool)
        masked = s.masked_fill(~inactive[0], -math.inf)
        ref[torch.sort(masked, descending=True, stable=True).indices[: int(counts)]] = True
        assert torch.equal(grown[0], ref) and not (grown & ~inactive).any()
        active = ~inactive
        cap = min(int(active.sum()), int(inactive.sum()))
        dropped = _pick_drops(active, s.reshape(1, -1), k)  # the k weakest active (ties: lower index)
        idx = active[0].nonzero().squeeze(1)
        ref = torch.zeros(n, dtype=torch.bool)
        ref[idx[torch.sort(s[idx], stable=True).indices[: min(k, cap)]]] = True
        assert torch.equal(dropped[0], ref), (n, k)
    s = torch.tensor([1.0, float("nan"), 3.0, 3.0, float("nan"), 0.0])  # NaN sorts as the largest
    want = torch.zeros(6, dtype=torch.bool)
    want[torch.sort(s, descending=True, stable=True).indices[:3]] = True
    assert torch.equal(_top_k_stable(s, 3), want)


@settings(max_examples=40, deadline=None)
@given(n=st.sampled_from([100, 70_000, 200_003]), frac=st.floats(0.0001, 0.6), layout=st.sampled_from(
    ["random", "sorted", "reversed", "ties", "blocks_of_inf"]), seed=st.integers(0, 10_000))
def test_kth_largest_is_exact(n, frac, layout, seed):
    """The sampled-threshold selection equals a full sort's k-th largest, on adversarial layouts too
    (sorted input: a strided sample sees a biased slice; many ties; long runs of -inf)."""
    from sparsenn.core.selection import kth_largest as _kth_largest

    g = torch.Generator().manual_seed(seed)
    s = torch.rand(n, generator=g)
    if layout == "sorted":
        s = s.sort().values
    elif layout == "reversed":
        s = s.sort(descending=True).values
    elif layout == "ties":
        s = (s * 5).floor()
    elif layout == "blocks_of_inf":
        s[: n // 2] = -math.inf
    k = max(1, int(frac * n))
    assert _kth_largest(s, k) == s.sort(descending=True).values[k - 1]
