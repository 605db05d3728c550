"""Group importance: one score per channel of a dependency group (higher: more important).

A group's channel lives in several layers at once (:mod:`.graph`): the rows of its
producers, the entries of its BatchNorms, the input columns of its consumers. Each
criterion scores the channel in some of these *members*; the members' scores are then
combined into one score per channel:

- ``normalise=True`` (per-group ranking, and ``global_ratio="mean"``): each member's
  scores are divided by their mean, so no layer dominates by its scale (Torch-Pruning's
  ``normalizer="mean"``), and summed;
- ``normalise=False`` (``global_ratio="raw"``): the members' scores as measured, averaged
  (Torch-Pruning's ``group_reduction="mean"``), so that groups can be compared with one
  another by the criterion's own units.

Criteria (:data:`IMPORTANCE`):

- ``"l1"`` / ``"l2"`` (``"group_l1"`` / ``"group_l2"`` are the same): the norm of the channel's
  weights in *every* member of the group - each producer's row, each Embedding's column,
  each norm's ``|gamma|``, and each consumer's input column(s) - combined as below
  (DepGraph's group magnitude, Fang et al. 2023; Torch-Pruning's ``MagnitudeImportance``
  default): a channel that the next layer barely reads scores low even when its own filter
  is large. Fine-tuned after shrinking, it kept more accuracy than the filter norm on both
  Fashion-MNIST CNNs of the benchmark (docs/benchmarks.md);
- ``"filter_l1"`` / ``"filter_l2"``: the norm of each producer's output row only (Li et al.
  2017, "Pruning Filters for Efficient ConvNets") and of each Embedding's weight column;
- ``"bn_scale"``: ``|gamma|`` of the group's BatchNorms (Liu et al. 2017, "Network
  Slimming"), GroupNorms, LayerNorms and RMSNorms; a group without one falls back to
  ``"filter_l1"``;
- ``"random"``: a seeded random order (the baseline every paper compares with);
- ``"wanda"``: for each consumer, ``||x_c|| * sum |W[:, c]|`` over the recorded run (Wanda's
  ``|W| * ||x||``, Sun et al. 2023, summed over the channel as LLM-Pruner and FLAP sum over
  structures);
- ``"apoz"``: one minus the Average Percentage of Zeros where consumers read the channel
  (Hu et al. 2016, "Network Trimming");
- ``"taylor"``: first-order Taylor expansion of the loss (Molchanov et al. 2019,
  "Importance Estimation for Neural Network Pruning"): per member,
  ``|sum over the channel's weights of w * dL/dw|`` - the producer's row and bias, the
  BatchNorm's (LayerNorm's, RMSNorm's) scale and shift, an Embedding's column, the
  consumer's input columns - the first-order change of
  the loss when the member's part of the channel is set to zero. Needs gradients
  (:func:`taylor_gradients`, or the ``.grad`` the user's ``loss.backward()`` left);
- ``"flap"``: the fluctuation metric of FLAP (An et al. 2024, "Fluctuation-based
  Adaptive Structured Pruning for Large Language Models"): for each consumer,
  ``Var(x_c) * ||W[:, c]||^2``, the variance of the channel's input over the recorded run
  (every token or position) times the squared norm of the weight column reading it: a
  channel whose input barely fluctuates can be replaced by its mean (FLAP then adds
  that mean's contribution to the bias; here the channel is only removed, so that the
  shrunk model still equals the masked one).

``wanda``, ``apoz`` and ``flap`` read the statistics of the graph's recorded run
(``input_norms``, ``input_zeros``, ``input_vars``): pass calibration data as
``example_inputs``. A group that no recorded layer reads falls back to ``"filter_l1"``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..core.metrics import call_model
from .graph import DependencyGraph, Group

IMPORTANCE = ("l1", "l2", "filter_l1", "filter_l2", "bn_scale", "random", "wanda", "apoz", "taylor", "flap")
#: other names: DepGraph's, and the channel criteria of ``sparsenn.structured`` (Sparsifier methods)
ALIASES = {"group_l1": "l1", "group_l2": "l2", "l1_filter": "filter_l1", "bn_gamma": "bn_scale"}


def _norm(x: torch.Tensor) -> torch.Tensor:
    mean = x.mean()
    return x / mean if mean > 0 else x


def _combine(parts: list[torch.Tensor], normalise: bool) -> torch.Tensor:
    if normalise:
        return sum(_norm(p) for p in parts)
    return torch.stack(parts).mean(0)


def _columns(t: torch.Tensor) -> torch.Tensor:
    """Sum over everything but the input dimension of ``t``, shaped like a Linear's or Conv2d's weight."""
    return t.sum(0) if t.dim() == 2 else t.sum((0, 2, 3))


def _per_channel(g: Group, offset: int, repeat: int, cols: torch.Tensor) -> torch.Tensor:
    """The ``g.size`` channels' share of a consumer's per-column values (``repeat`` columns each, summed)."""
    return cols[offset:offset + g.size * repeat].reshape(g.size, repeat).sum(1)


def _apoz(g: Group, zeros: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """Per channel of ``g``: 1 - the mean fraction of zeros where consumers read it."""
    parts = [zeros[mod][offset:offset + g.size * repeat].reshape(g.size, repeat).mean(1)
             for mod, offset, repeat in g.consumers if mod in zeros]
    return 1 - torch.stack(parts).mean(0) if parts else None


def _activation_weighted(modules: dict[str, nn.Module], g: Group, stats: dict[str, torch.Tensor],
                         squared: bool) -> list[torch.Tensor]:
    """Per consumer: wanda's ``||x_c|| * sum |W[:, c]|`` (``stats``: input norms) or FLAP's
    ``Var(x_c) * ||W[:, c]||^2`` (``squared``; ``stats``: input variances), per channel of ``g``."""
    parts = []
    for mod, offset, repeat in g.consumers:
        if mod not in stats:
            continue
        w = modules[mod].weight.detach().float()
        cols = _columns(w.pow(2) if squared else w.abs())
        parts.append(_per_channel(g, offset, repeat, cols * stats[mod]))
    return parts


def _magnitudes(modules: dict[str, nn.Module], g: Group, p: int) -> list[torch.Tensor]:
    """Per member of ``g``: the ``p``-norm of the channel's weights there (producer rows, Embedding columns,
    norm scales, consumer input columns summed over their repeats), one value per channel."""
    parts = [modules[m].weight.detach().float().flatten(1).norm(p=p, dim=1) for m in g.producers]
    parts += [modules[m].weight.detach().float().norm(p=p, dim=0) for m in g.embeddings]
    parts += [modules[n].weight.detach().float().abs() for n in g.norms + g.layer_norms
              if getattr(modules[n], "weight", None) is not None]
    for mod, offset, repeat in g.consumers:
        cols = _columns(modules[mod].weight.detach().float().abs().pow(p))
        parts.append(_per_channel(g, offset, repeat, cols).pow(1 / p))
    return parts


def _wx_grad(p: nn.Parameter | None) -> torch.Tensor | None:
    """``w * dL/dw`` of a parameter (``None`` without one or without its gradient)."""
    if p is None or p.grad is None:
        return None
    return (p.detach().float() * p.grad.detach().float())


def _taylor(modules: dict[str, nn.Module], g: Group) -> list[torch.Tensor]:
    """Per member of ``g`` with gradients: ``|sum of w * dL/dw over the channel's weights|`` per channel."""
    parts = []
    for name in g.producers:
        m = modules[name]
        wg = _wx_grad(m.weight)
        if wg is None:
            continue
        row = wg.flatten(1).sum(1)
        bg = _wx_grad(m.bias)
        parts.append((row + bg if bg is not None else row).abs())
    for name in g.embeddings:
        wg = _wx_grad(modules[name].weight)
        if wg is not None:
            parts.append(wg.sum(0).abs())
    for name in g.norms + g.layer_norms:
        m = modules[name]
        terms = [t for t in (_wx_grad(getattr(m, "weight", None)), _wx_grad(getattr(m, "bias", None)))
                 if t is not None]
        if terms:
            parts.append(sum(terms).abs())
    for mod, offset, repeat in g.consumers:
        wg = _wx_grad(modules[mod].weight)
        if wg is not None:
            parts.append(_per_channel(g, offset, repeat, _columns(wg)).abs())
    return parts


def group_importance(model: nn.Module, g: Group, importance: str, graph: DependencyGraph | None = None,
                     seed: int = 0, normalise: bool = True) -> torch.Tensor:
    """One score per channel of ``g`` (higher: more important) by ``importance`` (one of
    :data:`IMPORTANCE`); ``graph`` carries the recorded run's statistics (``wanda``, ``apoz``,
    ``flap``); ``normalise``: see the module docstring."""
    modules = dict(model.named_modules())
    stats = graph or DependencyGraph([], [])
    if importance == "random":
        return torch.rand(g.size, generator=torch.Generator().manual_seed(seed + g.root))
    if importance == "apoz":
        score = _apoz(g, stats.input_zeros)
        if score is not None:
            return score
    elif importance in ("wanda", "flap"):
        parts = _activation_weighted(modules, g, stats.input_norms if importance == "wanda" else stats.input_vars,
                                     squared=importance == "flap")
        if parts:
            return _combine(parts, normalise)
    elif importance == "taylor":
        parts = _taylor(modules, g)
        if not parts:
            raise ValueError(f"importance='taylor': no gradient reaches the layers of the group produced by "
                             f"{g.producers} (requires_grad=False?); pass them in ignore= or unfreeze them")
        return _combine(parts, normalise)
    elif importance == "bn_scale":
        gammas = [modules[n].weight.detach().abs().float() for n in g.norms + g.layer_norms
                  if getattr(modules[n], "weight", None) is not None]
        if gammas:
            return _combine(gammas, normalise)
    importance = ALIASES.get(importance, importance)
    p = 2 if importance in ("l2", "filter_l2") else 1
    if importance in ("l1", "l2"):
        return _combine(_magnitudes(modules, g, p), normalise)
    return _combine([modules[m].weight.detach().float().flatten(1).norm(p=p, dim=1) for m in g.producers] +
                    [modules[m].weight.detach().float().norm(p=p, dim=0) for m in g.embeddings], normalise)


def taylor_gradients(model: nn.Module, example_inputs: Any, loss_fn: Callable[[Any], torch.Tensor]) -> None:
    """Fill ``model``'s ``.grad`` (replacing what was there) with the gradient of
    ``loss_fn(model(example_inputs))``: one forward and backward pass in eval mode (the
    function that shrinking preserves: BatchNorm uses its running statistics, dropout is off);
    the model's mode is restored. ``loss_fn`` takes the model's output and returns a scalar."""
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be a callable taking the model's output, got {type(loss_fn).__name__}")
    was_training = model.training
    for p in model.parameters():
        p.grad = None
    model.eval()
    try:
        with torch.enable_grad():
            loss = loss_fn(call_model(model, example_inputs))
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise ValueError(f"loss_fn must return a scalar tensor, got "
                                 f"{tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__}")
            if not loss.requires_grad:
                raise ValueError("loss_fn returned a tensor that does not depend on the model's parameters "
                                 "(no grad_fn): it cannot give gradients")
            loss.reshape(()).backward()
    finally:
        model.train(was_training)


__all__ = ["ALIASES", "IMPORTANCE", "group_importance", "taylor_gradients"]
