"""Patterns: what shape the zeros may take, and exact top-k under each.

Every pattern views a weight as a matrix: rows are ``shape[0]`` (output units,
filters, embeddings) and columns are everything else flattened in PyTorch order
(the input dimension of the matrix product a kernel runs; for a convolution the
``in_channels * kh * kw`` axis of the unfolded product). A 1-D tensor is one row.

:func:`topk_mask` keeps exactly ``round(density * units)`` units of the pattern, the
highest-scoring ones; ties go to the lower flat index (the order of a stable sort, found
without sorting by :func:`sparsenn.core.selection.top_k_stable`), so the same scores
always give the same mask.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Mapping

import torch

from . import checks
from .registry import UnknownNameError
from .selection import top_k_stable


class PatternError(ValueError):
    """A tensor's shape cannot carry a pattern, or a density is out of its reach."""


def _matrix(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(1, -1) if t.dim() <= 1 else t.reshape(t.shape[0], -1)


def _matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    if len(shape) <= 1:
        return 1, math.prod(shape)
    return shape[0], math.prod(shape[1:])


def _top_units(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean vector keeping the ``k`` highest of a 1-D score vector; ties to the lower index
    (the first ``k`` of a stable descending sort, found by a k-th value selection)."""
    return top_k_stable(scores.reshape(-1), k)


def _count(density: float, units: int) -> int:
    if not 0.0 <= density <= 1.0 or math.isnan(density):
        raise PatternError(f"density must be in [0, 1], got {density}")
    return int(round(density * units))


def _where(name: str | None, shape) -> str:
    return f"layer {name!r} with shape {tuple(shape)}" if name else f"a tensor of shape {tuple(shape)}"


class Pattern:
    """Base class. Subclasses define :meth:`topk`, :meth:`check` and :meth:`obeys`."""

    #: the largest density the pattern can express (N/M for N:M)
    max_density: float = 1.0

    @property
    def removes_outputs(self) -> bool:
        """Whether a pruned unit is a whole output unit (a neuron, a filter, a class of a classifier)."""
        return False

    def check(self, shape: tuple[int, ...], name: str | None = None) -> None:
        """Raise :class:`PatternError` naming the layer if ``shape`` cannot carry the pattern."""

    def topk(self, scores: torch.Tensor, density: float, name: str | None = None) -> torch.Tensor:
        raise NotImplementedError

    def obeys(self, mask: torch.Tensor) -> bool:
        raise NotImplementedError

    def units(self, shape: tuple[int, ...]) -> int:
        """How many independently kept units a tensor of ``shape`` has (elements, blocks, channels)."""
        return math.prod(shape)

    def __str__(self) -> str:
        return self.name

    @property
    def name(self) -> str:
        raise NotImplementedError


@dataclass(frozen=True)
class Unstructured(Pattern):
    """Any element may be zero."""

    @property
    def name(self) -> str:
        return "unstructured"

    def topk(self, scores, density, name=None):
        k = _count(density, scores.numel())
        return _top_units(scores.reshape(-1), k).reshape(scores.shape)

    def obeys(self, mask):
        return True


@dataclass(frozen=True)
class Row(Pattern):
    """Every output row keeps the same number of weights, ``round(density * inputs)``: per-row
    budgets, the comparison group of Wanda (Sun et al. 2023), so that no output unit loses
    more than its share."""

    @property
    def name(self) -> str:
        return "per_row"

    def units(self, shape):
        return _matrix_shape(tuple(shape))[1]

    def topk(self, scores, density, name=None):
        matrix = _matrix(scores)
        k = _count(density, matrix.shape[1])
        order = torch.sort(matrix, dim=1, descending=True, stable=True).indices[:, :k]
        keep = torch.zeros_like(matrix, dtype=torch.bool).scatter_(1, order, True)
        return keep.reshape(scores.shape)

    def obeys(self, mask):
        counts = _matrix(mask).sum(1)
        return counts.numel() == 0 or bool((counts == counts[0]).all())


@dataclass(frozen=True)
class NM(Pattern):
    """At most ``n`` kept of every ``m`` consecutive weights along the input dimension.

    Exactly ``n`` of ``m`` at density ``n/m`` (the 2:4 layout of NVIDIA's Sparse Tensor
    Cores; Mishra et al. 2021). Lower densities drop the weakest kept weights globally
    within the tensor, still at most ``n`` per group.
    """

    n: int
    m: int

    def __post_init__(self):
        if not (isinstance(self.n, int) and isinstance(self.m, int)) or not 0 < self.n < self.m:
            raise PatternError(f"N:M pattern needs integers 0 < N < M, got {self.n}:{self.m}")

    @property
    def name(self) -> str:
        return f"{self.n}:{self.m}"

    @property
    def max_density(self) -> float:
        return self.n / self.m

    def check(self, shape, name=None):
        _, cols = _matrix_shape(tuple(shape))
        if cols % self.m:
            raise PatternError(
                f"{_where(name, shape)} cannot carry pattern {self.name}: "
                f"its input dimension {cols} is not divisible by {self.m}"
            )

    def topk(self, scores, density, name=None):
        self.check(scores.shape, name)
        if density > self.max_density + 1e-12:
            raise PatternError(
                f"pattern {self.name} keeps at most {self.max_density:g} of the weights; "
                f"density {density:g} (sparsity {1 - density:g}) is out of reach"
            )
        k = _count(density, scores.numel())
        groups = _matrix(scores).reshape(-1, self.m)  # (G, M)
        order = torch.sort(groups, dim=1, descending=True, stable=True).indices[:, : self.n]
        candidates = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, order, True)
        flat = groups.reshape(-1)
        masked_scores = torch.where(candidates.reshape(-1), flat, torch.full_like(flat, -math.inf))
        if k == candidates.sum():
            keep = candidates.reshape(-1)
        else:  # fewer than n per group: the best candidates, ties to the lower index
            keep = top_k_stable(masked_scores, k)
        return keep.reshape(scores.shape)

    def obeys(self, mask):
        rows, cols = _matrix_shape(tuple(mask.shape))
        if cols % self.m:
            return False
        return bool((_matrix(mask).reshape(-1, self.m).sum(1) <= self.n).all())


@dataclass(frozen=True)
class Block(Pattern):
    """Whole ``h x w`` blocks of the weight matrix are kept or zeroed (block sparsity, Gray et al. 2017)."""

    h: int
    w: int

    def __post_init__(self):
        if not (isinstance(self.h, int) and isinstance(self.w, int)) or self.h < 1 or self.w < 1:
            raise PatternError(f"block pattern needs positive integer sides, got {self.h}x{self.w}")

    @property
    def name(self) -> str:
        return f"block{self.h}x{self.w}"

    def check(self, shape, name=None):
        rows, cols = _matrix_shape(tuple(shape))
        if rows % self.h or cols % self.w:
            raise PatternError(
                f"{_where(name, shape)} cannot carry pattern {self.name}: its matrix view "
                f"{rows}x{cols} is not divisible into {self.h}x{self.w} blocks"
            )

    def units(self, shape):
        rows, cols = _matrix_shape(tuple(shape))
        return (rows // self.h) * (cols // self.w)

    def _blocks(self, t: torch.Tensor) -> torch.Tensor:
        rows, cols = _matrix_shape(tuple(t.shape))
        return _matrix(t).reshape(rows // self.h, self.h, cols // self.w, self.w)

    def topk(self, scores, density, name=None):
        self.check(scores.shape, name)
        block_scores = self._blocks(scores).sum(dim=(1, 3))  # (R/h, C/w)
        keep = _top_units(block_scores.reshape(-1), _count(density, block_scores.numel()))
        keep = keep.reshape(block_scores.shape)[:, None, :, None].expand(-1, self.h, -1, self.w)
        return keep.reshape(scores.shape)

    def obeys(self, mask):
        rows, cols = _matrix_shape(tuple(mask.shape))
        if rows % self.h or cols % self.w:
            return False
        b = self._blocks(mask)
        return bool((b.all(dim=(1, 3)) | ~b.any(dim=(1, 3))).all())


@dataclass(frozen=True)
class Channel(Pattern):
    """Whole output units (``axis="out"``: neurons, filters, rows) or inputs (``axis="in"``) are kept or zeroed.

    Unit importance is the sum of its weights' scores: with magnitude scores, the
    L1 norm of the filter (Li et al. 2017, "Pruning Filters for Efficient ConvNets").
    """

    axis: str = "out"

    def __post_init__(self):
        if self.axis not in ("out", "in"):
            raise PatternError(f"channel axis must be 'out' or 'in', got {self.axis!r}")

    @property
    def name(self) -> str:
        return "channel" if self.axis == "out" else "channel_in"

    @property
    def _dim(self) -> int:
        return 0 if self.axis == "out" else 1

    @property
    def removes_outputs(self) -> bool:
        return self.axis == "out"

    def check(self, shape, name=None):
        if self.axis == "in" and len(shape) < 2:
            raise PatternError(f"{_where(name, shape)} cannot carry pattern channel_in: it has no input dimension")

    def units(self, shape):
        return shape[self._dim] if shape else 1

    def _unit_view(self, t: torch.Tensor) -> torch.Tensor:
        """(units, rest)"""
        return t.movedim(self._dim, 0).reshape(t.shape[self._dim], -1)

    def topk(self, scores, density, name=None):
        self.check(scores.shape, name)
        if scores.dim() == 0:
            return _top_units(scores.reshape(1), _count(density, 1)).reshape(())
        unit_scores = self._unit_view(scores).sum(1)
        keep = _top_units(unit_scores, _count(density, unit_scores.numel()))
        shape = [1] * scores.dim()
        shape[self._dim] = -1
        return keep.reshape(shape).expand(scores.shape).clone()

    def obeys(self, mask):
        if mask.dim() == 0:
            return True
        v = self._unit_view(mask)
        return bool((v.all(1) | ~v.any(1)).all())


def check_layers(pattern: Pattern | str, shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Check every layer against ``pattern``; one :class:`PatternError` names all that cannot carry
    it and the ``exclude=[...]`` that leaves them out (module names for ``weight``s)."""
    pattern = parse_pattern(pattern)
    problems, names = [], []
    for name, shape in shapes.items():
        try:
            pattern.check(tuple(shape), name)
        except PatternError as e:
            problems.append(str(e))
            module_name, _, attr = name.rpartition(".")
            names.append(module_name if attr == "weight" and module_name else name)
    if problems:
        it = "it" if len(names) == 1 else "them"
        raise PatternError(f"{'; '.join(problems)}. Keep {it} dense with exclude={names!r}, "
                           f"or choose a pattern that fits")


_NM_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
_BLOCK_RE = re.compile(r"^block\s*(\d+)\s*x\s*(\d+)$")
_CHANNEL = {"channel": "out", "channel_out": "out", "filter": "out", "neuron": "out", "row": "out",
            "channel_in": "in", "input_channel": "in", "column": "in"}
_VALID = ("'unstructured', 'per_row' (the same count kept in every output row), 'N:M' (e.g. '2:4', '1:4', '4:8'), 'blockHxW' "
          "(e.g. 'block4x4'), 'channel' (aliases 'filter', 'neuron'), 'channel_in'")


def parse_pattern(spec: Pattern | str) -> Pattern:
    """A :class:`Pattern` from an instance or a string such as ``"2:4"`` or ``"block4x4"``."""
    if isinstance(spec, Pattern):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"pattern must be a Pattern or a string, got {type(spec).__name__}; valid: {_VALID}")
    s = spec.strip().lower()
    if s == "unstructured":
        return Unstructured()
    if s in ("per_row", "row_budget"):
        return Row()
    if m := _NM_RE.match(s):
        return NM(int(m.group(1)), int(m.group(2)))
    if m := _BLOCK_RE.match(s):
        return Block(int(m.group(1)), int(m.group(2)))
    if s in _CHANNEL:
        return Channel(_CHANNEL[s])
    raise UnknownNameError(f"unknown pattern {spec!r}; valid patterns: {_VALID}")


def list_patterns() -> list[str]:
    """Pattern families; ``N:M`` and ``blockHxW`` take numbers (``"2:4"``, ``"block4x4"``)."""
    return ["N:M", "blockHxW", "channel", "channel_in", "per_row", "unstructured"]


def topk_mask(scores: torch.Tensor, pattern: Pattern | str = "unstructured", density: float = 0.5,
              name: str | None = None) -> torch.Tensor:
    """Boolean mask keeping exactly ``round(density * units)`` highest-scoring units of ``pattern``.

    ``name`` (the layer's name) is used in error messages.
    """
    pattern = parse_pattern(pattern)
    if not torch.is_tensor(scores):
        raise TypeError(f"scores must be a tensor, got {type(scores).__name__}")
    if torch.isnan(scores).any():
        raise ValueError(f"scores of {name or 'the tensor'} contain NaN")
    return pattern.topk(scores.detach(), checks.sparsity("density", density, allow_one=True), name)
