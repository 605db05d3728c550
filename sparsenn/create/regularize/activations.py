"""Activation sparsity penalties: forward hooks record chosen modules' outputs, and the
penalty of what was recorded is added to the loss.

* :class:`ActivationL1` -- ``strength * mean over the batch of sum |a|`` (the L1 activity
  regularizer, e.g. Glorot, Bordes & Bengio 2011, "Deep Sparse Rectifier Neural Networks");
* :class:`ActivationKL` -- ``strength * sum_j KL(rho || rho_hat_j)``, ``rho_hat_j`` the mean
  activation of unit ``j`` over the batch: the sparse autoencoder penalty (Ng 2011,
  CS294A lecture notes "Sparse autoencoder"), for units in [0, 1] such as sigmoids.

Use::

    with ActivationKL(model, "hidden", rho=0.05, strength=3.0) as kl:
        for x, _ in loader:
            loss = mse(model(x), x) + kl()   # kl() consumes what the forward pass recorded
            ...

Outputs are recorded only while gradients are enabled (not under ``torch.no_grad``,
so evaluation loops record nothing); several forward passes before one call are summed.
:meth:`remove` (or leaving the ``with`` block) detaches the hooks. Measure the result with
:func:`sparsenn.core.metrics.activation_sparsity` (exact zeros, e.g. of ReLUs).
"""

from __future__ import annotations

import fnmatch
import math
from typing import Iterable, Union

import torch
from torch import nn

from ...core import checks as _checks

Tensor = torch.Tensor
ModuleSelector = Union[str, type, nn.Module, Iterable[Union[str, type, nn.Module]]]

__all__ = ["ActivationKL", "ActivationL1", "ActivationPenalty"]


def resolve_modules(model: nn.Module, modules: ModuleSelector) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` chosen by module names (``fnmatch`` patterns), types or the modules themselves."""
    named = [(n, m) for n, m in model.named_modules() if n]
    items = [modules] if isinstance(modules, (str, type, nn.Module)) else list(modules)
    chosen: list[tuple[str, nn.Module]] = []
    for item in items:
        if isinstance(item, str):
            hits = [(n, m) for n, m in named if fnmatch.fnmatchcase(n, item)]
        elif isinstance(item, type) and issubclass(item, nn.Module):
            hits = [(n, m) for n, m in named if isinstance(m, item)]
        elif isinstance(item, nn.Module):
            hits = [(n, m) for n, m in named if m is item]
        else:
            raise TypeError(f"modules are chosen by name patterns, nn.Module types or modules, got {item!r}")
        if not hits:
            raise ValueError(f"{item!r} matches no module of {type(model).__name__}; "
                             f"modules: {', '.join(n for n, _ in named) or '(none)'}")
        chosen += [h for h in hits if all(h[1] is not c[1] for c in chosen)]
    if not chosen:
        raise ValueError(f"no modules of {type(model).__name__} chosen (modules={modules!r})")
    return chosen


class ActivationPenalty:
    """Hooks on ``modules`` of ``model``; ``penalty()`` returns ``strength * sum term(output)``
    over the outputs recorded since the last call. Subclasses define :meth:`term`."""

    def __init__(self, model: nn.Module, modules: ModuleSelector, strength: float):
        self.strength = _checks.nonnegative("strength", strength)
        self.modules = resolve_modules(model, modules)
        self._recorded: list[tuple[str, Tensor]] = []
        self._handles = [m.register_forward_hook(self._hook(name)) for name, m in self.modules]

    def _hook(self, name: str):
        def record(module, args, output):
            if torch.is_grad_enabled():
                out = output if isinstance(output, Tensor) else output[0]
                self._recorded.append((name, out))
        return record

    def term(self, name: str, activation: Tensor) -> Tensor:
        raise NotImplementedError

    def __call__(self) -> Tensor:
        """The penalty of the recorded outputs (a differentiable scalar); clears the record."""
        if not self._handles:
            raise RuntimeError(f"{type(self).__name__} was removed; its hooks record nothing")
        if not self._recorded:
            raise RuntimeError(f"{type(self).__name__} recorded no activation: run a forward pass with "
                               "gradients enabled before calling it")
        recorded, self._recorded = self._recorded, []
        return self.strength * sum(self.term(name, a) for name, a in recorded)

    def clear(self) -> None:
        """Forget recorded outputs (e.g. after a forward pass whose loss is not used)."""
        self._recorded = []

    def remove(self) -> None:
        """Detach the hooks and forget recorded outputs."""
        for h in self._handles:
            h.remove()
        self._handles, self._recorded = [], []

    def __enter__(self) -> "ActivationPenalty":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


class ActivationL1(ActivationPenalty):
    """``strength * mean_n sum_j |a_nj|``: the L1 norm of each sample's activations, averaged over the batch."""

    def term(self, name: str, activation: Tensor) -> Tensor:
        return activation.abs().sum() / max(activation.shape[0], 1) if activation.dim() else activation.abs()


class ActivationKL(ActivationPenalty):
    """``strength * sum_j KL(rho || rho_hat_j)`` with ``rho_hat_j`` the batch mean of unit ``j``
    (Ng 2011): ``rho log(rho / rho_hat) + (1 - rho) log((1 - rho) / (1 - rho_hat))``.

    ``rho`` in (0, 1) is the target mean activation. Activations must lie in [0, 1]
    (sigmoid units); outside it is an error naming the module. ``rho_hat`` is clamped to
    ``[1e-6, 1 - 1e-6]`` so that a saturated unit gives a large, finite penalty.
    """

    def __init__(self, model: nn.Module, modules: ModuleSelector, rho: float = 0.05, strength: float = 1.0):
        self.rho = _checks.real("rho", rho, low=0.0, high=1.0, low_open=True, high_open=True)
        super().__init__(model, modules, strength)

    def term(self, name: str, activation: Tensor) -> Tensor:
        if activation.dim() == 0:
            raise ValueError(f"ActivationKL needs batched activations; {name!r} produced a scalar")
        lo, hi = activation.min().item(), activation.max().item()
        if lo < 0 or hi > 1 or math.isnan(lo + hi):
            raise ValueError(f"ActivationKL needs activations in [0, 1] (e.g. sigmoid units); "
                             f"{name!r} produced values in [{lo:g}, {hi:g}]")
        rho_hat = activation.mean(0).clamp(1e-6, 1 - 1e-6)
        rho = self.rho
        return (rho * torch.log(rho / rho_hat) + (1 - rho) * torch.log((1 - rho) / (1 - rho_hat))).sum()
