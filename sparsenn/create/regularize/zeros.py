"""Masks from exact zeros: sparsity created by the objective, made visible to every mask-based tool.

Proximal optimizers, sparse variational dropout and penalties followed by thresholding
leave weights that are exactly 0.0 but carry no mask. :func:`masks_from_zeros` attaches
the mask ``weight != 0`` so that :func:`sparsenn.report.layer_report`, :func:`sparsenn.sparsity`,
checkpoints, and a Sparsifier (``sn.attach_sparsifier(model)`` keeps the zeros during
further training) see them.
"""

from __future__ import annotations

import torch
from torch import nn

from ...core.masks import attach_masks
from ...core.targets import Selector, select_parameters

__all__ = ["masks_from_zeros"]


@torch.no_grad()
def masks_from_zeros(model: nn.Module, include: Selector = None, exclude: Selector = None) -> dict[str, torch.Tensor]:
    """Attach ``mask = (w != 0)`` to every selected parameter; returns ``{name: mask}``.

    ``include``/``exclude`` as in :func:`sparsenn.core.targets.select_parameters` (default:
    Linear/Conv/attention weights). A parameter that already has a mask gets the
    intersection, which is the new mask since masked weights are already zero. The
    selection is resolved first, so a bad selector leaves the model unchanged.
    """
    names = select_parameters(model, include, exclude)
    # attach_masks: a tied parameter gets its mask beside every name of it
    return attach_masks(model, {name: model.get_parameter(name) != 0 for name in names})
