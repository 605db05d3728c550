"""``sparsenn demo``: dense, gradual magnitude pruning, RigL, conversion, table and report."""

import re

import pytest
import torch
from conftest import DATA_DIR, needs_datasets

from sparsenn.cli.demo import run_demo

try:
    from sparsenn.backend.inference import runtime_convert

    runtime_convert()
    HAVE_RUNTIME = True
except Exception:  # noqa: BLE001
    HAVE_RUNTIME = False


def test_small_demo_tells_the_whole_story(tmp_path):
    lines = []
    result = run_demo(dense_epochs=2, prune_epochs=2, rigl_epochs=2, subset=400, out=tmp_path / "demo",
                      convert=HAVE_RUNTIME, print_fn=lines.append)
    text = "\n".join(lines)
    assert result["sparsity"] == pytest.approx(0.9, abs=1e-3)
    assert result["rigl_sparsity"] == pytest.approx(0.9, abs=1e-3)
    for a in ("dense_accuracy", "pruned_accuracy", "rigl_accuracy"):
        assert 0 <= result[a] <= 1
    for needle in ("1. dense", "2. gradual magnitude pruning to 90%", "3. RigL from scratch at 90%",
                   "test accuracy", "sparsity", "weight bytes", "GMP 90%", "RigL 90%", "html report"):
        assert needle in text, needle
    html = (tmp_path / "demo" / "report.html").read_text()
    assert len(re.findall(r'<img src="data:image/png;base64,', html)) == (5 if HAVE_RUNTIME else 4)
    assert (tmp_path / "demo" / "report.md").is_file()
    if HAVE_RUNTIME:
        assert "latency batch 1 (vs dense)" in text and "latency batch 64 (vs dense)" in text
        assert set(result["latency"]["gmp"]) == {1, 64}
        assert "Conversion: GMP 90%" in html
    assert torch.get_num_threads() >= 1


def test_demo_checks_its_arguments():
    with pytest.raises(ValueError, match="unknown demo data 'cifar'; valid: digits, mnist, fashion_mnist"):
        run_demo(data="cifar")
    with pytest.raises(ValueError, match=r"sparsity must be a number in \[0, 1\), got 1.5"):
        run_demo(sparsity=1.5)
    with pytest.raises(ValueError, match="rigl_epochs must be a positive integer, got 0"):
        run_demo(rigl_epochs=0)
    with pytest.raises(ValueError, match="--data mnist needs --data-dir DIR"):
        run_demo(data="mnist", print_fn=lambda *a: None)


def test_demo_default_training_is_accurate():
    """The shipped schedule: GMP at 90% within one point of dense; RigL at 90% within three."""
    result = run_demo(out=None, convert=False, print_fn=lambda *a: None)
    assert result["sparsity"] == pytest.approx(0.9, abs=1e-3)
    assert result["dense_accuracy"] > 0.95
    assert result["pruned_accuracy"] >= result["dense_accuracy"] - 0.01
    assert result["rigl_accuracy"] >= result["dense_accuracy"] - 0.03


@needs_datasets("mnist")
def test_demo_on_mnist_from_a_data_dir():
    lines = []
    result = run_demo(data="mnist", data_dir=str(DATA_DIR), subset=512, dense_epochs=1, prune_epochs=1,
                      rigl_epochs=1, out=None, convert=False, print_fn=lines.append)
    assert lines[0].startswith("mnist: 512 train / 128 test images (28x28, from ")
    assert "MLP 784-300-100-10" in lines[1]
    assert result["sparsity"] == pytest.approx(0.9, abs=1e-3) and result["dense_accuracy"] > 0.3
