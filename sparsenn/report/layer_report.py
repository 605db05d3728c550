"""Per-layer sparsity report: counts, storage bytes, MACs and dead units in one table.

``report(model)`` has one row per masked parameter (or, for a model without masks,
per weight :func:`sparsenn.core.metrics.sparsity` measures, with pattern ``"-"``) and a
``total`` row. Print it, or export it with ``to_markdown``, ``to_records`` (a
JSON-serializable list of dicts, for plots) or ``to_dict``.

``report(model, sparsifier=sp)`` with a dynamic sparse training sparsifier (``static``,
``set``, ``rigl``) adds one :class:`UpdateStats` per mask update, summed over layers:
weights dropped and grown, how many of the previous update's grown weights are still
active, and the fraction of mask positions that flipped since the previous update.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any, Callable

from torch import nn

from ..core.metrics import (
    bitmask_bytes,
    csr_bytes,
    dead_inputs,
    dead_units,
    dense_bytes,
    input_sparsity,
    macs_by_param,
    measured_weights,
    nm_bytes,
)
from ..train.distributed import unwrap_model

_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass
class LayerStats:
    """One weight's statistics (bytes at fp32; the ``total`` row sums, see :func:`report`)."""

    name: str
    shape: tuple[int, ...] | None
    params: int
    nonzeros: int
    sparsity: float
    pattern: str
    dense_bytes: int
    csr_bytes: int
    bitmask_bytes: int
    nm_bytes: int | None
    dead_units: int
    dense_macs: int | None = None
    sparse_macs: int | None = None
    input_sparsity: float | None = None
    dead_inputs: int | None = None

    def to_record(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = None if self.shape is None else list(self.shape)
        return d


def _si(n: int | None) -> str:
    if n is None:
        return "-"
    for div, unit in ((10**12, "T"), (10**9, "G"), (10**6, "M"), (10**3, "K")):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return str(n)


def _count(n: int) -> str:
    return f"{n:,}" if n < 1_000_000 else _si(n)


def _kib(b: int | None) -> str:
    return "-" if b is None else f"{b / 1024:.1f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _opt(n: int | None) -> str:
    return "-" if n is None else str(n)


@dataclass
class UpdateStats:
    """One mask update of a dynamic sparse training method, summed over the layers (counts in weights).

    ``survived``: weights grown at the previous update still active after this one
    (``None`` when the previous update grew none, or for the first update);
    ``survival = survived / grown at the previous update``. ``changed``: mask positions
    flipped by this update (``dropped + grown``); ``mask_change = changed / params``, the
    masked weights of the layers. ``layers``: the method's per-layer entry
    (:attr:`sparsenn.create.dst.DynamicSparse.history`).
    """

    step: int
    drop_fraction: float
    dropped: int
    grown: int
    active: int
    params: int
    survived: int | None
    survival: float | None
    changed: int
    mask_change: float
    layers: dict[str, dict[str, Any]]

    def to_record(self) -> dict[str, Any]:
        return asdict(self)


def _update_stats(history: list[dict[str, Any]]) -> list[UpdateStats]:
    out: list[UpdateStats] = []
    for entry in history:
        layers = entry["layers"]

        def total(key: str, layers: dict = layers) -> int:
            return sum(int(v[key]) for v in layers.values())

        prev_grown = out[-1].grown if out else 0
        alive = [v["survived"] for v in layers.values() if v.get("survived") is not None]
        survived = sum(alive) if alive and prev_grown else None
        params, changed = total("params"), total("changed")
        out.append(UpdateStats(
            step=int(entry["step"]), drop_fraction=float(entry["drop_fraction"]), dropped=total("dropped"),
            grown=total("grown"), active=total("active"), params=params, survived=survived,
            survival=None if survived is None else survived / prev_grown, changed=changed,
            mask_change=changed / params if params else 0.0, layers=layers,
        ))
    return out


_UPDATE_COLUMNS: list[tuple[str, Callable[[UpdateStats], str]]] = [
    ("step", lambda u: str(u.step)),
    ("drop frac", lambda u: f"{u.drop_fraction:.3f}"),
    ("dropped", lambda u: _count(u.dropped)),
    ("grown", lambda u: _count(u.grown)),
    ("grown alive %", lambda u: _pct(u.survival)),
    ("mask change %", lambda u: f"{100 * u.mask_change:.2f}"),
]


def _updates_caption(method: str | None, n: int) -> str:
    if not n:
        return f"DST mask updates ({method}): none so far"
    return (f"DST mask updates ({method}): {n}; counts in weights over all masked layers; grown alive %: "
            f"of the weights\ngrown at the previous update, the share still active after this one; "
            f"mask change %: positions flipped")


_Column = tuple[str, Callable[[LayerStats], str], bool]  # header, cell, left-aligned


def _macs_cell(r: LayerStats) -> str:
    return "-" if r.dense_macs is None else f"{_si(r.dense_macs)}->{_si(r.sparse_macs)}"


@dataclass
class Report:
    """Rows per weight, a ``total`` row, and (with an input) whole-model MACs per module."""

    rows: list[LayerStats]
    total: LayerStats
    model_macs: dict[str, tuple[int, int]] | None = None
    updates: list[UpdateStats] | None = None  #: with a DST sparsifier: one entry per mask update
    method: str | None = None  #: the sparsifier's method name, when one was given

    @property
    def has_input(self) -> bool:
        return self.model_macs is not None

    def _columns(self) -> list[_Column]:
        cols: list[_Column] = [
            ("layer", lambda r: r.name, True),
            ("shape", lambda r: "" if r.shape is None else "x".join(map(str, r.shape)), True),
            ("params", lambda r: _count(r.params), False),
            ("nnz", lambda r: _count(r.nonzeros), False),
            ("sparse %", lambda r: _pct(r.sparsity), False),
            ("pattern", lambda r: r.pattern, True),
        ]
        if self.has_input:
            cols.append(("MACs dense->sparse", _macs_cell, False))
        cols += [
            ("CSR KiB", lambda r: _kib(r.csr_bytes), False),
            ("bitmask KiB", lambda r: _kib(r.bitmask_bytes), False),
            ("N:M KiB", lambda r: _kib(r.nm_bytes), False),
            ("dead units", lambda r: str(r.dead_units), False),
        ]
        if self.has_input:
            cols += [("input zeros%", lambda r: _pct(r.input_sparsity), False),
                     ("dead inputs", lambda r: _opt(r.dead_inputs), False)]
        return cols

    def _cells(self) -> tuple[list[_Column], list[list[str]]]:
        cols = self._columns()
        return cols, [[cell(r) for _, cell, _ in cols] for r in [*self.rows, self.total]]

    def _footer(self) -> list[str]:
        lines = [f"dense fp32: {_kib(self.total.dense_bytes)} KiB; N:M KiB uses the layer's N:M pattern, "
                 "else 2:4 ('-': not N:M sparse)"]
        if self.model_macs:
            d = sum(v[0] for v in self.model_macs.values())
            s = sum(v[1] for v in self.model_macs.values())
            ratio = f" ({d / s:.2f}x fewer)" if s else ""
            lines.append(f"model MACs (every Linear/Conv/attention, attention products included): "
                         f"{_si(d)} dense -> {_si(s)} sparse{ratio}")
        return lines

    def to_text(self) -> str:
        """An aligned plain-text table; headers are split over two lines to keep it narrow."""
        cols, body = self._cells()
        heads = [h.split(" ", 1) if " " in h else ["", h] for h, _, _ in cols]
        widths = [max(len(h[0]), len(h[1]), *(len(row[i]) for row in body)) for i, h in enumerate(heads)]

        def line(cells: list[str]) -> str:
            out = ""
            for i, (c, w) in enumerate(zip(cells, widths)):
                wide = cols[i][2] or cols[i - 1][2] or "MACs" in cols[i - 1][0]
                sep = "" if i == 0 else "  " if wide else " "  # one space between plain numbers
                out += sep + (c.ljust(w) if cols[i][2] else c.rjust(w))
            return out.rstrip()

        top, bottom = line([h[0] for h in heads]), line([h[1] for h in heads])
        rule = "-" * len(bottom)
        out = [top, bottom, rule, *(line(r) for r in body[:-1]), rule, line(body[-1])]
        return "\n".join(out + self._footer() + self._updates_text())

    def _updates_text(self) -> list[str]:
        if self.updates is None:
            return []
        out = ["", _updates_caption(self.method, len(self.updates))]
        if not self.updates:
            return out
        heads = [h for h, _ in _UPDATE_COLUMNS]
        body = [[cell(u) for _, cell in _UPDATE_COLUMNS] for u in self.updates]
        widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(heads)]
        fmt = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
        return out + [fmt(heads), "-" * len(fmt(heads)), *(fmt(r) for r in body)]

    def __str__(self) -> str:
        return self.to_text()

    def to_markdown(self) -> str:
        """A GitHub-flavoured Markdown table (same columns as the text)."""
        cols, body = self._cells()
        out = ["| " + " | ".join(h for h, _, _ in cols) + " |",
               "|" + "|".join(":---" if left else "---:" for _, _, left in cols) + "|"]
        out += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body]
        out += [""] + self._footer()
        if self.updates is not None:
            out += ["", _updates_caption(self.method, len(self.updates))]
            if self.updates:
                out += ["", "| " + " | ".join(h for h, _ in _UPDATE_COLUMNS) + " |",
                        "|" + "---:|" * len(_UPDATE_COLUMNS)]
                out += ["| " + " | ".join(cell(u) for _, cell in _UPDATE_COLUMNS) + " |" for u in self.updates]
        return "\n".join(out)

    def to_records(self) -> list[dict[str, Any]]:
        """One JSON-serializable dict per row, the ``total`` row last."""
        return [r.to_record() for r in [*self.rows, self.total]]

    def to_dict(self) -> dict[str, Any]:
        """``{"rows": [...], "total": {...}, "model_macs": {module: [dense, sparse]} or None,
        "method": name or None, "updates": [UpdateStats as dicts] or None}``."""
        macs = None if self.model_macs is None else {k: list(v) for k, v in self.model_macs.items()}
        updates = None if self.updates is None else [u.to_record() for u in self.updates]
        return {"rows": [r.to_record() for r in self.rows], "total": self.total.to_record(), "model_macs": macs,
                "method": self.method, "updates": updates}


def _nm_for(weight, pattern: str | None) -> int | None:
    m = _NM.match(pattern or "")
    n_m = (int(m.group(1)), int(m.group(2))) if m else (2, 4)
    if not 0 < n_m[0] < n_m[1]:
        return None
    return nm_bytes(weight, *n_m)


def report(model: nn.Module, example_input: Any = None, *, sparsifier: Any = None) -> Report:
    """Statistics of every measured weight of ``model``.

    With ``example_input`` (as for :func:`sparsenn.core.metrics.macs`) rows also get MACs
    (attention projections only; ``None`` for weights without MACs such as
    embeddings), the zero fraction of the layer's input and its dead input features.
    The ``total`` row sums counts, bytes and MACs over the rows (``nm_bytes`` only if
    every row has one), sums dead inputs once per module, has the global sparsity,
    pattern ``"-"`` and no input sparsity; ``Report.model_macs`` holds the whole
    model's MACs per module, attention products and unmasked layers included.

    ``sparsifier``: the :class:`~sparsenn.Sparsifier` training ``model`` with a dynamic
    sparse training method (``static``, ``set``, ``rigl``, or any method with
    ``diagnostics()``); ``Report.updates`` then lists its mask updates
    (:class:`UpdateStats`), also in the text, Markdown and ``to_dict``. A finalized
    sparsifier still reports its history.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    updates = method = None
    if sparsifier is not None:
        updates, method = _sparsifier_updates(model, sparsifier)
    per_param = per_module = ins = di = None
    if example_input is not None:
        per_param, per_module = macs_by_param(model, example_input)
        ins, di = input_sparsity(model, example_input), dead_inputs(model, example_input)
    dead = dead_units(model)
    rows = []
    for name, module, attr, pattern in measured_weights(model):
        w = getattr(module, attr).detach()
        owner = name.rpartition(".")[0]
        params, nnz = w.numel(), int(w.count_nonzero())
        d_macs, s_macs = (per_param or {}).get(name, (None, None))
        rows.append(LayerStats(
            name=name, shape=tuple(w.shape), params=params, nonzeros=nnz,
            sparsity=0.0 if params == 0 else 1.0 - nnz / params, pattern=pattern or "-",
            dense_bytes=dense_bytes(w), csr_bytes=csr_bytes(w), bitmask_bytes=bitmask_bytes(w),
            nm_bytes=_nm_for(w, pattern), dead_units=dead[name], dense_macs=d_macs, sparse_macs=s_macs,
            input_sparsity=None if ins is None else ins.get(owner),
            dead_inputs=None if di is None else di.get(owner),
        ))
    return Report(rows, _total(rows, di), per_module, updates=updates, method=method)


def _sparsifier_updates(model: nn.Module, sparsifier: Any) -> tuple[list[UpdateStats], str]:
    from ..train.sparsifier import Sparsifier

    if not isinstance(sparsifier, Sparsifier):
        raise TypeError(f"sparsifier must be a sparsenn.Sparsifier, got {type(sparsifier).__name__}")
    if sparsifier.model is not unwrap_model(model)[0]:
        raise ValueError("sparsifier was built for a different model: report(model, sparsifier=sp) needs "
                         "sp = Sparsifier(model, ...) for this same model object")
    diagnostics = getattr(sparsifier.method, "diagnostics", None)
    if not callable(diagnostics):
        raise ValueError(f"method {sparsifier.method.name!r} records no per-update diagnostics; the dynamic "
                         f"sparse training methods (static, set, rigl) do")
    return _update_stats(diagnostics()), sparsifier.method.name


def _total(rows: list[LayerStats], di: dict[str, int] | None) -> LayerStats:
    def total(field: str, all_needed: bool = False) -> int | None:
        values = [getattr(r, field) for r in rows]
        present = [v for v in values if v is not None]
        if not present or (all_needed and len(present) < len(values)):
            return None
        return sum(present)

    params, nnz = sum(r.params for r in rows), sum(r.nonzeros for r in rows)
    owners = {r.name.rpartition(".")[0] for r in rows}
    return LayerStats(
        name="total", shape=None, params=params, nonzeros=nnz,
        sparsity=0.0 if params == 0 else 1.0 - nnz / params, pattern="-",
        dense_bytes=total("dense_bytes") or 0, csr_bytes=total("csr_bytes") or 0,
        bitmask_bytes=total("bitmask_bytes") or 0, nm_bytes=total("nm_bytes", all_needed=True),
        dead_units=total("dead_units") or 0, dense_macs=total("dense_macs"), sparse_macs=total("sparse_macs"),
        dead_inputs=None if di is None else sum(v for k, v in di.items() if k in owners),
    )


__all__ = ["LayerStats", "Report", "UpdateStats", "report"]
