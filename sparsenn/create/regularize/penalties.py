"""Sparsity-inducing penalties on chosen parameters: add ``penalty()`` to the training loss.

* :class:`L1` -- ``strength * sum |w|`` (Tibshirani 1996);
* :class:`GroupLasso` -- ``strength * sum_g ||w_g||_2`` over filters, neurons, input
  channels or blocks (Yuan & Lin 2006; Wen et al. 2016; groups of :mod:`sparsenn.core.groups`);
* :class:`HuberL1` -- Huber-smoothed ``|w|``, the Moreau envelope of ``|w|`` with
  parameter ``delta`` (Huber 1964; Beck & Teboulle 2012, "Smoothing and first order methods");
* :class:`LogSumExpL1` -- ``(1/beta) log(e^{beta w} + e^{-beta w})``, the log-sum-exp
  (entropy) smoothing of ``|w| = max(w, -w)`` (Nesterov 2005, "Smooth minimization of
  non-smooth functions").

The parameters are a model's selected weights (``include``/``exclude`` as in
:func:`sparsenn.core.targets.select_parameters`: Linear/Conv/attention weights by default) or
an explicit list of tensors. Gradient descent on a penalty only drives weights *near*
zero; for exact zeros use the proximal optimizers of :mod:`sparsenn.create.regularize.proximal`, then
:func:`sparsenn.create.regularize.zeros.masks_from_zeros`. Network Slimming's L1 on BatchNorm scales is
:class:`SlimmingPenalty` (also ``sn.structured.SlimmingPenalty``).
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ...core import checks as _checks
from ...core.groups import GroupSpec, check_groups, group_norms, parse_groups
from ...core.targets import Selector, select_parameters

Tensor = torch.Tensor

__all__ = ["GroupLasso", "HuberL1", "L1", "LogSumExpL1", "Penalty", "SlimmingPenalty"]


def _select(source: nn.Module | Iterable[Tensor], include: Selector, exclude: Selector) -> tuple[list, list]:
    """``(names, tensors)`` of the penalized parameters."""
    if isinstance(source, nn.Module):
        params = dict(source.named_parameters())
        names = select_parameters(source, include, exclude)
        return names, [params[n] for n in names]
    if include is not None or exclude is not None:
        raise ValueError("include/exclude select parameters of a model; with an explicit list of tensors leave them None")
    if isinstance(source, Tensor):
        source = [source]
    try:
        tensors = list(source)
    except TypeError:
        raise TypeError(f"a penalty takes an nn.Module or an iterable of tensors, got {type(source).__name__}") from None
    if not tensors or not all(isinstance(t, Tensor) for t in tensors):
        raise ValueError(f"a penalty needs a non-empty list of tensors, got {tensors!r:.80}")
    return [f"param{i}" for i in range(len(tensors))], tensors


class Penalty:
    """``strength * sum_p term(p)`` over the chosen parameters; subclasses define :meth:`term`."""

    def __init__(self, source: nn.Module | Iterable[Tensor], strength: float, *,
                 include: Selector = None, exclude: Selector = None):
        self.strength = _checks.nonnegative("strength", strength)
        self.names, self.params = _select(source, include, exclude)

    def term(self, p: Tensor) -> Tensor:
        raise NotImplementedError

    def __call__(self) -> Tensor:
        """The penalty, a differentiable scalar to add to the loss."""
        return self.strength * sum(self.term(p) for p in self.params)

    def _extra(self) -> str:
        return ""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(strength={self.strength:g}{self._extra()}, params={len(self.params)})"


class L1(Penalty):
    """``strength * sum |w|``; its gradient is the subgradient ``strength * sign(w)`` (0 at 0)."""

    def term(self, p: Tensor) -> Tensor:
        return p.abs().sum()


class GroupLasso(Penalty):
    """``strength * sum_g ||w_g||_2`` over the groups ``groups`` of each parameter (Yuan & Lin 2006).

    ``groups``: ``"channel"`` (aliases ``"filter"``, ``"neuron"``: output units),
    ``"channel_in"`` (input channels/features) or ``"blockHxW"``; every parameter must be
    tiled by them (a ValueError names the one that is not). Groups are unweighted.
    """

    def __init__(self, source: nn.Module | Iterable[Tensor], strength: float, groups: GroupSpec = "channel", *,
                 include: Selector = None, exclude: Selector = None):
        super().__init__(source, strength, include=include, exclude=exclude)
        self.groups = parse_groups(groups)
        for name, p in zip(self.names, self.params):
            check_groups(self.groups, tuple(p.shape), name)

    def term(self, p: Tensor) -> Tensor:
        return group_norms(p, self.groups).sum()

    def _extra(self) -> str:
        return f", groups={self.groups.name!r}"


class HuberL1(Penalty):
    """Huber-smoothed L1: ``w^2 / (2 delta)`` for ``|w| <= delta``, else ``|w| - delta/2``.

    It is ``min_z |z| + (z - w)^2 / (2 delta)`` (the Moreau envelope of ``|w|``), so
    ``|w| - delta/2 <= huber(w) <= |w|``; its gradient ``clip(w / delta, -1, 1)`` is
    ``1/delta``-Lipschitz. ``delta > 0``; smaller is closer to L1.
    """

    def __init__(self, source: nn.Module | Iterable[Tensor], strength: float, delta: float = 1e-3, *,
                 include: Selector = None, exclude: Selector = None):
        self.delta = _checks.positive("delta", delta)
        super().__init__(source, strength, include=include, exclude=exclude)

    def term(self, p: Tensor) -> Tensor:
        a = p.abs()
        return torch.where(a <= self.delta, p * p / (2 * self.delta), a - self.delta / 2).sum()

    def _extra(self) -> str:
        return f", delta={self.delta:g}"


class LogSumExpL1(Penalty):
    """Log-sum-exp smoothed L1: ``(1/beta) log(e^{beta w} + e^{-beta w})`` (Nesterov 2005).

    The soft maximum of ``w`` and ``-w``: ``|w| <= f(w) <= |w| + log(2)/beta``; its
    gradient ``tanh(beta w)`` is ``beta``-Lipschitz. ``beta > 0``; larger is closer to L1.
    Computed as ``logaddexp``, so large ``beta * w`` does not overflow.
    """

    def __init__(self, source: nn.Module | Iterable[Tensor], strength: float, beta: float = 1e3, *,
                 include: Selector = None, exclude: Selector = None):
        self.beta = _checks.positive("beta", beta)
        super().__init__(source, strength, include=include, exclude=exclude)

    def term(self, p: Tensor) -> Tensor:
        return (torch.logaddexp(self.beta * p, -self.beta * p) / self.beta).sum()

    def _extra(self) -> str:
        return f", beta={self.beta:g}"


class SlimmingPenalty:
    """The L1 penalty ``strength * sum |gamma|`` on BatchNorm scales that Network Slimming
    adds during training (Liu et al., 2017).

    Either call :meth:`apply_` after ``loss.backward()`` and before ``optimizer.step()``
    (adds the subgradient ``strength * sign(gamma)`` to each BN weight's ``.grad``), or
    add :meth:`loss` to the training loss. Every BatchNorm with an affine scale is used.
    """

    def __init__(self, model: nn.Module, strength: float = 1e-4):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        ok = isinstance(strength, (int, float)) and not isinstance(strength, bool)
        if not ok or not math.isfinite(strength) or strength < 0:
            raise ValueError(f"strength must be a finite number >= 0, got {strength!r}")
        self.strength = float(strength)
        self.batchnorms = [(n, m) for n, m in model.named_modules()
                           if isinstance(m, _BatchNorm) and m.weight is not None]
        if not self.batchnorms:
            raise ValueError("model has no BatchNorm layer with an affine scale; Network Slimming needs one")

    @torch.no_grad()
    def apply_(self) -> None:
        """Add ``strength * sign(gamma)`` to every BN scale's ``.grad`` (created if None)."""
        for _, bn in self.batchnorms:
            step = self.strength * torch.sign(bn.weight.detach())
            if bn.weight.grad is None:
                bn.weight.grad = step
            else:
                bn.weight.grad.add_(step)

    def loss(self) -> Tensor:
        """``strength * sum |gamma|`` over every BN scale (differentiable)."""
        return self.strength * sum(bn.weight.abs().sum() for _, bn in self.batchnorms)

    def __repr__(self) -> str:
        return f"SlimmingPenalty(strength={self.strength:g}, batchnorms={len(self.batchnorms)})"
