"""The whole-model check: the converted model computes what the dense one does, and is not slower.

At each batch size where some layer runs sparse, both models are timed end to end (interleaved medians). Where the converted model is *not faster* (no
margin: a tie or noise goes to dense), every layer runs dense at that batch size;
layers left dense at every batch size get their original module back. The check is
made twice (before and after that clean-up), and falling back on either, so a measured
slowdown has two chances to be caught and none to survive; ``summary.model_times``
holds the second measurement. A batch size where no layer runs sparse is the dense
model there and is not timed. Finally the converted model's output is compared with the
dense model's (``allclose``; a mismatch raises); a result with no sparse layer is the
dense model and needs neither. A check that cannot get :data:`MODEL_ROUNDS` rounds
within the time left falls back to dense at that batch size (noted): nothing unmeasured
survives.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from torch import nn

from ...core.plain import plain_copy
from . import inputs as I
from . import timing
from .layers import DENSE
from .replace import replace_module, sparse_layers
from .selection import Clock, close
from .summary import ConversionSummary

MODEL_ROUNDS = 3  # fewest interleaved rounds behind a whole-model comparison (2 timed calls per model each)
CALLS_PER_LOOK = 2 * (2 + 3 * MODEL_ROUNDS)  # two models: 2 warm-up calls, then (1 settling + 2 timed) per round


def model_budget(budget: float) -> float:
    """Seconds a whole-model comparison aims for (it runs at least MODEL_ROUNDS rounds)."""
    return 4 * budget


def check_seconds(model_seconds: float, budget: float) -> float:
    """Expected seconds of the two whole-model comparisons at a batch size where one call takes ``model_seconds``."""
    return 2 * max(model_budget(budget), CALLS_PER_LOOK * model_seconds)


def check_output(converted: nn.Module, example_input: Any, reference: Any, exact: bool = True) -> None:
    """Raise if the converted model's output differs from ``reference`` (the dense model's).

    ``exact=False`` (rounded or quantized weights): every layer was checked against its
    own rounded weight and tolerance; the model's change is measured and reported instead
    (:mod:`.accuracy`)."""
    if not exact:
        return
    for y, r in zip(I.output_tensors(I.call_model(converted, example_input)), I.output_tensors(reference)):
        ok, worst = close(y, r)
        if not ok:
            raise RuntimeError(f"the converted model's output differs from the dense model's "
                               f"(max abs error {worst:.3g}); please report this as a bug")


def dense_copy(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` without masks (its weights hold the zeros): the dense reference."""
    return plain_copy(model).eval()


def verify(converted: nn.Module, model: nn.Module, example_input: Any, reference: Any,
           batch_sizes: tuple[int, ...], batch0: int, summary: ConversionSummary, budget: float,
           clock: Clock, timing_on: bool = True, progress: Any = None, tokens: bool = False,
           exact: bool = True, dense: Callable[[], nn.Module] | None = None) -> nn.Module:
    """Time the converted model against the dense one; check its output (see the module docstring)."""
    if not sparse_layers(converted):  # the dense model itself: nothing to check or time
        summary.notes.append("no layer runs sparse at any batch size: the converted model is the dense model")
        return converted
    if not timing_on:
        check_output(converted, example_input, reference, exact)
        return converted
    dense_model = dense() if dense is not None else dense_copy(model)
    inputs: dict[int, Any] = {}

    def compare(b: int) -> tuple[float, float] | None:
        xb = inputs.setdefault(b, I.at_batch(example_input, b, batch0, tokens))
        fns = {"dense": lambda: I.call_model(dense_model, xb), "converted": lambda: I.call_model(converted, xb)}
        try:
            times = timing.interleaved_medians(fns, budget=model_budget(budget), min_repeats=MODEL_ROUNDS,
                                               max_repeats=60, max_seconds=None if clock.limit is None
                                               else max(clock.left(), 0.0))
        except timing.TimingCapReached:
            return None
        return times["dense"], times["converted"]

    def fall_back(b: int, why: str) -> None:
        for lname, layer in sparse_layers(converted):
            if summary.layer(lname).choice.get(b, DENSE) == DENSE:
                continue
            if layer.weight is None:  # keep the dense weight for this batch size
                w = dense_model.get_submodule(lname).weight.detach()
                layer.weight = w.reshape(w.shape[0], -1).clone()
            layer.set_plan(summary.layer(lname).rows.get(b), DENSE)
            summary.layer(lname).choice[b] = DENSE
        summary.notes.append(f"batch {b}: {why}; every layer runs dense at this batch size")

    def look(b: int) -> None:
        times = compare(b)
        if times is None:
            fall_back(b, f"the whole-model check did not fit in the time limit ({clock.limit:g} s)")
        elif times[1] >= times[0]:
            fall_back(b, f"the converted model measured {times[1] * 1e3:.4f} ms vs dense {times[0] * 1e3:.4f} ms "
                         "(not faster)")
            summary.model_times.pop(b, None)
        else:
            summary.model_times[b] = times

    for b in batch_sizes:  # first look, with every converted layer in place
        if summary.sparse_at(b):
            look(b)
    converted = restore_dense_layers(converted, dense_model, summary)
    for b in batch_sizes:  # second look, after the clean-up; its times are the ones reported
        if summary.sparse_at(b):
            look(b)
            converted = restore_dense_layers(converted, dense_model, summary)
        if progress is not None:
            progress.update()
    if not sparse_layers(converted):
        summary.model_times.clear()
        summary.notes.append("no layer runs sparse at any batch size: the converted model is the dense model")
    else:
        check_output(converted, example_input, reference, exact)
    return converted


def restore_dense_layers(converted: nn.Module, dense_model: nn.Module, summary: ConversionSummary) -> nn.Module:
    """A sparse layer that runs dense at every batch size gets its original (dense) module back."""
    for lname, layer in sparse_layers(converted):
        if all(k == DENSE for k in layer.plan.values()):
            original = copy.deepcopy(dense_model.get_submodule(lname))
            row = summary.layer(lname)
            row.note = "; ".join(filter(None, [row.note, "dense at every batch size after the whole-model check"]))
            converted = replace_module(converted, lname, original)
    return converted
