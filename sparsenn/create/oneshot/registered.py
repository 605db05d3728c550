"""``method="wanda"`` and ``method="sparsegpt"`` for the :class:`~sparsenn.Sparsifier`, on any model
with Linear and Conv2d layers, composable with the library's patterns and distributions.

Sun et al. 2023: ``|W_ij| * ||X_j||_2``, the input norms over the drawn batches (all
tokens / positions). Linear layers use their inputs; convolutions the columns of their
unfolded input patches (``in_channels * kh * kw``, the weight's matrix view). Where
``sn.oneshot`` prunes block by block with per-row budgets, the Sparsifier scores the whole
model in one pass and ranks under its pattern and distribution (``"global"`` too).

SparseGPT (Frantar & Alistarh 2023) likewise takes every layer's ``X^T X`` from one pass
over the drawn batches (not block by block: all Hessians at once, so this suits models
that fit beside them; ``sn.oneshot`` is the bounded-memory path for transformers) and then
prunes each layer to the Sparsifier's per-layer budget with its inverse-Hessian update,
through :meth:`~sparsenn.core.methods.Method.reconstruct`. Its score, which ``"global"``
ranks by, is the OBS saliency ``w^2 / [H^-1]_jj^2``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...core.methods import Method, ScoreContext, register_method
from ...core.patterns import NM, Row, Unstructured
from .solvers import HessianError, live_hessian, sparsegpt_prune, wanda_scores

__all__ = ["SparseGPT", "Wanda"]


def _owners(model: nn.Module, names: list[str], method: str = "wanda") -> dict[str, nn.Module]:
    modules = dict(model.named_modules())
    out = {}
    for name in names:
        owner, _, attr = name.rpartition(".")
        module = modules.get(owner)
        if attr != "weight" or not isinstance(module, (nn.Linear, nn.Conv2d)):
            raise ValueError(f"{method} scores Linear and Conv2d weights; {name!r} is "
                             f"{'a ' + type(module).__name__ + ' ' + attr if module is not None else 'unknown'}: "
                             "leave it out with exclude=[...]")
        if isinstance(module, nn.Conv2d) and module.groups != 1:
            raise ValueError(f"{method}: {name!r} is a grouped convolution (groups={module.groups}); leave it out "
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


@register_method("sparsegpt")
class SparseGPT(Method):
    """SparseGPT (Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned
    in One-Shot"): each layer pruned to its budget with the optimal brain surgeon update of the kept
    weights, from ``H = X^T X`` of its inputs over ``score_batches`` batches of ``data``.
    ``block_size``: columns per lazy-update block; ``damp``: dampening as a fraction of the mean
    Hessian diagonal. Patterns: unstructured, per_row and N:M. Prunes once, from unmasked weights (a one-shot
    schedule)."""

    needs_data = True
    patterns = ("unstructured", "per_row", "N:M")

    def __init__(self, block_size: int = 128, damp: float = 0.01):
        if not (isinstance(block_size, int) and not isinstance(block_size, bool) and block_size >= 1):
            raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
        if not (isinstance(damp, (int, float)) and not isinstance(damp, bool) and 0 < damp < float("inf")):
            raise ValueError(f"damp must be a number > 0, got {damp!r}")
        self.block_size, self.damp = block_size, float(damp)

    def config(self) -> dict:
        return {"block_size": self.block_size, "damp": self.damp}

    @torch.no_grad()
    def _hessians(self, ctx: ScoreContext) -> dict[str, torch.Tensor]:
        if "hessians" not in ctx.state:
            owners = _owners(ctx.model, list(ctx.params), "sparsegpt")
            hessians = {n: torch.zeros(m.weight[0].numel(), m.weight[0].numel(), dtype=torch.float64)
                        for n, m in owners.items()}
            _forward(ctx, owners, lambda name, cols: hessians[name].add_((cols.T @ cols).double().cpu()))
            ctx.state["hessians"] = hessians
        return ctx.state["hessians"]

    @torch.no_grad()
    def score(self, ctx: ScoreContext) -> dict[str, torch.Tensor]:
        out = {}
        for name, H in self._hessians(ctx).items():
            p = ctx.params[name].detach()
            H, dead = live_hessian(H)
            H.diagonal().add_(self.damp * float(torch.diagonal(H).mean()))
            try:
                inverse_diag = torch.diagonal(torch.cholesky_inverse(torch.linalg.cholesky(H)))
            except torch.linalg.LinAlgError:
                raise HessianError(f"sparsegpt: the Hessian of {name!r} is not positive definite with damp="
                                   f"{self.damp:g}; use a larger damp= or more data") from None
            matrix = p.reshape(p.shape[0], -1).float()
            saliency = matrix ** 2 / inverse_diag.float().unsqueeze(0) ** 2
            out[name] = saliency.masked_fill(dead.unsqueeze(0), 0.0).reshape(p.shape).to(p.device)
        return out

    @torch.no_grad()
    def reconstruct(self, ctx, densities, pattern):
        if not isinstance(pattern, (Unstructured, Row, NM)):
            raise ValueError(f"sparsegpt produces the patterns unstructured, per_row and N:M, got {pattern.name!r}")
        pruned = [n for n, m in ctx.masks.items() if not bool(m.all())]
        if pruned:
            raise ValueError(f"sparsegpt prunes once, from unmasked weights; {pruned[0]!r} already has pruned "
                             "weights (use a one-shot schedule, or method='wanda' for gradual pruning)")
        masks, weights = {}, {}
        for name, H in self._hessians(ctx).items():
            p = ctx.params[name].detach()
            matrix = p.reshape(p.shape[0], -1)
            if densities[name] <= 0.0:  # a global allocation may empty a layer
                masks[name], weights[name] = torch.zeros_like(p, dtype=torch.bool), torch.zeros_like(p)
                continue
            new, keep = sparsegpt_prune(matrix.cpu(), H, 1.0 - densities[name], pattern,
                                        block_size=self.block_size, damp=self.damp, name=name)
            masks[name] = keep.reshape(p.shape).to(p.device)
            weights[name] = new.reshape(p.shape).to(device=p.device, dtype=p.dtype)
        return masks, weights


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
