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


def _owners(model: nn.Module) -> dict[int, list[tuple[str, nn.Module, str]]]:
    """``{id(parameter): [(name, module, attr), ...]}`` over every name a parameter has, in
    ``named_parameters`` order; the first name is its canonical one (the one ``named_parameters``
    reports). Tied weights (``head.weight = emb.weight``) have several."""
    out: dict[int, list[tuple[str, nn.Module, str]]] = {}
    modules = dict(model.named_modules(remove_duplicate=False))
    for name, p in model.named_parameters(remove_duplicate=False):
        module_name, attr = _split(name)
        out.setdefault(id(p), []).append((name, modules[module_name], attr))
    return out


def canonical_names(model: nn.Module) -> dict[str, str]:
    """``{every parameter name: its canonical name}``; a tied parameter's names all map to the first."""
    return {name: owners[0][0] for owners in _owners(model).values() for name, _, _ in owners}


def masked_parameters(model: nn.Module) -> list[MaskedParam]:
    """Every masked parameter of ``model``, once, under its canonical name, in ``named_parameters`` order.

    A tied parameter counts once, whichever of its modules holds the mask.
    """
    out = []
    for owners in _owners(model).values():
        holder = next(((module, attr) for _, module, attr in owners if has_mask(module, attr)), None)
        if holder is not None:
            out.append(MaskedParam(owners[0][0], *holder))
    return out


def iter_masks(model: nn.Module) -> Iterator[tuple[str, nn.Parameter, torch.Tensor]]:
    """``(name, parameter, mask)`` for every masked parameter."""
    for mp in masked_parameters(model):
        yield mp.name, mp.param, mp.mask


def get_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{parameter name: bool mask}`` (the buffers themselves, not copies)."""
    return {mp.name: mp.mask for mp in masked_parameters(model)}


@torch.no_grad()
def _enforce_loaded_masks(module: nn.Module, incompatible_keys) -> None:
    """``load_state_dict`` post-hook of every module holding a mask: zero what its masks, as loaded, mask.

    Runs for every load into the module (the whole model's or the module's own, strict or not), after
    its parameters and masks were copied, so weights that a checkpoint holds at masked positions never
    survive the load. With ``assign=True`` the loaded tensor itself becomes the buffer: it is turned
    into a boolean mask (non-zero = kept) on the parameter's device first."""
    for key, mask in list(module._buffers.items()):
        param = module._parameters.get(key[: -len(MASK_SUFFIX)]) if key.endswith(MASK_SUFFIX) else None
        if param is None or mask is None:
            continue
        if mask.dtype is not torch.bool or mask.device != param.device:
            mask = module._buffers[key] = (mask != 0).to(param.device)
        zero_masked_(param, mask)


def _hook_loads(module: nn.Module) -> None:
    if not any(h is _enforce_loaded_masks for h in module._load_state_dict_post_hooks.values()):
        module.register_load_state_dict_post_hook(_enforce_loaded_masks)


def _unhook_loads(module: nn.Module) -> None:
    """Remove the load hook once the module holds no mask (a finalized model is a plain model again)."""
    if any(has_mask(module, a) for a in module._parameters):
        return
    hooks = module._load_state_dict_post_hooks
    for key in [k for k, h in hooks.items() if h is _enforce_loaded_masks]:
        del hooks[key]


def attach_mask(
    module: nn.Module, attr: str, mask: torch.Tensor | None = None, pattern: str | None = None
) -> torch.Tensor:
    """Register (or overwrite in place) the mask of ``module.<attr>`` and zero the pruned weights.

    ``pattern`` (a pattern's name such as ``"2:4"``) is remembered for reports. The module gets a
    ``load_state_dict`` post-hook that zeroes the masked weights after every load. For a parameter
    that is tied to other modules use :func:`attach_mask_by_name`, which masks every name of it.
    """
    param = module._parameters.get(attr)
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
        module.register_buffer(attr + MASK_SUFFIX, mask.clone(memory_format=torch.contiguous_format),
                               persistent=True)
    _hook_loads(module)
    if pattern is not None:
        module.__dict__.setdefault(_PATTERNS_ATTR, {})[attr] = pattern
    buffer = module._buffers[attr + MASK_SUFFIX]
    with torch.no_grad():
        zero_masked_(param, buffer)
    return buffer


def attach_masks(model: nn.Module, masks: dict[str, torch.Tensor | None],
                 pattern: str | None = None) -> dict[str, torch.Tensor]:
    """:func:`attach_mask` for each ``{parameter name: mask}`` of ``model`` (any name of a tied parameter;
    ``None``: keep its mask, or all-True if it has none); returns ``{name: mask buffer}``.

    A tied parameter gets one mask tensor, registered as a buffer beside every name of the
    parameter (``emb.weight_mask`` and ``head.weight_mask`` are the same tensor), like the
    parameter itself: each module's ``state_dict`` carries it and each module's load hook
    enforces it, whichever name loads last.
    """
    by_name = {name: owners for owners in _owners(model).values() for name, _, _ in owners}
    unknown = [n for n in masks if n not in by_name]
    if unknown:
        raise KeyError(f"{type(model).__name__} has no parameter {unknown[0]!r}")
    out = {}
    for name, mask in masks.items():
        owners = by_name[name]
        holder = next(((m, a) for _, m, a in owners if has_mask(m, a)), owners[0][1:])
        if mask is None and has_mask(*holder):
            mask = holder[0]._buffers[holder[1] + MASK_SUFFIX]
        buffer = out[name] = attach_mask(*holder, mask, pattern)
        for _, module, attr in owners:
            if module._buffers.get(attr + MASK_SUFFIX) is not buffer:
                module._buffers.pop(attr + MASK_SUFFIX, None)
                module.register_buffer(attr + MASK_SUFFIX, buffer, persistent=True)
                _hook_loads(module)
                if pattern is not None:
                    module.__dict__.setdefault(_PATTERNS_ATTR, {})[attr] = pattern
    return out


def attach_mask_by_name(model: nn.Module, name: str, mask: torch.Tensor | None = None,
                        pattern: str | None = None) -> torch.Tensor:
    """:func:`attach_masks` for one parameter: its mask buffer."""
    return attach_masks(model, {name: mask}, pattern)[name]


@torch.no_grad()
def apply_masks(model: nn.Module) -> None:
    """Write exact zeros at every masked position (idempotent)."""
    for mp in masked_parameters(model):
        zero_masked_(mp.param, mp.mask)


@torch.no_grad()
def remove_masks(model: nn.Module, names: Iterable[str] | None = None) -> list[str]:
    """Zero the pruned weights, then delete the mask buffers (all, or those of ``names``, any name of a
    tied parameter) and their load hooks.

    Returns the canonical names unmasked.
    """
    canonical = canonical_names(model)
    wanted = None if names is None else {canonical.get(n, n) for n in names}
    removed = []
    for owners in _owners(model).values():
        name = owners[0][0]
        holders = [(m, a) for _, m, a in owners if has_mask(m, a)]
        if not holders or (wanted is not None and name not in wanted):
            continue
        module, attr = holders[0]
        zero_masked_(module._parameters[attr], module._buffers[attr + MASK_SUFFIX])
        for module, attr in holders:
            del module._buffers[attr + MASK_SUFFIX]
            module.__dict__.get(_PATTERNS_ATTR, {}).pop(attr, None)
            _unhook_loads(module)
        removed.append(name)
    return removed


def masks_in_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The masks a ``state_dict`` carries for ``model``'s parameters: ``{parameter name: mask}`` for every
    ``<parameter name>_mask`` key (other ``*_mask`` keys are ordinary buffers and are left out).

    A model without masks does not know mask keys (``load_state_dict`` calls them unexpected):
    ``load_masks(model, masks_in_state_dict(model, sd))`` first, then ``model.load_state_dict(sd)``.
    """
    canonical = canonical_names(model)
    return {k[: -len(MASK_SUFFIX)]: v for k, v in state_dict.items()
            if k.endswith(MASK_SUFFIX) and k[: -len(MASK_SUFFIX)] in canonical}


def load_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Attach ``{parameter name: mask}`` to ``model`` (checked first, so a bad entry changes nothing).

    Any name of a tied parameter may be used; several names of one parameter must carry equal masks.
    """
    params = dict(model.named_parameters(remove_duplicate=False))
    canonical = canonical_names(model)
    chosen: dict[str, tuple[str, torch.Tensor]] = {}
    for name, mask in masks.items():
        if name not in params:
            raise KeyError(f"mask for unknown parameter {name!r}")
        if not torch.is_tensor(mask):
            raise TypeError(f"mask for {name!r} must be a tensor, got {type(mask).__name__}")
        if tuple(mask.shape) != tuple(params[name].shape):
            raise ValueError(
                f"mask for {name!r} has shape {tuple(mask.shape)}, parameter has {tuple(params[name].shape)}"
            )
        first = chosen.setdefault(canonical[name], (name, mask))
        if first[1] is not mask and not torch.equal(first[1].to(torch.bool).cpu(), mask.to(torch.bool).cpu()):
            raise ValueError(f"{first[0]!r} and {name!r} are one tied parameter but their masks differ")
    attach_masks(model, {name: mask for name, (_, mask) in chosen.items()})
