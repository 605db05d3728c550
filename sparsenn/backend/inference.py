"""From a trained sparse model to a measured inference model: convert, time, count bytes.

:func:`measure` converts a model with the sparse runtime (:func:`sparsenn.convert`),
times the dense model and the converted one on the same inputs at a few batch sizes,
and counts weight bytes (dense fp32 vs the smallest exact format, :mod:`sparsenn.backend.formats`).
The demo, ``sparsenn run`` (``outputs.convert``), ``convert`` and ``bench`` use it.
"""

from __future__ import annotations

import copy
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
    over the dense layer), the chosen kernel's bytes and the runtime's note."""
    rows = []
    for r in getattr(summary, "layers", []):
        row: dict[str, Any] = {"layer": r.name, "type": r.type, "shape": "x".join(map(str, r.shape)),
                               "sparsity": f"{r.sparsity:.1%}"}
        for b in summary.batch_sizes:
            kernel = r.choice.get(b)
            speed = r.speedup(b) if kernel not in (None, "dense") else None
            row[f"batch {b}"] = ("dense (not measured)" if kernel is None else kernel if speed is None
                                 else f"{kernel} ({speed:.2f}x)")
        sparse = [k for k in dict.fromkeys(r.choice.values()) if k != "dense"]
        dense_b = r.bytes.get("dense")
        row["bytes"] = (f"{r.bytes.get(sparse[0], '-')} (dense {dense_b})" if sparse and sparse[0] in r.bytes
                        else "-" if dense_b is None else str(dense_b))
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
    dense_bytes: int
    sparse_bytes: int
    formats: str
    summary: Any = None  #: the runtime's :class:`~sparsenn.backend.runtime.ConversionSummary`
    layers: list[dict[str, Any]] = field(default_factory=list)  #: :func:`layer_rows` of the summary
    layer_speedups: dict[str, dict[int, float]] = field(default_factory=dict)  #: :func:`layer_speedups`

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
    """Convert ``model`` with :func:`sparsenn.convert` (which works on a copy, masks removed) and
    collect the whole-model latency it measured, dense vs converted, at ``batch_sizes`` (timed
    here with :func:`measure_latency` if the runtime reports none) and the weight bytes."""
    from ..core.masks import remove_masks
    from ..core.progress import Bar

    convert = runtime_convert()
    batch_sizes = tuple(int(b) for b in batch_sizes)
    with Bar(1, "convert", unit="model", enabled=progress) as bar:
        converted = convert(model, example_input, batch_sizes=batch_sizes)
        bar.update()
    summary = getattr(converted, "conversion_summary", None)
    latency = dict(getattr(summary, "model_times", None) or {})
    dense = copy.deepcopy(model).eval()
    remove_masks(dense)
    for b in batch_sizes:
        if b not in latency:
            x = _batch(example_input, b)
            latency[b] = (measure_latency(dense, x), measure_latency(converted, x))
    dense_b, sparse_b, used = weight_bytes(dense)
    return Measured(converted, batch_sizes, {b: latency[b] for b in batch_sizes}, dense_b, sparse_b, used, summary,
                    layer_rows(summary), layer_speedups(summary))
