"""The method contract: a sparsity method is a small class overriding one hook.

A pruning criterion overrides :meth:`Method.score`; the :class:`~sparsenn.Sparsifier`
owns scheduling, per-layer budgets, top-k under a pattern, masking and state
(the JaxPruner design: ``MagnitudePruning`` is a few lines).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable

import torch
from torch import nn

from .patterns import NM
from .registry import Registry

if TYPE_CHECKING:
    from .schedules import Schedule

Batch = tuple[Any, Any]


@dataclass
class ScoreContext:
    """Everything a score may look at.

    ``params`` and ``masks`` are keyed by fully-qualified parameter name
    (``"fc1.weight"``). Masked weights already hold exact zeros. ``data`` is the
    user's iterable of ``(input, target)`` batches or ``None``; :meth:`batches`
    draws at most ``num_batches`` of them.
    """

    model: nn.Module
    params: dict[str, nn.Parameter]
    masks: dict[str, torch.Tensor]
    data: Iterable[Batch] | None = None
    loss_fn: Callable[..., torch.Tensor] | None = None
    num_batches: int = 1
    generator: torch.Generator | None = None
    state: dict[str, Any] = field(default_factory=dict)

    def batches(self) -> list[Batch]:
        if self.data is None:
            raise ValueError("this score needs data: pass data=<iterable of (input, target) batches>")
        got = list(itertools.islice(iter(self.data), self.num_batches))
        if not got:
            raise ValueError("the data iterable yielded no batches")
        return got


class Method:
    """Base class of every registered sparsity method.

    ``needs_data``: the score draws batches from the user's data.
    ``patterns``: the patterns it can produce (``None``: all).
    """

    name: str = "base"
    needs_data: bool = False

    @property
    def data_driven(self) -> bool:
        """The scores come from data (gradients, activations), so all-equal scores mean the data carried
        no signal: the Sparsifier raises :class:`ConstantScoresError` rather than choose by position.
        Default: :attr:`needs_data`. Data-free scores (magnitude, random) may tie legitimately."""
        return self.needs_data
    #: pattern names this method can produce (e.g. ``("channel",)`` for per-channel
    #: criteria; ``"N:M"`` stands for every N:M pattern); ``None`` means every pattern.
    patterns: tuple[str, ...] | None = None

    @classmethod
    def supports(cls, pattern: Any) -> bool:
        """Whether the method can produce ``pattern`` (a :class:`~sparsenn.core.patterns.Pattern`)."""
        if cls.patterns is None or pattern.name in cls.patterns:
            return True
        return "N:M" in cls.patterns and isinstance(pattern, NM)

    def score(self, ctx: ScoreContext) -> dict[str, torch.Tensor]:
        """Importance of every weight: higher means keep. One tensor per parameter."""
        raise NotImplementedError

    def reconstruct(self, ctx: ScoreContext, densities: dict[str, float],
                    pattern: Any) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None:
        """``(masks, weights)`` chosen together, for methods that update the kept weights while they
        prune (SparseGPT's optimal brain surgeon update), or ``None``: the Sparsifier takes the top
        ``densities[name]`` of :meth:`score` under ``pattern``. Called after :meth:`score` with the same
        ``ctx`` (so statistics may be cached in ``ctx.state``); must not modify the model: the
        Sparsifier installs the weights after the masks. Default: None."""
        return None

    def observe(self, ctx: ScoreContext) -> None:
        """Called by the masked optimizer before every step (gradients present). Default: nothing."""

    @property
    def observes_every_step(self) -> bool:
        """Whether :meth:`observe` reads the dense gradient at every step (movement scores accumulate it), so the
        layers cannot train sparse (``Sparsifier(backend="sparse")``). Default: whether ``observe`` is overridden."""
        return type(self).observe is not Method.observe

    # -- hooks for methods that change masks themselves (dynamic sparse training, sparsenn.create.dst) --
    def default_schedule(self) -> "Schedule | None":
        """The schedule a Sparsifier uses when the user passes none (``None``: one-shot at step 0)."""
        return None

    def update_masks(self, sparsifier: Any, sparsity: float) -> dict[str, torch.Tensor] | None:
        """New masks for ``Sparsifier.update`` to apply, or ``None`` to use score + top-k. Default: None."""
        return None

    def wants_dense_grad(self, next_step: int) -> bool:
        """Asked before the backward pass of a step ending in a mask update (``next_step``): True lets
        the dense gradient reach ``.grad`` for :meth:`observe` (RigL). Default: False."""
        return False

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise ValueError(f"method {self.name!r} keeps no state, got keys {sorted(state)}")

    def config(self) -> dict[str, Any]:
        """Constructor hyperparameters as a plain dict (for checkpoints and recipes)."""
        return {}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"


class ConstantScoresError(ValueError):
    """A data-driven score is the same for every weight it had to choose among (zero gradients)."""


def _competition(s: torch.Tensor, mask: torch.Tensor) -> tuple[float, float, int, int] | None:
    """``(min, max, competing, kept)`` over the entries that compete for a place (all but ``-inf``:
    weights that may not come back), or ``None`` if none does."""
    competing = s != -math.inf
    n = int(torch.count_nonzero(competing))
    if n == 0:
        return None
    hi = s.max()
    kept = int(torch.count_nonzero(mask.to(s.device) & competing))
    return float(s.masked_fill(~competing, hi).min()), float(hi), n, kept


def check_scores_informative(method: str, scores: dict[str, torch.Tensor], masks: dict[str, torch.Tensor],
                             *, joint: bool = False) -> None:
    """Raise :class:`ConstantScoresError` if a mask was chosen among equal scores.

    ``scores``: the ranked scores (``-inf`` for weights that may not come back); ``masks``: the
    masks chosen from them. A layer (``joint``: all layers together, for the ``global``
    distribution) is degenerate when every competing score is the same value and the mask
    keeps some but not all of the competing weights: the choice was made by the tie rule
    (lower flat index), i.e. by memory position, not by the score.
    """
    stats = {n: c for n, s in scores.items() if (c := _competition(s.detach(), masks[n])) is not None}
    if joint:
        flat = bool(stats) and min(c[0] for c in stats.values()) == max(c[1] for c in stats.values())
        kept, competing = sum(c[3] for c in stats.values()), sum(c[2] for c in stats.values())
        bad = list(stats) if flat and 0 < kept < competing else []
    else:
        bad = [n for n, (lo, hi, competing, kept) in stats.items() if lo == hi and 0 < kept < competing]
    if not bad:
        return
    value = stats[bad[0]][0]
    layers = ", ".join(map(repr, bad))
    where = (f"layers {layers} (all {value:g}, all layers together: distribution 'global')" if joint
             else f"layer{'s' if len(bad) > 1 else ''} {layers} (all {value:g})")
    modules = [n.rpartition(".")[0] if n.endswith(".weight") and "." in n else n for n in bad]
    raise ConstantScoresError(
        f"score {method!r} is the same for every weight it ranks in {where}: the data gave no signal there, "
        f"and the mask would keep the first weights in memory order. Check that loss_fn depends on the "
        f"model's weights and that the batches give non-zero gradients (not all-zero inputs); draw more "
        f"batches with score_batches=; leave the layers out with exclude={modules!r}; or use a data-free "
        f"method such as method='magnitude'"
    )


METHODS: Registry[type[Method]] = Registry("method")


def register_method(name: str):
    """Class decorator: register a :class:`Method` subclass under ``name``."""

    def deco(cls: type[Method]) -> type[Method]:
        cls.name = name
        METHODS.register(name, cls)
        return cls

    return deco


def make_method(spec, **kwargs) -> Method:
    """A :class:`Method` from an instance (returned as is) or a registered name."""
    if isinstance(spec, Method):
        if kwargs:
            raise ValueError("method keyword arguments are only accepted with a method name")
        return spec
    return METHODS.get(spec)(**kwargs)


def list_methods() -> list[str]:
    return METHODS.names()


__all__ = ["METHODS", "ConstantScoresError", "Method", "ScoreContext", "check_scores_informative", "list_methods",
           "make_method", "register_method"]
