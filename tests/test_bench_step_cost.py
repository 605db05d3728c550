"""The step-cost benchmark's --quick mode runs end to end (timings themselves are not asserted)."""

import json
import math

import pytest
from conftest import load_bench


def test_quick_step_cost_runs(tmp_path):
    mod = load_bench("step_cost_bench", "step_cost.py")
    results = mod.main(["--quick", "--out", str(tmp_path / "c")])
    assert [r["model"] for r in results] == ["MLP 784-1000-1000-1000-10", "LeNet-300-100"]
    for r in results:
        assert set(r["median_ms"]) == {"dense", "static", "set", "rigl"}
        assert all(0 < v < math.inf for v in r["median_ms"].values())
        # warm-up block + 2 timed blocks of 10 steps, an update every 10 steps
        assert r["updates"] == {"dense": 0, "static": 0, "set": 3, "rigl": 3} and r["steps_timed"] == 20
        q = r["ratios"]
        assert q["static/dense"] == pytest.approx(r["median_ms"]["static"] / r["median_ms"]["dense"])
        assert r["masked_met"] == (q["static/dense"] <= 1.10) and r["rigl_met"] == (q["rigl/static"] <= 1.05)
    md = (tmp_path / "c.md").read_text()
    assert "**Targets**" in md and md.count("LeNet-300-100") == 2
    assert json.loads((tmp_path / "c.json").read_text())["results"][1]["block"] == 10


def test_block_must_hold_whole_update_periods(capsys):
    mod = load_bench("step_cost_bench", "step_cost.py")
    with pytest.raises(SystemExit) as e:
        mod.main(["--block", "150", "--update-every", "100"])
    assert e.value.code == 2
    assert "must be a multiple of --update-every" in capsys.readouterr().err
