"""Robust latency comparisons: rounds of short blocks, shuffled order, medians.

:func:`interleaved_medians` times several functions that compute the same thing. Each
is called three times first: twice to warm up (numba compiles or loads a kernel from its
cache on the first call in a process, 0.1-0.2 s, which is not the kernel's cost and is not
counted against ``max_seconds``; a sparse layer's second call takes its one-row path,
another compiled function), then once to estimate the cost. Then, round after round (each round in a new random order from a fixed seed, so
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

Limits: ``budget`` sets the number of rounds (at least ``min_repeats``); ``max_seconds``
is a cap on the whole call after the warm-up calls. Each function's first timed call (its
estimate) is always made, so that :class:`TimingCapReached` carries an estimate of every
function; after those, no call starts once the cap is spent (a call in progress finishes).
If the estimates show that ``min_repeats`` rounds cannot fit in it, or it runs out before
they are done, :class:`TimingCapReached` is raised and the caller treats the comparison
as not made (or, with every estimate in hand, as made from one call each). ``stop(medians)``, checked after each
round from ``min_repeats`` on, ends the timing early once the answer is clear.
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


class TimingCapReached(RuntimeError):
    """``min_repeats`` rounds did not fit in ``max_seconds``; ``estimate``: seconds per call seen so far."""

    def __init__(self, message: str, estimate: dict[str, float]):
        super().__init__(message)
        self.estimate = estimate


def interleaved_medians(fns: dict[str, Callable[[], Any]], *, budget: float = 0.2, min_repeats: int = 5,
                        max_repeats: int = 50, block: int = 2, settle: float = 0.002,
                        device: torch.device | None = None, max_seconds: float | None = None,
                        stop: Callable[[dict[str, float]], bool] | None = None,
                        prepare: Callable[[], Any] | None = None) -> dict[str, float]:
    """``{name: median seconds per call}`` over rounds of blocks lasting about ``budget`` seconds.

    At least ``min_repeats`` and at most ``max_repeats`` rounds; ``block`` timed calls
    per function and round, after ``settle`` seconds of untimed calls. ``max_seconds``:
    hard cap (see the module docstring; :class:`TimingCapReached`); ``stop``: ends the
    rounds early when it returns true for the medians so far (from ``min_repeats`` rounds on).
    ``prepare``: called, untimed, before every timed call (e.g. :func:`.cache.evict`, so that
    each call starts with a cold cache); its time counts against ``max_seconds``.
    """
    if not fns:
        return {}
    for fn in fns.values():  # warm-up, outside the cap: numba compiles or loads a kernel on its first call
        for _ in range(2):  # (a sparse layer's second call takes its one-row path, another compiled function)
            fn()
            _sync(device)
    start = time.perf_counter()
    end = float("inf") if max_seconds is None else start + max_seconds
    estimate: dict[str, float] = {}
    prepared = 0.0  # seconds one call of prepare takes
    for name, fn in fns.items():  # one call each even past the cap (each already ran twice): the caller can still
        if prepare is not None:  # compare them on these (a 36 ms dense call used to hide a 10 ms sparse one)
            t0 = time.perf_counter()
            prepare()
            prepared = time.perf_counter() - t0
        t0 = time.perf_counter()
        fn()
        _sync(device)
        estimate[name] = time.perf_counter() - t0
    per_round = max(sum(max(settle, t) + block * (t + prepared) for t in estimate.values()), 1e-7)
    if time.perf_counter() + min_repeats * per_round > end:
        raise TimingCapReached(f"{min_repeats} rounds of about {per_round:.3g} s do not fit in {max_seconds:.3g} s",
                               estimate)
    repeats = max(min_repeats, min(max_repeats, int(budget / per_round)))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns)
    shuffle = random.Random(0).shuffle
    for done in range(repeats):
        if done >= min_repeats and (time.perf_counter() > end or (
                stop is not None and stop({n: statistics.median(s) for n, s in samples.items()}))):
            break
        if done and time.perf_counter() > end:
            raise TimingCapReached(f"only {done} of {min_repeats} rounds fit in {max_seconds:.3g} s", estimate)
        shuffle(order)
        for name in order:
            fn = fns[name]
            settled = time.perf_counter() + settle
            fn()
            _sync(device)
            while time.perf_counter() < settled:
                fn()
                _sync(device)
            for _ in range(block):
                if prepare is not None:
                    prepare()
                t0 = time.perf_counter()
                fn()
                _sync(device)
                samples[name].append(time.perf_counter() - t0)
    return {name: statistics.median(s) for name, s in samples.items()}
