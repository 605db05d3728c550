"""Knowledge distillation: the loss against hand computations and PyTorch's KL divergence, the T^2 gradient
scaling, feature distillation with projections, the teacher cache, and sparse students in a loop."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import TensorDataset

import sparsenn as sn
from sparsenn.core.masks import masked_parameters
from sparsenn.train.distillation import (
    DistillationLoss,
    distill,
    distillation_loss,
    distillation_terms,
    logits_of,
)
from sparsenn.train.feature_distillation import FeatureDistiller
from sparsenn.train.teacher_cache import TeacherCache, TeacherCacheError


pytestmark = pytest.mark.usefixtures("one_thread")

# -- the loss ----------------------------------------------------------------------------------------------

def test_loss_by_hand_two_classes():
    # student logits (1, 0), teacher (0, 1), label 0, T = 2, alpha = 0.5.
    # z/T: student (0.5, 0) -> q = (0.622459, 0.377541); teacher (0, 0.5) -> p = (0.377541, 0.622459).
    # KL(p || q) = p0 log(p0/q0) + p1 log(p1/q1) = (p1 - p0) * 0.5 = 0.5 * tanh(0.25) = 0.1224593
    # T^2 KL = 0.4898373; CE(student, 0) = log(1 + e^-1) = 0.3132617
    # loss = 0.5 * 0.4898373 + 0.5 * 0.3132617 = 0.4015495
    s = torch.tensor([[1.0, 0.0]])
    t = torch.tensor([[0.0, 1.0]])
    y = torch.tensor([0])
    terms = distillation_terms(s, t, y, temperature=2.0, alpha=0.5)
    assert terms["soft"].item() == pytest.approx(0.4898373, abs=1e-6)
    assert terms["task"].item() == pytest.approx(0.3132617, abs=1e-6)
    assert terms["loss"].item() == pytest.approx(0.4015495, abs=1e-6)
    assert distillation_loss(s, t, y, temperature=2.0, alpha=0.5).item() == pytest.approx(0.4015495, abs=1e-6)


def test_loss_by_hand_three_classes_two_samples():
    # sample 1: student (0, 0, 0) -> q uniform 1/3; teacher (ln 2, 0, 0) -> p = (1/2, 1/4, 1/4) at T = 1.
    #   KL = 1/2 ln(3/2) + 2 * 1/4 ln(3/4) = 0.2027326 - 0.1438410 = 0.0588915
    # sample 2: student == teacher -> KL = 0.   Mean over samples: 0.0294458 (alpha = 1: no task term)
    s = torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0]])
    t = torch.tensor([[math.log(2.0), 0.0, 0.0], [1.0, 2.0, 3.0]])
    assert distillation_loss(s, t, None, temperature=1.0, alpha=1.0).item() == pytest.approx(0.0294458, abs=1e-6)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 4), st.integers(2, 7), st.floats(0.5, 8.0), st.floats(0.0, 1.0), st.integers(0, 2**16))
def test_loss_matches_pytorch_kl_div_and_cross_entropy(n, classes, temperature, alpha, seed):
    g = torch.Generator().manual_seed(seed)
    s, t = torch.randn(n, classes, generator=g) * 3, torch.randn(n, classes, generator=g) * 3
    y = torch.randint(0, classes, (n,), generator=g)
    kl = F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1), reduction="batchmean",
                  log_target=True)
    expected = alpha * temperature ** 2 * kl + (1 - alpha) * F.cross_entropy(s, y)
    got = distillation_loss(s, t, y, temperature=temperature, alpha=alpha)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    assert distillation_loss(s, t, None, temperature=temperature, alpha=1.0).item() >= -1e-7  # KL >= 0


def test_soft_gradient_is_T_times_q_minus_p():
    # d/dz_s of T^2 KL(p || q) = T (q - p), averaged over the n positions
    torch.manual_seed(0)
    s, t = torch.randn(3, 5, requires_grad=True), torch.randn(3, 5)
    for temperature in (1.0, 2.5, 7.0):
        s.grad = None
        distillation_loss(s, t, None, temperature=temperature, alpha=1.0).backward()
        q, p = F.softmax(s.detach() / temperature, -1), F.softmax(t / temperature, -1)
        torch.testing.assert_close(s.grad, temperature * (q - p) / 3, rtol=1e-5, atol=1e-7)


def test_T_squared_keeps_the_gradient_scale_at_high_temperature():
    # Hinton et al. 2015, eq. 4: for large T the gradient tends to ((z - mean z) - (v - mean v)) / C,
    # independent of T; without the T^2 factor it would shrink as 1 / T^2
    torch.manual_seed(1)
    classes = 6
    s, t = torch.randn(1, classes, requires_grad=True), torch.randn(1, classes)
    limit = ((s.detach() - s.detach().mean()) - (t - t.mean())) / classes
    grads = {}
    for temperature in (50.0, 200.0):
        s.grad = None
        distillation_loss(s, t, None, temperature=temperature, alpha=1.0).backward()
        grads[temperature] = s.grad.clone()
    torch.testing.assert_close(grads[200.0], limit, rtol=2e-2, atol=1e-4)
    assert grads[50.0].norm() / grads[200.0].norm() == pytest.approx(1.0, abs=0.02)


def test_alpha_zero_is_the_task_loss():
    torch.manual_seed(2)
    s, t, y = torch.randn(4, 3), torch.randn(4, 3), torch.tensor([0, 2, 1, 1])
    expected = F.cross_entropy(s, y)
    assert torch.equal(distillation_loss(s, t, y, alpha=0.0), expected)
    assert torch.equal(distillation_loss(s, None, y, alpha=0.0), expected)
    custom = distillation_loss(s, t, y, alpha=0.0, task_loss=lambda z, yy: F.cross_entropy(z, yy, label_smoothing=0.1))
    assert custom.item() == pytest.approx(F.cross_entropy(s, y, label_smoothing=0.1).item())


def test_ignore_index_drops_positions_from_both_terms():
    torch.manual_seed(3)
    s, t = torch.randn(2, 4, 5), torch.randn(2, 4, 5)
    y = torch.randint(0, 5, (2, 4))
    y[0, 3] = y[1, 0] = -100
    keep = y != -100
    full = distillation_loss(s, t, y, temperature=2.0, alpha=0.3)
    kept = distillation_loss(s[keep], t[keep], y[keep], temperature=2.0, alpha=0.3)
    assert full.item() == pytest.approx(kept.item(), rel=1e-6)


def test_teacher_ruling_a_class_out_adds_nothing():
    s = torch.tensor([[0.0, 1.0, 2.0]], requires_grad=True)
    t = torch.tensor([[0.0, 1.0, -math.inf]])
    loss = distillation_loss(s, t, None, alpha=1.0, temperature=1.0)
    loss.backward()
    assert math.isfinite(loss.item()) and torch.isfinite(s.grad).all()


def test_bad_arguments_are_named():
    s, t, y = torch.randn(2, 3), torch.randn(2, 3), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="temperature"):
        distillation_loss(s, t, y, temperature=0.0)
    with pytest.raises(ValueError, match="alpha"):
        distillation_loss(s, t, y, alpha=1.5)
    with pytest.raises(ValueError, match="teacher_logits of shape"):
        distillation_loss(s, torch.randn(2, 4), y)
    with pytest.raises(ValueError, match="teacher_logits are needed"):
        distillation_loss(s, None, y, alpha=0.5)
    with pytest.raises(ValueError, match="target is needed"):
        distillation_loss(s, t, None, alpha=0.5)
    with pytest.raises(ValueError, match="does not match"):
        distillation_loss(s, t, torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match="integer tensor"):
        distillation_loss(s, t, torch.tensor([0.0, 1.0]))
    with pytest.raises(TypeError, match="logits"):
        logits_of({"a": 1})


def test_loss_module_matches_the_function_and_keeps_its_terms():
    torch.manual_seed(4)
    s, t, y = torch.randn(5, 4), torch.randn(5, 4), torch.randint(0, 4, (5,))
    kd = DistillationLoss(temperature=3.0, alpha=0.25)
    assert kd(s, t, y).item() == pytest.approx(distillation_loss(s, t, y, temperature=3.0, alpha=0.25).item())
    assert set(kd.last_terms) == {"loss", "soft", "task"}
    assert "temperature=3" in repr(kd)


# -- feature distillation ---------------------------------------------------------------------------------

class _Net(nn.Module):
    def __init__(self, width, channels):
        super().__init__()
        self.conv = nn.Conv2d(1, channels, 3, padding=1)
        self.fc1 = nn.Linear(channels * 16, width)
        self.fc2 = nn.Linear(width, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(torch.relu(self.conv(x)).flatten(1))))


def test_feature_distiller_projects_where_widths_differ():
    torch.manual_seed(5)
    student, teacher = _Net(width=8, channels=2), _Net(width=16, channels=4)
    x = torch.randn(3, 1, 4, 4)
    with FeatureDistiller(student, teacher, {"fc1": "fc1", "conv": "conv", "fc2": "fc2"}) as fd:
        assert isinstance(fd.projection("fc1"), nn.Linear) and fd.projection("fc1").weight.shape == (16, 8)
        assert isinstance(fd.projection("conv"), nn.Conv2d) and fd.projection("conv").weight.shape == (4, 2, 1, 1)
        assert fd.projection("fc2") is None  # same width: no projection
        student(x)
        with torch.no_grad():
            teacher(x)
        loss = fd.loss()
        with pytest.raises(RuntimeError, match="no features recorded"):
            fd.loss()  # each loss needs new forward passes
        s1, t1 = student.fc1(torch.relu(student.conv(x)).flatten(1)), teacher.fc1(torch.relu(teacher.conv(x)).flatten(1))
        sc, tc = student.conv(x), teacher.conv(x)
        expected = (F.mse_loss(fd.projection("fc1")(s1), t1) + F.mse_loss(fd.projection("conv")(sc), tc)
                    + F.mse_loss(student(x), teacher(x))) / 3
        assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
        loss.backward()
        assert fd.projection("fc1").weight.grad is not None and student.fc1.weight.grad is not None
        assert teacher.fc1.weight.grad is None
    student(x)  # hooks removed: nothing recorded
    with pytest.raises(RuntimeError, match="no features recorded"):
        fd.loss()


def test_feature_distiller_with_example_input_and_cosine():
    torch.manual_seed(6)
    student, teacher = _Net(width=8, channels=2), _Net(width=16, channels=4)
    x = torch.randn(2, 1, 4, 4)
    fd = FeatureDistiller(student, teacher, {"fc1": "fc1"}, distance="cosine", example_input=x, always_project=True)
    assert fd.projection("fc1").weight.shape == (16, 8)
    student(x)
    teacher(x)
    value = fd.loss()
    assert 0.0 <= value.item() <= 2.0
    fd.remove()


def test_feature_distiller_errors():
    student, teacher = _Net(8, 2), _Net(16, 4)
    with pytest.raises(ValueError, match="no module named 'nope'"):
        FeatureDistiller(student, teacher, {"nope": "fc1"})
    with pytest.raises(ValueError, match="unknown distance"):
        FeatureDistiller(student, teacher, {"fc1": "fc1"}, distance="l3")
    with pytest.raises(ValueError, match="cannot tell the output width"):
        FeatureDistiller(student, teacher, {"": "fc1"})


# -- the teacher cache ------------------------------------------------------------------------------------

def _data(n=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g))


def _teacher(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3))


def test_cache_round_trip(tmp_path):
    data, teacher = _data(), _teacher()
    path = tmp_path / "teacher.safetensors"
    cache = TeacherCache.load_or_compute(path, teacher, data, batch_size=7)
    with torch.no_grad():
        torch.testing.assert_close(cache.logits, teacher(data.tensors[0]))
    again = TeacherCache.load_or_compute(path, teacher, data, batch_size=5)  # loaded: digest independent of batch size
    assert torch.equal(again.logits, cache.logits)
    x, y, t = next(iter(again.loader(8, shuffle=False)))
    assert torch.equal(x, data.tensors[0][:8]) and torch.equal(y, data.tensors[1][:8])
    assert torch.equal(t, cache.logits[:8])


def test_cache_refuses_stale_and_tampered_files(tmp_path):
    data, teacher = _data(), _teacher()
    path = tmp_path / "c.safetensors"
    TeacherCache.compute(teacher, data).save(path)
    changed = TensorDataset(data.tensors[0].clone(), data.tensors[1])
    changed.tensors[0][3, 2] += 1.0
    with pytest.raises(TeacherCacheError, match="stale: the dataset's inputs"):
        TeacherCache.load(path, changed)
    with pytest.raises(TeacherCacheError, match="stale: computed for 20 samples, the dataset has 19"):
        TeacherCache.load(path, TensorDataset(*(t[:19] for t in data.tensors)))
    with pytest.raises(TeacherCacheError, match="another teacher"):
        TeacherCache.load_or_compute(path, _teacher(seed=1), data)
    # edited logits, metadata kept
    tensors = load_file(path)
    with safe_open(str(path), framework="pt") as sf:
        meta = sf.metadata()
    tensors["logits"][0, 0] += 0.5
    save_file(tensors, path, metadata=meta)
    with pytest.raises(TeacherCacheError, match="were changed"):
        TeacherCache.load(path, data)
    save_file({"weights": torch.zeros(2)}, tmp_path / "other.safetensors", metadata={"format": "x"})
    with pytest.raises(TeacherCacheError, match="not a teacher cache"):
        TeacherCache.load(tmp_path / "other.safetensors", data)
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 40)
    with pytest.raises(TeacherCacheError, match="unreadable"):
        TeacherCache.load(tmp_path / "junk.safetensors", data)
    with pytest.raises(TeacherCacheError, match="no such file"):
        TeacherCache.load(tmp_path / "missing.safetensors", data)


# -- sparse students in a loop: masks stay exact ----------------------------------------------------------

def _loader(n=64, seed=0):
    data = _data(n, seed)
    return torch.utils.data.DataLoader(data, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0)), data


def _assert_masked_zero(model):
    masked = masked_parameters(model)
    assert masked
    for mp in masked:
        assert torch.all(mp.param[~mp.mask] == 0)


@pytest.mark.parametrize("method", ["magnitude", "rigl"])
def test_distill_keeps_sparsifier_masks_exact(method):
    loader, _ = _loader()
    teacher, student = _teacher(0), _teacher(3)
    kwargs = {"total_steps": 12, "update_every": 4} if method == "rigl" else {}
    sp = sn.Sparsifier(student, 0.75, method=method, **kwargs)
    opt = sp.wrap(torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9))
    before = {n: m.clone() for n, m in sp.masks.items()}
    losses = distill(student, loader, opt, teacher=teacher, loss=DistillationLoss(temperature=2.0, alpha=0.7),
                     epochs=3, sparsifier=sp)
    assert len(losses) == 3 and losses[-1] < losses[0]
    _assert_masked_zero(student)
    moved = any(not torch.equal(before[n], m) for n, m in sp.masks.items())
    assert moved == (method == "rigl")  # RigL regrew weights; the static mask did not move
    assert all(float((~m).float().mean()) == pytest.approx(0.75, abs=0.02) for m in sp.masks.values())


def test_distill_from_cache_and_features(tmp_path):
    _, data = _loader()
    teacher, student = _teacher(0), _teacher(3)
    sp = sn.Sparsifier(student, 0.5)
    cache = TeacherCache.load_or_compute(tmp_path / "t.safetensors", teacher, data)
    opt = sp.wrap(torch.optim.Adam(student.parameters(), lr=1e-2))
    losses = distill(student, cache.loader(16, seed=1), opt, epochs=2, sparsifier=sp)
    assert losses[-1] < losses[0]
    _assert_masked_zero(student)
    with pytest.raises(ValueError, match="teacher was given too"):
        distill(student, cache.loader(16), opt, teacher=teacher)
    with pytest.raises(ValueError, match="no teacher"):
        distill(student, [(data.tensors[0][:4], data.tensors[1][:4])], opt)
    fd = FeatureDistiller(student, teacher, {"0": "0"}, always_project=True)
    opt2 = sp.wrap(torch.optim.Adam([*student.parameters(), *fd.parameters()], lr=1e-2))
    loader, _ = _loader()
    distill(student, loader, opt2, teacher=teacher, features=fd, feature_weight=0.5, epochs=1, sparsifier=sp)
    _assert_masked_zero(student)
    with pytest.raises(ValueError, match="feature distillation needs the teacher"):
        distill(student, cache.loader(16), opt2, features=fd)
