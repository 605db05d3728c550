"""The robustness part of a report: dense vs pruned models under attack and under common corruptions.

Input: one :class:`RobustnessRun` per model, holding what :func:`sparsenn.robust.robustness_eval`
returned. Output: tables (``(head, body)`` of strings), PNG figures (accuracy vs attack budget per
model; accuracy vs corruption severity and per corruption) and a :class:`~sparsenn.report.html.Section`
that ``render_html`` / ``write_report`` place after the other figures::

    from sparsenn.report.html import write_report

    runs = [RobustnessRun("dense", dense_eval), RobustnessRun("RigL 90%", rigl_eval, sparsity=0.9)]
    write_report("out", summaries, sections=[robustness_section(runs)])
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .html import Figure, Section
from .plots import _COLORS, _figure, _png

__all__ = ["RobustnessRun", "accuracy_vs_epsilon", "corruption_plot", "corruption_table", "robustness_figures",
           "robustness_section", "robustness_table"]


@dataclass
class RobustnessRun:
    """One model: ``label``, ``results`` (``robustness_eval``'s dict), its ``sparsity`` and an optional
    ``group`` (e.g. ``"adversarial training"``): plots draw one panel per group."""

    label: str
    results: Mapping[str, Any]
    sparsity: float | None = None
    group: str | None = None


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def _epsilons(runs: Sequence[RobustnessRun]) -> list[float]:
    return sorted({a["eps"] for r in runs for a in r.results.get("attacks", []) if a["eps"] > 0})


def _attack_label(runs: Sequence[RobustnessRun]) -> str:
    specs = [r.results.get("attack") for r in runs if r.results.get("attack")]
    if not specs:
        return "attack"
    s = specs[0]
    steps = f"-{s['steps']}" if "steps" in s else ""
    return f"{s.get('name', 'attack').upper()}{steps} {s.get('norm', '')}".strip()


def robustness_table(runs: Sequence[RobustnessRun]) -> tuple[list[str], list[list[str]]]:
    """Model, group, sparsity, clean accuracy, accuracy at each attack budget, mean corruption accuracy."""
    eps = _epsilons(runs)
    groups = any(r.group for r in runs)
    attack = _attack_label(runs)
    head = ["model", *(["training"] if groups else []), "sparsity", "clean"]
    head += [f"{attack} eps={e:g}" for e in eps] + ["mean corruption"]
    body = []
    for r in runs:
        by_eps = {a["eps"]: a["accuracy"] for a in r.results.get("attacks", [])}
        body.append([r.label, *([r.group or "-"] if groups else []), _pct(r.sparsity), _pct(r.results.get("clean")),
                     *(_pct(by_eps.get(e)) for e in eps), _pct(r.results.get("mean_corruption_accuracy"))])
    return head, body


def _corruption_names(runs: Sequence[RobustnessRun]) -> list[str]:
    return list(dict.fromkeys(n for r in runs for n in r.results.get("corruption_means", {})))


def corruption_table(runs: Sequence[RobustnessRun]) -> tuple[list[str], list[list[str]]] | None:
    """Per model, accuracy under each corruption (mean over severities); ``None`` without corruptions."""
    names = _corruption_names(runs)
    if not names:
        return None
    groups = any(r.group for r in runs)
    head = ["model", *(["training"] if groups else []), *(n.replace("_", " ") for n in names)]
    body = [[r.label, *([r.group or "-"] if groups else []),
             *(_pct(r.results.get("corruption_means", {}).get(n)) for n in names)] for r in runs]
    return head, body


def _colors(n: int) -> list:
    if n <= len(_COLORS):
        return _COLORS[:n]
    from matplotlib import colormaps

    cmap = colormaps["tab20"]
    return [cmap(i % 20) for i in range(n)]


def _by_group(runs: Sequence[RobustnessRun]) -> dict[str | None, list[RobustnessRun]]:
    out: dict[str | None, list[RobustnessRun]] = {}
    for r in runs:
        out.setdefault(r.group, []).append(r)
    return out


def _labels(runs: Sequence[RobustnessRun]) -> list[str]:
    return list(dict.fromkeys(r.label for r in runs))


def accuracy_vs_epsilon(runs: Sequence[RobustnessRun]) -> bytes | None:
    """Accuracy (%) against the attack budget, a line per model, a panel per group; ``None`` without attacks."""
    runs = [r for r in runs if len(r.results.get("attacks", [])) > 1 or _epsilons([r])]
    if not runs:
        return None
    groups = _by_group(runs)
    labels = _labels(runs)
    colors = dict(zip(labels, _colors(len(labels))))
    fig = _figure(4.6 * len(groups) + 1.6, 3.8)
    axes = fig.subplots(1, len(groups), sharey=True, squeeze=False)[0]
    for ax, (group, members) in zip(axes, groups.items()):
        for r in members:
            points = sorted((a["eps"], 100 * a["accuracy"]) for a in r.results["attacks"])
            ax.plot(*zip(*points), marker="o", ms=3, color=colors[r.label], label=r.label)
        ax.set_xlabel("attack budget eps")
        ax.set_title(group or _attack_label(runs), fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (%)")
    axes[-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle(f"Accuracy under {_attack_label(runs)}", fontsize=11)
    return _png(fig)


def corruption_plot(runs: Sequence[RobustnessRun]) -> bytes | None:
    """Left: accuracy (%) against severity (0 = clean), mean over corruptions, a line per model. Right: a heat
    map of accuracy per model and corruption (mean over severities). ``None`` without corruptions."""
    runs = [r for r in runs if r.results.get("corruptions")]
    if not runs:
        return None
    names = _corruption_names(runs)
    labels = [f"{r.label}" + (f" ({r.group})" if r.group else "") for r in runs]
    models = _labels(runs)
    colors = dict(zip(models, _colors(len(models))))  # a model's colour, as in accuracy_vs_epsilon
    groups = list(_by_group(runs))
    styles = {g: ("-", "--", ":", "-.")[i % 4] for i, g in enumerate(groups)}  # a group's line style
    fig = _figure(5.0 + 0.55 * len(names) + 2.0, max(3.8, 0.28 * len(runs) + 1.6))
    left, right = fig.subplots(1, 2, width_ratios=[1.0, 0.2 + 0.12 * len(names)])
    drawn = set()
    for r in runs:
        sev: dict[int, list[float]] = {}
        for rec in r.results["corruptions"]:
            sev.setdefault(rec["severity"], []).append(rec["accuracy"])
        xs = [0, *sorted(sev)]
        ys = [100 * r.results["clean"], *(100 * statistics.fmean(sev[s]) for s in sorted(sev))]
        left.plot(xs, ys, styles[r.group], marker="o", ms=3, color=colors[r.label],
                  label=None if r.label in drawn else r.label)
        drawn.add(r.label)
    if len(groups) > 1:  # the line styles' key
        for g in groups:
            left.plot([], [], styles[g], color="#444", label=g or "-")
    left.set_xlabel("severity (0 = clean)")
    left.set_ylabel("accuracy (%), mean over corruptions")
    left.grid(alpha=0.3)
    left.legend(fontsize=6)
    grid = [[100 * r.results.get("corruption_means", {}).get(n, float("nan")) for n in names] for r in runs]
    image = right.imshow(grid, cmap="viridis", aspect="auto", vmin=0, vmax=100)
    right.set_xticks(range(len(names)), [n.replace("_", " ") for n in names], rotation=40, ha="right", fontsize=7)
    right.set_yticks(range(len(runs)), labels, fontsize=7)
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            right.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=6, color="white" if v < 60 else "black")
    fig.colorbar(image, ax=right, label="accuracy (%)", shrink=0.8)
    fig.suptitle("Accuracy under common corruptions", fontsize=11)
    return _png(fig)


def robustness_figures(runs: Sequence[RobustnessRun]) -> list[Figure]:
    attack = _attack_label(runs)
    out = [Figure("robustness_attack", f"Accuracy under {attack}", f"Test accuracy of every model on inputs "
                  f"attacked by {attack} at each budget eps (0: clean).", accuracy_vs_epsilon(runs)),
           Figure("robustness_corruptions", "Accuracy under common corruptions", "Left: accuracy against severity, "
                  "mean over corruptions. Right: accuracy per corruption, mean over severities.",
                  corruption_plot(runs))]
    return [f for f in out if f.png is not None]


def robustness_section(runs: Sequence[RobustnessRun], *, title: str = "Robustness",
                       notes: Sequence[str] = ()) -> Section:
    """The tables and figures as a :class:`~sparsenn.report.html.Section` for ``render_html`` / ``write_report``."""
    if not runs:
        raise ValueError("robustness_section needs at least one RobustnessRun")
    tables = [robustness_table(runs)]
    if (t := corruption_table(runs)) is not None:
        tables.append(t)
    return Section(title, tables, robustness_figures(runs), list(notes))
