"""Per-layer densities from one global sparsity target.

:func:`layer_densities` turns a global sparsity into one density (= 1 - sparsity)
per layer such that ``sum(d_l * numel_l) == (1 - sparsity) * sum(numel_l)``:

* ``uniform``: every layer gets ``1 - sparsity``.
* ``global``: one top-k ranking of ``scores`` across all layers (global magnitude
  pruning, e.g. Frankle & Carbin 2019, "The Lottery Ticket Hypothesis").
* ``erk``: Erdos-Renyi-Kernel, density proportional to
  ``(sum(shape) / prod(shape)) ** erk_power_scale`` (Evci et al. 2020, "Rigging the
  Lottery: Making All Tickets Winners").
* ``er``: Erdos-Renyi, density proportional to ``(out + in) / (out * in)``
  (Mocanu et al. 2018, "Scalable training of artificial neural networks with
  adaptive sparse connectivity", SET).

ERK/ER layers whose density would exceed 1 are made dense and the scale is
recomputed for the rest, as in google-research/rigl
``sparse_utils.get_sparsities_erdos_renyi``.

A registered distribution is a callable
``fn(shapes, density, *, scores=None, erk_power_scale=1.0) -> dict[str, float]``
that spreads an average ``density`` (kept / total over ``shapes``) over the layers.
"""

from __future__ import annotations

import fnmatch
import math
import numbers
from typing import Mapping, Sequence

import torch

from . import checks
from .registry import Registry
from .selection import top_k_stable

__all__ = ["DISTRIBUTIONS", "layer_densities", "list_distributions"]

DISTRIBUTIONS: Registry = Registry("distribution")

Shape = tuple[int, ...]


def _numel(shape: Shape) -> int:
    return math.prod(shape)


def _as_2d(shape: Shape) -> Shape:
    """0-D shapes count as (1, 1) and 1-D shapes (biases) as (n, 1)."""
    return (tuple(shape) + (1, 1))[:2] if len(shape) < 2 else tuple(shape)


# ----------------------------------------------------------------------------- distributions


@DISTRIBUTIONS.register("uniform")
def _uniform(shapes: Mapping[str, Shape], density: float, **_) -> dict[str, float]:
    """Every layer gets the same density."""
    return {name: density for name in shapes}


@DISTRIBUTIONS.register("global")
def _global(
    shapes: Mapping[str, Shape], density: float, *, scores=None, **_
) -> dict[str, float]:
    """Keep the ``round(density * total)`` highest scores over all layers together.

    Ties go to the lower index of the concatenation of the flattened scores in key
    order (the order of a stable descending sort, found by a k-th value selection,
    :func:`~sparsenn.core.selection.top_k_stable`, not a sort).
    """
    if scores is None:
        raise ValueError("distribution 'global' needs scores (one tensor per layer), got None")
    missing = [n for n in shapes if n not in scores]
    if missing:
        raise ValueError(f"distribution 'global' needs scores for layers {missing}")
    flat = []
    for name, shape in shapes.items():
        s = torch.as_tensor(scores[name]).detach()
        if tuple(s.shape) != tuple(shape):
            raise ValueError(
                f"scores[{name!r}] has shape {tuple(s.shape)}, expected {tuple(shape)}"
            )
        if s.is_floating_point() and bool(torch.isnan(s.sum())) and bool(torch.isnan(s).any()):  # sum: one pass
            raise ValueError(f"scores[{name!r}] contains NaN")
        flat.append(s.reshape(-1))
    # one dtype that holds every score exactly (float32 scores stay float32), one device
    dtype = flat[0].dtype if flat[0].is_floating_point() else torch.float64
    for s in flat[1:]:
        dtype = torch.promote_types(dtype, s.dtype if s.is_floating_point() else torch.float64)
    device = flat[0].device if all(s.device == flat[0].device for s in flat) else torch.device("cpu")
    allscores = torch.cat([s.to(device, dtype) for s in flat])
    keep = top_k_stable(allscores, round(density * allscores.numel()))
    kept = [int(torch.count_nonzero(c)) for c in keep.split([t.numel() for t in flat])]
    return {name: c / _numel(shape) for (name, shape), c in zip(shapes.items(), kept)}


def _scaled(shapes: Mapping[str, Shape], density: float, raw: dict[str, float]) -> dict[str, float]:
    """density_l = eps * raw_l with eps matching the kept count; layers above 1 go dense."""
    numel = {n: _numel(s) for n, s in shapes.items()}
    budget = density * sum(numel.values())
    dense: set[str] = set()
    eps = 0.0
    while len(dense) < len(shapes):
        pool = [n for n in shapes if n not in dense]
        rest = budget - sum(numel[n] for n in dense)
        eps = rest / sum(raw[n] * numel[n] for n in pool)
        over = {n for n in pool if eps * raw[n] > 1.0}
        if not over:
            break
        dense |= over
    return {n: 1.0 if n in dense else min(1.0, max(0.0, eps * raw[n])) for n in shapes}


@DISTRIBUTIONS.register("erk")
def _erk(
    shapes: Mapping[str, Shape], density: float, *, erk_power_scale: float = 1.0, **_
) -> dict[str, float]:
    """Erdos-Renyi-Kernel (Evci et al. 2020): raw_l = (sum(shape)/prod(shape))**power."""
    raw = {}
    for n, s in shapes.items():
        s2 = _as_2d(s)
        raw[n] = (sum(s2) / _numel(s2)) ** erk_power_scale
    return _scaled(shapes, density, raw)


@DISTRIBUTIONS.register("er")
def _er(shapes: Mapping[str, Shape], density: float, **_) -> dict[str, float]:
    """Erdos-Renyi (Mocanu et al. 2018): raw_l = (out + in) / (out * in)."""
    raw = {}
    for n, s in shapes.items():
        out, inp = _as_2d(s)[:2]
        raw[n] = (out + inp) / (out * inp)
    return _scaled(shapes, density, raw)


# ----------------------------------------------------------------------------- public API


def list_distributions() -> list[str]:
    """Names accepted by :func:`layer_densities`."""
    return DISTRIBUTIONS.names()


def _check_fraction(what: str, value, *, closed: bool) -> float:
    return checks.sparsity(what, value, allow_one=closed)


def _check_shapes(shapes) -> dict[str, Shape]:
    if not isinstance(shapes, Mapping) or not shapes:
        raise ValueError(f"shapes must be a non-empty dict of layer name -> shape, got {shapes!r}")
    out = {}
    for name, shape in shapes.items():
        ok = isinstance(shape, Sequence) and all(
            isinstance(d, numbers.Integral) and not isinstance(d, bool) and d > 0 for d in shape
        )
        if not ok:
            raise ValueError(
                f"shape of {name!r} must be a tuple of positive ints, got {shape!r}"
            )
        out[name] = tuple(int(d) for d in shape)
    return out


def _resolve_overrides(overrides, names: list[str]) -> dict[str, float]:
    """Map each overridden layer to its density; exact names beat glob patterns."""
    if not overrides:
        return {}
    exact: dict[str, float] = {}
    by_pattern: dict[str, dict[str, float]] = {}
    for key, value in overrides.items():
        density = 1.0 - _check_fraction(f"override sparsity for {key!r}", value, closed=True)
        if key in names:
            exact[key] = density
            continue
        hits = fnmatch.filter(names, key)
        if not hits:
            raise ValueError(f"override {key!r} matches no layer; layers: {', '.join(names)}")
        for name in hits:
            by_pattern.setdefault(name, {})[key] = density
    for name, found in by_pattern.items():
        if name not in exact and len(set(found.values())) > 1:
            raise ValueError(f"layer {name!r} matches overrides {sorted(found)} with different values")
        exact.setdefault(name, next(iter(found.values())))
    return exact


def layer_densities(
    distribution: str,
    shapes: dict[str, tuple[int, ...]],
    sparsity: float,
    *,
    overrides: dict[str, float] | None = None,
    scores: dict[str, torch.Tensor] | None = None,
    erk_power_scale: float = 1.0,
) -> dict[str, float]:
    """Density (= 1 - sparsity) per layer, in the key order of ``shapes``.

    ``overrides`` maps layer names or fnmatch patterns to a fixed sparsity; the other
    layers share the remaining kept budget so the global target still holds.
    ``scores`` is needed by ``"global"``; ``erk_power_scale`` by ``"erk"``.
    """
    fn = DISTRIBUTIONS.get(distribution)
    shapes = _check_shapes(shapes)
    sparsity = _check_fraction("sparsity", sparsity, closed=False)
    if not (
        isinstance(erk_power_scale, numbers.Real)
        and math.isfinite(erk_power_scale)
        and erk_power_scale >= 0
    ):
        raise ValueError(f"erk_power_scale must be a finite number >= 0, got {erk_power_scale!r}")
    fixed = _resolve_overrides(overrides, list(shapes))
    numel = {n: _numel(s) for n, s in shapes.items()}
    total = sum(numel.values())
    rest = {n: s for n, s in shapes.items() if n not in fixed}
    budget = (1.0 - sparsity) * total - sum(fixed[n] * numel[n] for n in fixed)
    tol = 1e-9
    result: dict[str, float] = {}
    if not rest:
        if abs(budget) > tol * total:
            raise ValueError(
                f"every layer is overridden, keeping {(1 - sparsity) * total - budget:.6g} "
                f"weights, but sparsity {sparsity} requires {(1 - sparsity) * total:.6g} of {total}"
            )
    else:
        rest_total = sum(numel[n] for n in rest)
        density = budget / rest_total if fixed else 1.0 - sparsity
        if not -tol <= density <= 1.0 + tol:
            raise ValueError(
                f"cannot reach sparsity {sparsity}: the overrides keep "
                f"{(1 - sparsity) * total - budget:.6g} of {total} weights, leaving "
                f"{budget:.6g} to keep among the other {rest_total} weights "
                f"(density {density:.6g}, must be in [0, 1])"
            )
        density = min(1.0, max(0.0, density))
        result = fn(rest, density, scores=scores, erk_power_scale=float(erk_power_scale))
    return {n: fixed[n] if n in fixed else float(result[n]) for n in shapes}
