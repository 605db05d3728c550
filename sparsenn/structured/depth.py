"""Depth pruning: remove whole residual blocks (ResNet blocks, transformer layers).

A block whose output is nearly its input adds little: Block Influence (Men et al. 2024,
"ShortGPT: Layers in Large Language Models are More Redundant Than You Expect") scores
a block by ``1 - cos(input, output)`` of the hidden states, averaged over positions
(the feature vector of each token, or of each pixel of a feature map), on calibration
inputs; the blocks with the lowest scores are removed.

Blocks are the elements of ``nn.ModuleList`` / ``nn.Sequential`` containers that have
submodules of their own (a lone layer is not a block) and whose output has the shape of
their input (so the network still fits together without them).
An element of a ``Sequential`` becomes ``nn.Identity``; an element of a ``ModuleList``
(a ``transformers`` decoder's ``layers``) is deleted, the remaining layers' ``layer_idx``
(the key-value cache's index) renumbered and ``config.num_hidden_layers`` (and
``layer_types`` where the config has it) updated, so ``generate`` and
``save_pretrained`` / ``from_pretrained`` keep working.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

from ..core.masks import remove_masks
from ..core.metrics import call_model


def _first(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return getattr(value, "last_hidden_state", None) if not isinstance(value, dict) else value.get("hidden_states")


def _features(t: torch.Tensor) -> torch.Tensor:
    """``(positions, features)``: a feature map's channels per pixel, else the last dimension per token."""
    if t.dim() == 4:
        return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])
    return t.reshape(-1, t.shape[-1])


def _containers(model: nn.Module) -> dict[str, nn.Module]:
    """Elements of ``ModuleList`` / ``Sequential`` containers that are blocks (modules with submodules;
    a single layer, such as the BatchNorm of a projection shortcut, is not a block)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.ModuleList, nn.Sequential)):
            for child, sub in m.named_children():
                if next(sub.children(), None) is not None:
                    out[f"{name}.{child}" if name else child] = sub
    return out


@torch.no_grad()
def block_influence(model: nn.Module, example_inputs: Any) -> dict[str, float]:
    """``{block name: 1 - mean cosine(input, output)}`` of every shape-preserving container element,
    from one eval-mode run on ``example_inputs``."""
    sums: dict[str, list[float]] = {}
    handles = []

    def hook(name):
        def f(module, args, kwargs, out):
            x = args[0] if args and isinstance(args[0], torch.Tensor) else kwargs.get("hidden_states")
            y = _first(out)
            if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.shape == y.shape and x.dim() >= 2:
                cos = torch.nn.functional.cosine_similarity(_features(x).float(), _features(y).float(), dim=1)
                acc = sums.setdefault(name, [0.0, 0])
                acc[0] += float((1 - cos).sum())
                acc[1] += cos.numel()
            else:
                sums.setdefault(name, [float("nan"), 0])
        return f

    blocks = _containers(model)
    for name, m in blocks.items():
        handles.append(m.register_forward_hook(hook(name), with_kwargs=True))
    was = model.training
    model.eval()
    try:
        call_model(model, example_inputs)
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    return {n: s / c for n, (s, c) in sums.items() if c > 0 and not math.isnan(s)}


def drop_layers(model: nn.Module, example_inputs: Any, n: int) -> nn.Module:
    """A copy of ``model`` without its ``n`` blocks of lowest Block Influence (the input is unchanged).

    The copy carries ``block_scores`` (every candidate block's score) and ``dropped`` (the
    names removed, in model order). ``n`` larger than the number of candidate blocks, or
    removing every layer of a ``ModuleList``, raises ValueError naming them.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    out = copy.deepcopy(model)
    remove_masks(out)
    scores = block_influence(out, example_inputs)
    if n > len(scores):
        raise ValueError(f"n={n} blocks requested, but only {len(scores)} shape-preserving blocks were found: "
                         f"{sorted(scores)}")
    drop = sorted(sorted(scores, key=lambda k: (scores[k], k))[:n], key=list(scores).index)
    lists: dict[str, list[int]] = {}
    for name in drop:
        parent_name, _, idx = name.rpartition(".")
        parent = out.get_submodule(parent_name)
        if isinstance(parent, nn.Sequential):
            setattr(parent, idx, nn.Identity())  # a Sequential passes one tensor on: the identity fits
        else:
            lists.setdefault(parent_name, []).append(int(idx))
    for parent_name, idxs in lists.items():
        parent = out.get_submodule(parent_name)
        if len(idxs) == len(parent):
            raise ValueError(f"dropping {n} blocks would remove every layer of {parent_name!r}")
        kept = [m for i, m in enumerate(parent) if i not in set(idxs)]
        parent_list = nn.ModuleList(kept)
        grand, _, attr = parent_name.rpartition(".")
        setattr(out.get_submodule(grand) if grand else out, attr, parent_list)
        for new_idx, layer in enumerate(kept):
            for m in layer.modules():
                if hasattr(m, "layer_idx"):
                    m.layer_idx = new_idx
        _update_depth(out, idxs, len(kept))
    out.block_scores = scores
    out.dropped = drop
    return out


def _update_depth(model: nn.Module, removed: list[int], kept: int) -> None:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "num_hidden_layers"):
        return
    types = getattr(config, "layer_types", None)
    if isinstance(types, list) and len(types) == kept + len(removed):
        config.layer_types = [t for i, t in enumerate(types) if i not in set(removed)]
    config.num_hidden_layers = kept


__all__ = ["block_influence", "drop_layers"]
