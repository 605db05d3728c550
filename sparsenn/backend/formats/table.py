"""Model bytes per format: one row per measured weight, exact ``nbytes`` of each format.

The weights are those :func:`sparsenn.core.metrics.sparsity` measures (masked parameters,
or Linear/Conv/Embedding/attention weights when nothing is masked), at their own dtype
unless ``dtype`` is given. A format that cannot hold a weight as it is (``"2:4"`` for a
weight that is not 2:4) has ``None`` there, and then ``None`` in the total.

A weight with fewer than 2 dimensions (a BatchNorm scale or shift masked by
:func:`sparsenn.structured.channels.couple_batchnorm`, a bias) is counted as the ``1 x n`` matrix
:mod:`sparsenn.core.patterns` makes of a vector: CSR is then a sparse vector (values,
column indices and 2 pointers), COO adds a ``uint8`` row index (0) per nonzero, CSC has
``n + 1`` column pointers, BSR pads the row to the block height, N:M groups run along
it. The row keeps the weight's own shape.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ...core.metrics import measured_weights
from . import UnrepresentableError, parse_format, to_format

DEFAULT_FORMATS = ("dense", "coo", "csr", "csc", "bsr4x4", "bitmask", "2:4")


@dataclass
class BytesRow:
    """One weight: its name, shape, dtype, nonzeros and ``{format spec: bytes or None}``."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    nnz: int
    bytes: dict[str, int | None] = field(default_factory=dict)

    @property
    def smallest(self) -> str:
        """The spec with the fewest bytes (the earlier one in the table on a tie)."""
        held = [(b, i, f) for i, (f, b) in enumerate(self.bytes.items()) if b is not None]
        return min(held)[2] if held else "-"


@dataclass
class BytesTable:
    """Rows per weight and a ``total`` row (bytes summed; ``None`` where any row has ``None``)."""

    formats: tuple[str, ...]
    rows: list[BytesRow]
    total: BytesRow

    def to_records(self) -> list[dict[str, Any]]:
        """JSON-serializable rows, the total last."""
        return [{"name": r.name, "shape": list(r.shape), "dtype": r.dtype, "nnz": r.nnz, "bytes": dict(r.bytes),
                 "smallest": r.smallest} for r in [*self.rows, self.total]]

    def _cells(self) -> tuple[list[str], list[list[str]]]:
        head = ["weight", "shape", "nnz", *self.formats, "smallest"]
        body = [[r.name, "x".join(map(str, r.shape)) or "-", str(r.nnz),
                 *("-" if r.bytes[f] is None else str(r.bytes[f]) for f in self.formats), r.smallest]
                for r in [*self.rows, self.total]]
        return head, body

    def to_markdown(self) -> str:
        head, body = self._cells()
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in body])

    def __str__(self) -> str:
        head, body = self._cells()
        widths = [max(len(x) for x in col) for col in zip(head, *body)]
        lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
                 for cells in [head, *body]]
        return "\n".join([*lines, "bytes: exact nbytes of the arrays each format stores"])


def weight_bytes(weight: torch.Tensor, formats: Sequence[str] = DEFAULT_FORMATS) -> dict[str, int | None]:
    """``{spec: nbytes}`` of one weight; ``None`` where the format cannot hold it as it is.

    A 1-D (or 0-D) weight is counted as a ``1 x n`` matrix (see the module doc)."""
    if isinstance(weight, torch.Tensor) and weight.dim() < 2:
        weight = weight.reshape(1, -1)
    out: dict[str, int | None] = {}
    for spec in formats:
        try:
            out[spec] = to_format(weight, spec).nbytes
        except UnrepresentableError:
            out[spec] = None
    return out


def bytes_table(model: nn.Module, formats: Sequence[str] = DEFAULT_FORMATS, *,
                dtype: torch.dtype | None = None) -> BytesTable:
    """Exact bytes of every measured weight of ``model`` in each of ``formats`` (specs, see
    :func:`sparsenn.backend.formats.to_format`), converted to ``dtype`` first if given."""
    formats = tuple(formats)
    for spec in formats:
        parse_format(spec)  # unknown names fail before any conversion
    rows = []
    for name, module, attr, _ in measured_weights(model):
        w = getattr(module, attr).detach()
        if dtype is not None:
            w = w.to(dtype)
        rows.append(BytesRow(name, tuple(w.shape), str(w.dtype).removeprefix("torch."),
                             int(torch.count_nonzero(w)), weight_bytes(w, formats)))
    total = {f: (None if any(r.bytes[f] is None for r in rows) else sum(r.bytes[f] for r in rows)) for f in formats}
    dtypes = sorted({r.dtype for r in rows})
    return BytesTable(formats, rows, BytesRow("total", (), "/".join(dtypes), sum(r.nnz for r in rows), total))


def layer_bytes(model: nn.Module) -> dict[str, dict[str, int | None]]:
    """``{weight: {format: exact bytes or None}}`` for every measured weight with >= 2 dimensions.
    1-D weights (coupled BatchNorm scales) are left out."""
    return {name: weight_bytes(getattr(module, attr).detach())
            for name, module, attr, _ in measured_weights(model) if getattr(module, attr).dim() >= 2}
