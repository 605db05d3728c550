"""A small built-in trainer for the command line, the demo and the benchmarks.

Users keep their own loops (``opt = sp.wrap(...)``, ``sp.step()`` after ``opt.step()``);
this is that loop, written once.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn


def train(model: nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer, *, epochs: int = 1,
          sparsifier=None, scheduler=None, loss_fn: Callable | None = None,
          after_backward: Callable[[], None] | None = None, on_step: Callable[[], None] | None = None,
          on_epoch: Callable[[int, float], None] | None = None, progress: bool | str = False) -> list[float]:
    """Train for ``epochs``; returns the mean loss per epoch.

    ``after_backward()`` runs between backward and the optimizer step. After every optimizer step: ``scheduler.step()`` (a per-iteration LR schedule),
    ``sparsifier.step()``, then ``on_step()`` (e.g. a penalty or a snapshot).
    ``progress``: ``True`` or a description shows one bar over all steps (stderr; off in
    quiet mode, see :mod:`sparsenn.core.progress`) with the epoch and the running loss.
    """
    if not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs must be a non-negative integer, got {epochs!r}")
    loss_fn = loss_fn or nn.functional.cross_entropy
    losses = []
    bar = _bar(loader, epochs, progress)
    for epoch in range(epochs):
        model.train()
        total, count = 0.0, 0
        for x, y in loader:
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            if after_backward is not None:  # e.g. a penalty's subgradient, gradient clipping
                after_backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            if sparsifier is not None:
                sparsifier.step()
            if on_step is not None:
                on_step()
            total += loss.item() * len(y)
            count += len(y)
            if bar.active:
                bar.set_postfix(epoch=f"{epoch + 1}/{epochs}", loss=total / count)
                bar.update()
        losses.append(total / max(count, 1))
        if on_epoch is not None:
            on_epoch(epoch, losses[-1])
    bar.close()
    return losses


def _bar(loader: Iterable, epochs: int, progress: bool | str):
    """A :class:`sparsenn.core.progress.Bar` over ``epochs * len(loader)`` steps (disabled unless ``progress``)."""
    from ..core.progress import Bar

    try:
        total = epochs * len(loader)  # type: ignore[arg-type]
    except TypeError:
        total = None
    return Bar(total, progress if isinstance(progress, str) else "train", unit="step", enabled=bool(progress),
               leave=True)


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable) -> float:
    """Top-1 accuracy in [0, 1]; restores the model's train/eval mode."""
    was_training = model.training
    model.eval()
    correct = total = 0
    try:
        for x, y in loader:
            correct += (model(x).argmax(-1) == y).sum().item()
            total += len(y)
    finally:
        model.train(was_training)
    if total == 0:
        raise ValueError("evaluate got an empty loader")
    return correct / total


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int, start_step: int = 0):
    """Per-iteration cosine decay to 0 over ``total_steps`` (Loshchilov & Hutter 2017), starting at ``start_step``."""
    import math

    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda t: 0.5 * (1 + math.cos(math.pi * min(t + start_step, total_steps) / total_steps))
    )
