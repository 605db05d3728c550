"""The conversion summary: per layer, the kernel chosen at each batch size, why, and what it holds.

``str(summary)`` is a table; ``to_dict()`` / ``to_records()`` give JSON-ready data
(times in milliseconds there). Only measured differences are shown as speedups: a layer
runs sparse at a batch size only where its kernel measured at least ``margin`` faster
than the dense layer; a batch size where no layer runs sparse shows the dense model
(1.00x, nothing to time); a whole-model gain smaller than ``margin`` is labelled as
within noise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .cost import SLACK
from .layers import DENSE


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f}"


@dataclass
class LayerSummary:
    """One weight-bearing layer of the model.

    ``times[b][kernel]``: median seconds of this layer at model batch size ``b``
    (``"dense"`` is the original PyTorch layer); ``predicted[b][kernel]``: the cost
    model's seconds (:mod:`.cost`), for every candidate, timed or not; ``choice[b]``: the
    kernel it runs there; ``rows[b]``: rows of its matrix product at ``b``;
    ``formats[kernel]``: the layout a kernel stores; ``bytes``: ``"dense"`` fp32 weight
    bytes and each candidate's packed bytes; ``held``: bytes of the tensors the converted
    model's module holds (each kernel of its plan, ``weight`` if it keeps the dense
    weight, ``bias``); ``note``: why it was kept dense, or what else happened.
    """

    name: str
    type: str
    shape: tuple[int, ...]
    sparsity: float = 0.0
    rows: dict[int, int] = field(default_factory=dict)
    times: dict[int, dict[str, float]] = field(default_factory=dict)
    choice: dict[int, str] = field(default_factory=dict)
    formats: dict[str, str] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)
    note: str = ""
    predicted: dict[int, dict[str, float]] = field(default_factory=dict)
    held: dict[str, int] = field(default_factory=dict)
    error: dict[str, float] = field(default_factory=dict)  #: per rounded/quantized kernel: max relative change

    @property
    def converted(self) -> bool:
        """Whether some batch size runs a sparse kernel."""
        return any(k != DENSE for k in self.choice.values())

    @property
    def held_bytes(self) -> int:
        """Bytes the converted model's module holds for this layer (see ``held``)."""
        return sum(self.held.values())

    @property
    def dense_held_bytes(self) -> int:
        """Bytes the dense layer holds: its fp32 weight and its bias."""
        return self.bytes.get(DENSE, self.held.get("weight", 0)) + self.held.get("bias", 0)

    def speedup(self, batch: int) -> float | None:
        """Measured dense time / time of the kernel chosen at ``batch`` (``None`` if not measured)."""
        t = self.times.get(batch) or {}
        chosen = t.get(self.choice.get(batch, ""))
        return None if DENSE not in t or not chosen else t[DENSE] / chosen

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "type": self.type, "shape": list(self.shape), "sparsity": self.sparsity,
            "converted": self.converted, "rows": {str(b): r for b, r in self.rows.items()},
            "choice": {str(b): k for b, k in self.choice.items()},
            "times_ms": {str(b): {k: v * 1e3 for k, v in t.items()} for b, t in self.times.items()},
            "predicted_ms": {str(b): {k: v * 1e3 for k, v in t.items()} for b, t in self.predicted.items()},
            "formats": dict(self.formats), "bytes": dict(self.bytes), "held": dict(self.held), "note": self.note,
            "error": dict(self.error),
        }

    @classmethod
    def from_dict(cls, r: dict[str, Any]) -> LayerSummary:
        def per_batch(d):
            return {int(b): {k: v / 1e3 for k, v in t.items()} for b, t in d.items()}

        return cls(r["name"], r["type"], tuple(r["shape"]), r.get("sparsity", 0.0),
                   {int(b): v for b, v in r.get("rows", {}).items()}, per_batch(r.get("times_ms", {})),
                   {int(b): k for b, k in r.get("choice", {}).items()}, dict(r.get("formats", {})),
                   dict(r.get("bytes", {})), r.get("note", ""), per_batch(r.get("predicted_ms", {})),
                   dict(r.get("held", {})), dict(r.get("error", {})))

    def cell(self, b: int) -> str:
        """What the table shows for batch size ``b``."""
        k = self.choice.get(b)
        t = self.times.get(b, {})
        if k is None:
            return "dense (not measured)"
        if k != DENSE:
            if DENSE not in t or k not in t:
                return f"{k} (not timed)"
            return f"{k} {_ms(t[k])} ms vs dense {_ms(t[DENSE])} ({t[DENSE] / t[k]:.1f}x)"
        if DENSE in t:
            best = min((v for n, v in t.items() if n != DENSE), default=None)
            return f"dense {_ms(t[DENSE])} ms" + (f" (best sparse {_ms(best)})" if best is not None else "")
        p = self.predicted.get(b, {})
        sparse = [v for n, v in p.items() if n != DENSE]
        if DENSE in p and sparse and min(sparse) > SLACK * p[DENSE]:
            return f"dense (best sparse predicted {min(sparse) / p[DENSE]:.1f}x slower; not timed)"
        return "dense (not timed)"


@dataclass
class ConversionSummary:
    """What :func:`sparsenn.convert` measured and chose; see :class:`LayerSummary`.

    ``model_times[b] = (dense s, converted s)``: the whole model at batch size ``b``,
    measured after conversion where some layer runs sparse at ``b`` (``verify=True``);
    a batch size where every layer runs dense is the dense model and is not timed
    (:meth:`speedup` is 1.0 there). ``seconds``: how long the conversion took;
    ``time_limit``: its cap (``None``: none).
    """

    batch_sizes: tuple[int, ...]
    threads: int
    margin: float
    layers: list[LayerSummary] = field(default_factory=list)
    model_times: dict[int, tuple[float, float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    time_limit: float | None = None
    weights: str = "fp32"  #: the precision asked for (``"fp32"``, ``"bf16"``, ``"int8"``)
    tokens: bool = False  #: batch sizes count tokens of one sequence (a text generator, see inputs.token_count)
    #: the whole model against the dense one on the example: ``max_abs_error`` of the outputs (logits), and
    #: with ``text``: ``perplexity_dense`` / ``perplexity_converted``
    accuracy: dict[str, float] = field(default_factory=dict)

    def label(self, batch: int) -> str:
        """How a batch size is named: ``batch 16``, or ``1 token`` / ``64 tokens`` for a text generator."""
        if self.tokens:
            return "1 token (decode)" if batch == 1 else f"{batch} tokens"
        return f"batch {batch}"

    def layer(self, name: str) -> LayerSummary:
        for row in self.layers:
            if row.name == name:
                return row
        raise KeyError(f"no layer {name!r} in the summary; layers: {', '.join(r.name for r in self.layers)}")

    def sparse_at(self, batch: int) -> bool:
        """Whether some layer runs a sparse kernel at model batch size ``batch``."""
        return any(r.choice.get(batch, DENSE) != DENSE for r in self.layers)

    def speedup(self, batch: int) -> float | None:
        """Dense / converted whole-model time at ``batch``: 1.0 where every layer runs dense (the dense
        model), the measured ratio where some layer runs sparse, ``None`` if that was not measured."""
        if not self.sparse_at(batch):
            return 1.0
        if batch not in self.model_times:
            return None
        dense, converted = self.model_times[batch]
        return dense / converted if converted > 0 else None

    def held_bytes(self) -> tuple[int, int]:
        """``(dense, converted)``: bytes the layers hold in the dense model (weights and biases) and in the
        converted one (packed arrays of every kernel in a plan, dense weights kept, biases)."""
        return sum(r.dense_held_bytes for r in self.layers), sum(r.held_bytes for r in self.layers)

    def to_records(self) -> list[dict[str, Any]]:
        return [row.to_dict() for row in self.layers]

    def to_dict(self) -> dict[str, Any]:
        return {
            "batch_sizes": list(self.batch_sizes), "threads": self.threads, "margin": self.margin,
            "layers": self.to_records(),
            "model_times_ms": {str(b): {"dense": d * 1e3, "converted": c * 1e3} for b, (d, c) in self.model_times.items()},
            "notes": list(self.notes), "seconds": self.seconds, "time_limit": self.time_limit,
            "weights": self.weights, "tokens": self.tokens, "accuracy": dict(self.accuracy),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ConversionSummary:
        layers = [LayerSummary.from_dict(r) for r in d.get("layers", [])]
        model = {int(b): (t["dense"] / 1e3, t["converted"] / 1e3) for b, t in d.get("model_times_ms", {}).items()}
        return cls(tuple(d.get("batch_sizes", ())), int(d.get("threads", 0)), float(d.get("margin", 0.0)),
                   layers, model, list(d.get("notes", [])), float(d.get("seconds", 0.0)), d.get("time_limit"),
                   str(d.get("weights", "fp32")), bool(d.get("tokens", False)), dict(d.get("accuracy", {})))

    def model_line(self, batch: int) -> str:
        """The whole model at ``batch``, as the summary prints it."""
        name = self.label(batch)
        if not self.sparse_at(batch):
            return f"{name}: every layer dense: the dense model (1.00x)"
        if batch not in self.model_times:
            return f"{name}: not timed"
        d, c = self.model_times[batch]
        ratio = d / c if c > 0 else float("inf")
        gain = f"{ratio:.2f}x" if ratio >= 1 / (1 - self.margin) else \
            f"{ratio:.2f}x, within the {self.margin:.0%} margin: no clear gain"
        return f"{name}: dense {_ms(d)} ms, converted {_ms(c)} ms ({gain})"

    def __str__(self) -> str:
        head = ["layer", "type", "shape", "sparsity"] + [self.label(b) for b in self.batch_sizes]
        rows = [[r.name, r.type, "x".join(map(str, r.shape)), f"{r.sparsity:.1%}"] + [r.cell(b) for b in self.batch_sizes]
                for r in self.layers]
        widths = [max(len(h), *(len(c[i]) for c in rows)) if rows else len(h) for i, h in enumerate(head)]

        def line(cells):
            return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

        took = f"; took {self.seconds:.1f} s" if self.seconds else ""
        limit = f" (time limit {self.time_limit:g} s)" if self.time_limit is not None and took else ""
        out = [f"sparsenn conversion: {self.weights} weights; {sum(r.converted for r in self.layers)} of "
               f"{len(self.layers)} layers converted; {self.threads} threads; a kernel is chosen when >= "
               f"{self.margin:.0%} faster than the dense float32 layer{took}{limit}", line(head),
               line(["-" * w for w in widths])]
        out += [line(c) for c in rows]
        for r in self.layers:
            if r.note:
                out.append(f"  {r.name}: {r.note}")
        for r in self.layers:
            if r.converted:
                parts = [f"{k} {n}" + (f" ({r.formats[k]})" if k in r.formats else "") for k, n in r.held.items()]
                err = "".join(f"; {k} changes its output by {e:.2e} of its largest value" for k, e in r.error.items()
                              if k in r.held)
                out.append(f"  {r.name}: holds {r.held_bytes} bytes: {', '.join(parts)} "
                           f"(dense layer: {r.dense_held_bytes}){err}")
        dense_b, held_b = self.held_bytes()
        if any(r.held for r in self.layers):
            out.append(f"bytes held by the layers: dense {dense_b}, converted {held_b} "
                       f"(packed arrays of the kernels in use, dense weights kept, biases)")
        out.append("whole model: " + "; ".join(self.model_line(b) for b in self.batch_sizes))
        if self.accuracy:
            acc = self.accuracy
            line_ = f"accuracy against the dense model: max abs error of the outputs {acc['max_abs_error']:.3g}"
            if "max_abs_output" in acc:
                line_ += f" (largest output {acc['max_abs_output']:.3g})"
            if "perplexity_dense" in acc:
                pd, pc = acc["perplexity_dense"], acc["perplexity_converted"]
                line_ += f"; perplexity {pd:.4g} -> {pc:.4g} ({(pc - pd) / pd:+.2%})"
            out.append(line_)
        out += self.notes
        return "\n".join(out)
