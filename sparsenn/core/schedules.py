"""Sparsity schedules: when masks are updated and how sparse they are at each step.

``step`` is the number of completed training steps, starting at 0. Before
``begin_step`` every schedule returns ``initial``; at and after ``end_step`` it
returns ``target`` exactly.

* ``one_shot``: jump to ``target`` at ``begin_step``.
* ``constant``: ``target`` from ``begin_step`` on, masks updated every ``frequency``
  steps (dynamic sparse training, e.g. SET, Mocanu et al. 2018; RigL, Evci et al. 2020).
* ``linear``: linear interpolation from ``initial`` to ``target``.
* ``polynomial``: Zhu & Gupta 2017, "To prune, or not to prune" (exponent 3 = cubic).
* ``exponential``: density decays geometrically (a fixed fraction of the remaining
  weights is removed per unit time).
* ``iterative``: Han et al. 2015, "Learning both Weights and Connections": ``rounds``
  rounds, each removing the same fraction of the remaining weights.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import ClassVar

from . import checks
from .registry import Registry

__all__ = [
    "SCHEDULES",
    "Constant",
    "Exponential",
    "Iterative",
    "Linear",
    "OneShot",
    "Polynomial",
    "Schedule",
    "list_schedules",
    "make_schedule",
]

SCHEDULES: Registry = Registry("schedule")


def _register(name: str):
    def deco(cls):
        cls.name = name
        return SCHEDULES.register(name)(cls)

    return deco


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


@dataclass
class Schedule:
    """Base schedule; subclasses implement :meth:`_between` for begin <= step < end."""

    begin_step: int = 0
    end_step: int = 0
    frequency: int = 1

    name: ClassVar[str] = "schedule"
    gradual: ClassVar[bool] = False  # needs end_step > begin_step

    def __post_init__(self):
        for field, low in (("begin_step", 0), ("end_step", 0), ("frequency", 1)):
            value = getattr(self, field)
            if not _is_int(value) or value < low:
                raise ValueError(f"{self.name}: {field} must be an int >= {low}, got {value!r}")
        if self.end_step < self.begin_step:
            raise ValueError(
                f"{self.name}: end_step must be >= begin_step={self.begin_step}, "
                f"got {self.end_step}"
            )
        if self.gradual and self.end_step == self.begin_step:
            raise ValueError(
                f"{self.name}: end_step must be > begin_step={self.begin_step}, "
                f"got {self.end_step}"
            )

    # -- public API

    def sparsity_at(self, step: int, target: float, initial: float = 0.0) -> float:
        """Sparsity after ``step`` completed steps, going from ``initial`` to ``target``."""
        target, initial = _check_targets(target, initial)
        if not _is_int(step) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        if step < self.begin_step:
            return initial
        if step >= self.end_step:
            return target
        return self._between(step, target, initial)

    def is_update_step(self, step: int) -> bool:
        """True on begin_step, every ``frequency`` steps after it, and on end_step."""
        if not self.begin_step <= step <= self.end_step:
            return False
        return (step - self.begin_step) % self.frequency == 0 or step == self.end_step

    def to_dict(self) -> dict:
        """``{"name": ..., **fields}``; :func:`make_schedule` inverts it."""
        return {"name": self.name, **dataclasses.asdict(self)}

    # -- helpers

    def _between(self, step: int, target: float, initial: float) -> float:
        raise NotImplementedError

    def _progress(self, step: int) -> float:
        return (step - self.begin_step) / (self.end_step - self.begin_step)


def _check_targets(target, initial) -> tuple[float, float]:
    target = checks.sparsity("target sparsity", target)
    v = checks.as_real(initial)
    if v is None or not 0.0 <= v <= target:
        raise ValueError(f"initial sparsity must be in [0, target={target:g}], got {initial!r}")
    return target, v


def _clip(value: float, initial: float, target: float) -> float:
    """Guard against rounding just outside [initial, target]."""
    return min(max(value, initial), target)


@_register("one_shot")
@dataclass
class OneShot(Schedule):
    """Prune to ``target`` at ``begin_step`` (``end_step`` is forced to ``begin_step``)."""

    def __post_init__(self):
        if _is_int(self.begin_step) and self.begin_step >= 0:
            self.end_step = self.begin_step
        super().__post_init__()

    def is_update_step(self, step: int) -> bool:
        return step == self.begin_step


@_register("constant")
@dataclass
class Constant(Schedule):
    """``target`` from ``begin_step`` on; masks updated every ``frequency`` steps up to
    ``end_step`` (dynamic sparse training: SET, Mocanu et al. 2018; RigL, Evci et al. 2020)."""

    def _between(self, step: int, target: float, initial: float) -> float:
        return target

    def is_update_step(self, step: int) -> bool:
        if self.end_step <= self.begin_step:
            return step == self.begin_step
        return (
            self.begin_step <= step <= self.end_step
            and (step - self.begin_step) % self.frequency == 0
        )


@_register("linear")
@dataclass
class Linear(Schedule):
    """``initial + (target - initial) * (t - begin) / (end - begin)``."""

    gradual: ClassVar[bool] = True

    def _between(self, step: int, target: float, initial: float) -> float:
        return _clip(initial + (target - initial) * self._progress(step), initial, target)


@_register("exponential")
@dataclass
class Exponential(Schedule):
    """Density ``d_i * (d_f / d_i) ** ((t - begin) / (end - begin))`` with d = 1 - sparsity."""

    gradual: ClassVar[bool] = True

    def _between(self, step: int, target: float, initial: float) -> float:
        d_i, d_f = 1.0 - initial, 1.0 - target
        return _clip(1.0 - d_i * (d_f / d_i) ** self._progress(step), initial, target)


@_register("polynomial")
@dataclass(kw_only=True)
class Polynomial(Schedule):
    """Zhu & Gupta 2017: ``target + (initial - target) * (1 - progress) ** exponent``."""

    exponent: float = 3.0
    gradual: ClassVar[bool] = True

    def __post_init__(self):
        super().__post_init__()
        e = self.exponent
        if not isinstance(e, numbers.Real) or isinstance(e, bool) or not (0 < e < math.inf):
            raise ValueError(f"{self.name}: exponent must be a finite number > 0, got {e!r}")

    def _between(self, step: int, target: float, initial: float) -> float:
        value = target + (initial - target) * (1.0 - self._progress(step)) ** self.exponent
        return _clip(value, initial, target)


@_register("iterative")
@dataclass(kw_only=True)
class Iterative(Schedule):
    """Han et al. 2015: ``rounds`` rounds at evenly spaced steps from begin to end
    inclusive, each removing the same fraction of the remaining weights."""

    rounds: int = 5
    gradual: ClassVar[bool] = True

    def __post_init__(self):
        super().__post_init__()
        if not _is_int(self.rounds) or self.rounds < 1:
            raise ValueError(f"{self.name}: rounds must be an int >= 1, got {self.rounds!r}")
        span = self.end_step - self.begin_step
        if self.rounds - 1 > span:
            raise ValueError(
                f"{self.name}: rounds={self.rounds} need end_step - begin_step >= "
                f"{self.rounds - 1}, got {span}"
            )

    @property
    def round_steps(self) -> list[int]:
        """Step of each round: ``begin + round(i * (end - begin) / (rounds - 1))``."""
        k, span = self.rounds, self.end_step - self.begin_step
        if k == 1:
            return [self.end_step]
        return [self.begin_step + round(i * span / (k - 1)) for i in range(k)]

    def fraction_per_round(self, target: float, initial: float = 0.0) -> float:
        """``p = 1 - ((1 - target) / (1 - initial)) ** (1 / rounds)``."""
        target, initial = _check_targets(target, initial)
        return 1.0 - ((1.0 - target) / (1.0 - initial)) ** (1.0 / self.rounds)

    def _between(self, step: int, target: float, initial: float) -> float:
        done = sum(s <= step for s in self.round_steps)
        if done == 0:
            return initial
        if done == self.rounds:
            return target
        p = self.fraction_per_round(target, initial)
        return _clip(1.0 - (1.0 - initial) * (1.0 - p) ** done, initial, target)

    def is_update_step(self, step: int) -> bool:
        return step in self.round_steps


def list_schedules() -> list[str]:
    """Names accepted by :func:`make_schedule`."""
    return SCHEDULES.names()


def make_schedule(spec) -> Schedule:
    """A :class:`Schedule` from itself, a registered name, or ``{"name": ..., **kwargs}``."""
    if isinstance(spec, Schedule):
        return spec
    if isinstance(spec, str):
        return SCHEDULES.get(spec)()
    if isinstance(spec, dict):
        if "name" not in spec:
            raise ValueError(
                f"schedule dict needs a 'name' key (one of {', '.join(list_schedules())}), "
                f"got keys {sorted(spec)}"
            )
        kwargs = dict(spec)
        cls = SCHEDULES.get(kwargs.pop("name"))
        valid = [f.name for f in dataclasses.fields(cls)]
        bad = sorted(set(kwargs) - set(valid))
        if bad:
            raise ValueError(f"unknown {cls.name} arguments {bad}; valid: {', '.join(valid)}")
        return cls(**kwargs)
    raise TypeError(
        f"schedule spec must be a Schedule, a name or a dict, got {type(spec).__name__}"
    )
