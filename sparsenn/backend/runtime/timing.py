"""Robust latency comparisons: rounds of short blocks, shuffled order, medians.

:func:`interleaved_medians` times several functions that compute the same thing. Each
is called twice first (numba compiles on the first call; the second estimates the
cost). Then, round after round (each round in a new random order from a fixed seed, so
that a slow period on a shared machine hits all of them alike and no function always
runs right after the same other one), each function runs one *block*:
calls that are not timed until ``settle`` seconds have passed (at least one), then
``block`` timed calls. The untimed calls matter because the engines use different
thread pools (PyTorch's OpenMP, numba's OpenMP, ONNX Runtime's own): a pool spins for
a while after its last task, and the function timed right after another engine would
pay for that engine's spinning threads (measured: 2x slower products). Settling is not
always enough (ONNX Runtime's pool can spin longer), hence the shuffled order: with a
fixed alternating order, the converted model, which always followed ONNX Runtime, ran
its dense product at 0.77-0.94x the speed of the same product timed elsewhere in the
round (bench/runtime.py, BERT feed-forward at batch 1). The median per function
is robust to the occasional preempted call.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


def _sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_medians(fns: dict[str, Callable[[], Any]], *, budget: float = 0.2, min_repeats: int = 5,
                        max_repeats: int = 50, block: int = 2, settle: float = 0.002,
                        device: torch.device | None = None) -> dict[str, float]:
    """``{name: median seconds per call}`` over rounds of blocks lasting about ``budget`` seconds.

    At least ``min_repeats`` and at most ``max_repeats`` rounds; ``block`` timed calls
    per function and round, after ``settle`` seconds of untimed calls.
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
    per_round = max(sum(max(settle, t) + block * t for t in estimate.values()), 1e-7)
    repeats = max(min_repeats, min(max_repeats, int(budget / per_round)))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns)
    shuffle = random.Random(0).shuffle
    for _ in range(repeats):
        shuffle(order)
        for name in order:
            fn = fns[name]
            end = time.perf_counter() + settle
            fn()
            _sync(device)
            while time.perf_counter() < end:
                fn()
                _sync(device)
            for _ in range(block):
                t0 = time.perf_counter()
                fn()
                _sync(device)
                samples[name].append(time.perf_counter() - t0)
    return {name: statistics.median(s) for name, s in samples.items()}
