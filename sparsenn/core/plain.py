"""A plain copy of a model: what ``copy.deepcopy`` gives, for models it refuses or copies wrongly.

PyTorch's own ways of masking a weight change the module: ``torch.nn.utils.prune`` keeps the
computed weight as a non-leaf tensor attribute (``weight = weight_orig * weight_mask``) that
``copy.deepcopy`` refuses; ``torch.nn.utils.parametrize`` swaps the module's class for an
injected subclass that a deep copy shares with the original, so removing a parametrization from
the copy would break the user's model. :func:`plain_copy` resolves both on a copy, leaving the
given model untouched: the copy's weights are ordinary parameters holding what the forward
pass used (zeros included).
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils import parametrize, prune

from .masks import remove_masks


@torch.no_grad()
def plain_copy(model: nn.Module, *, masks: bool = False) -> nn.Module:
    """A deep copy of ``model`` with ``torch.nn.utils.prune`` hooks and parametrizations resolved into plain
    parameters; ``masks=False`` also removes sparsenn's mask buffers (the zeros stay in the weights).
    The copy keeps the model's training/eval mode; ``model`` itself is not changed."""
    # the computed weight of a pruned module is a non-leaf tensor that deepcopy refuses: copy its value
    # (prune.remove below recomputes it from weight_orig and weight_mask anyway)
    memo = {id(value): value.detach().clone() for module in model.modules() for value in vars(module).values()
            if isinstance(value, torch.Tensor) and not value.is_leaf}
    plain = copy.deepcopy(model, memo)
    for module in plain.modules():
        for hook in list(module._forward_pre_hooks.values()):
            if isinstance(hook, prune.BasePruningMethod):
                prune.remove(module, hook._tensor_name)
        if parametrize.is_parametrized(module):
            # deepcopy shares the injected Parametrized<Module> class with the original, and removing a
            # parametrization deletes its property from that class: give the copy a class of its own first
            cls = type(module)
            own = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}
            module.__class__ = type(cls.__name__, cls.__bases__, own)
            for name in list(module.parametrizations):
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    if not masks:
        remove_masks(plain)
    return plain


__all__ = ["plain_copy"]
