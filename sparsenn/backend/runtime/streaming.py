"""The one-row plan chosen on the whole model when its weights exceed the last-level cache.

Each layer's one-row product is timed alone after :func:`.cache.evict`, which makes it
pay the memory's latency on every cache line, while a decoding model streams one layer
after another and the hardware overlaps those reads. Timed that way, SmolLM2-135M's
1536x576 int8 product took 0.13-0.16 ms against 0.025 ms inside a stream of 40 copies,
and the per-layer choices were close to a coin toss between formats that read 0.9 MB and
0.38 MB. At 70% sparsity with int8 weights the per-layer plan kept 45 of 211 layers in
float32 and decoded at 18.3-18.9 ms per token; the same model with every layer forced to
``bitmask_int8`` decoded at 15.3-16.8 ms.

So :func:`stream_plan` builds a second plan for each such batch size: every layer takes
the candidate holding the fewest bytes that agrees with its dense layer (:func:`.selection.agrees`;
a layer whose fewest-bytes candidate is what it runs already is left alone). Both plans
are timed on the whole model at that batch size (interleaved medians, like the whole-model
check) and the faster one is kept. The whole-model check (:mod:`.verification`) still
compares the result with the dense model afterwards, so the guarantee that the converted
model is never slower than the dense one is unchanged.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..kernels._tiles import SPMV_MAX_ROWS
from . import inputs as I
from . import timing
from .errors import ConversionError
from .layers import DENSE
from .replace import replace_module
from .selection import Clock, LayerWork, agrees
from .summary import ConversionSummary
from .verification import MODEL_ROUNDS, model_budget

PER_LAYER, FEWEST_BYTES = "per-layer plan", "fewest-bytes plan"


def stream_plan(converted: nn.Module, work: list[LayerWork], b: int, batch0: int, example_input: Any, tokens: bool,
                budget: float, clock: Clock, summary: ConversionSummary) -> nn.Module:
    """Keep the per-layer one-row plan at ``b`` or switch to the fewest-bytes plan, whichever runs the model faster."""
    changes = {w.name: k for w in work if w.cold and 0 < w.row.rows.get(b, 0) <= SPMV_MAX_ROWS
               for k in [_fewest_bytes(w, b, batch0)] if k is not None and k != w.row.choice.get(b, DENSE)}
    if not changes:
        return converted
    by_name = {w.name: w for w in work}
    modules = dict(converted.named_modules())
    plans = {PER_LAYER: {n: modules[n] for n in changes}, FEWEST_BYTES: {}}
    for n, k in changes.items():
        w = by_name[n]
        plans[FEWEST_BYTES][n] = w.layer({**w.row.choice, b: k})
    state = {"installed": PER_LAYER, "model": converted}

    def run(plan: str):
        if state["installed"] != plan:
            for n, m in plans[plan].items():
                state["model"] = replace_module(state["model"], n, m)
            state["installed"] = plan
        return I.call_model(state["model"], xb)

    xb = I.at_batch(example_input, b, batch0, tokens)
    try:
        times = timing.interleaved_medians({p: (lambda p=p: run(p)) for p in plans}, budget=model_budget(budget),
                                           min_repeats=MODEL_ROUNDS, max_repeats=60,
                                           max_seconds=None if clock.limit is None else max(clock.left_for_layers(), 0))
    except timing.TimingCapReached:
        run(PER_LAYER)
        summary.notes.append(f"batch {b}: the fewest-bytes one-row plan was not timed (time limit reached)")
        return state["model"]
    keep = FEWEST_BYTES if times[FEWEST_BYTES] < times[PER_LAYER] else PER_LAYER
    run(keep)
    summary.notes.append(
        f"batch {b}: the whole model with each layer's fewest-bytes kernel ({len(changes)} layers differ) took "
        f"{times[FEWEST_BYTES] * 1e3:.4g} ms vs {times[PER_LAYER] * 1e3:.4g} ms with the per-layer cold timings' "
        f"choices: the {keep} is used")
    if keep == FEWEST_BYTES:
        for n, k in changes.items():
            w = by_name[n]
            w.row.choice[b] = k
            w.row.note = "; ".join([*filter(None, [w.row.note]), f"batch {b}: {k} from the fewest-bytes plan"])
    return state["model"]


def _fewest_bytes(w: LayerWork, b: int, batch0: int) -> str | None:
    """The candidate holding the fewest bytes (no more than the dense weight) that agrees with the dense layer."""
    for k in sorted(w.no_larger_than_dense(w.packed), key=lambda k: w.row.bytes[k]):
        if k == w.row.choice.get(b):
            return k
        try:
            if agrees(w, k, b, batch0):
                return k
        except ConversionError:  # its rounding moves the output beyond the tolerance: not a candidate
            continue
    return None



__all__ = ["stream_plan"]
