"""Masked optimizers: any ``torch.optim`` optimizer whose state never revives a pruned weight.

:func:`mask_optimizer` does not replace the optimizer; it registers a step pre-hook
and post-hook on it (``Optimizer.register_step_pre_hook``), so the object the user
holds is still the same ``torch.optim.Optimizer`` and LR schedulers, ``state_dict``
and ``zero_grad`` behave as before. Around every ``step``:

* before: gradients at masked positions are set to 0 (so weight decay, momentum and
  adaptive moments see nothing there), unless ``grad_is_zeroed`` vouches that this very
  gradient was zeroed under the current mask and has not been written since (the
  Sparsifier's gradient hook zeroes ``.grad`` as backward accumulates it; a second pass
  would cost a read and a write of every gradient per step for nothing). The guarantee does
  not rest on this skip: a gradient written behind the version counter can only move masked
  weights that the write-back below zeroes again;
* after: every masked weight is written back to exact +0.0 (:func:`~sparsenn.core.masks.zero_masked_`,
  which reads the mask as it is now).

The write-back is unconditional. Skipping it when identity and version counters show
that nothing wrote the weight, its optimizer state or the mask since the last step (the
update is then provably +0.0 for SGD, Adam and AdamW) can be fooled: writes through
``p.data``, ``p.data = ...``, ``vector_to_parameters`` or a NumPy view bump no version
counter. Only reading the masked positions cannot be fooled, and reading them costs
nearly what writing them back costs, so every step writes them back: one pass over the
masked weights (the mask at 1 byte and the weight read and written; no allocation), and
no reliance on the optimizer's arithmetic, its hyper-parameters or its state. Optimizer state at masked positions is not needed for
the guarantee: whatever is there (dense training before ``wrap``, a write through
``.data``), the weight is +0.0 after the step.

When masks change, :func:`reset_state` resets the optimizer state at the changed
positions to the optimizer's initial state (zero momentum and moments; Adagrad's
``initial_accumulator_value``): a weight pruned now carries no stale momentum, and a
weight re-enabled later (dynamic sparse training) starts fresh, as in RigL (Evci et
al. 2020). Per-parameter step counters (Adam's bias correction) are shared by the
whole tensor and cannot be reset per element; they are left as they are.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..core.masks import MaskedParam, zero_masked_


def initial_value(optimizer: torch.optim.Optimizer, group: dict, key: str) -> float:
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
            value.masked_fill_(where.to(value.device), initial_value(optimizer, group, key))


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
        self._stepping: list[MaskedParam] | None = None
        self._handles = [
            optimizer.register_step_pre_hook(self._pre),
            optimizer.register_step_post_hook(self._post),
        ]

    def _owned(self) -> list[MaskedParam]:
        ids = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
        return [mp for mp in self._masked() if id(mp.param) in ids]

    @torch.no_grad()
    def _pre(self, optimizer, args, kwargs):
        if self._before_step is not None:
            self._before_step()
        clean = self._grad_is_zeroed
        stepping = self._owned()  # the step itself changes no mask: _post reuses the list
        for mp in stepping:
            grad = mp.param.grad
            if grad is not None and not (clean is not None and clean(mp)):
                zero_masked_(grad, mp.mask)
        self._stepping = stepping

    @torch.no_grad()
    def _post(self, optimizer, args, kwargs):
        stepping, self._stepping = self._stepping, None
        for mp in stepping if stepping is not None else self._owned():  # None: a step without the pre-hook
            zero_masked_(mp.param, mp.mask)

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
