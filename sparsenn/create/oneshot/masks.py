"""Masks from scores for one-shot pruning: per output row, per N:M group, or per layer.

Wanda (Sun et al. 2023) compares weights *per output row*: every row of a Linear keeps
the same number of weights, which matters for language models whose rows differ in
scale. N:M patterns are per group of ``m`` consecutive inputs by construction; every
other pattern (blocks, channels, a whole-layer budget) goes through
:func:`sparsenn.core.patterns.topk_mask`.
"""

from __future__ import annotations

import torch

from ...core import checks
from ...core.patterns import NM, Pattern, PatternError, Row, Unstructured, parse_pattern, topk_mask

Tensor = torch.Tensor

__all__ = ["keep_mask", "pruned_count"]


def pruned_count(sparsity: float, units: int) -> int:
    """How many of ``units`` a sparsity removes (``round``, as every mask in the library)."""
    return int(round(sparsity * units))


def _row_keep(scores: Tensor, prune: int) -> Tensor:
    """Keep all but the ``prune`` lowest scores of every row (the ``per_row`` pattern with that many kept;
    ties: the lower column index is kept, as in every mask of the library)."""
    cols = scores.shape[1]
    return Row().topk(scores, (cols - prune) / cols if cols else 1.0)


def keep_mask(scores: Tensor, pattern: Pattern | str, sparsity: float, *, per_row: bool = True,
              name: str | None = None) -> Tensor:
    """Boolean mask (True: keep) of a 2-D weight's ``scores`` (higher: more important).

    ``pattern="unstructured"``: with ``per_row`` (always with ``pattern="per_row"``) every output row prunes
    ``round(sparsity * columns)`` weights, else the layer prunes ``round(sparsity * size)``
    wherever they are. ``"N:M"``: ``n`` of every ``m`` consecutive inputs are kept at
    sparsity ``1 - n/m`` (a higher sparsity also prunes the weakest kept ones). Other
    patterns: the layer's budget under the pattern.
    """
    pattern = parse_pattern(pattern)
    sparsity = checks.sparsity("sparsity", sparsity)
    if scores.dim() != 2:
        raise ValueError(f"scores of {name or 'the layer'} must be 2-D (outputs x inputs), got shape "
                         f"{tuple(scores.shape)}")
    if torch.isnan(scores).any():
        raise ValueError(f"scores of {name or 'the layer'} contain NaN (NaN or Inf in the weights or the "
                         "calibration activations)")
    if isinstance(pattern, NM):
        pattern.check(scores.shape, name)
        if sparsity < 1 - pattern.max_density - 1e-9:
            raise PatternError(f"{name or 'the layer'}: pattern {pattern.name} prunes at least "
                               f"{1 - pattern.max_density:g} of the weights; sparsity {sparsity:g} is out of reach")
    if isinstance(pattern, Row) or (isinstance(pattern, Unstructured) and per_row):
        return _row_keep(scores, pruned_count(sparsity, scores.shape[1]))
    return topk_mask(scores, pattern, 1.0 - sparsity, name=name)
