"""bench/dst_short_runs.py: the quick mode end to end (two shards sharing one rows file, then a resume that
trains nothing), and the ordering target computed from the numbers."""

import json
from pathlib import Path

import pytest
from conftest import load_bench

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "datasets"


@pytest.mark.skipif(not ((DATA / "mnist").is_dir() and (DATA / "fashion_mnist").is_dir()),
                    reason=f"MNIST / Fashion-MNIST not found at {DATA}")
def test_quick_shards_resume_and_report(tmp_path):
    mod = load_bench("dst_short_runs_bench", "dst_short_runs.py")
    prefix = str(tmp_path / "d")
    common = ["--quick", "--models", "lenet300100", "--epochs", "1", "--train-size", "1000", "--test-size", "300",
              "--data-dir", str(DATA), "--out", prefix]
    _, _, rows0 = mod.main(common + ["--shard", "0/2"])
    summary, target, rows = mod.main(common + ["--shard", "1/2"])
    jobs = mod.make_jobs(["issue", "bench"], ["lenet300100"], [1], 1, [1])
    assert len(jobs) == 10 and sorted(r["key"] for r in rows) == sorted(j.key for j in jobs)
    assert sorted(r["key"] for r in rows0) == sorted(j.key for i, j in enumerate(jobs) if i % 2 == 0)

    steps = 1000 // 128 + 1  # 8 batches of 128 (the last one short)
    for r in rows:
        assert r["error"] <= 100 and r["sparsity"] >= 0.95 - 1e-3
        if r["part"] == "bench":
            assert r["steps"] == steps
        if r["method"] == "static":
            assert r["updates"] == 0 and r["update_every_used"] is None
        elif r["update_every"] is None:  # the library default, 3 * isqrt(total_steps)
            assert r["update_every_used"] == mod.sn.create.dst.default_update_every(r["steps"])
        else:
            assert r["update_every_used"] == r["update_every"] in (100, 800) and r["updates"] == 0  # 16 steps
    assert summary[("bench", "lenet300100", 1, "RigL")]["n"] == 1
    p = target["points"]
    assert [(x["model"], x["epochs"]) for x in p] == [("LeNet-300-100", 1)]
    e = {m: summary[("bench", "lenet300100", 1, mod.LABELS[m])]["error"] for m in mod.METHODS}
    assert target["met"] == (e["rigl"] <= e["set"] <= e["static"])

    md = Path(prefix + ".md").read_text()
    assert "**Target**" in md and "**Issue 13 recipe**" in md and "RigL (every 100)" in md
    saved = json.loads(Path(prefix + ".json").read_text())
    assert len(saved["rows"]) == 10 and len(saved["meta"]["commands"]) == 2

    lines = Path(prefix + ".rows.jsonl").read_text().splitlines()
    _, _, again = mod.main(common)  # resume: every job is in the file, nothing is trained again
    assert Path(prefix + ".rows.jsonl").read_text().splitlines() == lines and len(again) == 10


def test_order_target_is_computed_not_assumed():
    mod = load_bench("dst_short_runs_bench", "dst_short_runs.py")

    def entry(err):
        return {"error": err, "std": 0.0, "n": 3}

    summary = {("bench", "lenet300100", 5, "static"): entry(3.0), ("bench", "lenet300100", 5, "SET"): entry(2.0),
               ("bench", "lenet300100", 5, "RigL"): entry(1.9),
               ("bench", "mlp", 5, "static"): entry(14.0), ("bench", "mlp", 5, "SET"): entry(14.1),
               ("bench", "mlp", 5, "RigL"): entry(13.0),
               ("bench", "mlp", 20, "static"): entry(13.0)}  # incomplete: not a point
    t = mod.order_target(summary)
    assert [(p["model"], p["epochs"]) for p in t["points"]] == [("LeNet-300-100", 5), ("MLP 784-1000-1000-1000-10", 5)]
    assert t["met"] is False and t["points_met"] == 1
    assert t["points"][1]["rigl_le_set"] is True and t["points"][1]["set_le_static"] is False
    summary[("bench", "mlp", 5, "SET")] = entry(13.5)
    assert mod.order_target(summary)["met"] is True
    assert mod.order_target({})["met"] is None
