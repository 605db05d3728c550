"""The objective-sparsity benchmark's --quick mode runs end to end on the real MNIST files."""

import json
from pathlib import Path

import pytest
from conftest import DATA_DIR, load_bench, needs_datasets

ROOT = Path(__file__).resolve().parents[1]
DATA = DATA_DIR


@needs_datasets("mnist")
def test_quick_objective_benchmark_runs(tmp_path):
    mod = load_bench("objective_bench", "objective.py")
    weight, relu, sae = mod.main(["--quick", "--train-size", "512", "--test-size", "256", "--data-dir", str(DATA),
                                  "--out", str(tmp_path / "o")])
    methods = [r["method"] for r in weight]
    assert methods.count("dense (SGD)") == 1
    for method in ("L1 subgradient (SGD)", "proximal SGD (ISTA)", "FISTA", "proximal Adam", "sparse VD", "GMP"):
        assert methods.count(method) == 2, method
    for r in weight:
        assert 0 <= r["error"] <= 100 and r["zeros"] <= r["small"] <= r["total"] == 266_200
        assert r["sparsity"] == pytest.approx(r["zeros"] / r["total"])
    assert [r["sparsity"] for r in weight if r["method"] == "GMP"] == pytest.approx([0.9, 0.98], abs=1e-4)
    assert [r["method"] for r in relu][0] == "dense (SGD)" and len(sae) == 3
    assert all(0 < r["rho_hat"] < 1 and r["mse"] > 0 for r in sae)
    assert (tmp_path / "o.md").read_text().count("|") > 50
    assert json.loads((tmp_path / "o.json").read_text())["meta"]["epochs"] == 1
