"""Per-block sparsities for one global target: OWL (outlier-weighted layerwise sparsity).

Yin et al. 2024, "Outlier Weighed Layerwise Sparsity (OWL): A Missing Secret Sauce for
Pruning LLMs to High Sparsity": a block whose Wanda scores ``|W| * ||X||`` hold more
outliers (scores above ``m`` times the block's mean score) keeps more weights. With
``D_i`` the outlier ratio of block ``i``, densities are
``1 - s + 2 * lam * (D_i - min D) / (max D - min D)``, shifted so their mean is ``1 - s``
(every block of a transformer has the same size, so the global sparsity is ``s``);
the paper's defaults ``m = 5``, ``lam = 0.08``.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from ...core import checks

__all__ = ["outlier_ratio", "owl_sparsities"]


def outlier_ratio(scores: Sequence[torch.Tensor], m: float = 5.0) -> float:
    """Fraction of the scores (all layers of one block together) above ``m`` times their mean."""
    flat = torch.cat([s.detach().reshape(-1).float() for s in scores])
    if flat.numel() == 0:
        raise ValueError("outlier_ratio needs at least one score")
    return float((flat > m * flat.mean()).float().mean())


def owl_sparsities(ratios: Sequence[float], sparsity: float, lam: float = 0.08) -> list[float]:
    """One sparsity per block from its outlier ratio (see the module docstring); their mean is ``sparsity``.

    Raises ValueError when a block's sparsity would leave [0, 1) (``lam`` too large for ``sparsity``)."""
    sparsity = checks.sparsity("sparsity", sparsity)
    lam = checks.real("lam", lam, low=0.0, noun="a number")
    ratios = [float(r) for r in ratios]
    if not ratios or not all(math.isfinite(r) for r in ratios):
        raise ValueError(f"outlier ratios must be finite numbers, got {ratios}")
    lo, hi = min(ratios), max(ratios)
    spread = [0.0 if hi == lo else 2 * lam * (r - lo) / (hi - lo) for r in ratios]
    mean = sum(spread) / len(spread)
    densities = [1.0 - sparsity + s - mean for s in spread]
    out = [1.0 - d for d in densities]
    bad = [i for i, s in enumerate(out) if not 0.0 <= s < 1.0]
    if bad:
        raise ValueError(f"OWL with lam={lam:g} at sparsity {sparsity:g} gives block sparsities outside [0, 1) "
                         f"(blocks {bad}: {[round(out[i], 4) for i in bad]}); use a smaller lam")
    return out
