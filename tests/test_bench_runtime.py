"""The runtime benchmark's --quick mode runs end to end: every engine, every target, both files."""

import json

from conftest import load_bench


def test_quick_runtime_benchmark_runs(tmp_path):
    mod = load_bench("runtime_bench", "runtime.py")
    result = mod.main(["--quick", "--deepsparse-python", "none", "--out", str(tmp_path / "rt")])
    cells = result["cells"]
    assert [(c["workload"], c["level"]) for c in cells] == [
        (w, lv) for w in ("mlp", "bert_ffn", "bert_proj") for lv in ("0%", "90%", "2:4")]
    for c in cells:
        assert set(c["times_ms"]) == {"1", "16"}
        for t in c["times_ms"].values():
            assert {"dense", "torch_csr", "sparsenn"} <= set(t) and all(v > 0 for v in t.values())
        for errs in c["errors"].values():
            assert all(e < 1e-4 for e in errs.values()), errs
        assert c["bytes"]["dense"] > 0 and c["bytes"]["sparsenn b1"] > 0
    mlp90 = next(c for c in cells if c["workload"] == "mlp" and c["level"] == "90%")
    assert mlp90["bytes"]["csr"] < mlp90["bytes"]["dense"] / 4
    assert mlp90["sparsity"] > 0.89
    kinds = {t["target"] for t in result["targets"]}
    assert any("DeepSparse" in k for k in kinds) and any("bandwidth" in k for k in kinds)
    assert any("never slower" in k for k in kinds)
    md = (tmp_path / "rt.md").read_text()
    assert "## Targets" in md and "## Model bytes per format" in md and md.count("|") > 100
    assert json.loads((tmp_path / "rt.json").read_text())["meta"]["quick"] is True
