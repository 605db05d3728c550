"""One-row products of a model larger than the last-level cache are timed cold (runtime/cache.py)."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

import sparsenn as sn
from sparsenn.backend.runtime import cache, timing


def test_cache_size_is_read_or_assumed(monkeypatch, tmp_path):
    for i, size in enumerate(["48K", "2048K", "32768K"]):
        (tmp_path / f"index{i}").mkdir()
        (tmp_path / f"index{i}" / "size").write_text(size + "\n")
    monkeypatch.setattr(cache, "_CACHE_DIR", tmp_path)
    cache.last_level_cache_bytes.cache_clear()
    try:
        assert cache.last_level_cache_bytes() == 32 << 20
        monkeypatch.setattr(cache, "_CACHE_DIR", tmp_path / "absent")
        cache.last_level_cache_bytes.cache_clear()
        assert cache.last_level_cache_bytes() == cache.DEFAULT_LLC_BYTES
    finally:
        cache.last_level_cache_bytes.cache_clear()


@pytest.mark.parametrize("text,size", [("512K", 512 << 10), ("1M", 1 << 20), ("12", 12), ("x", None), ("", None)])
def test_size_strings(text, size):
    assert cache._parse_size(text) == size


def test_prepare_runs_untimed_before_every_timed_call():
    calls = []

    def prepare():
        calls.append("prepare")
        time.sleep(0.002)  # not in the medians

    def fn():
        calls.append("fn")

    out = timing.interleaved_medians({"a": fn}, budget=0.01, min_repeats=3, block=2, settle=0.0, prepare=prepare)
    assert out["a"] < 0.002
    timed = [i for i, c in enumerate(calls) if c == "fn" and i and calls[i - 1] == "prepare"]
    assert len(timed) >= 3 * 2 + 1  # the estimate call and every timed call follow a prepare


def test_prepare_counts_against_the_cap():
    with pytest.raises(timing.TimingCapReached):
        timing.interleaved_medians({"a": lambda: None}, budget=0.01, min_repeats=5, prepare=lambda: time.sleep(0.02),
                                   max_seconds=0.05)


def _pruned_mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 64)).eval()
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                m.weight[torch.rand_like(m.weight) < 0.8] = 0
    return model


@pytest.mark.parametrize("llc,cold", [(1 << 10, True), (1 << 30, False)])
def test_conversion_times_one_row_cold_only_when_the_weights_exceed_the_cache(monkeypatch, llc, cold):
    from sparsenn.backend.runtime import conversion, selection

    monkeypatch.setattr(conversion, "last_level_cache_bytes", lambda: llc)
    evicted = []
    monkeypatch.setattr(selection, "evict", lambda: evicted.append(1))
    model = _pruned_mlp()
    x = torch.randn(4, 128)
    c = sn.convert(model, x, batch_sizes=(1, 64), budget=0.05, verify=False, screen=False)
    notes = " ".join(c.conversion_summary.notes)
    assert ("timed with a cold cache" in notes) is cold
    assert bool(evicted) is cold
    torch.testing.assert_close(c(x), model(x), rtol=1e-4, atol=1e-5)


def _only(medians):
    """A stand-in for the timing module as the streaming step sees it (the per-layer timing keeps the real one)."""
    import types
    return types.SimpleNamespace(interleaved_medians=medians, TimingCapReached=timing.TimingCapReached)


def _plan_kernels(c, b=1):
    return {r.name: r.choice.get(b) for r in c.conversion_summary.layers if r.converted}


@pytest.mark.parametrize("weights", ["fp32", "int8"])
def test_the_fewest_bytes_plan_is_timed_on_the_whole_model_and_kept_only_when_faster(monkeypatch, weights):
    """Cold mode: the plan of each layer's fewest-bytes kernel is timed against the per-layer choices."""
    from sparsenn.backend.runtime import conversion, selection, streaming

    monkeypatch.setattr(conversion, "last_level_cache_bytes", lambda: 1 << 10)
    monkeypatch.setattr(selection, "evict", lambda: None)
    seen = []
    real = streaming.timing.interleaved_medians

    def rigged(fns, **kw):  # the fewest-bytes plan wins (both plans still run: their outputs are used)
        seen.append(sorted(fns))
        real(fns, **kw)
        return {streaming.PER_LAYER: 2.0, streaming.FEWEST_BYTES: 1.0}

    monkeypatch.setattr(streaming, "timing", _only(rigged))
    monkeypatch.setattr(conversion, "choose", lambda *a, **kw: "dense")  # the per-layer plan: every layer dense
    model = _pruned_mlp()
    x = torch.randn(4, 128)
    c = sn.convert(model, x, batch_sizes=(1, 64), budget=0.05, verify=False, screen=False, weights=weights)
    s = c.conversion_summary
    assert seen == [[streaming.FEWEST_BYTES, streaming.PER_LAYER]]  # batch 1 only: 64 rows are not cold
    assert any("fewest-bytes plan is used" in n for n in s.notes)
    for r in s.layers:
        if r.converted and r.choice.get(1) not in (None, "dense"):
            held = {k: v for k, v in r.bytes.items() if k != "dense" and v <= r.bytes.get("dense", 1 << 62)}
            assert r.bytes[r.choice[1]] == min(held.values())  # one row: the fewest bytes
    modules = dict(c.named_modules())
    for name, k in _plan_kernels(c).items():  # the modules run what the summary says
        assert modules[name].kernel_for(1) == k
    tol = {"rtol": 1e-4, "atol": 1e-5} if weights == "fp32" else {"rtol": 0.05, "atol": 0.05}
    torch.testing.assert_close(c(x[:1]), model(x[:1]), **tol)
    torch.testing.assert_close(c(x), model(x), **tol)


def test_the_per_layer_plan_stays_when_the_fewest_bytes_plan_is_slower(monkeypatch):
    from sparsenn.backend.runtime import conversion, selection, streaming

    monkeypatch.setattr(conversion, "last_level_cache_bytes", lambda: 1 << 10)
    monkeypatch.setattr(selection, "evict", lambda: None)
    monkeypatch.setattr(streaming, "timing",
                        _only(lambda fns, **kw: {streaming.PER_LAYER: 1.0, streaming.FEWEST_BYTES: 2.0}))
    model = _pruned_mlp()
    x = torch.randn(4, 128)
    per_layer = []
    real = streaming.stream_plan

    def spy(converted, work, b, *a, **kw):
        before = {w.name: w.row.choice.get(b) for w in work}
        out = real(converted, work, b, *a, **kw)
        per_layer.append(before == {w.name: w.row.choice.get(b) for w in work})
        return out

    monkeypatch.setattr(conversion, "stream_plan", spy)
    c = sn.convert(model, x, batch_sizes=(1, 64), budget=0.05, verify=False, screen=False, weights="int8")
    assert per_layer and all(per_layer)
    assert not any("fewest-bytes plan is used" in n for n in c.conversion_summary.notes)
    modules = dict(c.named_modules())
    for name, k in _plan_kernels(c).items():
        m = modules[name]
        assert (m.kernel_for(1) if hasattr(m, "kernel_for") else "dense") == k
