"""A self-contained HTML report and a Markdown summary of one or more runs.

One :class:`RunSummary` per model (dense baseline, pruned, trained sparse, ...) built
from :func:`sparsenn.report.layer_report` output (``Report`` or its ``to_dict()``), the model's
masks and, when the model was converted, its latency and bytes
(:class:`sparsenn.backend.inference.Measured`). :func:`write_report` writes

* ``report.html``: every figure embedded as a ``data:image/png;base64`` URI, no other files needed;
* ``report.md``: the same tables, figures linked from ``plots/*.png`` (written too).

Figures (:mod:`sparsenn.report.plots`): accuracy vs sparsity, per-layer sparsity, mask heat
maps of the first layers, MACs and bytes per layer, inference speedup.
"""

from __future__ import annotations

import base64
import html
import platform
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ..backend.formats.table import layer_bytes
from . import plots

__all__ = ["Figure", "RunSummary", "Section", "figures", "render_html", "render_markdown", "write_report"]


@dataclass
class RunSummary:
    """One model in the report. Only ``label``, ``accuracy`` and ``sparsity`` are required."""

    label: str
    accuracy: float | None
    sparsity: float
    report: dict[str, Any] | None = None  #: ``Report.to_dict()``
    masks: dict[str, torch.Tensor] | None = None  #: per weight: kept positions (for heat maps)
    bytes_by_format: dict[str, dict[str, int | None]] | None = None  #: per weight: ``{format: bytes}``
    dense_bytes: int | None = None  #: all measured weights, dense
    sparse_bytes: int | None = None  #: all measured weights, smallest exact format per weight
    formats: str | None = None  #: the formats ``sparse_bytes`` uses
    latency: dict[int, tuple[float, float]] | None = None  #: batch size -> (dense s, sparse s)
    conversion: list[dict[str, Any]] = field(default_factory=list)  #: the runtime's summary, a row per layer
    layer_speedups: dict[str, dict[int, float]] = field(default_factory=dict)  #: layer -> batch -> speedup
    before_finetune: float | None = None  #: accuracy right after pruning, before fine-tuning

    @classmethod
    def from_model(cls, label: str, model: nn.Module, report: Any, *, accuracy: float | None,
                   inference: Any = None, before_finetune: float | None = None) -> "RunSummary":
        """From a model, its :class:`~sparsenn.report.layer_report.Report` (or ``to_dict()``) and, optionally,
        a :class:`sparsenn.backend.inference.Measured`."""
        from ..core.metrics import measured_weights

        data = report.to_dict() if hasattr(report, "to_dict") else dict(report)
        masks = {name: getattr(module, attr).detach() != 0 for name, module, attr, _ in measured_weights(model)
                 if getattr(module, attr).dim() >= 2}  # matrices and kernels; not coupled BatchNorm scales
        by_format = layer_bytes(model)
        run = cls(label, accuracy, data["total"]["sparsity"], data, masks, by_format,
                  before_finetune=before_finetune)
        if by_format:
            run.dense_bytes = sum(b["dense"] for b in by_format.values())
            run.sparse_bytes = sum(min(v for v in b.values() if v is not None) for b in by_format.values())
        if inference is not None:
            run.dense_bytes, run.sparse_bytes, run.formats = (inference.dense_bytes, inference.sparse_bytes,
                                                              inference.formats)
            run.latency = dict(inference.latency)
            run.conversion = list(inference.layers)
            run.layer_speedups = dict(getattr(inference, "layer_speedups", {}) or {})
        return run

    @property
    def records(self) -> list[dict[str, Any]]:
        if not self.report:
            return []
        return [*self.report["rows"], self.report["total"]]


@dataclass
class Figure:
    key: str
    title: str
    caption: str
    png: bytes


@dataclass
class Section:
    """A further part of the report after the figures (e.g. ``sparsenn.report.robustness.robustness_section``):
    a title, tables as ``(head, body)``, figures and notes."""

    title: str
    tables: list[tuple[list[str], list[list[str]]]] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def figures(runs: Sequence[RunSummary]) -> list[Figure]:
    """The report's figures for ``runs`` (those with data to draw)."""
    points = []
    for r in runs:
        if r.before_finetune is not None:
            points.append({"label": f"{r.label} (before fine-tuning)", "sparsity": r.sparsity,
                           "accuracy": r.before_finetune})
        points.append({"label": r.label, "sparsity": r.sparsity, "accuracy": r.accuracy})
    sparse = [r for r in runs if r.report]
    detailed = sparse[0] if sparse else None
    out = [
        Figure("accuracy_vs_sparsity", "Accuracy vs sparsity", "Test accuracy of every model against the fraction "
               "of its weights that are exactly zero.", plots.accuracy_vs_sparsity(points)),
        Figure("layer_sparsity", "Per-layer sparsity", "Fraction of zeros in each weight, per model.",
               plots.layer_sparsity({r.label: r.records for r in sparse})),
        Figure("mask_heatmaps", "Mask heat maps", "Kept weights of the first layers (matrix view: rows are "
               "outputs); darker = more weights kept in that block.",
               plots.mask_heatmaps({r.label: r.masks for r in sparse if r.masks})),
    ]
    if detailed is not None:
        out.append(Figure("bytes_and_macs", f"MACs and bytes per layer ({detailed.label})",
                          "Left: multiply-accumulates of one batch, dense vs skipping zero weights. Right: "
                          "exact bytes of each weight in each storage format.",
                          plots.layer_bytes_and_macs(detailed.records, detailed.bytes_by_format)))
    out.append(Figure("speedup", "Inference speedup", "Dense PyTorch time divided by the converted sparse "
                      "model's time on the same inputs (medians of interleaved timed rounds), for the whole "
                      "model and, from the conversion summary, for each layer that runs a sparse kernel.",
                      plots.speedup({r.label: r.latency for r in runs if r.latency},
                                    {r.label: r.layer_speedups for r in runs if r.layer_speedups})))
    return [f for f in out if f.png is not None]


# ----------------------------------------------------------------------------- tables


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def _kib(b: int | None) -> str:
    return "-" if b is None else f"{b / 1024:.1f} KiB"


def _ms(s: float) -> str:
    return f"{1000 * s:.3f} ms"


def summary_table(runs: Sequence[RunSummary]) -> tuple[list[str], list[list[str]]]:
    sizes = sorted({b for r in runs if r.latency for b in r.latency})
    head = ["model", "test accuracy", "sparsity", "weight bytes"]
    head += [f"latency batch {b} (vs dense)" for b in sizes]
    body = []
    for r in runs:
        size = _kib(r.dense_bytes) if r.sparse_bytes is None else _kib(r.sparse_bytes)
        if r.sparse_bytes is not None and r.dense_bytes and r.sparse_bytes != r.dense_bytes:
            size += f" ({r.dense_bytes / max(r.sparse_bytes, 1):.1f}x smaller{', ' + r.formats if r.formats else ''})"
        row = [r.label, _pct(r.accuracy), _pct(r.sparsity), size]
        for b in sizes:
            if r.latency and b in r.latency:
                dense, sparse = r.latency[b]
                # one timing for both: the converted model runs every layer dense at this batch size
                row.append("runs dense (1.00x)" if dense == sparse and r.sparsity else f"{_ms(sparse)} ({dense / sparse:.2f}x)")
            else:
                row.append("-")
        body.append(row)
    return head, body


def layer_table(run: RunSummary) -> tuple[list[str], list[list[str]]]:
    head = ["layer", "shape", "params", "nonzeros", "sparsity", "pattern", "MACs dense", "MACs sparse",
            "dense bytes", "CSR bytes", "bitmask bytes"]
    body = []
    for r in run.records:
        body.append([r["name"], "x".join(map(str, r["shape"] or [])), f"{r['params']:,}", f"{r['nonzeros']:,}",
                     _pct(r["sparsity"]), r["pattern"],
                     *("-" if r.get(k) is None else f"{r[k]:,}" for k in ("dense_macs", "sparse_macs")),
                     f"{r['dense_bytes']:,}", f"{r['csr_bytes']:,}", f"{r['bitmask_bytes']:,}"])
    return head, body


def updates_table(run: RunSummary) -> tuple[list[str], list[list[str]]] | None:
    updates = (run.report or {}).get("updates")
    if not updates:
        return None
    head = ["step", "drop fraction", "dropped", "grown", "grown alive", "mask change"]
    body = [[str(u["step"]), f"{u['drop_fraction']:.3f}", f"{u['dropped']:,}", f"{u['grown']:,}",
             _pct(u.get("survival")), _pct(u["mask_change"])] for u in updates]
    return head, body


def conversion_table(run: RunSummary) -> tuple[list[str], list[list[str]]] | None:
    if not run.conversion:
        return None
    head = list(dict.fromkeys(k for row in run.conversion for k in row))
    body = [[_cell(row.get(k)) for k in head] for row in run.conversion]
    return head, body


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return "x".join(map(str, v)) if all(isinstance(x, int) for x in v) else ", ".join(map(_cell, v))
    if isinstance(v, dict):
        return ", ".join(f"{k}: {_cell(x)}" for k, x in v.items())
    return str(v)


def _environment() -> str:
    return (f"sparsenn {_version()}, PyTorch {torch.__version__}, Python {platform.python_version()}, "
            f"{platform.machine()}, {_plural(torch.get_num_threads(), 'thread')}; generated "
            f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _version() -> str:
    from .._version import __version__
    return __version__


# ----------------------------------------------------------------------------- HTML

_CSS = """
body { font-family: system-ui, -apple-system, Segoe UI, sans-serif; margin: 2rem auto; max-width: 1100px;
       padding: 0 1rem; color: #222; line-height: 1.45; }
h1 { font-size: 1.6rem; } h2 { font-size: 1.25rem; margin-top: 2rem; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.8rem 0; font-size: 0.88rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.6rem; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
figure { margin: 1.2rem 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.85rem; color: #555; } pre { background: #f7f7f7; padding: 0.8rem; overflow-x: auto; }
.meta { color: #666; font-size: 0.85rem; }
"""


def _html_table(head: list[str], body: list[list[str]]) -> str:
    e = html.escape
    rows = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>\n" for row in body)
    return f"<table>\n<tr>{''.join(f'<th>{e(h)}</th>' for h in head)}</tr>\n{rows}</table>"


def _html_figure(f: Figure) -> str:
    e = html.escape
    data = base64.b64encode(f.png).decode("ascii")
    return (f"<figure><img src=\"data:image/png;base64,{data}\" alt=\"{e(f.title)}\" id=\"fig-{e(f.key)}\">"
            f"<figcaption>{e(f.caption)}</figcaption></figure>")


def render_html(runs: Sequence[RunSummary], *, title: str = "sparsenn report", description: str | None = None,
                figs: Sequence[Figure] | None = None, recipe: Mapping[str, Any] | None = None,
                notes: Sequence[str] = (), sections: Sequence[Section] = ()) -> str:
    """The report as one HTML string (images inline as base64 PNG data URIs)."""
    e = html.escape
    figs = figures(runs) if figs is None else figs
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{e(title)}</title>",
             f"<style>{_CSS}</style></head><body>", f"<h1>{e(title)}</h1>"]
    if description:
        parts.append(f"<p>{e(description)}</p>")
    parts.append(f"<p class=\"meta\">{e(_environment())}</p>")
    parts += ["<h2>Summary</h2>", _html_table(*summary_table(runs))]
    parts += [f"<p>{e(n)}</p>" for n in notes]
    parts += [f"<h2>{e(f.title)}</h2>\n{_html_figure(f)}" for f in figs]
    for sec in sections:
        parts += [f"<h2>{e(sec.title)}</h2>", *(_html_table(*t) for t in sec.tables), *(f"<p>{e(n)}</p>" for n in sec.notes)]
        parts += [f"<h3>{e(f.title)}</h3>\n{_html_figure(f)}" for f in sec.figures]
    for r in runs:
        if r.report:
            parts += [f"<h2>Layers: {e(r.label)}</h2>", _html_table(*layer_table(r))]
        if (t := updates_table(r)) is not None:
            parts += [f"<h3>Mask updates ({e(str(r.report.get('method')))})</h3>", _html_table(*t)]
        if (t := conversion_table(r)) is not None:
            parts += [f"<h3>Conversion: {e(r.label)}</h3>", _html_table(*t)]
    if recipe:
        parts += ["<h2>Recipe</h2>", f"<pre>{e(_yaml(recipe))}</pre>"]
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _yaml(recipe: Mapping[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(dict(recipe), sort_keys=False)


# ----------------------------------------------------------------------------- Markdown


def _md_table(head: list[str], body: list[list[str]]) -> str:
    esc = lambda s: s.replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(map(esc, head)) + " |", "|" + "|".join(":---" if i == 0 else "---:"
                                                                  for i in range(len(head))) + "|"]
    return "\n".join(lines + ["| " + " | ".join(map(esc, row)) + " |" for row in body])


def render_markdown(runs: Sequence[RunSummary], *, title: str = "sparsenn report", description: str | None = None,
                    figs: Sequence[Figure] = (), plot_dir: str = "plots", notes: Sequence[str] = (),
                    sections: Sequence[Section] = ()) -> str:
    """The Markdown summary; figures are linked as ``plot_dir/KEY.png``."""
    parts = [f"# {title}", ""]
    if description:
        parts += [description, ""]
    parts += [f"_{_environment()}_", "", "## Summary", "", _md_table(*summary_table(runs)), ""]
    parts += [*notes, ""] if notes else []
    for f in figs:
        parts += [f"![{f.title}]({plot_dir}/{f.key}.png)", ""]
    for sec in sections:
        parts += [f"## {sec.title}", ""]
        parts += [x for t in sec.tables for x in (_md_table(*t), "")] + [x for n in sec.notes for x in (n, "")]
        parts += [x for f in sec.figures for x in (f"![{f.title}]({plot_dir}/{f.key}.png)", "")]
    for r in runs:
        if r.report:
            parts += [f"## Layers: {r.label}", "", _md_table(*layer_table(r)), ""]
        if (t := updates_table(r)) is not None:
            parts += [f"### Mask updates ({r.report.get('method')})", "", _md_table(*t), ""]
        if (t := conversion_table(r)) is not None:
            parts += [f"### Conversion: {r.label}", "", _md_table(*t), ""]
    return "\n".join(parts)


def write_report(out_dir: str | Path, runs: Sequence[RunSummary], *, title: str = "sparsenn report",
                 description: str | None = None, formats: Sequence[str] = ("markdown", "html"),
                 recipe: Mapping[str, Any] | None = None, notes: Sequence[str] = (),
                 sections: Sequence[Section] = ()) -> dict[str, Path]:
    """Write ``report.html`` and/or ``report.md`` (+ ``plots/*.png``) under ``out_dir``; returns the paths."""
    bad = [f for f in formats if f not in ("markdown", "html")]
    if bad:
        raise ValueError(f"unknown report format {bad[0]!r}; valid: markdown, html")
    if not runs:
        raise ValueError("write_report needs at least one RunSummary")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figs = figures(runs)
    written: dict[str, Path] = {}
    if "html" in formats:
        path = out / "report.html"
        path.write_text(render_html(runs, title=title, description=description, figs=figs, recipe=recipe,
                                    notes=notes, sections=sections), encoding="utf-8")
        written["html"] = path
    if "markdown" in formats:
        (out / "plots").mkdir(exist_ok=True)
        for f in [*figs, *(f for sec in sections for f in sec.figures)]:
            (out / "plots" / f"{f.key}.png").write_bytes(f.png)
        path = out / "report.md"
        path.write_text(render_markdown(runs, title=title, description=description, figs=figs, notes=notes,
                                        sections=sections), encoding="utf-8")
        written["markdown"] = path
    return written
