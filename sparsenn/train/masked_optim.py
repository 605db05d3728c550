"""Masked optimizers: any ``torch.optim`` optimizer whose state never revives a pruned weight.

:func:`mask_optimizer` does not replace the optimizer; it registers a step pre-hook
and post-hook on it (``Optimizer.register_step_pre_hook``), so the object the user
holds is still the same ``torch.optim.Optimizer`` and LR schedulers, ``state_dict``
and ``zero_grad`` behave as before. Around every ``step``:

* before: gradients at masked positions are set to 0 (so weight decay, momentum and
  adaptive moments see nothing there), unless ``grad_is_zeroed`` vouches that this very
  gradient was zeroed under the current mask and has not been written since (the
  Sparsifier's gradient hook zeroes ``.grad`` as backward accumulates it; a second pass
  would cost a read and a write of every weight per step for nothing);
* after: masked positions are written back to exact 0.0, unless the step provably left
  them there (below).

Skipping the write-back (:data:`KEEPS_ZEROS`): for plain ``torch.optim.SGD`` (momentum,
Nesterov, weight decay, dampening, maximize), ``Adam`` and ``AdamW`` (amsgrad, L2 or
decoupled decay) the update at a position is built from its gradient, weight and state
alone, and where all of them are exactly 0 it is exactly 0 and the weight stays +0.0:
SGD's update is a linear combination of them; Adam's is ``m / (sqrt(v) + eps)`` = 0 for
``eps > 0``; decoupled decay multiplies the weight by ``1 - lr * wd``, which keeps +0.0
while that factor is >= 0. After one full write-back, which also zeroes the state at
masked positions, that holds at every following step as long as nothing else writes the
weight, the state or the mask: checked before each step by identity and version counter
(any in-place write bumps it), along with those conditions on the hyper-parameters (a
finite learning rate, ``eps > 0``, ``lr * weight_decay <= 1`` for decoupled decay). Any
change (a new mask, ``load_state_dict``, a write to ``p.data``, state from dense training
before ``wrap``) sends that parameter through the full write-back again. The saving is
one read and write of every masked weight per step.

When masks change, :func:`reset_state` resets the optimizer state at the changed
positions to the optimizer's initial state (zero momentum and moments; Adagrad's
``initial_accumulator_value``): a weight pruned now carries no stale momentum, and a
weight re-enabled later (dynamic sparse training) starts fresh, as in RigL (Evci et
al. 2020). Per-parameter step counters (Adam's bias correction) are shared by the
whole tensor and cannot be reset per element; they are left as they are.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn

from ..core.masks import MaskedParam, snapshot, unchanged_since, zero_masked_


def _initial_value(optimizer: torch.optim.Optimizer, group: dict, key: str) -> float:
    if isinstance(optimizer, torch.optim.Adagrad) and key == "sum":
        return float(group.get("initial_accumulator_value", 0.0))
    return 0.0


@torch.no_grad()
def reset_state(optimizer: torch.optim.Optimizer, param: torch.Tensor, where: torch.Tensor) -> None:
    """Reset every element-wise state tensor of ``param`` at the positions ``where`` to its initial value."""
    state = optimizer.state.get(param)
    if not state:
        return
    group = next((g for g in optimizer.param_groups if any(p is param for p in g["params"])), {})
    for key, value in state.items():
        if torch.is_tensor(value) and value.shape == param.shape:
            value.masked_fill_(where.to(value.device), _initial_value(optimizer, group, key))


# Exact optimizer types whose update is exactly +0.0 wherever the gradient, the weight and every
# element-wise state tensor are 0, under _hyper_parameters_keep_zeros (subclasses may change the update).
KEEPS_ZEROS: tuple[type, ...] = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)


def _elementwise_state(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> list[torch.Tensor]:
    return [v for v in optimizer.state.get(param, {}).values() if torch.is_tensor(v) and v.shape == param.shape]


class MaskedOptimizerHooks:
    """The hooks :meth:`Sparsifier.wrap` installs on one optimizer; :meth:`remove` undoes them."""

    def __init__(self, optimizer: torch.optim.Optimizer, masked: Callable[[], list[MaskedParam]],
                 before_step: Callable[[], None] | None = None,
                 grad_is_zeroed: Callable[[MaskedParam], bool] | None = None):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"wrap expects a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.optimizer = optimizer
        self._masked = masked
        self._before_step = before_step
        self._grad_is_zeroed = grad_is_zeroed
        self._stepping: list[tuple[MaskedParam, bool]] | None = None
        self._keeps_zeros = type(optimizer) in KEEPS_ZEROS
        self._clean: dict[int, tuple[Any, ...]] = {}  # id(param) -> snapshot(param, mask, *state) after a step
        self._handles = [
            optimizer.register_step_pre_hook(self._pre),
            optimizer.register_step_post_hook(self._post),
        ]

    def _owned(self) -> list[MaskedParam]:
        ids = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
        return [mp for mp in self._masked() if id(mp.param) in ids]

    def _hyper_parameters_keep_zeros(self) -> bool:
        """A finite learning rate; Adam: ``eps > 0``; decoupled weight decay: ``lr * wd <= 1``."""
        decoupled_type = isinstance(self.optimizer, torch.optim.AdamW)
        for g in self.optimizer.param_groups:
            lr = float(g["lr"])
            if not math.isfinite(lr):
                return False
            if "eps" in g and not float(g["eps"]) > 0:
                return False
            if (decoupled_type or g.get("decoupled_weight_decay", False)) \
                    and not lr * float(g.get("weight_decay", 0.0)) <= 1.0:
                return False
        return True

    @torch.no_grad()
    def _pre(self, optimizer, args, kwargs):
        if self._before_step is not None:
            self._before_step()
        clean = self._grad_is_zeroed
        fast = self._keeps_zeros and self._hyper_parameters_keep_zeros()
        stepping = []  # the step itself changes no mask: _post reuses the list
        for mp in self._owned():
            param, mask = mp.param, mp.mask
            if param.grad is not None and not (clean is not None and clean(mp)):
                zero_masked_(param.grad, mask)
            rec = self._clean.get(id(param)) if fast else None
            zeros_kept = rec is not None and unchanged_since(rec, param, mask, *_elementwise_state(optimizer, param))
            stepping.append((mp, zeros_kept))
        self._stepping = stepping

    @torch.no_grad()
    def _post(self, optimizer, args, kwargs):
        stepping, self._stepping = self._stepping, None
        if stepping is None:  # a step without the pre-hook: write every masked weight back
            stepping = [(mp, False) for mp in self._owned()]
        for mp, zeros_kept in stepping:
            param, mask = mp.param, mp.mask
            state = _elementwise_state(optimizer, param) if self._keeps_zeros else []
            if not zeros_kept:
                zero_masked_(param, mask)
                for t in state:  # momentum / moments: 0 at masked positions from now on
                    zero_masked_(t, mask)
            if self._keeps_zeros:
                self._clean[id(param)] = snapshot(param, mask, *state)

    def reset(self, param: nn.Parameter, where: torch.Tensor) -> None:
        reset_state(self.optimizer, param, where)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def clip_grad_norm_(model: nn.Module, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` over the model's parameters, masked gradients already zero.

    With a :class:`~sparsenn.Sparsifier` attached the gradients of masked positions are
    zeroed as they are computed, so plain ``torch.nn.utils.clip_grad_norm_`` is right
    too; this helper also zeroes them first for models whose hooks were lost (e.g. a
    deep copy trained with a newly wrapped optimizer).
    """
    from ..core.masks import masked_parameters

    with torch.no_grad():
        for mp in masked_parameters(model):
            if mp.param.grad is not None:
                mp.param.grad.masked_fill_(~mp.mask, 0)
    return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm, norm_type)
