"""Adversarial training that plugs into any loop: it only changes the batch.

Adversarial training (Madry et al. 2018, arXiv:1706.06083) minimizes the loss on attacked inputs.
Nothing here touches weights, gradients of parameters, masks or optimizers: the attack takes
gradients with respect to the input only and the user's backward pass and (masked) optimizer step do
the rest, so it composes with ``sp.wrap(optimizer)``, gradual pruning and dynamic sparse training
(RigL's grow step sees the gradient of the adversarial loss, which is the loss being trained).

* :func:`adversarial_loss` -- in your own loop: ``loss = adversarial_loss(model, x, y, attack=FGSM(...))``.
* :class:`AdversarialBatches` -- wraps a loader so that it yields attacked batches, for loops that take a
  loader (``sparsenn.train.train(model, AdversarialBatches(loader, model, attack), opt, sparsifier=sp)``).

Cheap training attacks: FGSM with a random start and a step of 1.25 eps ("fast adversarial training",
Wong et al. 2020, arXiv:2001.03994) costs one extra forward/backward per step; PGD with a few steps
is the stronger, slower choice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core import checks
from .attacks import make_attack

__all__ = ["AdversarialBatches", "adversarial_loss", "attacked"]

AttackFn = Callable[..., torch.Tensor]


def _attack_fn(attack: Any) -> AttackFn:
    """An attack object (:class:`~sparsenn.robust.attacks.PGD`, ``FGSM``), a dict or name for
    :func:`~sparsenn.robust.attacks.make_attack`, or any callable ``attack(model, x, y) -> x_adv``."""
    if isinstance(attack, (str, dict)):
        return make_attack(attack)
    if not callable(attack):
        raise TypeError(f"attack must be an attack (PGD, FGSM), its name or dict, or a callable "
                        f"attack(model, x, y) -> x_adv; got {type(attack).__name__}")
    return attack


def attacked(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: Any,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """``attack(model, x, y)``, passing ``generator`` to the library's attacks (a plain callable gets none)."""
    fn = _attack_fn(attack)
    if generator is not None and hasattr(fn, "to_dict"):
        return fn(model, x, y, generator=generator)
    return fn(model, x, y)


def adversarial_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, attack: Any,
                     loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                     clean_weight: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """The training loss on attacked inputs: ``(1 - w) L(model(x_adv), y) + w L(model(x), y)``.

    The attack runs in eval mode and restores every module's mode; the returned loss comes from
    forward passes in the model's own mode (train mode in a training loop). Call ``backward()`` on it
    as on any loss. ``clean_weight`` ``w`` in [0, 1] mixes in the clean loss (0: adversarial only,
    as Madry et al.; 0.5: Goodfellow et al. 2015). ``loss_fn`` defaults to cross-entropy (mean).
    """
    w = checks.real("clean_weight", clean_weight, low=0.0, high=1.0, noun="a number")
    loss_fn = loss_fn or F.cross_entropy
    x_adv = attacked(model, x, y, attack, generator)
    loss = loss_fn(model(x_adv), y)
    if w > 0:
        loss = (1 - w) * loss + w * loss_fn(model(x), y)
    return loss


class AdversarialBatches:
    """Iterate ``loader`` yielding ``(attack(model, x, y), y)``: each batch attacked with the model's current
    weights when it is drawn, so a loop that takes a loader trains adversarially unchanged.

    Re-iterable (one pass per epoch) and sized like ``loader``. ``fraction`` in (0, 1]: only the first
    ``round(fraction * N)`` samples of each batch are attacked (the rest stay clean).
    """

    def __init__(self, loader: Iterable, model: nn.Module, attack: Any, *, fraction: float = 1.0,
                 generator: torch.Generator | None = None):
        self.loader, self.model, self.attack = loader, model, _attack_fn(attack)
        self.fraction = checks.real("fraction", fraction, low=0.0, high=1.0, low_open=True, noun="a number")
        self.generator = generator

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for batch in self.loader:
            if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                raise ValueError("AdversarialBatches needs batches (input, target, ...); got "
                                 f"{type(batch).__name__}")
            x, y, *rest = batch
            n = round(self.fraction * len(x))
            if n == len(x):
                x = attacked(self.model, x, y, self.attack, self.generator)
            elif n > 0:
                x = torch.cat([attacked(self.model, x[:n], y[:n], self.attack, self.generator), x[n:]])
            yield (x, y, *rest)

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]
