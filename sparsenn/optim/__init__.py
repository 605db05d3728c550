"""Optimizers and optimizer plumbing.

* :mod:`.masked` -- the step hooks that keep masked weights at exact zero under any
  ``torch.optim`` optimizer, optimizer-state reset, masked gradient clipping;
* :mod:`.proximal` -- proximal optimizers that create exact zeros: :class:`ProximalSGD`
  (ISTA), :class:`FISTA`, :class:`ProximalAdam`, and the proximal maps
  :func:`soft_threshold` and :func:`group_soft_threshold`.
"""

from .masked import MaskedOptimizerHooks, clip_grad_norm_, reset_state
from .proximal import FISTA, ProximalAdam, ProximalSGD, group_soft_threshold, soft_threshold

__all__ = [
    "FISTA", "MaskedOptimizerHooks", "ProximalAdam", "ProximalSGD", "clip_grad_norm_", "group_soft_threshold",
    "reset_state", "soft_threshold",
]
