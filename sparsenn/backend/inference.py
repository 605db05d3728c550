"""From a trained sparse model to a measured inference model: convert, time, count bytes.

:func:`measure` converts a model with the sparse runtime (:func:`sparsenn.convert`) and
collects the whole-model latency, dense vs converted, at a few batch sizes: the
runtime's own measurement where some layer runs sparse; where every layer runs dense
the converted model is the dense model, which is timed once and reported for both
(1.00x, no gain claimed). Bytes: what the converted model's layers hold (packed arrays
of the kernels in use, dense weights kept, biases) against the dense layers, and the
smallest exact storage format per weight (:mod:`sparsenn.backend.formats`; a storage
size, not what the runtime holds). The demo, ``sparsenn run`` (``outputs.convert``),
``convert`` and ``bench`` use it.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

__all__ = ["Measured", "RuntimeUnavailable", "layer_rows", "layer_speedups", "measure", "measure_latency",
           "runtime_convert", "weight_bytes"]


class RuntimeUnavailable(RuntimeError):
    """The sparse runtime (``sparsenn.convert``) is not part of this installation."""


def runtime_convert():
    """``sparsenn.convert``, or :class:`RuntimeUnavailable` naming what is missing."""
    try:
        from .runtime import convert
    except ImportError as e:
        raise RuntimeUnavailable(f"the sparse runtime is not available (sparsenn.backend.runtime: {e}); "
                                 f"conversion and latency measurements need it") from None
    return convert


@torch.inference_mode()
def measure_latency(module: nn.Module, x: torch.Tensor, *, repeats: int = 20, warmup: int = 3,
                    min_seconds: float = 0.05) -> float:
    """Median seconds per ``module(x)`` call over ``repeats`` timed rounds (each round runs the
    call enough times to last ``min_seconds / repeats``), after ``warmup`` calls."""
    was_training = getattr(module, "training", False)
    if hasattr(module, "eval"):
        module.eval()
    try:
        for _ in range(warmup):
            module(x)
        t0 = time.perf_counter()
        module(x)
        one = max(time.perf_counter() - t0, 1e-7)
        inner = max(1, int(min_seconds / repeats / one))
        samples = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(inner):
                module(x)
            samples.append((time.perf_counter() - t0) / inner)
    finally:
        if hasattr(module, "train"):
            module.train(was_training)
    return statistics.median(samples)


def weight_bytes(model: nn.Module) -> tuple[int, int, str]:
    """``(dense bytes, bytes in the smallest exact format per weight, the formats used)``."""
    from .formats.table import layer_bytes

    table = layer_bytes(model)
    dense = sum(b["dense"] for b in table.values())
    best = {name: min((v, f) for f, v in b.items() if v is not None) for name, b in table.items()}
    used = ", ".join(sorted({f for _, f in best.values()}))
    return dense, sum(v for v, _ in best.values()), used


def layer_rows(summary: Any) -> list[dict[str, Any]]:
    """The runtime's :class:`~sparsenn.backend.runtime.ConversionSummary` as flat per-layer rows for tables:
    layer, type, shape, sparsity, per batch size the kernel run there (and its measured speedup
    over the dense layer), the bytes the converted layer holds (and the dense layer's) and the
    runtime's note."""
    rows = []
    for r in getattr(summary, "layers", []):
        row: dict[str, Any] = {"layer": r.name, "type": r.type, "shape": "x".join(map(str, r.shape)),
                               "sparsity": f"{r.sparsity:.1%}"}
        for b in summary.batch_sizes:
            kernel = r.choice.get(b)
            speed = r.speedup(b) if kernel not in (None, "dense") else None
            row[f"batch {b}"] = ("dense (not measured)" if kernel is None else kernel if speed is None
                                 else f"{kernel} ({speed:.2f}x)")
        held = getattr(r, "held_bytes", 0)
        row["bytes"] = (f"{held} (dense {r.dense_held_bytes})" if r.converted and held
                        else str(held) if held else "-")
        row["note"] = r.note
        rows.append(row)
    return rows


def layer_speedups(summary: Any) -> dict[str, dict[int, float]]:
    """``{layer: {batch size: dense time / time of what runs there}}`` for layers measured sparse."""
    out: dict[str, dict[int, float]] = {}
    for r in getattr(summary, "layers", []):
        values = {b: r.speedup(b) for b in r.choice if r.times.get(b)}
        values = {b: v for b, v in values.items() if v is not None}
        if values and r.converted:
            out[r.name] = values
    return out


@dataclass
class Measured:
    """A converted model and its measurements."""

    module: nn.Module
    batch_sizes: tuple[int, ...]
    latency: dict[int, tuple[float, float]]  #: batch size -> (dense s, sparse s) per call
    dense_bytes: int  #: dense fp32 weights (biases excluded)
    sparse_bytes: int  #: the weights in the smallest exact storage format each (a storage size)
    formats: str  #: the formats ``sparse_bytes`` uses
    summary: Any = None  #: the runtime's :class:`~sparsenn.backend.runtime.ConversionSummary`
    layers: list[dict[str, Any]] = field(default_factory=list)  #: :func:`layer_rows` of the summary
    layer_speedups: dict[str, dict[int, float]] = field(default_factory=dict)  #: :func:`layer_speedups`
    dense_held_bytes: int = 0  #: what the dense model's converted-or-not layers hold (weights, biases)
    held_bytes: int = 0  #: what the converted model's layers hold (``summary.held_bytes()``)

    def speedup(self, batch_size: int) -> float:
        dense, sparse = self.latency[batch_size]
        return dense / sparse if sparse > 0 else float("inf")

    def save(self, path: str | Path) -> Path:
        """Write the converted model (:func:`sparsenn.backend.runtime.save`; load with :func:`sparsenn.backend.runtime.load`)."""
        from .runtime import save

        return save(self.module, path)


def _batch(example: torch.Tensor, n: int) -> torch.Tensor:
    reps = -(-n // example.shape[0])
    return example.repeat(reps, *([1] * (example.dim() - 1)))[:n]


def measure(model: nn.Module, example_input: torch.Tensor, *, batch_sizes: Sequence[int] = (1, 64),
            progress: bool = False) -> Measured:
    """Convert ``model`` with :func:`sparsenn.convert` (which works on a copy, masks removed;
    ``progress``: its per-layer bar) and collect the whole-model latency, dense vs converted,
    at ``batch_sizes``: the runtime's measurement where some layer runs sparse; elsewhere the
    converted model runs the dense layers, so the dense model is timed once
    (:func:`measure_latency`) and reported for both. Also the bytes (see the module docstring)."""
    from ..core.plain import plain_copy

    convert = runtime_convert()
    batch_sizes = tuple(int(b) for b in batch_sizes)
    converted = convert(model, example_input, batch_sizes=batch_sizes, progress=progress)
    summary = getattr(converted, "conversion_summary", None)
    latency = dict(getattr(summary, "model_times", None) or {})
    dense = plain_copy(model).eval()
    for b in batch_sizes:
        if b in latency:
            continue
        x = _batch(example_input, b)
        if summary is not None and not summary.sparse_at(b):  # the dense model there: one timing for both
            t = measure_latency(dense, x)
            latency[b] = (t, t)
        else:
            latency[b] = (measure_latency(dense, x), measure_latency(converted, x))
    dense_b, sparse_b, used = weight_bytes(dense)
    held = summary.held_bytes() if summary is not None else (0, 0)
    return Measured(converted, batch_sizes, {b: latency[b] for b in batch_sizes}, dense_b, sparse_b, used, summary,
                    layer_rows(summary), layer_speedups(summary), held[0], held[1])
