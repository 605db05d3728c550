"""Masks: boolean buffers beside the parameters they mask.

A mask for ``module.<attr>`` is the persistent boolean buffer ``module.<attr>_mask``
(``True`` = kept), the naming of ``torch.nn.utils.prune``. The parameter itself is
left in place, untouched in name and type, and holds exact zeros wherever its mask
is ``False``: zeros are written when a mask is set, after every step of a masked
optimizer, and by :func:`apply_masks`. So the forward pass costs what the dense
model costs, ``copy.deepcopy``, ``torch.compile`` and ``state_dict`` need nothing
special, and the dense gradient at pruned positions stays available to methods that
need it (RigL). :func:`remove_masks` ("finalize") drops the buffers and leaves
plain parameters with exact zeros.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
from torch import nn

from .zeroing import zero_masked, zero_masked_  # noqa: F401  (re-exported)

MASK_SUFFIX = "_mask"
_PATTERNS_ATTR = "_sparsenn_patterns"  # plain module attribute {attr: pattern name}, for reports


@dataclass(frozen=True)
class MaskedParam:
    """One masked parameter: ``name`` is its fully-qualified name (``"fc1.weight"``)."""

    name: str
    module: nn.Module
    attr: str

    # Read on every training step by the masked-optimizer and gradient hooks: look in the module's
    # dicts first (``nn.Module.__getattr__`` costs about a microsecond a call), getattr otherwise.
    @property
    def param(self) -> nn.Parameter:
        p = self.module._parameters.get(self.attr)
        return p if p is not None else getattr(self.module, self.attr)

    @property
    def mask(self) -> torch.Tensor:
        m = self.module._buffers.get(self.attr + MASK_SUFFIX)
        return m if m is not None else getattr(self.module, self.attr + MASK_SUFFIX)


def snapshot(*tensors: torch.Tensor) -> tuple[tuple[weakref.ref, int], ...]:
    """Identity and version counter of each tensor, for :func:`unchanged_since` (the gradient hook and
    the optimizer pre-hook use it to skip zeroing a gradient twice)."""
    return tuple((weakref.ref(t), t._version) for t in tensors)


def unchanged_since(snap: tuple[tuple[weakref.ref, int], ...], *tensors: torch.Tensor) -> bool:
    """True if ``tensors`` are the very tensors :func:`snapshot` saw, none written since by a torch
    operation: every in-place operation bumps ``_version``, a replaced tensor fails the identity test.
    Writes through ``.data`` or NumPy are not seen: never rest the masked-weights guarantee on this."""
    return len(snap) == len(tensors) and all(ref() is t and t._version == version
                                             for t, (ref, version) in zip(tensors, snap))


def _split(name: str) -> tuple[str, str]:
    module_name, _, attr = name.rpartition(".")
    return module_name, attr


def has_mask(module: nn.Module, attr: str) -> bool:
    return isinstance(module._buffers.get(attr + MASK_SUFFIX), torch.Tensor)


def get_pattern(module: nn.Module, attr: str) -> str:
    """The pattern name recorded when the mask was set (``"unstructured"`` if none)."""
    return module.__dict__.get(_PATTERNS_ATTR, {}).get(attr, "unstructured")


def masked_parameters(model: nn.Module) -> list[MaskedParam]:
    """Every masked parameter of ``model``, in ``named_parameters`` order."""
    out = []
    for name, _ in model.named_parameters():
        module_name, attr = _split(name)
        module = model.get_submodule(module_name)
        if has_mask(module, attr):
            out.append(MaskedParam(name, module, attr))
    return out


def iter_masks(model: nn.Module) -> Iterator[tuple[str, nn.Parameter, torch.Tensor]]:
    """``(name, parameter, mask)`` for every masked parameter."""
    for mp in masked_parameters(model):
        yield mp.name, mp.param, mp.mask


def get_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{parameter name: bool mask}`` (the buffers themselves, not copies)."""
    return {mp.name: mp.mask for mp in masked_parameters(model)}


def attach_mask(
    module: nn.Module, attr: str, mask: torch.Tensor | None = None, pattern: str | None = None
) -> torch.Tensor:
    """Register (or overwrite in place) the mask of ``module.<attr>`` and zero the pruned weights.

    ``pattern`` (a pattern's name such as ``"2:4"``) is remembered for reports.
    """
    param = getattr(module, attr, None)
    if not isinstance(param, nn.Parameter):
        raise ValueError(f"{type(module).__name__} has no parameter {attr!r}")
    if mask is None:
        mask = torch.ones_like(param, dtype=torch.bool)
    if mask.shape != param.shape:
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} does not match parameter {attr!r} of shape {tuple(param.shape)}"
        )
    mask = mask.to(device=param.device, dtype=torch.bool)
    if has_mask(module, attr):
        getattr(module, attr + MASK_SUFFIX).copy_(mask)
    else:
        module.register_buffer(attr + MASK_SUFFIX, mask.clone(), persistent=True)
    if pattern is not None:
        module.__dict__.setdefault(_PATTERNS_ATTR, {})[attr] = pattern
    with torch.no_grad():
        param.masked_fill_(~getattr(module, attr + MASK_SUFFIX), 0)
    return getattr(module, attr + MASK_SUFFIX)


@torch.no_grad()
def apply_masks(model: nn.Module) -> None:
    """Write exact zeros at every masked position (idempotent)."""
    for mp in masked_parameters(model):
        zero_masked_(mp.param, mp.mask)


@torch.no_grad()
def remove_masks(model: nn.Module, names: Iterable[str] | None = None) -> list[str]:
    """Zero the pruned weights, then delete the mask buffers (all, or those of ``names``).

    Returns the names unmasked.
    """
    wanted = None if names is None else set(names)
    names = []
    for mp in masked_parameters(model):
        if wanted is not None and mp.name not in wanted:
            continue
        mp.param.masked_fill_(~mp.mask, 0)
        del mp.module._buffers[mp.attr + MASK_SUFFIX]
        mp.module.__dict__.get(_PATTERNS_ATTR, {}).pop(mp.attr, None)
        names.append(mp.name)
    return names


def load_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Attach ``{parameter name: mask}`` to ``model`` (checked first, so a bad entry changes nothing)."""
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        if name not in params:
            raise KeyError(f"mask for unknown parameter {name!r}")
        if tuple(mask.shape) != tuple(params[name].shape):
            raise ValueError(
                f"mask for {name!r} has shape {tuple(mask.shape)}, parameter has {tuple(params[name].shape)}"
            )
    for name, mask in masks.items():
        module_name, attr = _split(name)
        attach_mask(model.get_submodule(module_name), attr, mask)
