"""Adversarial training of sparse models (masks stay exact with static, gradual and RigL masks; in the
library's loop and in a user's loop), robustness_eval's records, and the robustness report."""

import base64
import json
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import sparsenn as sn
from sparsenn.core.masks import get_masks
from sparsenn.report.html import RunSummary, render_html, write_report
from sparsenn.report.robustness import (
    RobustnessRun,
    corruption_table,
    robustness_figures,
    robustness_section,
    robustness_table,
)
from sparsenn.robust import (
    FGSM,
    PGD,
    AdversarialBatches,
    accuracy_under_attack,
    adversarial_loss,
    pgd,
    robustness_eval,
)
from sparsenn.train.loop import train

PNG = b"\x89PNG\r\n\x1a\n"


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        return self.fc(F.relu(self.conv(x)).flatten(1))


def _data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 8, 8, generator=g)
    y = (x[:, 0, :4].mean((1, 2)) * 3).long().clamp(max=2)
    return TensorDataset(x, y)


def _loader(n=32):
    return DataLoader(_data(n), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0))


def _assert_masked(model):
    masks = get_masks(model)
    assert masks
    for name, mask in masks.items():
        assert (model.get_parameter(name)[~mask] == 0).all(), name


def _mask_sparsity(model):
    masks = get_masks(model).values()
    return 1 - sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks)


def _sparsifier(model, method, steps):
    if method == "rigl":
        return sn.Sparsifier(model, sparsity=0.75, method="rigl", total_steps=steps, update_every=2)
    if method == "gradual":
        return sn.Sparsifier(model, sparsity=0.75, schedule=sn.Polynomial(end_step=steps - 2, frequency=2))
    return sn.Sparsifier(model, sparsity=0.75)  # one-shot magnitude, then a fixed mask


@pytest.mark.parametrize("method", ["static", "gradual", "rigl"])
def test_masks_stay_exact_in_adversarial_training_through_the_librarys_loop(method):
    torch.manual_seed(0)
    model, loader = TinyCNN(), _loader()
    steps = 2 * len(loader)
    sp = _sparsifier(model, method, steps)
    before = {n: m.clone() for n, m in get_masks(model).items()}
    opt = sp.wrap(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    train(model, AdversarialBatches(loader, model, FGSM(eps=0.1, random_start=True)), opt, epochs=2,
          sparsifier=sp, on_step=lambda: _assert_masked(model))
    _assert_masked(model)
    assert _mask_sparsity(model) == pytest.approx(0.75, abs=0.01)
    if method != "static":  # the masks moved (gradual pruning, RigL's drop and grow) during adversarial training
        assert any(not torch.equal(before[n], m) for n, m in get_masks(model).items())
    if method == "rigl":
        assert sp.method.history and any(u["layers"]["fc.weight"]["grown"] for u in sp.method.history)


@pytest.mark.parametrize("method", ["static", "rigl"])
def test_masks_stay_exact_with_adversarial_loss_in_a_users_loop(method):
    torch.manual_seed(1)
    model, loader = TinyCNN(), _loader()
    sp = _sparsifier(model, method, 8)
    opt = sp.wrap(torch.optim.Adam(model.parameters(), lr=1e-2))
    attack = PGD(eps=0.1, steps=2)
    for step, (x, y) in enumerate(loader):
        opt.zero_grad()
        loss = adversarial_loss(model, x, y, attack=attack, clean_weight=0.5)
        loss.backward()
        opt.step()
        sp.step()
        _assert_masked(model)
        assert model.training  # the attack put the model back in train mode
    assert _mask_sparsity(model) == pytest.approx(0.75, abs=0.01)
    sp.finalize()
    assert sn.sparsity(model) >= 0.74  # exact zeros kept (regrown weights may still be 0)


def test_adversarial_loss_mixes_clean_and_attacked_losses():
    torch.manual_seed(0)
    model, (x, y) = TinyCNN(), _data(8)[:]
    attack = PGD(eps=0.1, steps=2, random_start=False)
    x_adv = pgd(model, x, y, eps=0.1, steps=2, random_start=False)
    expected = 0.75 * F.cross_entropy(model(x_adv), y) + 0.25 * F.cross_entropy(model(x), y)
    assert torch.allclose(adversarial_loss(model, x, y, attack=attack, clean_weight=0.25), expected)
    assert torch.allclose(adversarial_loss(model, x, y, attack={"name": "pgd", "eps": 0.1, "steps": 2,
                                                                 "random_start": False}),
                          F.cross_entropy(model(x_adv), y))
    with pytest.raises(ValueError, match="clean_weight must be a number in"):
        adversarial_loss(model, x, y, attack=attack, clean_weight=1.5)


def test_adversarial_batches_attack_a_fraction_and_keep_the_loaders_length():
    torch.manual_seed(0)
    model, loader = TinyCNN(), DataLoader(_data(32), batch_size=8)
    batches = AdversarialBatches(loader, model, PGD(eps=0.1, steps=1, random_start=False), fraction=0.5)
    assert len(batches) == 4
    for (xa, ya), (x, y) in zip(batches, loader):
        assert torch.equal(ya, y) and torch.equal(xa[4:], x[4:]) and not torch.equal(xa[:4], x[:4])
    assert len(list(batches)) == 4  # re-iterable: one pass per epoch


# ----------------------------------------------------------------------------- evaluation and report


@pytest.fixture(scope="module")
def evaluated():
    torch.manual_seed(0)
    loader = DataLoader(_data(32), batch_size=16)
    runs = []
    for group in ("standard", "adversarial"):
        for label, sparsity in (("dense", 0.0), ("magnitude 75%", 0.75)):
            model = TinyCNN()
            if sparsity:
                sn.Sparsifier(model, sparsity=sparsity)
            res = robustness_eval(model, loader, epsilons=(0.0, 0.05, 0.1), attack=PGD(steps=2),
                                  corruptions=["gaussian_noise", "contrast"], severities=(1, 5))
            runs.append(RobustnessRun(label, res, sparsity=sparsity, group=group))
    return runs, loader


def test_robustness_eval_returns_plain_deterministic_records(evaluated):
    runs, loader = evaluated
    res = runs[0].results
    assert json.loads(json.dumps(res)) == res
    assert res["samples"] == 32 and res["attacks"][0] == {"eps": 0.0, "accuracy": res["clean"]}
    assert [a["eps"] for a in res["attacks"]] == [0.0, 0.05, 0.1]
    assert res["attacks"][2]["accuracy"] <= res["clean"]
    assert [(r["corruption"], r["severity"]) for r in res["corruptions"]] == [
        ("gaussian_noise", 1), ("gaussian_noise", 5), ("contrast", 1), ("contrast", 5)]
    assert res["mean_corruption_accuracy"] == pytest.approx(sum(r["accuracy"] for r in res["corruptions"]) / 4)
    assert res["attack"]["name"] == "pgd" and "eps" not in res["attack"]
    torch.manual_seed(0)
    again = robustness_eval(TinyCNN(), loader, epsilons=(0.0, 0.05, 0.1), attack=PGD(steps=2),
                            corruptions=["gaussian_noise", "contrast"], severities=(1, 5))
    assert again == res  # the same model, the same perturbations


def test_restarts_take_the_worst_case_over_runs():
    torch.manual_seed(0)
    model, loader = TinyCNN(), DataLoader(_data(64), batch_size=32)
    attack = PGD(eps=0.03, steps=1)
    one = accuracy_under_attack(model, loader, attack, generator=torch.Generator().manual_seed(0))
    three = accuracy_under_attack(model, loader, attack, restarts=3, generator=torch.Generator().manual_seed(0))
    assert three <= one  # the first run of three is the single run: a sample survives three only if it survives it
    with pytest.raises(ValueError, match="restarts must be an int >= 1, got 0"):
        accuracy_under_attack(model, loader, attack, restarts=0)


def test_robustness_eval_refuses_bad_arguments():
    model, loader = TinyCNN(), DataLoader(_data(8), batch_size=8)
    with pytest.raises(ValueError, match="unknown corruption 'fog'"):
        robustness_eval(model, loader, corruptions=["fog"])
    with pytest.raises(ValueError, match="severities must be among 1, 2, 3, 4, 5; got 7"):
        robustness_eval(model, loader, severities=(7,))
    with pytest.raises(TypeError, match="use accuracy_under_attack"):
        robustness_eval(model, loader, attack=lambda m, x, y: x)


def test_robustness_tables(evaluated):
    runs, _ = evaluated
    head, body = robustness_table(runs)
    assert head == ["model", "training", "sparsity", "clean", "PGD-2 linf eps=0.05", "PGD-2 linf eps=0.1",
                    "mean corruption"]
    assert [row[:3] for row in body[:2]] == [["dense", "standard", "0.00%"], ["magnitude 75%", "standard", "75.00%"]]
    head, body = corruption_table(runs)
    assert head == ["model", "training", "gaussian noise", "contrast"] and len(body) == 4


def test_the_report_renders_the_robustness_section(evaluated, tmp_path):
    runs, _ = evaluated
    figs = robustness_figures(runs)
    assert [f.key for f in figs] == ["robustness_attack", "robustness_corruptions"]
    assert all(f.png.startswith(PNG) for f in figs)
    section = robustness_section(runs, notes=["one seed <b>"])
    html = render_html([RunSummary("dense", 0.9, 0.0)], sections=[section])
    images = [base64.b64decode(m) for m in re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)]
    assert sum(img.startswith(PNG) for img in images) >= 2
    assert "<h2>Robustness</h2>" in html and "PGD-2 linf eps=0.1" in html and "one seed &lt;b&gt;" in html
    written = write_report(tmp_path, [RunSummary("dense", 0.9, 0.0)], sections=[section])
    md = written["markdown"].read_text()
    assert "## Robustness" in md and "plots/robustness_attack.png" in md
    assert (tmp_path / "plots" / "robustness_corruptions.png").read_bytes().startswith(PNG)
    with pytest.raises(ValueError, match="at least one RobustnessRun"):
        robustness_section([])
