"""Dynamic sparse training (DST): ``static``, ``set`` and ``rigl`` as registered methods.

The masks are drawn at the target sparsity at step 0 (random per layer at the
distribution's densities, e.g. ERK) by the Sparsifier's score + top-k. Then, every
``update_every`` steps up to ``end_fraction * total_steps``, each layer drops the
``k = round(f_t * active)`` active weights of smallest magnitude and grows ``k``:

* ``static``: never updates (the fixed sparse baseline).
* ``set``: grows at random (Mocanu et al. 2018, "Scalable training of artificial neural
  networks with adaptive sparse connectivity inspired by network science").
* ``rigl``: grows the largest dense-gradient magnitudes of the current batch (Evci et
  al. 2020, "Rigging the Lottery: Making All Tickets Winners"); a layer whose gradient is
  the same at every inactive position (zero) grows at random, as SET, with a warning.

``f_t`` anneals from ``drop_fraction`` ``f0`` with ``E = end_fraction * total_steps``:
``cosine`` ``f0/2 (1 + cos(pi t / E))`` (RigL), ``constant`` ``f0``, ``exponential``
``f0 exp(-3 t / E)``; ``f_t = 0`` after ``E``.

Every default follows the run's length ``T = total_steps``: ``end_fraction`` 0.75 and the
cosine from ``f0 = 0.3`` (Evci et al. 2020) are fractions of it, and ``update_every``
(when not given) is ``3 * isqrt(T)`` (:func:`default_update_every`), so that both the
interval and the number of updates (about ``sqrt(T) / 4``) grow with the run: 12 updates
144 steps apart in 2,345 steps, 42 updates 501 apart in 28,140. A fixed
interval (the papers' ``Delta T = 100``) is too short where a step moves the weights
little (small learning rate or batch): a weight grown at 0 is judged by its magnitude
at the next update before it was trained, and RigL drops most of what it grew and regrows
the same positions (Liu et al. 2021, "Do We Actually Need Dense Over-parameterization?
In-Time Over-parameterization in Sparse Training": exploration pays when it is reliable).
A fixed number of updates is too few in long runs (less exploration). docs/DESIGN.md,
"Dynamic sparse training: the update interval", has the measurements.

Units are the pattern's (elements; whole blocks and channels ranked by summed scores).
Each N:M group keeps its count: the ``k`` drops are chosen over the layer and each
group regrows as many as it lost. Growth picks among the positions inactive *before*
the update, so a weight is never dropped and regrown (or grown and dropped) in one
update, and every layer keeps exactly its count of active weights. Grown weights start
at 0 with fresh optimizer state (:meth:`Sparsifier.set_masks`). Ties: stable sorts,
lower index first.
"""

from __future__ import annotations

import copy
import math
import numbers
import warnings
from typing import Any, Callable

import torch

from ..core import checks
from ..core.methods import Method, ScoreContext, register_method
from ..core.patterns import NM, Block, Channel, Pattern, Row, Unstructured, _matrix, _matrix_shape
from ..core.schedules import Constant, OneShot, Schedule
from ..core.selection import top_k_stable

__all__ = ["DynamicSparse", "RigL", "SET", "Static", "default_update_every"]

Tensor = torch.Tensor
DROP_SCHEDULES = ("cosine", "constant", "exponential")
INITS = ("random", "magnitude")
_EXP_RATE = 3.0  # exponential: f_t = f0 * exp(-3 t / E), f0/20 at the end
UPDATE_EVERY_PER_SQRT_STEP = 3  # default update_every = 3 * isqrt(total_steps)


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def default_update_every(total_steps: int) -> int:
    """The default interval between mask updates: ``3 * isqrt(total_steps)`` steps.

    Interval and number of updates both grow as ``sqrt(total_steps)``: a compromise between
    a fixed interval (the papers' 100 steps: too short to train a grown weight before it is
    judged when steps are small, e.g. 35 updates 0.1 epoch apart in a 5-epoch run at batch
    64 and lr 0.01) and a fixed number of updates (too little exploration in long runs).
    Measurements in docs/DESIGN.md, "Dynamic sparse training: the update interval"."""
    if not _is_int(total_steps) or total_steps < 1:
        raise ValueError(f"total_steps must be an int >= 1, got {total_steps!r}")
    return UPDATE_EVERY_PER_SQRT_STEP * math.isqrt(int(total_steps))


# ----------------------------------------------------------------------------- pattern units


def _to_units(pattern: Pattern, t: Tensor) -> Tensor:
    """``(groups, units)`` view of ``t`` summed per unit; N:M has one row per group of M."""
    if isinstance(pattern, Unstructured):
        return t.reshape(1, -1)
    if isinstance(pattern, NM):
        return _matrix(t).reshape(-1, pattern.m)
    if isinstance(pattern, Row):
        return _matrix(t)
    if isinstance(pattern, Block):
        return pattern._blocks(t).sum(dim=(1, 3)).reshape(1, -1)
    if isinstance(pattern, Channel) and t.dim() >= 1:
        return pattern._unit_view(t).sum(1).reshape(1, -1)
    raise ValueError(f"dynamic sparse training supports unstructured, per_row, N:M, block and channel patterns, "
                     f"got {pattern.name!r}")


def _from_units(pattern: Pattern, units: Tensor, shape: torch.Size) -> Tensor:
    """Inverse of :func:`_to_units` for a boolean unit mask."""
    if isinstance(pattern, (Unstructured, NM, Row)):
        return units.reshape(shape)
    if isinstance(pattern, Block):
        rows, cols = _matrix_shape(tuple(shape))
        b = units.reshape(rows // pattern.h, cols // pattern.w)[:, None, :, None]
        return b.expand(-1, pattern.h, -1, pattern.w).reshape(shape)
    view = [1] * len(shape)
    view[pattern._dim] = -1
    return units.reshape(view).expand(shape).clone()


def _pick_drops(active: Tensor, score: Tensor, k: int) -> Tensor:
    """The ``k`` active units of lowest ``score`` (ties: lower index), at most ``cap`` per group, where a
    group's cap is how many it can regrow (its inactive count)."""
    groups, width = active.shape
    cap = torch.minimum(active.sum(1), (~active).sum(1))
    idx = active.reshape(-1).nonzero().squeeze(1)
    values = score.reshape(-1)[idx]
    if groups == 1 and bool(torch.isfinite(values.sum())):  # one group: a top-k of the negated scores
        drop = torch.zeros(width, dtype=torch.bool, device=active.device)
        drop[idx[top_k_stable(-values, min(k, int(cap[0])))]] = True
        return drop.reshape(1, width)
    order = idx[torch.sort(values, stable=True).indices]  # weakest first
    group = order // width
    perm = torch.sort(group, stable=True).indices  # rank of each candidate within its group
    sorted_group = group[perm]
    rank = torch.empty_like(order)
    rank[perm] = torch.arange(len(order), device=order.device) - torch.searchsorted(sorted_group, sorted_group)
    chosen = order[rank < cap[group]][:k]
    drop = torch.zeros(groups * width, dtype=torch.bool, device=active.device)
    drop[chosen] = True
    return drop.reshape(groups, width)


def _flat_among(score: Tensor, where: Tensor) -> bool:
    """All of ``score`` at ``where`` is one value (and there are at least two such positions)."""
    if int(where.sum()) < 2:
        return False
    values = score[where]
    return bool(values.min() == values.max())


def _pick_grows(inactive: Tensor, score: Tensor, counts: Tensor) -> Tensor:
    """Per group, the ``counts[g]`` inactive units of highest ``score`` (ties: lower index)."""
    s = score.to(torch.float32).masked_fill(~inactive, -math.inf)
    if s.shape[0] == 1:  # one group: top-k instead of a full sort (the cost of an update on big layers)
        return top_k_stable(s.reshape(-1), int(counts[0])).reshape(s.shape)
    order = torch.sort(s, dim=1, descending=True, stable=True).indices
    take = torch.arange(s.shape[1], device=s.device)[None, :] < counts[:, None]
    return torch.zeros_like(inactive).scatter_(1, order, take)


# ----------------------------------------------------------------------------- methods


class DynamicSparse(Method):
    """Shared frame of the DST methods: validation, drop-fraction schedule, drop/grow, diagnostics.

    Subclasses set :meth:`_grow_score`. ``history`` holds one JSON-serializable dict per
    update: ``step``, ``drop_fraction``, ``grown_at_random`` (layers RigL grew at random for want of a
    gradient signal, see :attr:`grows_by_signal`) and ``layers``, per layer (counts in weights):
    ``dropped``, ``grown``, ``active`` (after the update), ``params`` (the layer's size),
    ``survived`` (how many of the weights grown at the previous update are still active
    after this one; ``None`` if none were grown), ``survival`` (``survived`` / that
    update's ``grown``, or ``None``), ``regrown`` (how many of this update's grown weights
    the previous update dropped: a method oscillating because its interval is too short
    for grown weights to be trained; ``None`` at the first update), ``changed`` (positions
    whose mask flipped since the previous update: ``dropped + grown``) and ``mask_change``
    (``changed / params``).
    ``sparsenn.report.layer_report(model, sparsifier=sp)`` sums them over layers.
    """

    dynamic = True  # takes update_every / total_steps (conformance tests, recipes)
    #: grow scores come from training (RigL's gradient): if they are all equal at a layer's inactive
    #: positions (zero gradient) they carry no signal, and that layer grows at random (SET's rule)
    #: instead of at the lowest indices; the update warns and lists it in ``grown_at_random``
    grows_by_signal = False
    requires_total_steps = True

    def __init__(self, *, update_every: int | None = None, total_steps: int | None = None,
                 drop_fraction: float = 0.3, drop_schedule: str = "cosine", end_fraction: float = 0.75,
                 init: str = "random"):
        if update_every is not None and (not _is_int(update_every) or update_every < 1):
            raise ValueError(f"update_every must be an int >= 1 (or None: {UPDATE_EVERY_PER_SQRT_STEP} * isqrt(total_steps)), "
                             f"got {update_every!r}")
        if total_steps is None and self.requires_total_steps:
            raise ValueError(f"method {self.name!r} needs total_steps=<number of training steps, an int >= 1>")
        if total_steps is not None and (not _is_int(total_steps) or total_steps < 1):
            raise ValueError(f"total_steps must be an int >= 1, got {total_steps!r}")
        drop_fraction = checks.real("drop_fraction", drop_fraction, low=0.0, high=1.0, low_open=True, high_open=True,
                                    noun="a number")  # NumPy scalars and 0-d tensors are numbers too
        if drop_schedule not in DROP_SCHEDULES:
            raise ValueError(f"drop_schedule must be one of {', '.join(DROP_SCHEDULES)}; got {drop_schedule!r}")
        end_fraction = checks.real("end_fraction", end_fraction, low=0.0, high=1.0, low_open=True, noun="a number")
        if init not in INITS:
            raise ValueError(f"init must be one of {', '.join(INITS)}; got {init!r}")
        if update_every is None and total_steps is not None:
            update_every = default_update_every(total_steps)
        # None only for static without total_steps, which never updates
        self.update_every = None if update_every is None else int(update_every)
        self.total_steps = None if total_steps is None else int(total_steps)
        self.drop_fraction, self.drop_schedule = float(drop_fraction), drop_schedule
        self.end_fraction, self.init = float(end_fraction), init
        self.history: list[dict[str, Any]] = []
        self._grown: dict[str, Tensor] = {}  # positions grown at the last update, per layer
        self._dropped: dict[str, Tensor] = {}  # positions dropped at the last update, per layer

    def config(self) -> dict[str, Any]:
        return {"update_every": self.update_every, "total_steps": self.total_steps,
                "drop_fraction": self.drop_fraction, "drop_schedule": self.drop_schedule,
                "end_fraction": self.end_fraction, "init": self.init}

    def diagnostics(self) -> list[dict[str, Any]]:
        """A copy of :attr:`history` (JSON-serializable)."""
        return copy.deepcopy(self.history)

    @property
    def end_step(self) -> int:
        """The last step that may update masks: ``int(end_fraction * total_steps)``."""
        return int(self.end_fraction * self.total_steps)

    def default_schedule(self) -> Schedule:
        """Constant sparsity; masks drawn at step 0, updated every ``update_every`` steps up to :attr:`end_step`."""
        return Constant(begin_step=0, end_step=self.end_step, frequency=self.update_every)

    def drop_fraction_at(self, step: int) -> float:
        """``f_t``: cosine ``f0/2 (1 + cos(pi t / E))`` (Evci et al. 2020), constant, or ``f0 exp(-3 t / E)``;
        0 after ``E = end_fraction * total_steps``."""
        end = self.end_fraction * self.total_steps
        if step > end:
            return 0.0
        if self.drop_schedule == "cosine":
            return self.drop_fraction / 2 * (1 + math.cos(math.pi * step / end))
        if self.drop_schedule == "exponential":
            return self.drop_fraction * math.exp(-_EXP_RATE * step / end)
        return self.drop_fraction

    def score(self, ctx: ScoreContext) -> dict[str, Tensor]:
        """Scores of the initial masks: uniform random (``init="random"``) or ``|w|``."""
        if self.init == "magnitude":
            return {n: p.detach().abs().float() for n, p in ctx.params.items()}
        gen = ctx.generator if ctx.generator is not None else torch.Generator()
        return {n: torch.rand(p.shape, generator=gen, device=gen.device).to(p.device) for n, p in ctx.params.items()}

    def _grow_score(self, name: str, shape: torch.Size, to_units: Callable[[Tensor], Tensor],
                    generator: torch.Generator) -> Tensor:
        """``(groups, units)`` scores of the inactive units; higher = grown first."""
        raise NotImplementedError

    @torch.no_grad()
    def update_masks(self, sparsifier: Any, sparsity: float) -> dict[str, Tensor] | None:
        if not sparsifier.history:
            return None  # the first masks: score + top-k at the distribution's densities
        step = sparsifier.step_count
        if abs(sparsity - sparsifier.sparsity) > 1e-12:
            raise ValueError(f"method {self.name!r} keeps the sparsity at {sparsifier.sparsity:g}, but the schedule "
                             f"asks for {sparsity:g} at step {step}; use a constant schedule")
        f = self.drop_fraction_at(step)
        masks, layers, at_random = {}, {}, []
        for mp in sparsifier.masked:
            old, pattern = mp.mask, sparsifier.pattern
            to_units = lambda t, pattern=pattern: _to_units(pattern, t)  # noqa: E731
            # a unit is active if any of its weights is (unstructured and N:M units are single weights)
            active = to_units(old) if isinstance(pattern, (Unstructured, NM, Row)) else to_units(old.to(torch.float32)) > 0
            unit = old.numel() // active.numel()
            k = int(round(f * int(active.sum())))
            drop = _pick_drops(active, to_units(mp.param.detach().abs().float()), k) if k else torch.zeros_like(active)
            grow = torch.zeros_like(active)
            if drop.any():
                score = self._grow_score(mp.name, active.shape, to_units, sparsifier.generator).to(active.device)
                if self.grows_by_signal and _flat_among(score, ~active) and int((~active).sum()) > int(drop.sum()):
                    at_random.append(mp.name)  # no signal: SET's random growth, not the lowest indices
                    gen = sparsifier.generator
                    score = torch.rand(score.shape, generator=gen, device=gen.device).to(active.device)
                grow = _pick_grows(~active, score, drop.sum(1))
            new = _from_units(pattern, (active & ~drop) | grow, old.shape)
            grown, dropped = _from_units(pattern, grow, old.shape), _from_units(pattern, drop, old.shape)
            prev, prev_dropped = self._grown.get(mp.name), self._dropped.get(mp.name)
            survived = None if prev is None or not prev.any() else int((new & prev.to(new.device)).sum())
            regrown = None if prev_dropped is None else int((grown & prev_dropped.to(new.device)).sum())
            changed = int((new ^ old).sum())
            layers[mp.name] = {"dropped": int(drop.sum()) * unit, "grown": int(grow.sum()) * unit,
                               "active": int(new.sum()), "params": old.numel(), "survived": survived,
                               "survival": None if survived is None else survived / int(prev.sum()),
                               "regrown": regrown, "changed": changed, "mask_change": changed / old.numel()}
            masks[mp.name] = new
            self._grown[mp.name], self._dropped[mp.name] = grown, dropped
        if at_random:
            warnings.warn(f"{self.name}: no signal to grow by in {', '.join(map(repr, at_random))} at step {step} "
                          "(the gradient is the same at every inactive position, e.g. 0: a layer the loss does "
                          "not reach); they grew at random (as SET) at this update", RuntimeWarning, stacklevel=4)
        self.history.append({"step": int(step), "drop_fraction": f, "layers": layers, "grown_at_random": at_random})
        return masks

    def state_dict(self) -> dict[str, Any]:
        return {"history": copy.deepcopy(self.history), "grown": {n: t.clone() for n, t in self._grown.items()},
                "dropped": {n: t.clone() for n, t in self._dropped.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict):
            raise TypeError(f"{self.name} state must be a dict, got {type(state).__name__}")
        unknown = sorted(set(state) - set(self.state_dict()) - {"grad"})
        if unknown:
            raise ValueError(f"method {self.name!r} state has unknown keys {unknown}; valid: history, grown, dropped")
        history = state.get("history", [])
        if not isinstance(history, list):
            raise TypeError(f"{self.name} state: history must be a list of update records, got {type(history).__name__}")
        for i, entry in enumerate(history):
            if not (isinstance(entry, dict) and _is_int(entry.get("step")) and entry["step"] >= 0
                    and isinstance(entry.get("layers"), dict)):
                raise ValueError(f"{self.name} state: history[{i}] must be a dict with an int 'step' >= 0 and a "
                                 f"'layers' dict, got {str(entry)[:80]}")
        masks = {}
        for key in ("grown", "dropped"):
            value = state.get(key, {})
            if not (isinstance(value, dict) and all(isinstance(n, str) and torch.is_tensor(t) for n, t in value.items())):
                raise TypeError(f"{self.name} state: {key} must map parameter names to tensors, got {str(value)[:80]}")
            masks[key] = {n: t.detach().to(torch.bool).clone() for n, t in value.items()}
        self.history = copy.deepcopy(history)
        self._grown, self._dropped = masks["grown"], masks["dropped"]


@register_method("static")
class Static(DynamicSparse):
    """The fixed sparse baseline: masks drawn at step 0 (random per the distribution), never changed."""

    requires_total_steps = False  # accepts the DST arguments so switching methods is one word

    def default_schedule(self) -> Schedule:
        return OneShot(begin_step=0)

    def update_masks(self, sparsifier: Any, sparsity: float) -> dict[str, Tensor] | None:
        if not sparsifier.history:
            return None
        return {n: m.clone() for n, m in sparsifier.masks.items()}


@register_method("set")
class SET(DynamicSparse):
    """Sparse Evolutionary Training (Mocanu et al. 2018): drop the smallest ``|w|``, regrow uniformly at
    random among inactive positions from the sparsifier's seeded generator (same on every rank)."""

    def _grow_score(self, name, shape, to_units, generator):
        return torch.rand(shape, generator=generator, device=generator.device)


_NEEDS_GRAD = ("RigL needs the gradient of the current batch to grow weights at step {step}: call "
               "loss.backward() before opt.step() with opt = sp.wrap(optimizer), then sp.step()")


@register_method("rigl")
class RigL(DynamicSparse):
    """RigL (Evci et al. 2020): drop the smallest ``|w|``, grow the inactive positions of largest
    ``|dense gradient|`` on the batch of the update step.

    The Sparsifier lets the dense gradient through only the backward pass of a step ending
    in an update (:meth:`wants_dense_grad`); :meth:`observe` stashes ``|grad|`` at inactive
    positions before the optimizer zeroes it, and the update consumes the stash. With
    gradient accumulation the stash is what ``.grad`` holds at the optimizer step.
    """

    grows_by_signal = True
    observes_every_step = False  # only on the steps whose dense gradient it asked for (wants_dense_grad)
    _armed: int | None = None  # the update step whose gradient observe() must stash
    _grad: dict[str, Tensor] | None = None  # |grad| at inactive positions, consumed by the update

    def wants_dense_grad(self, next_step: int) -> bool:
        self._armed = next_step if self.drop_fraction_at(next_step) > 0 else None
        return self._armed is not None

    @torch.no_grad()
    def observe(self, ctx: ScoreContext) -> None:
        if self._armed is None:
            return
        grads = {}
        for name, p in ctx.params.items():
            if p.grad is None:
                continue
            if not torch.isfinite(p.grad.sum()) and not torch.isfinite(p.grad).all():  # sum: one cheap pass
                raise ValueError(f"RigL: the gradient of {name!r} contains NaN or Inf at step {self._armed}")
            grads[name] = p.grad.detach().abs().float().masked_fill(ctx.masks[name].to(p.grad.device), 0)
        if not grads:
            raise RuntimeError(_NEEDS_GRAD.format(step=self._armed))
        self._grad, self._armed = grads, None

    def _grow_score(self, name, shape, to_units, generator):
        g = self._grad.get(name)
        return torch.zeros(shape) if g is None else to_units(g)  # a layer the loss does not reach

    def update_masks(self, sparsifier: Any, sparsity: float) -> dict[str, Tensor] | None:
        step = sparsifier.step_count
        if sparsifier.history and self._grad is None and self.drop_fraction_at(step) > 0:
            raise RuntimeError(_NEEDS_GRAD.format(step=step))
        try:
            return super().update_masks(sparsifier, sparsity)
        finally:
            self._grad = None

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self._grad is not None:
            state["grad"] = {n: t.clone() for n, t in self._grad.items()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        grad = state.get("grad")
        self._grad = None if grad is None else {n: t.detach().float().clone() for n, t in grad.items()}
