"""Proximal optimizers: a gradient step on the loss, then the exact proximal map of the L1
(or group-lasso) penalty, which writes exact zeros.

For ``min_w f(w) + l1 * R(w)`` a proximal gradient step is ``w <- prox_{lr*l1*R}(w - lr * g)``
(ISTA; Daubechies, Defrise & De Mol 2004; Combettes & Wajs 2005). For ``R = ||w||_1`` the
prox is soft-thresholding (:func:`soft_threshold`); for the group lasso
``R = sum_g ||w_g||_2`` it is group soft-thresholding (:func:`group_soft_threshold`;
Yuan & Lin 2006). Unlike a subgradient of ``|w|`` added to the loss, which makes weights
oscillate around zero, the prox sets every weight (group) below the threshold to exact 0.0.

Every optimizer takes, globally or per parameter group, ``lr``, ``l1`` (the penalty
strength, >= 0), ``groups`` (``None`` = element-wise L1, or a group specification of
:mod:`sparsenn.core.groups`: ``"channel"``/``"filter"``/``"neuron"``, ``"channel_in"``,
``"blockHxW"``) and ``weight_decay`` (an L2 term added to the gradient, as in
``torch.optim``). Penalize only the weights by giving biases their own group with
``l1=0``::

    opt = ProximalSGD([{"params": weights, "l1": 1e-4, "groups": "filter"},
                       {"params": biases, "l1": 0.0}], lr=0.1, momentum=0.9)

With a :class:`~sparsenn.Sparsifier`, ``sp.wrap(opt)`` works as for any optimizer:
masked gradients are zeroed before the step, and masked weights written to 0.0 after it.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch

from ...core import checks as _checks
from ...core.groups import GroupSpec, check_groups, from_groups, parse_groups, to_groups

Tensor = torch.Tensor

__all__ = ["FISTA", "ProximalAdam", "ProximalSGD", "group_soft_threshold", "soft_threshold"]


def _check_threshold(threshold: float | Tensor) -> None:
    if torch.is_tensor(threshold):
        if not bool(((threshold >= 0) & torch.isfinite(threshold)).all()):
            raise ValueError("threshold must be finite and >= 0 everywhere, got a tensor with "
                             f"minimum {threshold.min().item():g}")
    else:
        _checks.nonnegative("threshold", threshold)


def _soft_threshold(x: Tensor, threshold: float | Tensor) -> Tensor:
    shrunk = (x.abs() - threshold).clamp_min(0)
    return torch.where(shrunk > 0, x.sign() * shrunk, torch.zeros_like(x))  # +0.0, never -0.0


def soft_threshold(x: Tensor, threshold: float | Tensor) -> Tensor:
    """``sign(x) * max(|x| - threshold, 0)``: the proximal map of ``threshold * |x|``,
    i.e. ``argmin_z 0.5 * (z - x)**2 + threshold * |z|`` element-wise (Donoho 1995).

    ``threshold`` is a number or a tensor broadcastable to ``x`` (one per coordinate), >= 0.
    Entries with ``|x| <= threshold`` become exactly 0.0.
    """
    _check_threshold(threshold)
    return _soft_threshold(x, threshold)


def _group_soft_threshold(x: Tensor, threshold: float | Tensor, pattern) -> Tensor:
    g = to_groups(x, pattern)
    norms = torch.linalg.vector_norm(g, dim=1, keepdim=True)
    t = threshold.reshape(-1, 1) if torch.is_tensor(threshold) else threshold
    scale = (1 - t / norms.clamp_min(torch.finfo(x.dtype).tiny)).clamp_min(0)
    out = torch.where(scale > 0, g * scale, torch.zeros_like(g))
    return from_groups(out, pattern, x.shape)


def group_soft_threshold(x: Tensor, threshold: float | Tensor, groups: GroupSpec) -> Tensor:
    """``w_g * max(1 - threshold / ||w_g||_2, 0)`` for every group ``g``: the proximal map of
    ``threshold * sum_g ||w_g||_2`` (group lasso, Yuan & Lin 2006).

    Groups whose norm is ``<= threshold`` become exactly 0.0; the others keep their
    direction and lose ``threshold`` of their norm. ``groups`` is a group specification
    of :mod:`sparsenn.core.groups`; ``threshold`` a number or a tensor with one entry per group.
    """
    pattern = parse_groups(groups)
    check_groups(pattern, tuple(x.shape))
    _check_threshold(threshold)
    return _group_soft_threshold(x, threshold, pattern)


@torch.no_grad()
def _prox_(p: Tensor, threshold: float | Tensor, groups: GroupSpec | None) -> None:
    """Replace ``p`` by its prox. A per-coordinate threshold becomes one per group by its mean."""
    if groups is None:
        p.copy_(_soft_threshold(p, threshold))
        return
    pattern = parse_groups(groups)
    if torch.is_tensor(threshold):
        threshold = to_groups(threshold, pattern).mean(1)
    p.copy_(_group_soft_threshold(p, threshold, pattern))


class _Proximal(torch.optim.Optimizer):
    """Base: checks ``lr``, ``l1``, ``weight_decay`` and ``groups`` of every parameter group as it is added."""

    _nonnegative: tuple[str, ...] = ("lr", "l1", "weight_decay")

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        try:
            self._check_group(self.param_groups[-1])
        except ValueError:
            self.param_groups.pop()  # a bad group leaves the optimizer as it was
            raise

    def _check_group(self, group: dict) -> None:
        for key in self._nonnegative:
            _checks.nonnegative(key, group[key])
        if group["groups"] is not None:
            pattern = parse_groups(group["groups"])
            for i, p in enumerate(group["params"]):
                check_groups(pattern, tuple(p.shape), f"parameter {i} of the group")

    @staticmethod
    def _closure_loss(closure: Callable[[], Tensor] | None) -> Tensor | None:
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

    @staticmethod
    def _decayed(p: Tensor, group: dict) -> Tensor:
        """The gradient with the L2 term ``weight_decay * p`` added (as ``torch.optim``)."""
        grad = p.grad
        if grad.is_sparse:
            raise ValueError("proximal optimizers do not support sparse gradients")
        return grad.add(p, alpha=group["weight_decay"]) if group["weight_decay"] != 0 else grad


class ProximalSGD(_Proximal):
    """Proximal SGD (ISTA with stochastic gradients): the ``torch.optim.SGD`` step, then
    soft-thresholding by ``lr * l1`` (or group soft-thresholding with ``groups``).

    ``momentum``, ``dampening``, ``nesterov`` and ``weight_decay`` are those of
    ``torch.optim.SGD`` (same state key ``momentum_buffer``); with ``l1=0`` the steps are
    exactly SGD's. With momentum the prox follows the momentum step, the usual
    stochastic proximal heuristic; for the accelerated method with guarantees use :class:`FISTA`.
    """

    def __init__(self, params: Iterable, lr: float, l1: float = 0.0, groups: GroupSpec | None = None,
                 momentum: float = 0.0, dampening: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0):
        _checks.nonnegative("momentum", momentum)
        _checks.nonnegative("dampening", dampening)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError(f"nesterov needs momentum > 0 and dampening = 0, got momentum={momentum!r}, "
                             f"dampening={dampening!r}")
        super().__init__(params, dict(lr=lr, l1=l1, groups=groups, momentum=momentum, dampening=dampening,
                                      nesterov=nesterov, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = self._closure_loss(closure)
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = self._decayed(p, group)
                if momentum != 0:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = grad.detach().clone()
                    else:
                        buf.mul_(momentum).add_(grad, alpha=1 - group["dampening"])
                    grad = grad.add(buf, alpha=momentum) if group["nesterov"] else buf
                p.add_(grad, alpha=-lr)
                if group["l1"] > 0:
                    _prox_(p, lr * group["l1"], group["groups"])
        return loss


class FISTA(_Proximal):
    """FISTA (Beck & Teboulle 2009, "A Fast Iterative Shrinkage-Thresholding Algorithm"):

        x_k     = prox_{lr*l1}(y_k - lr * grad f(y_k))
        t_{k+1} = (1 + sqrt(1 + 4 t_k^2)) / 2,                  t_1 = 1
        y_{k+1} = x_k + ((t_k - 1) / t_{k+1}) (x_k - x_{k-1}),  y_1 = x_0 = the initial weights

    The gradient is evaluated at the extrapolated point, so **between steps the
    parameters hold y_k**, and the sparse iterate ``x_k`` is kept in the state
    (``state[p]["iterate"]``, with ``state[p]["t"] = t_{k+1}``). ``y_k`` need not be sparse:
    where ``x_k = 0`` but ``x_{k-1} != 0`` it holds ``-beta * x_{k-1}``. Call
    :meth:`load_iterate` before evaluating or exporting the model: it writes ``x_k`` into
    the parameters (and restarts the momentum). ``accelerated=False`` keeps ``t = 1``:
    plain ISTA, the steps of ``ProximalSGD(momentum=0)``. ``lr`` should not exceed
    ``1/L`` for an ``L``-smooth loss (full-batch guarantee: ``F(x_k) - F* = O(1/k^2)``).

    With stochastic gradients the momentum ``(t_k - 1)/t_{k+1} -> 1`` accumulates the
    gradient noise and training can diverge; ``restart_every=n`` restarts every ``n``
    steps (``y = x_k``, ``t = 1``: the fixed restart of O'Donoghue & Candes 2015,
    "Adaptive Restart for Accelerated Gradient Schemes"), which bounds the momentum.
    """

    def __init__(self, params: Iterable, lr: float, l1: float = 0.0, groups: GroupSpec | None = None,
                 weight_decay: float = 0.0, accelerated: bool = True, restart_every: int | None = None):
        if restart_every is not None and (isinstance(restart_every, bool) or not isinstance(restart_every, int)
                                          or restart_every < 1):
            raise ValueError(f"restart_every must be None or a positive integer, got {restart_every!r}")
        super().__init__(params, dict(lr=lr, l1=l1, groups=groups, weight_decay=weight_decay,
                                      accelerated=bool(accelerated), restart_every=restart_every))

    @staticmethod
    def next_t(t: float) -> float:
        """``t_{k+1} = (1 + sqrt(1 + 4 t_k^2)) / 2``."""
        return (1.0 + math.sqrt(1.0 + 4.0 * t * t)) / 2.0

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = self._closure_loss(closure)
        for group in self.param_groups:
            lr = group["lr"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["iterate"], state["t"], state["step"] = p.detach().clone(), 1.0, 0  # x_0 = y_1, t_1
                x = p.add(self._decayed(p, group), alpha=-lr)
                if group["l1"] > 0:
                    _prox_(x, lr * group["l1"], group["groups"])
                state["step"] += 1
                every = group["restart_every"]
                t = state["t"]
                t_next = self.next_t(t) if group["accelerated"] else 1.0
                beta = (t - 1.0) / t_next
                if every is not None and state["step"] % every == 0:
                    beta, t_next = 0.0, 1.0  # restart: y = x_k, t = 1
                p.copy_(x if beta == 0 else x + beta * (x - state["iterate"]))
                state["iterate"], state["t"] = x, t_next
        return loss

    @torch.no_grad()
    def load_iterate(self) -> None:
        """Write the last proximal iterate ``x_k`` (exact zeros) into the parameters and restart (``t = 1``)."""
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if state:
                    p.copy_(state["iterate"])
                    state["t"] = 1.0


class ProximalAdam(_Proximal):
    """Adam (Kingma & Ba 2015), then the L1 prox in Adam's own metric: soft-thresholding
    with the per-coordinate threshold ``lr * l1 / (sqrt(v_hat) + eps)``, the step size
    Adam gives that coordinate (the diagonal-preconditioned proximal step of ProxGen,
    Yun, Lozano & Yang 2021, arXiv:2107.04446).

    The Adam step is ``torch.optim.Adam``'s (coupled ``weight_decay``, state keys
    ``step``, ``exp_avg``, ``exp_avg_sq``); with ``l1=0`` the steps are exactly Adam's.
    With ``groups`` the metric is not constant inside a group and the group prox has no
    closed form; each group is thresholded by ``lr * l1`` over its *mean* denominator,
    which is exact when the denominator is constant on the group.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, l1: float = 0.0, groups: GroupSpec | None = None,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        for i, beta in enumerate(betas):
            _checks.real(f"betas[{i}]", beta, low=0.0, high=1.0, high_open=True)
        _checks.positive("eps", eps)
        super().__init__(params, dict(lr=lr, l1=l1, groups=groups, betas=tuple(betas), eps=eps,
                                      weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = self._closure_loss(closure)
        for group in self.param_groups:
            lr, eps, (beta1, beta2) = group["lr"], group["eps"], group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = self._decayed(p, group)
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                step = state["step"].item()
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                step_size = lr / (1 - beta1**step)
                denom = (exp_avg_sq.sqrt() / (1 - beta2**step) ** 0.5).add_(eps)  # sqrt(v_hat) + eps
                p.addcdiv_(exp_avg, denom, value=-step_size)
                if group["l1"] > 0:
                    _prox_(p, (lr * group["l1"]) / denom, group["groups"])
        return loss
