"""Weight and learning-rate rewinding.

* Weight rewinding: after pruning, the surviving weights are reset to their values
  ``theta_k`` at training iteration ``k`` and training restarts from there (Frankle &
  Carbin 2019, "The Lottery Ticket Hypothesis", ``k = 0``; Frankle et al. 2020,
  "Linear Mode Connectivity and the Lottery Ticket Hypothesis", ``k > 0``).
* LR rewinding: the trained weights are kept and only the learning-rate schedule
  restarts from iteration ``k`` (Renda et al. 2020, "Comparing Rewinding and
  Fine-tuning in Neural Network Pruning").

A :class:`Snapshot` holds copies of every parameter and buffer except the mask
buffers, so it can be taken before masks exist and applied after they change.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..core.masks import MASK_SUFFIX, apply_masks, masked_parameters

__all__ = ["Snapshot", "check_snapshot", "rewind_lr", "rewind_weights", "take_snapshot"]


@dataclass
class Snapshot:
    """A model's parameters and buffers (masks excluded) at training iteration ``step``."""

    step: int
    params: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)
    scheduler_state: dict[str, Any] | None = None
    optimizer_state: dict[str, Any] | None = None

    def __repr__(self) -> str:
        return (f"Snapshot(step={self.step}, params={len(self.params)}, buffers={len(self.buffers)}, "
                f"scheduler={self.scheduler_state is not None}, optimizer={self.optimizer_state is not None})")


def _mask_buffer_names(model: nn.Module) -> set[str]:
    return {mp.name + MASK_SUFFIX for mp in masked_parameters(model)}


def _state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    masks = _mask_buffer_names(model)
    params = dict(model.named_parameters())
    buffers = {n: b for n, b in model.named_buffers() if n not in masks}
    return params, buffers


@torch.no_grad()
def take_snapshot(model: nn.Module, step: int, *, scheduler=None,
                  optimizer: torch.optim.Optimizer | None = None) -> Snapshot:
    """Copy ``model``'s parameters and buffers (not masks) as they are at iteration ``step``.

    ``scheduler`` / ``optimizer``: their ``state_dict()`` is deep-copied too, for
    :func:`rewind_lr` (the optimizer's state can be restored with ``load_state_dict``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    params, buffers = _state(model)
    return Snapshot(
        step=step,
        params={n: p.detach().clone() for n, p in params.items()},
        buffers={n: b.detach().clone() for n, b in buffers.items()},
        scheduler_state=None if scheduler is None else copy.deepcopy(scheduler.state_dict()),
        optimizer_state=None if optimizer is None else copy.deepcopy(optimizer.state_dict()),
    )


def _compare(kind: str, have: dict[str, torch.Tensor], saved: dict[str, torch.Tensor]) -> None:
    missing = [n for n in saved if n not in have]
    extra = [n for n in have if n not in saved]
    if missing or extra:
        raise ValueError(
            f"model does not match the snapshot: {kind} missing from the model: {missing or 'none'}; "
            f"{kind} not in the snapshot: {extra or 'none'}"
        )
    for name, t in have.items():
        if tuple(t.shape) != tuple(saved[name].shape):
            raise ValueError(
                f"model does not match the snapshot: {kind[:-1]} {name!r} has shape {tuple(t.shape)}, "
                f"snapshot has {tuple(saved[name].shape)}"
            )


def check_snapshot(model: nn.Module, snapshot: Snapshot) -> None:
    """Raise ValueError unless ``model`` has the snapshot's parameter and buffer names and shapes."""
    if not isinstance(snapshot, Snapshot):
        raise TypeError(f"snapshot must be a Snapshot (take_snapshot(model, step)), got {type(snapshot).__name__}")
    params, buffers = _state(model)
    _compare("parameters", params, snapshot.params)
    _compare("buffers", buffers, snapshot.buffers)


@torch.no_grad()
def rewind_weights(model: nn.Module, snapshot: Snapshot) -> nn.Module:
    """Reset every parameter and buffer to ``snapshot``, then re-zero masked positions.

    Survivors get exactly their snapshot values ("reset to theta_k", Frankle et al.
    2020); masks are untouched. A model whose names or shapes differ from the
    snapshot's raises ValueError and is left unchanged. Returns ``model``.
    """
    check_snapshot(model, snapshot)
    params, buffers = _state(model)
    for name, p in params.items():
        p.copy_(snapshot.params[name])
    for name, b in buffers.items():
        b.copy_(snapshot.buffers[name])
    apply_masks(model)
    return model


def rewind_lr(scheduler, snapshot: Snapshot) -> None:
    """LR rewinding (Renda et al. 2020): restore ``scheduler`` to iteration ``snapshot.step``.

    Loads the scheduler state saved in the snapshot and sets the learning rate of each
    of its optimizer's param groups to the rate it had then; weights are not touched.
    """
    if not isinstance(snapshot, Snapshot):
        raise TypeError(f"snapshot must be a Snapshot, got {type(snapshot).__name__}")
    if snapshot.scheduler_state is None:
        raise ValueError("snapshot holds no scheduler state: take it with take_snapshot(model, step, scheduler=...)")
    optimizer = getattr(scheduler, "optimizer", None)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"scheduler must be a torch LR scheduler with an .optimizer, got {type(scheduler).__name__}")
    state = copy.deepcopy(snapshot.scheduler_state)
    lrs = state.get("_last_lr")
    if lrs is not None and len(lrs) != len(optimizer.param_groups):
        raise ValueError(
            f"snapshot has learning rates for {len(lrs)} param groups, the optimizer has "
            f"{len(optimizer.param_groups)}"
        )
    scheduler.load_state_dict(state)
    if lrs is None:
        lrs = scheduler.get_last_lr()
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
