"""What a federated round exchanges of a model: its floating-point state, its masks, its update.

The *shared state* is every floating-point tensor of ``model.state_dict()``: parameters and
floating buffers (BatchNorm statistics), once per tensor (a tied weight under its first name),
never the boolean mask buffers or integer counters. Its order is the state dict's, and both
sides derive it from the same model class, so no name is ever sent.

The *server's masks* are the model's masks (:func:`sparsenn.core.masks.get_masks`): a model
pruned by any method of the library, or by hand, before federated training. They are known to
both sides, so updates and downloads carry only the kept entries (see
:mod:`~sparsenn.federated.messages`), and clients train under them with
:func:`fixed_mask_sparsifier` (the library's masked optimizer: masked weights stay exactly 0).
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.masks import apply_masks, get_masks, masked_parameters
from ..core.schedules import OneShot
from ..train.sparsifier import Sparsifier

__all__ = ["fixed_mask_sparsifier", "get_state", "load_state", "server_masks", "shared_names", "state_update"]

_NEVER = 10**12  # a one-shot schedule at this step never fires: masks change only when told


def shared_names(model: nn.Module) -> list[str]:
    """Names of the floating-point state tensors a round exchanges, in state-dict order, each tensor once."""
    names, seen = [], set()
    for name, t in model.state_dict(keep_vars=True).items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and id(t) not in seen:
            seen.add(id(t))
            names.append(name)
    return names


def get_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached CPU copies of the shared state."""
    sd = model.state_dict(keep_vars=True)
    return {n: sd[n].detach().cpu().clone() for n in shared_names(model)}


@torch.no_grad()
def load_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` (exactly the shared names, matching shapes) into ``model``, then zero its masked weights."""
    sd = model.state_dict(keep_vars=True)
    names = shared_names(model)
    if sorted(state) != sorted(names):
        missing, extra = sorted(set(names) - set(state)), sorted(set(state) - set(names))
        raise ValueError(f"state does not match the model: missing {missing}, unexpected {extra}")
    for n in names:
        if tuple(state[n].shape) != tuple(sd[n].shape):
            raise ValueError(f"state {n!r} has shape {tuple(state[n].shape)}, the model's is {tuple(sd[n].shape)}")
        sd[n].copy_(state[n])
    apply_masks(model)


def server_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's masks by shared name (CPU copies); empty for a model without masks."""
    names = set(shared_names(model))
    return {n: m.detach().cpu().clone() for n, m in get_masks(model).items() if n in names}


def state_update(after: dict[str, torch.Tensor], before: dict[str, torch.Tensor],
                 masks: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """``after - before`` per tensor; refuses a change outside the server's masks (it could not be sent)."""
    update = {}
    for n, b in before.items():
        u = after[n] - b
        m = (masks or {}).get(n)
        if m is not None and bool((u[~m] != 0).any()):
            raise ValueError(f"{n!r} changed outside the server's mask; a client must keep masked weights at 0 "
                             "(wrap its optimizer with fixed_mask_sparsifier(model).wrap(optimizer))")
        update[n] = u
    return update


def fixed_mask_sparsifier(model: nn.Module, **kwargs) -> Sparsifier:
    """A :class:`~sparsenn.train.sparsifier.Sparsifier` over ``model``'s existing masks that never changes
    them: ``opt = fixed_mask_sparsifier(model).wrap(opt)`` keeps masked weights exactly 0 in any loop."""
    names = [mp.name for mp in masked_parameters(model)]
    if not names:
        raise ValueError(f"{type(model).__name__} has no masks to keep fixed")
    return Sparsifier(model, sparsity=0.0, schedule=OneShot(begin_step=_NEVER), include=names, **kwargs)
