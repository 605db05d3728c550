"""Pruning criteria: one small registered :class:`~sparsenn.core.methods.Method` each.

Every score returns one float32 tensor per entry of ``ctx.params``, shaped like the
parameter, with the convention HIGHER = MORE IMPORTANT = KEPT. Scoring leaves the
model exactly as it was: weights, ``.grad``, ``requires_grad``, train/eval mode and
every buffer (BatchNorm running statistics, masks) are restored afterwards, and
gradients are taken with :func:`torch.autograd.grad`, never ``backward()``.
Data-dependent scores use ``ctx.loss_fn(model(x), y)`` (default
:func:`torch.nn.functional.cross_entropy`), one mean loss per drawn batch, in the
model's current train/eval mode.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..core.methods import Method, ScoreContext, register_method

Tensor = torch.Tensor

__all__ = [
    "GraSP",
    "Magnitude",
    "Movement",
    "OBD",
    "RandomScore",
    "SNIP",
    "Taylor",
    "preserved_model_state",
]


# ----------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def preserved_model_state(model: nn.Module, params: Sequence[Tensor] = ()) -> Iterator[None]:
    """Snapshot the model's mode, buffers and ``requires_grad`` flags; restore them on exit.

    Inside the block, ``params`` require grad and the model's other parameters do
    not (so autograd only builds what the score needs). ``.grad`` is not touched.
    """
    modes = [(m, m.training) for m in model.modules()]
    buffers = [
        (mod, name, buf, buf.detach().clone())
        for mod in model.modules()
        for name, buf in mod._buffers.items()
        if buf is not None
    ]
    scored = {id(p) for p in params}
    all_params = {id(p): p for p in model.parameters()}
    all_params.update({id(p): p for p in params})
    flags = [(p, p.requires_grad) for p in all_params.values()]
    try:
        for p in all_params.values():
            p.requires_grad_(id(p) in scored)
        yield
    finally:
        with torch.no_grad():
            for mod, name, buf, saved in buffers:
                mod._buffers[name] = buf
                buf.copy_(saved)
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, training in modes:
            m.training = training


def _check_finite_params(params: dict[str, Tensor]) -> None:
    for name, p in params.items():
        if not torch.isfinite(p.detach()).all():
            raise ValueError(f"parameter {name!r} contains NaN or Inf; cannot score")


def _draw(ctx: ScoreContext, method: str) -> list[tuple[Any, Any]]:
    try:
        return ctx.batches()
    except ValueError as e:
        raise ValueError(f"score {method!r}: {e}") from None


def _to(x: Any, device: torch.device) -> Any:
    return x.to(device) if isinstance(x, Tensor) else x


def _loss(ctx: ScoreContext, batch: Any, device: torch.device, temperature: float = 1.0) -> Tensor:
    """``loss_fn(model(x) / temperature, y)`` for one ``(input, target)`` batch."""
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise ValueError(f"each batch must be an (input, target) pair, got {type(batch).__name__}")
    x, y = batch
    out = ctx.model(_to(x, device))
    if temperature != 1.0:
        out = out / temperature
    loss = (ctx.loss_fn or F.cross_entropy)(out, _to(y, device))
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(f"loss_fn must return a scalar tensor, got {shape}")
    return loss.reshape(())


def _grads(outputs: Tensor, tensors: list[Tensor], create_graph: bool = False) -> list[Tensor]:
    """``d outputs / d tensors``; zeros (detached) for tensors the output does not use."""
    if not outputs.requires_grad:
        return [torch.zeros_like(t) for t in tensors]
    gs = torch.autograd.grad(outputs, tensors, allow_unused=True, create_graph=create_graph)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(gs, tensors)]


def _batch_grads(ctx: ScoreContext, method: str) -> Iterator[list[Tensor]]:
    """Per batch: the gradient of that batch's mean loss w.r.t. ``ctx.params`` (detached)."""
    tensors = list(ctx.params.values())
    device = tensors[0].device
    for batch in _draw(ctx, method):
        yield [g.detach() for g in _grads(_loss(ctx, batch, device), tensors)]


def _summed_grads(ctx: ScoreContext, method: str) -> list[Tensor]:
    total = None
    for gs in _batch_grads(ctx, method):
        total = gs if total is None else [t + g for t, g in zip(total, gs)]
    return total


class _Criterion(Method):
    """Shared frame: finite-weight check, state preservation, float32 finite output."""

    runs_model = True  # forward/backward passes: snapshot and restore the model's state around them

    def score(self, ctx: ScoreContext) -> dict[str, Tensor]:
        _check_finite_params(ctx.params)
        if not ctx.params:
            return {}
        guard = (
            preserved_model_state(ctx.model, list(ctx.params.values()))
            if self.runs_model
            else contextlib.nullcontext()
        )
        with guard, torch.enable_grad():
            raw = self._compute(ctx)
        out = {}
        for name, p in ctx.params.items():
            s = raw[name].detach().to(torch.float32)
            if s.shape != p.shape:
                raise ValueError(f"score of {name!r} has shape {tuple(s.shape)}, expected {tuple(p.shape)}")
            if not torch.isfinite(s).all():
                raise ValueError(
                    f"score {self.name!r} of parameter {name!r} is NaN or Inf "
                    "(non-finite loss or gradient?)"
                )
            out[name] = s
        return out

    def _compute(self, ctx: ScoreContext) -> dict[str, Tensor]:
        raise NotImplementedError


# ----------------------------------------------------------------------------- criteria


@register_method("magnitude")
class Magnitude(_Criterion):
    """``|w|`` (Han et al., 2015, "Learning both Weights and Connections")."""

    needs_data = False
    runs_model = False

    def _compute(self, ctx):
        return {n: p.detach().abs() for n, p in ctx.params.items()}


@register_method("random")
class RandomScore(_Criterion):
    """Uniform ``[0, 1)`` scores from ``ctx.generator`` (a default-seeded one if None).

    The random-pruning baseline (e.g. Liu et al., 2022, "The Unreasonable
    Effectiveness of Random Pruning"); the same generator seed gives the same scores.
    """

    needs_data = False
    runs_model = False

    def _compute(self, ctx):
        gen = ctx.generator if ctx.generator is not None else torch.Generator()
        return {
            n: torch.rand(p.shape, generator=gen, device=gen.device).to(p.device)
            for n, p in ctx.params.items()
        }


@register_method("snip")
class SNIP(_Criterion):
    """Connection sensitivity ``|g * w|`` (Lee et al., 2019, "SNIP").

    ``g`` is the gradient of the sum over drawn batches of each batch's mean loss.
    """

    needs_data = True

    def _compute(self, ctx):
        g = _summed_grads(ctx, self.name)
        return {n: (gi * p.detach()).abs() for (n, p), gi in zip(ctx.params.items(), g)}


@register_method("grasp")
class GraSP(_Criterion):
    """Gradient Signal Preservation (Wang et al., 2020, "Picking Winning Tickets
    Before Training by Preserving Gradient Flow").

    Sign convention: the paper scores ``S = -(w * Hg)`` and REMOVES the weights with
    the largest ``S``. This library keeps the highest scores, so the importance
    returned here is ``-S = w * Hg``. ``g`` is the loss gradient summed over the
    drawn batches and ``Hg`` the exact Hessian-gradient product of that summed loss
    (double backprop, one pass per batch). ``temperature`` divides the logits before
    the loss (the authors' code uses 200; the default 1 is the plain loss).
    """

    needs_data = True

    def __init__(self, *, temperature: float = 1.0):
        ok = isinstance(temperature, (int, float)) and not isinstance(temperature, bool)
        if not ok or not math.isfinite(temperature) or temperature <= 0:
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        self.temperature = float(temperature)

    def config(self):
        return {"temperature": self.temperature}

    def _compute(self, ctx):
        tensors = list(ctx.params.values())
        device = tensors[0].device
        batches = _draw(ctx, self.name)
        g = None
        for batch in batches:
            gs = [x.detach() for x in _grads(_loss(ctx, batch, device, self.temperature), tensors)]
            g = gs if g is None else [a + b for a, b in zip(g, gs)]
        hg = [torch.zeros_like(t) for t in tensors]
        for batch in batches:
            gs = _grads(_loss(ctx, batch, device, self.temperature), tensors, create_graph=True)
            z = sum((gi * gd).sum() for gi, gd in zip(gs, g))
            hg = [a + b.detach() for a, b in zip(hg, _grads(z, tensors))]
        return {n: p.detach() * h for (n, p), h in zip(ctx.params.items(), hg)}


@register_method("taylor")
class Taylor(_Criterion):
    """First-order Taylor importance ``mean_b (g_b * w)^2`` (Molchanov et al., 2019,
    "Importance Estimation for Neural Network Pruning"), ``g_b`` the gradient of
    batch ``b``'s mean loss."""

    needs_data = True

    def _compute(self, ctx):
        acc, n = None, 0
        for gs in _batch_grads(ctx, self.name):
            terms = [(g * p.detach()) ** 2 for g, p in zip(gs, ctx.params.values())]
            acc = terms if acc is None else [a + t for a, t in zip(acc, terms)]
            n += 1
        return {name: a / n for name, a in zip(ctx.params, acc)}


@register_method("obd")
class OBD(_Criterion):
    """Optimal Brain Damage saliency ``0.5 * H_ii * w^2`` (LeCun et al., 1989).

    ``H_ii`` is estimated by the diagonal of the mini-batch empirical Fisher,
    ``mean_b g_b^2`` with ``g_b`` the gradient of batch ``b``'s mean loss (not the
    per-sample Fisher and not the exact Hessian diagonal).
    """

    needs_data = True

    def _compute(self, ctx):
        fisher, n = None, 0
        for gs in _batch_grads(ctx, self.name):
            sq = [g**2 for g in gs]
            fisher = sq if fisher is None else [a + s for a, s in zip(fisher, sq)]
            n += 1
        return {
            name: 0.5 * (f / n) * p.detach() ** 2
            for (name, p), f in zip(ctx.params.items(), fisher)
        }


@register_method("movement")
class Movement(_Criterion):
    """Movement pruning ``S = -sum_t w_t * g_t`` (Sanh et al., 2020, "Movement
    Pruning: Adaptive Sparsity by Fine-Tuning").

    :meth:`observe` (before each optimizer step, gradients in ``p.grad``) adds
    ``-w * p.grad`` to a per-parameter float32 accumulator. :meth:`score` returns the
    accumulators once any step was observed, else the one-shot ``-w * g`` with ``g``
    summed over batches from ``ctx.batches()``. Accumulators persist across mask
    updates (call :meth:`reset` to clear) and travel in :meth:`state_dict`.
    """

    needs_data = False  # observed training gradients suffice; data only for a score before any step
    data_driven = True  # all-equal accumulated scores (zero gradients) carry no signal: an error

    def __init__(self):
        self._acc: dict[str, Tensor] = {}

    def reset(self) -> None:
        self._acc = {}

    def observe(self, ctx: ScoreContext) -> None:
        with torch.no_grad():
            for name, p in ctx.params.items():
                step = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
                if p.grad is not None:
                    step -= (p.detach() * p.grad.detach()).float()
                prev = self._acc.get(name)
                if prev is None:
                    self._acc[name] = step
                elif prev.shape != p.shape:
                    raise ValueError(
                        f"movement accumulator of {name!r} has shape {tuple(prev.shape)}, "
                        f"parameter has {tuple(p.shape)}"
                    )
                else:
                    prev.add_(step.to(prev.device))

    def _compute(self, ctx):
        if not self._acc:
            g = _summed_grads(ctx, self.name)
            return {n: -(p.detach() * gi) for (n, p), gi in zip(ctx.params.items(), g)}
        missing = [n for n in ctx.params if n not in self._acc]
        if missing:
            raise ValueError(f"movement has no accumulated scores for parameters {missing}")
        return {n: self._acc[n].to(p.device).clone() for n, p in ctx.params.items()}

    def state_dict(self) -> dict[str, Tensor]:
        return {n: t.detach().clone() for n, t in self._acc.items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if not isinstance(state, dict):
            raise TypeError(f"movement state must be a dict, got {type(state).__name__}")
        for k, v in state.items():
            if not isinstance(k, str) or not isinstance(v, Tensor):
                raise ValueError(f"movement state entry {k!r} must map a name to a tensor")
        self._acc = {k: v.detach().to(torch.float32).clone() for k, v in state.items()}
