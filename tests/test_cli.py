"""The `sparsenn` command and the demo."""

import subprocess
import sys

import pytest

from sparsenn.cli import main
from sparsenn.demo import run_demo


def test_demo_prunes_to_target_and_prints_report():
    lines = []
    result = run_demo(sparsity=0.9, dense_epochs=3, prune_epochs=3, print_fn=lines.append)
    text = "\n".join(lines)
    assert result["sparsity"] == pytest.approx(0.9, abs=1e-3)
    assert 0.5 < result["dense_accuracy"] <= 1 and 0.3 < result["pruned_accuracy"] <= 1
    for name in ("fc1.weight", "fc2.weight", "fc3.weight", "total", "accuracy", "pruned"):
        assert name in text


def test_demo_default_run_is_accurate():
    """The shipped demo: 90% sparse and within one point of the dense accuracy."""
    result = run_demo(print_fn=lambda *a: None)
    assert result["sparsity"] == pytest.approx(0.9, abs=1e-3)
    assert result["dense_accuracy"] > 0.95
    assert result["pruned_accuracy"] >= result["dense_accuracy"] - 0.01


def test_cli_list_and_help(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "magnitude" in out and "erk" in out and "N:M" in out and "polynomial" in out
    with pytest.raises(SystemExit) as e:
        main(["demo", "--help"])
    assert e.value.code == 0
    assert main([]) == 2


def test_cli_bad_sparsity_is_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["demo", "--sparsity", "1.5"])
    assert e.value.code == 2
    assert "--sparsity must be in [0, 1), got 1.5" in capsys.readouterr().err


def test_console_script_entry_point():
    out = subprocess.run([sys.executable, "-m", "sparsenn.cli", "list"], capture_output=True, text=True, check=True)
    assert "methods" in out.stdout
