"""Robustness of one model as plain records: accuracy under attack at several budgets and under
common corruptions at several severities.

``robustness_eval(model, loader)`` returns a JSON-serializable dict; ``sparsenn.report.robustness``
turns several of them (dense and pruned models) into a table and plots. Every random draw (attack
starts, noise) comes from generators seeded from ``seed`` and the case (budget, corruption, severity),
so two models are measured on the same perturbations, whatever the order of the cases.
"""

from __future__ import annotations

import hashlib
import itertools
import statistics
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from ..core import checks
from .attacks import PGD, _Attack, _eval_mode, make_attack
from .corruptions import CORRUPTIONS, SEVERITIES, corrupt, list_corruptions

__all__ = ["accuracy_under_attack", "corruption_accuracy", "robustness_eval"]

DEFAULT_EPSILONS = (0.0, 0.05, 0.1, 0.2)


def _device(model: nn.Module) -> torch.device | None:
    p = next(model.parameters(), None)
    return None if p is None else p.device


def _batches(loader: Iterable, max_batches: int | None, device: torch.device | None):
    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int)
                                    or max_batches < 1):
        raise ValueError(f"max_batches must be None or an int >= 1, got {max_batches!r}")
    count = 0
    for x, y, *_ in itertools.islice(loader, max_batches):
        count += 1
        yield (x, y) if device is None else (x.to(device), y.to(device))
    if count == 0:
        raise ValueError("the loader gave no batches")


@torch.no_grad()
def _hits(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with _eval_mode(model):
        return model(x).argmax(-1) == y


def _correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    return int(_hits(model, x, y).sum())


def accuracy_under_attack(model: nn.Module, loader: Iterable, attack: Any, *, restarts: int = 1,
                          generator: torch.Generator | None = None, max_batches: int | None = None) -> float:
    """Top-1 accuracy in [0, 1] on ``attack(model, x, y)`` for every batch of ``loader``.

    ``restarts`` > 1 runs the attack that many times per batch (random starts differ) and counts a sample
    as correct only if every run leaves it correct: the worst case over restarts (Madry et al. 2018)."""
    if isinstance(restarts, bool) or not isinstance(restarts, int) or restarts < 1:
        raise ValueError(f"restarts must be an int >= 1, got {restarts!r}")
    attack = make_attack(attack) if isinstance(attack, (str, dict)) else attack
    correct = total = 0
    for x, y in _batches(loader, max_batches, _device(model)):
        ok = torch.ones(len(y), dtype=torch.bool, device=y.device)
        for _ in range(restarts):
            x_adv = attack(model, x, y, generator=generator) if isinstance(attack, _Attack) else attack(model, x, y)
            ok &= _hits(model, x_adv, y)
        correct += int(ok.sum())
        total += len(y)
    return correct / total


def corruption_accuracy(model: nn.Module, loader: Iterable, name: str, severity: int, *,
                        generator: torch.Generator | None = None, max_batches: int | None = None) -> float:
    """Top-1 accuracy in [0, 1] on ``corrupt(x, name, severity)`` for every batch of ``loader``."""
    CORRUPTIONS.get(name)  # an unknown name fails before any batch is drawn
    correct = total = 0
    for x, y in _batches(loader, max_batches, _device(model)):
        correct += _correct(model, corrupt(x, name, severity, generator=generator), y)
        total += len(y)
    return correct / total


def _generator(seed: int, *case: int) -> torch.Generator:
    """A generator for one case, seeded from ``seed`` and the case's numbers (the same in every process)."""
    digest = hashlib.sha256(repr((seed, *case)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") % 2**63)


def robustness_eval(model: nn.Module, loader: Iterable, *, epsilons: Sequence[float] = DEFAULT_EPSILONS,
                    attack: Any = None, corruptions: Sequence[str] | None = None,
                    severities: Sequence[int] = SEVERITIES, seed: int = 0, restarts: int = 1,
                    max_batches: int | None = None) -> dict[str, Any]:
    """Clean accuracy, accuracy under ``attack`` at each of ``epsilons``, and under each corruption and severity.

    Args:
        attack: an attack object, name or dict (:func:`~sparsenn.robust.attacks.make_attack`); its ``eps``
            is replaced by each of ``epsilons``. Default PGD-10, L-inf, random start.
        epsilons: budgets (0 is the clean accuracy, without an attack); ``()`` for none.
        corruptions: names (default: every registered corruption); ``()`` for none.
        severities: from 1..5. seed: seeds every random draw. max_batches: a prefix of the loader.
        restarts: attack runs per batch; a sample counts as correct only if it survives all of them.

    Returns ``{"clean", "samples", "attack", "attacks": [{"eps", "accuracy"}], "corruptions":
    [{"corruption", "severity", "accuracy"}], "corruption_means": {name: mean over severities},
    "mean_corruption_accuracy"}`` (``None`` without corruptions), all plain Python values.
    """
    attack = PGD(eps=0.0) if attack is None else make_attack(attack) if isinstance(attack, (str, dict)) else attack
    if not isinstance(attack, _Attack):
        raise TypeError(f"attack must be an attack (PGD, FGSM), its name or dict, got {type(attack).__name__}; "
                        "a plain callable has no budget to vary: use accuracy_under_attack")
    epsilons = [checks.nonnegative("every epsilon", e) for e in epsilons]
    names = list_corruptions() if corruptions is None else list(corruptions)
    for name in names:
        CORRUPTIONS.get(name)
    severities = list(severities)
    bad = [s for s in severities if isinstance(s, bool) or s not in SEVERITIES]
    if bad:
        raise ValueError(f"severities must be among {', '.join(map(str, SEVERITIES))}; got {bad[0]!r}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {seed!r}")

    device = _device(model)
    correct = total = 0
    for x, y in _batches(loader, max_batches, device):
        correct += _correct(model, x, y)
        total += len(y)
    clean = correct / total
    attacks = []
    for i, eps in enumerate(epsilons):
        acc = clean if eps == 0 else accuracy_under_attack(model, loader, attack.with_eps(eps), restarts=restarts,
                                                           generator=_generator(seed, 0, i), max_batches=max_batches)
        attacks.append({"eps": eps, "accuracy": acc})
    records, means = [], {}
    for i, name in enumerate(names):
        accs = [corruption_accuracy(model, loader, name, s, generator=_generator(seed, 1, i, s),
                                    max_batches=max_batches) for s in severities]
        records += [{"corruption": name, "severity": s, "accuracy": a} for s, a in zip(severities, accs)]
        if accs:
            means[name] = statistics.fmean(accs)
    spec = attack.to_dict()
    spec.pop("eps")
    spec["restarts"] = restarts
    return {"clean": clean, "samples": total, "attack": spec, "attacks": attacks, "corruptions": records,
            "corruption_means": means,
            "mean_corruption_accuracy": statistics.fmean(r["accuracy"] for r in records) if records else None}
