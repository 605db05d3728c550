"""Gradient attacks on a model's inputs: FGSM and PGD under an L-inf or L2 budget.

* :func:`fgsm` -- the fast gradient sign method (Goodfellow et al. 2015, arXiv:1412.6572): one step of
  size ``eps`` along the sign of the input gradient (L2: along the gradient scaled to norm ``eps``,
  the fast gradient method); with ``random_start`` the "FGSM-RS" of Wong et al. 2020 (arXiv:2001.03994):
  a uniform start in the ball and a step of ``1.25 eps``, projected back.
* :func:`pgd` -- projected gradient descent (Madry et al. 2018, arXiv:1706.06083): ``steps`` steps of
  ``step_size`` (default ``2.5 eps / steps``, as Madry et al.), each projected onto the ``eps`` ball
  around the input and onto the valid input range.

Both return adversarial inputs ``x_adv`` with ``||x_adv - x|| <= eps`` (up to float rounding) and, unless
``clamp=None``, inside ``clamp`` (default ``(0, 1)``: images in [0, 1]; normalize inside the model). The
model runs in eval mode during the attack (every module's own mode is restored after), gradients are
taken with respect to the input only (``torch.autograd.grad``): no ``.grad`` is written on the model's
parameters, and a Sparsifier's gradient hooks never fire, so an attack leaves masks, optimizers and
DST state untouched. A ``DistributedDataParallel`` model is attacked through its inner module.

:class:`FGSM` and :class:`PGD` hold the hyperparameters (registry :data:`ATTACKS`, :func:`make_attack`);
calling one runs it.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..core import checks
from ..core.registry import Registry
from ..train.distributed import unwrap_model

__all__ = ["ATTACKS", "FGSM", "NORMS", "PGD", "fgsm", "list_attacks", "make_attack", "pgd"]

NORMS = ("linf", "l2")
RS_STEP = 1.25  # FGSM-RS step, in units of eps (Wong et al. 2020)
PGD_STEP = 2.5  # PGD's default total travel, in units of eps (Madry et al. 2018): step = 2.5 eps / steps

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ----------------------------------------------------------------------------- checks


def _check_norm(norm: Any) -> str:
    if not isinstance(norm, str) or norm.lower() not in NORMS:
        raise ValueError(f"norm must be one of {', '.join(NORMS)}; got {norm!r}")
    return norm.lower()


def _check_clamp(clamp: Any) -> tuple[float, float] | None:
    if clamp is None:
        return None
    if not isinstance(clamp, (tuple, list)) or len(clamp) != 2:
        raise ValueError(f"clamp must be None or a pair (low, high) of the valid input range, got {clamp!r}")
    low, high = checks.real("clamp low", clamp[0]), checks.real("clamp high", clamp[1])
    if not low < high:
        raise ValueError(f"clamp must be (low, high) with low < high, got {clamp!r}")
    return low, high


def _check_steps(steps: Any) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    return steps


def _check_inputs(x: Any, clamp: tuple[float, float] | None) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {type(x).__name__ if not isinstance(x, torch.Tensor) else x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"x must be a batch (N, ...) with at least 2 dimensions, got shape {tuple(x.shape)}")
    if clamp is not None and x.numel():
        lo, hi = float(x.min()), float(x.max())
        if lo < clamp[0] or hi > clamp[1]:
            raise ValueError(f"inputs lie in [{lo:g}, {hi:g}], outside clamp={clamp}: attacks work in the valid input "
                             "range (normalize inside the model), or pass clamp=None for unbounded inputs")


# ----------------------------------------------------------------------------- geometry


def _per_sample_norm(t: torch.Tensor) -> torch.Tensor:
    """``(N, 1, 1, ...)`` L2 norm of each sample."""
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.dim() - 1)))


def _project(delta: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """The nearest point of the ``eps`` ball (L-inf: clip each coordinate; L2: rescale long vectors)."""
    if norm == "linf":
        return delta.clamp(-eps, eps)
    return delta * (eps / _per_sample_norm(delta).clamp_min(1e-12)).clamp(max=1.0)


def _direction(grad: torch.Tensor, norm: str) -> torch.Tensor:
    """The steepest-ascent direction of unit size: ``sign(g)`` (L-inf) or ``g / ||g||`` (L2)."""
    if norm == "linf":
        return grad.sign()
    return grad / _per_sample_norm(grad).clamp_min(1e-12)


def _random_start(x: torch.Tensor, eps: float, norm: str, generator: torch.Generator | None) -> torch.Tensor:
    """Uniform in the L-inf box, or uniform in the L2 ball (a Gaussian direction, radius ``eps u^(1/d)``)."""
    draw = {"generator": generator, "dtype": x.dtype}
    if norm == "linf":
        return ((torch.rand(x.shape, **draw) * 2 - 1) * eps).to(x.device)
    d = x[0].numel()
    direction = torch.randn(x.shape, **draw)
    direction = direction / _per_sample_norm(direction).clamp_min(1e-12)
    radius = eps * torch.rand(x.shape[0], **draw).pow(1.0 / d).view(-1, *([1] * (x.dim() - 1)))
    return (direction * radius).to(x.device)


def _in_range(x: torch.Tensor, delta: torch.Tensor, clamp: tuple[float, float] | None) -> torch.Tensor:
    """``delta`` such that ``x + delta`` lies in ``clamp``. Each coordinate only shrinks toward 0 (``x`` is
    inside the range), so a point of the eps ball stays in it."""
    return delta if clamp is None else (x + delta).clamp(*clamp) - x


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """Every module in eval mode; each module's own mode restored after (not one flag for all)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _summed_loss(logits: torch.Tensor, y: torch.Tensor, loss_fn: LossFn | None) -> torch.Tensor:
    loss = F.cross_entropy(logits, y, reduction="sum") if loss_fn is None else loss_fn(logits, y)
    return loss if loss.dim() == 0 else loss.sum()  # a sum: each sample's gradient is its own loss's


# ----------------------------------------------------------------------------- attacks


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, norm: str = "linf", steps: int = 10,
        step_size: float | None = None, random_start: bool = True, clamp: tuple[float, float] | None = (0.0, 1.0),
        targeted: bool = False, loss_fn: LossFn | None = None,
        generator: torch.Generator | None = None) -> torch.Tensor:
    """Projected gradient descent (Madry et al. 2018): ``x_adv`` maximizing the loss within the ``eps`` ball.

    Args:
        model: any ``nn.Module`` mapping ``x`` to logits (a DDP model is attacked through its module).
        x: ``(N, ...)`` inputs, inside ``clamp``. y: labels (targeted: the target labels).
        eps: the budget, a number >= 0 (0 returns a copy of ``x``). norm: ``"linf"`` or ``"l2"`` (per sample).
        steps: gradient steps. step_size: per step; default ``2.5 * eps / steps``.
        random_start: start uniformly inside the ball (else at ``x``); draws from ``generator``.
        clamp: the valid input range ``(low, high)``, or ``None``.
        targeted: descend the loss toward ``y`` instead of ascending it away from ``y``.
        loss_fn: ``loss_fn(logits, y)``, summed if not scalar; default cross-entropy (summed over the batch).

    Returns the adversarial batch, detached, with ``x``'s shape and dtype.
    """
    eps = checks.nonnegative("eps", eps)
    norm, steps, clamp = _check_norm(norm), _check_steps(steps), _check_clamp(clamp)
    step_size = PGD_STEP * eps / steps if step_size is None else checks.positive("step_size", step_size)
    if not isinstance(random_start, bool) or not isinstance(targeted, bool):
        raise TypeError(f"random_start and targeted must be True or False, got {random_start!r}, {targeted!r}")
    _check_inputs(x, clamp)
    x0 = x.detach()
    if eps == 0:
        return x0.clone()
    net, _ = unwrap_model(model)
    sign = -1.0 if targeted else 1.0
    delta = _random_start(x0, eps, norm, generator) if random_start else torch.zeros_like(x0)
    delta = _in_range(x0, _project(delta, eps, norm), clamp)
    with _eval_mode(net), torch.enable_grad():
        for _ in range(steps):
            delta.requires_grad_(True)
            loss = _summed_loss(net(x0 + delta), y, loss_fn)
            if not loss.requires_grad:
                raise ValueError("the loss does not depend on the input: nothing to attack")
            (grad,) = torch.autograd.grad(loss, delta)  # the input only: no .grad on parameters
            with torch.no_grad():
                delta = delta + sign * step_size * _direction(grad, norm)
                delta = _in_range(x0, _project(delta, eps, norm), clamp)
    return (x0 + delta).detach() if clamp is None else (x0 + delta).clamp(*clamp).detach()


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, norm: str = "linf",
         random_start: bool = False, step_size: float | None = None,
         clamp: tuple[float, float] | None = (0.0, 1.0), targeted: bool = False, loss_fn: LossFn | None = None,
         generator: torch.Generator | None = None) -> torch.Tensor:
    """The fast gradient sign method (Goodfellow et al. 2015): ``clamp(x + eps * sign(grad_x loss))``.

    ``norm="l2"``: ``x + eps * g / ||g||`` (the fast gradient method). ``random_start``: FGSM-RS (Wong et
    al. 2020), a uniform start in the ball and one step of ``step_size`` (default ``1.25 eps``), projected
    onto the ball; without it the step is ``eps`` (default). Other arguments as :func:`pgd`.
    """
    if step_size is None and checks.nonnegative("eps", eps) > 0:
        step_size = RS_STEP * eps if random_start is True else eps
    return pgd(model, x, y, eps=eps, norm=norm, steps=1, step_size=step_size, random_start=random_start,
               clamp=clamp, targeted=targeted, loss_fn=loss_fn, generator=generator)


# ----------------------------------------------------------------------------- configurations

ATTACKS: Registry = Registry("attack")


@dataclass(frozen=True)
class _Attack:
    eps: float = 0.1
    norm: str = "linf"
    step_size: float | None = None
    clamp: tuple[float, float] | None = (0.0, 1.0)
    targeted: bool = False

    name: ClassVar[str] = "attack"

    def __post_init__(self):
        object.__setattr__(self, "eps", checks.nonnegative("eps", self.eps))
        object.__setattr__(self, "norm", _check_norm(self.norm))
        object.__setattr__(self, "clamp", _check_clamp(self.clamp))
        if self.step_size is not None:
            object.__setattr__(self, "step_size", checks.positive("step_size", self.step_size))
        for flag in ("targeted", "random_start"):
            if not isinstance(getattr(self, flag, False), bool):
                raise TypeError(f"{flag} must be True or False, got {getattr(self, flag)!r}")

    def _kwargs(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def to_dict(self) -> dict[str, Any]:
        """``{"name": ..., **fields}`` (JSON-serializable); :func:`make_attack` inverts it."""
        out = {"name": self.name, **self._kwargs()}
        out["clamp"] = None if self.clamp is None else list(self.clamp)
        return out

    def with_eps(self, eps: float) -> _Attack:
        """The same attack at another budget."""
        return dataclasses.replace(self, eps=eps)

    @property
    def label(self) -> str:
        """A short name, e.g. ``"PGD-10 (linf)"``."""
        return f"{self.name.upper()} ({self.norm})"


@ATTACKS.register("pgd")
@dataclass(frozen=True)
class PGD(_Attack):
    """:func:`pgd`'s hyperparameters; ``attack(model, x, y, generator=None)`` runs it."""

    steps: int = 10
    random_start: bool = True

    name: ClassVar[str] = "pgd"

    def __post_init__(self):
        super().__post_init__()
        _check_steps(self.steps)

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, loss_fn: LossFn | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        return pgd(model, x, y, **self._kwargs(), loss_fn=loss_fn, generator=generator)

    @property
    def label(self) -> str:
        return f"PGD-{self.steps} ({self.norm})"


@ATTACKS.register("fgsm")
@dataclass(frozen=True)
class FGSM(_Attack):
    """:func:`fgsm`'s hyperparameters (``random_start=True``: FGSM-RS); ``attack(model, x, y)`` runs it."""

    random_start: bool = False

    name: ClassVar[str] = "fgsm"

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, loss_fn: LossFn | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        return fgsm(model, x, y, **self._kwargs(), loss_fn=loss_fn, generator=generator)

    @property
    def label(self) -> str:
        return f"FGSM{'-RS' if self.random_start else ''} ({self.norm})"


def make_attack(name: str | dict | _Attack, **kwargs: Any) -> _Attack:
    """An attack from its name and keywords, from :meth:`to_dict`'s dict, or returned as given."""
    if isinstance(name, _Attack):
        if kwargs:
            raise ValueError("make_attack takes keywords only with an attack name, not with an attack object")
        return name
    if isinstance(name, dict):
        spec = dict(name)
        if "name" not in spec:
            raise ValueError(f"an attack dict needs a 'name' ({', '.join(ATTACKS.names())}), got keys {sorted(spec)}")
        name = spec.pop("name")
        kwargs = {**spec, **kwargs}
    cls = ATTACKS.get(name)
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise ValueError(f"attack {name!r} does not take {', '.join(map(repr, unknown))}; it takes: {', '.join(valid)}")
    if isinstance(kwargs.get("clamp"), list):
        kwargs["clamp"] = tuple(kwargs["clamp"])
    return cls(**kwargs)


def list_attacks() -> list[str]:
    return ATTACKS.names()

