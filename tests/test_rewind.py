"""Weight and LR rewinding: exact restoration of theta_k and of the LR schedule at iteration k."""

import copy

import pytest
import torch
from torch import nn

import sparsenn as sn
from sparsenn.core.masks import load_masks
from sparsenn.train.rewind import Snapshot, rewind_lr, rewind_weights, take_snapshot
from conftest import TinyMLP, make_batches


class BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.bn = nn.BatchNorm1d(32)
        self.fc2 = nn.Linear(32, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


def _sgd_steps(model, batches, opt, sched=None):
    for x, y in batches:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if sched is not None:
            sched.step()


def _lambda_sched(opt):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.8 ** t)


def test_snapshot_is_a_copy_and_excludes_masks():
    torch.manual_seed(0)
    model = TinyMLP()
    sn.Sparsifier(model, sparsity=0.5)
    snap = take_snapshot(model, 3)
    assert snap.step == 3 and isinstance(snap, Snapshot)
    assert set(snap.params) == {n for n, _ in model.named_parameters()}
    assert not any(n.endswith("_mask") for n in snap.buffers)
    with torch.no_grad():
        model.fc1.weight.add_(1.0)
    assert not torch.equal(snap.params["fc1.weight"], model.fc1.weight)


def test_rewind_weights_restores_params_and_batchnorm_exactly_then_rezeros_masked():
    torch.manual_seed(0)
    model = BNNet()
    snap = take_snapshot(model, 0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _sgd_steps(model, make_batches(3), opt)
    assert not torch.equal(model.bn.running_mean, snap.buffers["bn.running_mean"])
    sp = sn.Sparsifier(model, sparsity=0.7)  # masks from the trained weights
    masks = {n: m.clone() for n, m in sp.masks.items()}
    rewind_weights(model, snap)
    for name, p in model.named_parameters():
        expected = snap.params[name] * masks[name] if name in masks else snap.params[name]
        assert torch.equal(p, expected), name
    for name in ("bn.running_mean", "bn.running_var", "bn.num_batches_tracked"):
        assert torch.equal(dict(model.named_buffers())[name], snap.buffers[name])
    assert all(torch.equal(m, masks[n]) for n, m in sp.masks.items())  # masks untouched


def test_rewind_weights_mismatch_raises_and_leaves_model_unchanged():
    torch.manual_seed(0)
    snap = take_snapshot(TinyMLP(hidden=32), 0)
    other = TinyMLP(hidden=8)
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(ValueError, match="fc1.weight"):
        rewind_weights(other, snap)
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in before.items())
    with pytest.raises(ValueError, match="fc2.bias"):
        model = TinyMLP()
        del snap.params["fc2.bias"]
        rewind_weights(model, snap)


def test_rewind_weights_with_different_masks_keeps_survivors_exact():
    torch.manual_seed(0)
    model = TinyMLP()
    snap = take_snapshot(model, 0)
    mask = torch.rand(model.fc2.weight.shape) > 0.5
    load_masks(model, {"fc2.weight": mask})
    with torch.no_grad():
        model.fc2.weight.mul_(3.0)
    rewind_weights(model, snap)
    assert torch.equal(model.fc2.weight, snap.params["fc2.weight"] * mask)


def test_rewind_lr_restores_the_schedule_at_step_k_and_keeps_weights():
    torch.manual_seed(0)
    model = TinyMLP()
    batches = make_batches(6)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = _lambda_sched(opt)
    _sgd_steps(model, batches[:2], opt, sched)  # k = 2
    snap = take_snapshot(model, 2, scheduler=sched, optimizer=opt)
    lr_k = opt.param_groups[0]["lr"]
    later = []
    for b in batches[2:]:
        _sgd_steps(model, [b], opt, sched)
        later.append(opt.param_groups[0]["lr"])
    trained = copy.deepcopy(model.state_dict())
    rewind_lr(sched, snap)
    assert opt.param_groups[0]["lr"] == pytest.approx(lr_k) and sched.last_epoch == 2
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in trained.items())
    again = []
    for b in batches[2:]:  # the schedule replays from k
        _sgd_steps(model, [b], opt, sched)
        again.append(opt.param_groups[0]["lr"])
    assert again == pytest.approx(later)
    assert snap.optimizer_state is not None and snap.scheduler_state is not None


def test_rewind_lr_bad_input():
    model = TinyMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = _lambda_sched(opt)
    with pytest.raises(ValueError, match="scheduler"):
        rewind_lr(sched, take_snapshot(model, 0))
    with pytest.raises(TypeError, match="Snapshot"):
        rewind_lr(sched, {"step": 0})
    with pytest.raises(ValueError, match="step"):
        take_snapshot(model, -1)
