"""``method="wanda"`` for the :class:`~sparsenn.Sparsifier`: Wanda's score on any model, with every
pattern, distribution and schedule of the library.

Sun et al. 2023: ``|W_ij| * ||X_j||_2``, the input norms over the drawn batches (all
tokens / positions). Linear layers use their inputs; convolutions the columns of their
unfolded input patches (``in_channels * kh * kw``, the weight's matrix view). Where
``sn.oneshot`` prunes block by block with per-row budgets, the Sparsifier scores the whole
model in one pass and ranks under its pattern and distribution (``"global"`` too).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...core.methods import Method, ScoreContext, register_method
from .solvers import wanda_scores

__all__ = ["Wanda"]


def _owners(model: nn.Module, names: list[str]) -> dict[str, nn.Module]:
    modules = dict(model.named_modules())
    out = {}
    for name in names:
        owner, _, attr = name.rpartition(".")
        module = modules.get(owner)
        if attr != "weight" or not isinstance(module, (nn.Linear, nn.Conv2d)):
            raise ValueError(f"wanda scores Linear and Conv2d weights; {name!r} is "
                             f"{'a ' + type(module).__name__ + ' ' + attr if module is not None else 'unknown'}: "
                             "leave it out with exclude=[...]")
        if isinstance(module, nn.Conv2d) and module.groups != 1:
            raise ValueError(f"wanda: {name!r} is a grouped convolution (groups={module.groups}); leave it out "
                             "with exclude=[...]")
        out[name] = module
    return out


def _columns(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The rows the weight's matrix view multiplies: tokens x inputs (Linear) or positions x patches (conv)."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    if module.padding_mode != "zeros":
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
        padding = 0
    else:
        padding = module.padding
    if isinstance(padding, str):
        raise ValueError(f"wanda: padding={padding!r} convolutions are not supported; leave them out with exclude=")
    patches = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=padding, stride=module.stride)
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])


@register_method("wanda")
class Wanda(Method):
    """``|W| * ||X||`` per weight (Sun et al. 2023, "A Simple and Effective Pruning Approach for Large
    Language Models"); the input norms from a forward pass over ``score_batches`` batches of ``data``."""

    needs_data = True

    @torch.no_grad()
    def score(self, ctx: ScoreContext) -> dict[str, torch.Tensor]:
        owners = _owners(ctx.model, list(ctx.params))
        norms = {n: torch.zeros(m.weight[0].numel(), dtype=torch.float64, device=m.weight.device)
                 for n, m in owners.items()}
        _forward(ctx, owners, lambda name, cols: norms[name].add_((cols.double() ** 2).sum(0)))
        out = {}
        for name, p in ctx.params.items():
            matrix = p.detach().reshape(p.shape[0], -1)
            out[name] = wanda_scores(matrix, norms[name].to(torch.float32)).reshape(p.shape)
        return out


def _forward(ctx: ScoreContext, owners: dict[str, nn.Module], accumulate) -> None:
    """One eval-mode forward pass over ``ctx.batches()``, feeding each owner's input rows to ``accumulate``."""
    def hook(module, args, output, name):
        accumulate(name, _columns(module, args[0].detach()).to(torch.float32))  # returns None: output kept

    handles = [m.register_forward_hook(lambda mod, args, out, name=n: hook(mod, args, out, name))
               for n, m in owners.items()]
    modes = [(m, m.training) for m in ctx.model.modules()]
    ctx.model.eval()
    try:
        for x, _ in ctx.batches():
            ctx.model(**x) if isinstance(x, dict) else ctx.model(x)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes:
            m.train(mode)
