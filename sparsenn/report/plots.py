"""The report's figures, drawn with matplotlib's Agg canvas and returned as PNG bytes.

Each function takes plain data (``Report.to_records()`` rows, ``{label: ...}`` maps)
and returns the PNG, or ``None`` when there is nothing to draw. No pyplot: figures are
``matplotlib.figure.Figure`` objects on their own Agg canvas, so no global backend or
window state is touched.
"""

from __future__ import annotations

import io
from typing import Any, Mapping, Sequence

import torch

__all__ = ["accuracy_vs_sparsity", "layer_bytes_and_macs", "layer_sparsity", "mask_heatmaps", "speedup"]

_COLORS = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c"]


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _layers(records: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [r for r in records if r.get("name") != "total"]


def accuracy_vs_sparsity(points: Sequence[Mapping[str, Any]]) -> bytes | None:
    """Test accuracy (%) against sparsity (%); ``points``: ``{"label", "sparsity", "accuracy"}``."""
    points = [p for p in points if p.get("accuracy") is not None]
    if not points:
        return None
    fig = _figure(6.0, 3.8)
    ax = fig.add_subplot()
    for i, p in enumerate(points):
        x, y = 100 * p["sparsity"], 100 * p["accuracy"]
        ax.scatter([x], [y], s=60, color=_COLORS[i % len(_COLORS)], label=p["label"], zorder=3)
        ax.annotate(p["label"], (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
    accs = [100 * p["accuracy"] for p in points]
    ax.set_xlim(-5, 105)
    ax.set_ylim(max(0.0, min(accs) - 5), min(100.5, max(accs) + 3))
    ax.set_xlabel("sparsity (% of weights zero)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Accuracy vs sparsity")
    ax.grid(alpha=0.3)
    return _png(fig)


def layer_sparsity(reports: Mapping[str, Sequence[Mapping[str, Any]]]) -> bytes | None:
    """Grouped bars of per-layer sparsity (%), one group per layer, one bar per run."""
    reports = {k: _layers(v) for k, v in reports.items() if v}
    if not reports:
        return None
    names: list[str] = []
    for rows in reports.values():
        names += [r["name"] for r in rows if r["name"] not in names]
    fig = _figure(max(5.0, 1.1 * len(names) + 2), 3.8)
    ax = fig.add_subplot()
    width = 0.8 / len(reports)
    for i, (label, rows) in enumerate(reports.items()):
        by_name = {r["name"]: r for r in rows}
        xs = [j + (i - (len(reports) - 1) / 2) * width for j, n in enumerate(names) if n in by_name]
        ys = [100 * by_name[n]["sparsity"] for n in names if n in by_name]
        ax.bar(xs, ys, width, label=label, color=_COLORS[i % len(_COLORS)])
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
    ax.set_ylim(0, 118)  # room for the legend above 100%
    ax.set_yticks(range(0, 101, 20))
    ax.set_ylabel("sparsity (%)")
    ax.set_title("Per-layer sparsity")
    ax.legend(fontsize=8, loc="upper left", ncol=min(4, len(reports)))
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def _density_grid(mask: torch.Tensor, cells: int) -> torch.Tensor:
    """The kept fraction in blocks of the mask's matrix view, at most ``cells`` x ``cells``."""
    m = mask.detach().reshape(mask.shape[0], -1).float() if mask.dim() > 1 else mask.detach().float()[None]
    rows, cols = m.shape
    fr, fc = -(-rows // cells), -(-cols // cells)
    pad = torch.zeros(-(-rows // fr) * fr, -(-cols // fc) * fc)
    pad[:rows, :cols] = m
    return pad.reshape(pad.shape[0] // fr, fr, pad.shape[1] // fc, fc).mean(dim=(1, 3))


def mask_heatmaps(masks: Mapping[str, Mapping[str, torch.Tensor]], max_layers: int = 3,
                  cells: int = 96) -> bytes | None:
    """Heat maps of which weights are kept: one row per run, one column per layer (the first
    ``max_layers``); each weight as its matrix view (rows = outputs), shaded by the kept
    fraction in blocks of at most ``cells`` x ``cells``."""
    runs = {label: list(m.items())[:max_layers] for label, m in masks.items() if m}
    if not runs:
        return None
    ncols = max(len(v) for v in runs.values())
    fig = _figure(3.2 * ncols + 0.8, 2.9 * len(runs))
    axes = fig.subplots(len(runs), ncols, squeeze=False)
    image = None
    for i, (label, layers) in enumerate(runs.items()):
        for j in range(ncols):
            ax = axes[i][j]
            if j >= len(layers):
                ax.set_axis_off()
                continue
            name, mask = layers[j]
            grid = _density_grid(mask, cells)
            rows = mask.shape[0] if mask.dim() > 1 else 1
            cols = mask[0].numel() if mask.dim() > 1 else mask.numel()
            image = ax.imshow(grid.numpy(), cmap="Blues", vmin=0, vmax=1, aspect="auto", interpolation="nearest",
                              extent=(0, cols, rows, 0))  # axes in weight indices, whatever the block size
            density = mask.float().mean().item()
            shape = "x".join(map(str, mask.shape))
            ax.set_title(f"{label}: {name}\n{shape}, {100 * density:.1f}% kept", fontsize=8)
            ax.set_xlabel("inputs", fontsize=7)
            ax.set_ylabel("outputs", fontsize=7)
            ax.tick_params(labelsize=6)
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.8, label="kept fraction")
    return _png(fig)


def layer_bytes_and_macs(records: Sequence[Mapping[str, Any]],
                         bytes_by_format: Mapping[str, Mapping[str, int | None]] | None = None) -> bytes | None:
    """Per layer: multiply-accumulates dense vs sparse (left) and weight bytes per format (right).

    ``records``: ``Report.to_records()``; ``bytes_by_format``: ``{layer: {format: bytes}}``
    (from :func:`sparsenn.backend.formats.bytes_table`), else the report's dense/CSR/bitmask bytes.
    """
    rows = _layers(records)
    if not rows:
        return None
    names = [r["name"] for r in rows]
    fig = _figure(max(8.0, 1.6 * len(names) + 4), 3.8)
    ax_macs, ax_bytes = fig.subplots(1, 2)
    x = range(len(names))
    if all(r.get("dense_macs") is not None for r in rows):
        ax_macs.bar([i - 0.2 for i in x], [r["dense_macs"] for r in rows], 0.4, label="dense", color=_COLORS[0])
        ax_macs.bar([i + 0.2 for i in x], [r["sparse_macs"] for r in rows], 0.4, label="sparse", color=_COLORS[1])
        ax_macs.set_yscale("log")
        ax_macs.legend(fontsize=8, loc="upper right")
    else:
        ax_macs.text(0.5, 0.5, "no example input: MACs not measured", ha="center", va="center",
                     transform=ax_macs.transAxes)
    ax_macs.set_xticks(list(x), names, rotation=20, ha="right", fontsize=8)
    ax_macs.set_ylabel("MACs per batch")
    ax_macs.set_title("Multiply-accumulates per layer")
    if bytes_by_format and any(n in bytes_by_format for n in names):
        table = {n: dict(bytes_by_format[n]) for n in names if n in bytes_by_format}
        formats = [f for f in next(iter(table.values())) if all(b.get(f) is not None for b in table.values())]
    else:
        table = {r["name"]: {"dense": r["dense_bytes"], "csr": r["csr_bytes"], "bitmask": r["bitmask_bytes"]}
                 for r in rows}
        formats = ["dense", "csr", "bitmask"]
    held = list(table)  # weights a format table covers (matrices and conv kernels)
    width = 0.8 / max(1, len(formats))
    for k, f in enumerate(formats):
        ax_bytes.bar([i + (k - (len(formats) - 1) / 2) * width for i in range(len(held))],
                     [table[n][f] for n in held], width, label=f, color=_COLORS[k % len(_COLORS)])
    ax_bytes.set_xticks(range(len(held)), held, rotation=20, ha="right", fontsize=8)
    ax_bytes.set_yscale("log")
    ax_bytes.set_ylabel("bytes")
    ax_bytes.set_title("Weight bytes per layer and format")
    ax_bytes.legend(fontsize=7, ncol=2, loc="upper right")
    return _png(fig)


def speedup(latency: Mapping[str, Mapping[int, tuple[float, float]]],
            layers: Mapping[str, Mapping[str, Mapping[int, float]]] | None = None) -> bytes | None:
    """Inference speedup (dense time / sparse time; 1 = as fast as dense): per run and batch size
    for the whole model (``latency``: ``{run: {batch: (dense s, sparse s)}}``) and, when given,
    per layer (``layers``: ``{run: {layer: {batch: speedup}}}``, from the conversion summary)."""
    latency = {k: v for k, v in latency.items() if v}
    layers = {k: v for k, v in (layers or {}).items() if v}
    if not latency:
        return None
    sizes = sorted({b for v in latency.values() for b in v})
    names = list(dict.fromkeys(n for by_layer in layers.values() for n in by_layer))
    # each panel as wide as its bars need, within what a page shows legibly (the HTML caps at ~11 in)
    widths = [min(7.0, max(4.5, 0.45 * len(sizes) * len(latency) + 2))]
    if layers:
        widths.append(min(8.0, max(4.5, 0.3 * len(names) * len(layers) * len(sizes) + 2)))
    fig = _figure(sum(widths), 3.8)
    axes = fig.subplots(1, len(widths), squeeze=False, width_ratios=widths)[0]
    groups = {label: {f"batch {b}": by_size[b][0] / by_size[b][1] for b in sizes if b in by_size}
              for label, by_size in latency.items()}
    _speedup_bars(axes[0], groups, [f"batch {b}" for b in sizes], "Inference speedup: whole model")
    if layers:
        bars = {f"{label} b={b}": {layer: v[b] for layer, v in by_layer.items() if b in v}
                for label, by_layer in layers.items() for b in sizes}
        _speedup_bars(axes[1], bars, names, "Per converted layer (conversion summary)")
    return _png(fig)


def _speedup_bars(ax, groups: Mapping[str, Mapping[str, float]], ticks: list[str], title: str) -> None:
    """Bars of speedups: one colour per series in ``groups``, one group per tick."""
    groups = {k: v for k, v in groups.items() if v}
    width = 0.8 / max(1, len(groups))
    top = 1.0
    for i, (label, values) in enumerate(groups.items()):
        xs = [j + (i - (len(groups) - 1) / 2) * width for j, t in enumerate(ticks) if t in values]
        ys = [values[t] for t in ticks if t in values]
        top = max(top, *ys)
        bars = ax.bar(xs, ys, width, label=label, color=_COLORS[i % len(_COLORS)])
        ax.bar_label(bars, [f"{y:.2f}x" for y in ys], fontsize=7)
    ax.axhline(1.0, color="black", lw=0.8, ls="--")
    ax.set_xticks(range(len(ticks)), ticks, rotation=20 if len(ticks) > 3 else 0, fontsize=8)
    ax.set_ylim(0, top * 1.35)
    ax.set_ylabel("speedup vs dense (x)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="upper left", ncol=2)
