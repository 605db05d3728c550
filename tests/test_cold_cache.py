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
