"""Groups for group lasso: a tensor split into disjoint groups that are zeroed together.

A group specification is a structured pattern of :mod:`sparsenn.core.patterns`, so the
groups a penalty drives to zero are the units a pruning pattern keeps or removes:

* ``"channel"`` (aliases ``"filter"``, ``"neuron"``, ``"row"``): one group per output
  unit -- a convolution's filter ``w[i]``, a Linear layer's row of incoming weights
  (the structured sparsity of Wen et al. 2016, arXiv:1608.03665);
* ``"channel_in"`` (aliases ``"input_channel"``, ``"column"``): one group per input
  channel / feature ``w[:, j]`` (input-neuron selection, Scardapane et al. 2017,
  arXiv:1607.00485);
* ``"blockHxW"`` (e.g. ``"block4x4"``): ``H x W`` blocks of the weight's matrix view
  (rows ``shape[0]``, columns everything else), which must tile it exactly.

:func:`to_groups` lays the groups out as the rows of a ``(groups, group size)`` matrix
and :func:`from_groups` puts such a matrix back; they are inverse to each other.
"""

from __future__ import annotations

import math

import torch

from .patterns import Block, Channel, Pattern, PatternError, parse_pattern

GroupSpec = Pattern | str

VALID_GROUPS = ("'channel' (aliases 'filter', 'neuron', 'row'), 'channel_in' (aliases 'input_channel', "
                "'column'), 'blockHxW' (e.g. 'block4x4')")


def parse_groups(spec: GroupSpec) -> Channel | Block:
    """The :class:`~sparsenn.core.patterns.Channel` or :class:`~sparsenn.core.patterns.Block` pattern named by ``spec``."""
    try:
        pattern = parse_pattern(spec)
    except (TypeError, ValueError):
        raise ValueError(f"unknown groups {spec!r}; valid groups: {VALID_GROUPS}") from None
    if not isinstance(pattern, (Channel, Block)):
        raise ValueError(f"groups {spec!r} do not partition a tensor into groups; valid groups: {VALID_GROUPS}")
    return pattern


def check_groups(pattern: Channel | Block, shape: tuple[int, ...], name: str | None = None) -> None:
    """Raise a :class:`~sparsenn.core.patterns.PatternError` (a ValueError) if the groups do not tile ``shape``."""
    what = f"{name!r} of shape {tuple(shape)}" if name else f"a tensor of shape {tuple(shape)}"
    if isinstance(pattern, Channel):
        if pattern.axis == "in" and len(shape) < 2:
            raise PatternError(f"channel_in groups need an input dimension; {what} has none")
        return
    rows, cols = _matrix_shape(torch.Size(shape))
    if len(shape) == 0 or rows % pattern.h or cols % pattern.w:
        raise PatternError(f"{pattern.name} groups do not tile {what}: its matrix view {rows}x{cols} "
                           f"is not divisible into {pattern.h}x{pattern.w} blocks")


def _matrix_shape(shape: torch.Size) -> tuple[int, int]:
    return (1, math.prod(shape)) if len(shape) <= 1 else (shape[0], math.prod(shape[1:]))


def to_groups(t: torch.Tensor, pattern: Channel | Block) -> torch.Tensor:
    """``(groups, group size)``: row ``g`` holds the elements of group ``g``."""
    check_groups(pattern, tuple(t.shape))
    if isinstance(pattern, Channel):
        if t.dim() == 0:
            return t.reshape(1, 1)
        dim = 0 if pattern.axis == "out" else 1
        return t.movedim(dim, 0).reshape(t.shape[dim], -1)
    rows, cols = _matrix_shape(t.shape)
    h, w = pattern.h, pattern.w
    return t.reshape(rows // h, h, cols // w, w).permute(0, 2, 1, 3).reshape(-1, h * w)


def from_groups(g: torch.Tensor, pattern: Channel | Block, shape: torch.Size) -> torch.Tensor:
    """The tensor of ``shape`` whose :func:`to_groups` is ``g``."""
    shape = torch.Size(shape)
    if isinstance(pattern, Channel):
        if pattern.axis == "out" or len(shape) == 0:
            return g.reshape(shape)
        moved = (shape[1], shape[0], *shape[2:])
        return g.reshape(moved).movedim(0, 1)
    rows, cols = _matrix_shape(shape)
    h, w = pattern.h, pattern.w
    return g.reshape(rows // h, cols // w, h, w).permute(0, 2, 1, 3).reshape(shape)


def group_norms(t: torch.Tensor, pattern: Channel | Block) -> torch.Tensor:
    """The Euclidean norm of every group, ``(groups,)``."""
    return torch.linalg.vector_norm(to_groups(t, pattern), dim=1)
