"""The conversion summary: per layer, the format and kernel chosen at each batch size and why.

``str(summary)`` is a table; ``to_dict()`` / ``to_records()`` give JSON-ready data
(times in milliseconds there).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class LayerSummary:
    """One weight-bearing layer of the model.

    ``times[b][kernel]``: median seconds of this layer at model batch size ``b``
    (``"dense"`` is the original PyTorch layer); ``choice[b]``: the kernel it runs
    there; ``rows[b]``: rows of its matrix product at ``b``; ``formats[kernel]``: the
    layout a kernel stores; ``bytes``: ``"dense"`` fp32 bytes and each kernel's packed
    bytes; ``note``: why it was kept dense without measuring, or what else happened.
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

    @property
    def converted(self) -> bool:
        """Whether some batch size runs a sparse kernel."""
        return any(k != "dense" for k in self.choice.values())

    def speedup(self, batch: int) -> float | None:
        """Measured dense time / time of the kernel chosen at ``batch`` (``None`` if not measured)."""
        t = self.times.get(batch) or {}
        chosen = t.get(self.choice.get(batch, ""))
        return None if "dense" not in t or not chosen else t["dense"] / chosen

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "type": self.type, "shape": list(self.shape), "sparsity": self.sparsity,
            "converted": self.converted, "rows": {str(b): r for b, r in self.rows.items()},
            "choice": {str(b): k for b, k in self.choice.items()},
            "times_ms": {str(b): {k: v * 1e3 for k, v in t.items()} for b, t in self.times.items()},
            "formats": dict(self.formats), "bytes": dict(self.bytes), "note": self.note,
        }


@dataclass
class ConversionSummary:
    """What :func:`sparsenn.convert` measured and chose; see :class:`LayerSummary`.

    ``model_times[b] = (dense s, converted s)``: the whole model at batch size ``b``,
    measured after conversion (empty when ``verify=False``).
    """

    batch_sizes: tuple[int, ...]
    threads: int
    margin: float
    layers: list[LayerSummary] = field(default_factory=list)
    model_times: dict[int, tuple[float, float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def layer(self, name: str) -> LayerSummary:
        for row in self.layers:
            if row.name == name:
                return row
        raise KeyError(f"no layer {name!r} in the summary; layers: {', '.join(r.name for r in self.layers)}")

    def to_records(self) -> list[dict[str, Any]]:
        return [row.to_dict() for row in self.layers]

    def to_dict(self) -> dict[str, Any]:
        return {
            "batch_sizes": list(self.batch_sizes), "threads": self.threads, "margin": self.margin,
            "layers": self.to_records(),
            "model_times_ms": {str(b): {"dense": d * 1e3, "converted": c * 1e3} for b, (d, c) in self.model_times.items()},
            "notes": list(self.notes),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ConversionSummary:
        layers = []
        for r in d.get("layers", []):
            layers.append(LayerSummary(
                r["name"], r["type"], tuple(r["shape"]), r.get("sparsity", 0.0),
                {int(b): v for b, v in r.get("rows", {}).items()},
                {int(b): {k: v / 1e3 for k, v in t.items()} for b, t in r.get("times_ms", {}).items()},
                {int(b): k for b, k in r.get("choice", {}).items()},
                dict(r.get("formats", {})), dict(r.get("bytes", {})), r.get("note", "")))
        model = {int(b): (t["dense"] / 1e3, t["converted"] / 1e3) for b, t in d.get("model_times_ms", {}).items()}
        return cls(tuple(d.get("batch_sizes", ())), int(d.get("threads", 0)), float(d.get("margin", 0.0)),
                   layers, model, list(d.get("notes", [])))

    def __str__(self) -> str:
        head = ["layer", "type", "shape", "sparsity"] + [f"batch {b}" for b in self.batch_sizes]
        rows = []
        for r in self.layers:
            cells = [r.name, r.type, "x".join(map(str, r.shape)), f"{r.sparsity:.1%}"]
            for b in self.batch_sizes:
                k = r.choice.get(b)
                t = r.times.get(b, {})
                if k is None or not t:
                    cells.append(f"{k or 'dense'} (not measured)")
                elif k == "dense" or "dense" not in t:
                    best = min((v for n, v in t.items() if n != "dense"), default=None)
                    cells.append(f"dense {t.get('dense', 0) * 1e3:.3f} ms"
                                 + (f" (best sparse {best * 1e3:.3f})" if best is not None else ""))
                else:
                    cells.append(f"{k} {t[k] * 1e3:.3f} ms vs dense {t['dense'] * 1e3:.3f} ({t['dense'] / t[k]:.1f}x)")
            rows.append(cells)
        widths = [max(len(h), *(len(c[i]) for c in rows)) if rows else len(h) for i, h in enumerate(head)]

        def line(cells):
            return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

        out = [f"sparsenn conversion: {sum(r.converted for r in self.layers)} of {len(self.layers)} layers sparse "
               f"somewhere; {self.threads} threads; sparse chosen when >= {self.margin:.0%} faster than dense",
               line(head), line(["-" * w for w in widths])]
        out += [line(c) for c in rows]
        for r in self.layers:
            if r.note:
                out.append(f"  {r.name}: {r.note}")
        for r in self.layers:
            for k, desc in r.formats.items():
                if k in r.choice.values() and k != "dense":
                    out.append(f"  {r.name}: {k} = {desc}, {r.bytes.get(k, 0)} bytes "
                               f"(dense {r.bytes.get('dense', 0)})")
        if self.model_times:
            out.append("whole model: " + "; ".join(
                f"batch {b}: dense {d * 1e3:.3f} ms, converted {c * 1e3:.3f} ms ({d / c:.2f}x)"
                for b, (d, c) in sorted(self.model_times.items())))
        out += self.notes
        return "\n".join(out)
