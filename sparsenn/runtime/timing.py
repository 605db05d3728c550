"""Robust latency comparisons: interleaved repetitions, medians.

:func:`interleaved_medians` times several functions that compute the same thing. Each
is called twice first (numba compiles on the first call; the second estimates the
cost), then the functions are called in rounds, alternating forward and reverse order
(so a slow period on a shared machine hits all of them alike, and none always runs
right after a particular other one), until a time budget is spent. The median per
function is robust to the occasional preempted call.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch


def _sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_medians(fns: dict[str, Callable[[], Any]], *, budget: float = 0.2, min_repeats: int = 5,
                        max_repeats: int = 50, device: torch.device | None = None) -> dict[str, float]:
    """``{name: median seconds per call}`` over interleaved rounds lasting about ``budget`` seconds.

    At least ``min_repeats`` and at most ``max_repeats`` rounds.
    """
    if not fns:
        return {}
    estimate = {}
    for name, fn in fns.items():
        fn()
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        estimate[name] = time.perf_counter() - t0
    per_round = max(sum(estimate.values()), 1e-7)
    repeats = max(min_repeats, min(max_repeats, int(budget / per_round)))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns)
    for r in range(repeats):
        for name in (order if r % 2 == 0 else order[::-1]):
            t0 = time.perf_counter()
            fns[name]()
            _sync(device)
            samples[name].append(time.perf_counter() - t0)
    return {name: statistics.median(s) for name, s in samples.items()}
