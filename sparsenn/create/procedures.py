"""Pruning procedures from the literature, usable with any training function.

* :func:`one_shot_prune`: prune once, then fine-tune.
* :func:`iterative_prune`: prune and retrain in rounds (Han et al. 2015, "Learning both
  Weights and Connections for Efficient Neural Networks"), optionally rewinding the
  weights (Frankle et al. 2020) or only the learning rate (Renda et al. 2020) each round.
* :class:`LotteryTicket`: iterative magnitude pruning with the survivors reset to
  ``theta_k`` (Frankle & Carbin 2019, "The Lottery Ticket Hypothesis"; ``k > 0``:
  Frankle et al. 2020, "Linear Mode Connectivity and the Lottery Ticket Hypothesis"),
  plus its two controls (random re-initialization, random mask).

A ``train_fn(model, round: RoundInfo)`` trains the model in place for one round. It
creates its own optimizer (optimizer state is reset every round, as in Han et al.),
wraps it with ``round.sparsifier.wrap(opt)``, calls ``round.sparsifier.step()`` after
each optimizer step, scales its learning rate by ``round.lr_scale`` and starts its LR
schedule at iteration ``round.start_step``. It may return a dict (e.g. metrics).
"""

from __future__ import annotations

import copy
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn

from ..core import checks
from ..core.distributions import _resolve_overrides, layer_densities
from ..core.masks import apply_masks, load_masks, masked_parameters
from ..core.metrics import sparsity as measured_sparsity
from ..core.schedules import OneShot
from ..core.targets import select_parameters
from ..train.rewind import Snapshot, check_snapshot, rewind_weights, take_snapshot
from ..train.sparsifier import Sparsifier

__all__ = ["LotteryTicket", "RoundInfo", "RoundResult", "attach_sparsifier", "iterative_prune", "one_shot_prune"]

REWIND_MODES = ("weights", "lr")


def _never() -> OneShot:
    """A schedule that never fires: masks change only through ``update``/``set_masks``."""
    return OneShot(begin_step=10**12)


@dataclass
class RoundInfo:
    """What ``train_fn`` needs to know about the current round."""

    index: int  # 0-based round
    sparsity: float  # global target of this round
    sparsifier: Sparsifier
    lr_scale: float = 1.0  # multiply the learning rate by this (Han et al.: reduced LR to fine-tune)
    start_step: int = 0  # start the LR schedule at this iteration (k under rewinding)


@dataclass
class RoundResult:
    """One finished round: the target, the achieved sparsity and what ``train_fn`` returned."""

    index: int
    target: float
    sparsity: float  # measured with sparsenn.core.metrics.sparsity after training
    metrics: dict[str, Any] = field(default_factory=dict)


def _fraction(value: Any, what: str) -> float:
    return checks.sparsity(what, value, allow_zero=False)


def _step(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{what} must be an int >= 0, got {value!r}")
    return int(value)


def _lr_scale(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 < float(value) < math.inf:
        raise ValueError(f"lr_scale must be a finite number > 0, got {value!r}")
    return float(value)


def _no_schedule(kwargs: dict, who: str) -> None:
    bad = sorted({"schedule", "sparsity"} & set(kwargs))
    if bad:
        raise ValueError(f"{who} sets the sparsity itself; do not pass {', '.join(bad)}=")


def _mask_sparsity(masks: Mapping[str, torch.Tensor]) -> float:
    total = sum(m.numel() for m in masks.values())
    return 0.0 if total == 0 else 1.0 - sum(int(m.sum()) for m in masks.values()) / total


def attach_sparsifier(model: nn.Module, **kwargs: Any) -> Sparsifier:
    """A Sparsifier over ``model``'s existing masks that never changes them on its own.

    For deep copies (which carry masks but no sparsifier): ``sp.wrap(opt)`` then masks
    the optimizer. ``kwargs`` go to :class:`Sparsifier` (e.g. ``pattern``).
    """
    names = [mp.name for mp in masked_parameters(model)]
    if not names:
        raise ValueError(f"{type(model).__name__} has no masks to attach a sparsifier to")
    _no_schedule(kwargs, "attach_sparsifier")
    masks = {mp.name: mp.mask for mp in masked_parameters(model)}
    sp = Sparsifier(model, sparsity=0.0, schedule=_never(), include=names, **kwargs)
    sp.sparsity = _mask_sparsity(masks)  # the masks' sparsity: later update()s are monotone from here
    return sp


def _call_round(train_fn: Callable, model: nn.Module, info: RoundInfo) -> dict[str, Any]:
    sp = info.sparsifier
    before = len(sp._optimizers)
    out = train_fn(model, info)
    # the round's optimizer is done: unhook it so it is released (the next round makes its own)
    for hooks in sp._optimizers[before:]:
        hooks.remove()
    del sp._optimizers[before:]
    apply_masks(model)  # a no-op when train_fn wrapped its optimizer, as it must
    if out is None:
        return {}
    if not isinstance(out, Mapping):
        raise TypeError(f"train_fn must return None or a dict, got {type(out).__name__}")
    return dict(out)


def one_shot_prune(model: nn.Module, sparsity: float, *, train_fn: Callable | None = None,
                   lr_scale: float = 1.0, **sparsifier_kwargs: Any) -> Sparsifier:
    """Prune ``model`` once to ``sparsity`` (magnitude by default), then fine-tune with ``train_fn``.

    ``sparsifier_kwargs`` (method, pattern, distribution, include, data, ...) go to
    :class:`Sparsifier`. Returns the sparsifier; the model keeps its masks.
    """
    _no_schedule(sparsifier_kwargs, "one_shot_prune")
    if train_fn is not None and not callable(train_fn):
        raise TypeError(f"train_fn must be callable, got {type(train_fn).__name__}")
    lr_scale = _lr_scale(lr_scale)
    sp = Sparsifier(model, sparsity, schedule="one_shot", **sparsifier_kwargs)  # prunes now
    if train_fn is not None:
        _call_round(train_fn, model, RoundInfo(0, sp.target, sp, lr_scale, 0))
    return sp


def _levels(levels, rounds, fraction) -> list[float]:
    if levels is not None:
        if rounds is not None or fraction is not None:
            raise ValueError("pass either levels= or rounds= with fraction=, not both")
        levels = list(levels)
        if not levels:
            raise ValueError("levels must be a non-empty list of increasing sparsities in (0, 1)")
        out = [_fraction(v, f"levels[{i}]") for i, v in enumerate(levels)]
        for i in range(1, len(out)):
            if out[i] <= out[i - 1]:
                raise ValueError(f"levels must be strictly increasing, got {levels[i]!r} after {levels[i - 1]!r} "
                                 f"in {levels!r}")
        return out
    if rounds is None or fraction is None:
        raise ValueError("pass levels=[s1, s2, ...] or rounds=<int> with fraction=<float in (0, 1)>")
    if isinstance(rounds, bool) or not isinstance(rounds, numbers.Integral) or rounds < 1:
        raise ValueError(f"rounds must be an int >= 1, got {rounds!r}")
    p = _fraction(fraction, "fraction")
    return [1.0 - (1.0 - p) ** r for r in range(1, int(rounds) + 1)]


def iterative_prune(model: nn.Module, *, levels=None, rounds: int | None = None, fraction: float | None = None,
                    train_fn: Callable, rewind: str | None = None, rewind_step: int = 0,
                    snapshot: Snapshot | None = None, lr_scale: float | None = None,
                    on_round: Callable[[RoundResult], None] | None = None,
                    **sparsifier_kwargs: Any) -> list[RoundResult]:
    """Prune and retrain in rounds (Han et al. 2015); returns one :class:`RoundResult` per round.

    Sparsity follows ``levels`` (increasing global sparsities) or ``rounds`` rounds that
    each prune ``fraction`` of the remaining weights. Each round: prune to the level
    (monotone: pruned weights stay pruned), then rewind -- ``"weights"``: survivors reset
    to ``snapshot`` (theta_k) and the LR schedule restarts at ``snapshot.step``;
    ``"lr"``: weights kept, the LR schedule restarts at ``rewind_step`` (Renda et al.
    2020); ``None``: plain fine-tuning -- then ``train_fn``, then ``on_round(result)``.
    ``lr_scale`` defaults to 0.1 for fine-tuning and 1.0 under rewinding.
    """
    levels = _levels(levels, rounds, fraction)
    if not callable(train_fn):
        raise TypeError(f"train_fn must be callable, got {type(train_fn).__name__}")
    if on_round is not None and not callable(on_round):
        raise TypeError(f"on_round must be callable, got {type(on_round).__name__}")
    if rewind is not None and rewind not in REWIND_MODES:
        raise ValueError(f"unknown rewind mode {rewind!r}; valid: {', '.join(map(repr, REWIND_MODES))} or None")
    rewind_step = _step(rewind_step, "rewind_step")
    if rewind is None and (snapshot is not None or rewind_step):
        raise ValueError("snapshot/rewind_step given but rewind=None; pass rewind='weights' or rewind='lr'")
    if rewind == "weights" and snapshot is None:
        raise ValueError("rewind='weights' needs snapshot=take_snapshot(model, k) taken during dense training")
    start = rewind_step
    if snapshot is not None:
        check_snapshot(model, snapshot)
        if rewind_step and rewind_step != snapshot.step:
            raise ValueError(f"rewind_step={rewind_step} differs from snapshot.step={snapshot.step}")
        start = snapshot.step
    lr_scale = _lr_scale((0.1 if rewind is None else 1.0) if lr_scale is None else lr_scale)
    _no_schedule(sparsifier_kwargs, "iterative_prune")
    if sparsifier_kwargs.get("overrides"):  # every level must be reachable before anything changes
        names = select_parameters(model, sparsifier_kwargs.get("include"), sparsifier_kwargs.get("exclude"),
                                  pattern=sparsifier_kwargs.get("pattern"), warn=False)  # the Sparsifier warns
        params = dict(model.named_parameters())
        dist = sparsifier_kwargs.get("distribution", "uniform")
        for level in levels:
            layer_densities(dist, {n: tuple(params[n].shape) for n in names}, level,
                            overrides=sparsifier_kwargs["overrides"],
                            scores={n: params[n].detach().abs() for n in names})
    sp = Sparsifier(model, levels[-1], schedule=_never(), **sparsifier_kwargs)

    results = []
    for i, level in enumerate(levels):
        sp.update(level)
        if rewind == "weights":
            rewind_weights(model, snapshot)
        info = RoundInfo(i, level, sp, lr_scale, 0 if rewind is None else start)
        metrics = _call_round(train_fn, model, info)
        result = RoundResult(i, level, measured_sparsity(model), metrics)
        results.append(result)
        if on_round is not None:
            on_round(result)
    return results


class LotteryTicket:
    """Iterative magnitude pruning with reset to ``theta_k`` (Frankle & Carbin 2019; Frankle et al. 2020).

    ``lt.wrap(opt)``, ``lt.step()`` after each optimizer step (takes the ``theta_k``
    snapshot when the count reaches ``rewind_step``), ``lt.prune()`` after training:
    removes ``prune_fraction`` of the remaining weights of each layer (``distribution=
    "uniform"``) or of all layers together (``"global"``), by magnitude, and resets the
    survivors to ``theta_k``. ``overrides`` = ``{layer name or glob: prune fraction per
    round}`` (Frankle & Carbin prune output layers at half the rate). Train each round
    with a fresh optimizer and restart the LR schedule at ``rewind_step``.
    """

    def __init__(self, model: nn.Module, *, prune_fraction: float = 0.2, rewind_step: int = 0,
                 distribution: str = "uniform", include=None, exclude=None,
                 overrides: dict[str, float] | None = None, seed: int = 0):
        self.prune_fraction = _fraction(prune_fraction, "prune_fraction")
        self.rewind_step = _step(rewind_step, "rewind_step")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        names = select_parameters(model, include, exclude)
        for key, value in (overrides or {}).items():
            checks.sparsity(f"override prune fraction for {key!r}", value)
        # {name: per-round fraction}; validates the keys (unknown layer -> error listing the layers)
        self.fractions = {n: 1.0 - d for n, d in _resolve_overrides(overrides, names).items()}
        self.model, self.seed, self.rounds, self.iteration = model, seed, 0, 0
        self._numel = {n: p.numel() for n, p in model.named_parameters() if n in names}
        target, layer = self._targets(1)
        self.sparsifier = Sparsifier(model, target, method="magnitude", distribution=distribution,
                                     schedule=_never(), include=names, overrides=layer, seed=seed)
        self.snapshot: Snapshot | None = take_snapshot(model, 0) if self.rewind_step == 0 else None

    def _targets(self, r: int) -> tuple[float, dict[str, float]]:
        """Global sparsity and per-layer override sparsities after ``r`` rounds."""
        layer = {n: 1.0 - (1.0 - p) ** r for n, p in self.fractions.items()}
        kept = sum(self._numel[n] * ((1.0 - self.prune_fraction) ** r if n not in layer else 1.0 - layer[n])
                   for n in self._numel)
        return 1.0 - kept / sum(self._numel.values()), layer

    def wrap(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """Mask ``optimizer`` (in place) and return it."""
        return self.sparsifier.wrap(optimizer)

    def step(self) -> None:
        """Call after each optimizer step: counts iterations, snapshots ``theta_k`` at ``rewind_step``."""
        self.sparsifier.step()
        self.iteration += 1
        if self.snapshot is None and self.iteration == self.rewind_step:
            self.snapshot = take_snapshot(self.model, self.iteration)

    def _need_snapshot(self) -> Snapshot:
        if self.snapshot is None:
            raise ValueError(f"rewind_step {self.rewind_step} is beyond the {self.iteration} trained iterations; "
                             f"train (calling lt.step() after each optimizer step) before pruning")
        return self.snapshot

    def prune(self) -> float:
        """Prune ``prune_fraction`` of the remaining weights, reset survivors to theta_k; returns the sparsity."""
        snapshot = self._need_snapshot()
        target, layer = self._targets(self.rounds + 1)
        sp, old = self.sparsifier, self.sparsifier.overrides
        sp.overrides = layer
        try:
            sp.update(target)  # computes every mask before changing any
        except Exception:
            sp.overrides = old
            raise
        rewind_weights(self.model, snapshot)
        self.rounds += 1
        self.iteration = self.rewind_step
        return _mask_sparsity(sp.masks)

    def ticket_sparsities(self) -> dict[str, float]:
        """Per-layer sparsity of the current ticket's masks."""
        return {n: 1.0 - int(m.sum()) / m.numel() for n, m in self.sparsifier.masks.items()}

    def random_reinit(self, seed: int | None = None) -> nn.Module:
        """Control 1: a deep copy with the same masks and freshly initialized weights.

        Calls ``reset_parameters()`` of every module that has one, under
        ``torch.manual_seed(seed)`` in a forked RNG, then re-zeros masked positions.
        """
        clone = copy.deepcopy(self.model)
        with torch.random.fork_rng():
            torch.manual_seed(self.seed if seed is None else seed)
            for module in clone.modules():
                if callable(getattr(module, "reset_parameters", None)):
                    module.reset_parameters()
        apply_masks(clone)
        return clone

    def random_mask(self, seed: int | None = None) -> nn.Module:
        """Control 2: a deep copy with theta_k weights and a random mask of the same per-layer sparsity."""
        snapshot = self._need_snapshot()
        g = torch.Generator().manual_seed(self.seed if seed is None else seed)
        masks = {}
        for name, m in self.sparsifier.masks.items():
            keep = torch.zeros(m.numel(), dtype=torch.bool)
            keep[torch.randperm(m.numel(), generator=g)[: int(m.sum())]] = True
            masks[name] = keep.view(m.shape).to(m.device)
        clone = copy.deepcopy(self.model)
        load_masks(clone, masks)
        return rewind_weights(clone, snapshot)

    @staticmethod
    def for_model(model: nn.Module, **kwargs: Any) -> Sparsifier:
        """A sparsifier for a control copy; see :func:`attach_sparsifier`."""
        return attach_sparsifier(model, **kwargs)
