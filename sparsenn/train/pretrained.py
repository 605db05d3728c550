"""Masked models in the ``save_pretrained`` / ``from_pretrained`` world (Hugging Face ``transformers``).

A masked model's ``state_dict`` holds a ``<param>_mask`` buffer beside every masked weight.
``model.save_pretrained(dir)`` writes them into ``model.safetensors``, and
``from_pretrained(dir)`` then reports each as an unexpected key (the class has no such
buffer) and drops it. Two clean paths:

* ``sp.finalize()`` first: plain parameters with exact zeros, the dense model's keys;
* :func:`save_pretrained` / :func:`from_pretrained` here: the weights (exact zeros at
  masked positions) go to ``model.save_pretrained`` without the masks, and the masks go
  beside them to ``sparsenn_masks.safetensors`` (:func:`save_masks`), re-attached after
  loading (:func:`load_masks`); ``sn.attach_sparsifier(model)`` then resumes training
  sparse.

Nothing here imports ``transformers``: the model's own ``save_pretrained`` and the class's
``from_pretrained`` are called, so any library with that convention works.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as st_save
from torch import nn

from ..core.masks import MASK_SUFFIX, apply_masks, attach_mask, get_pattern, masked_parameters
from .checkpoint import atomic_write

__all__ = ["MASKS_FILE", "MaskFileError", "dense_state_dict", "from_pretrained", "load_masks", "save_masks",
           "save_pretrained"]

MASKS_FILE = "sparsenn_masks.safetensors"
FORMAT = "sparsenn-masks"
VERSION = 1


class MaskFileError(ValueError):
    """A masks file is not one :func:`save_masks` wrote, or does not fit the model."""


def _mask_keys(model: nn.Module) -> set[str]:
    """State-dict keys of mask buffers: ``<prefix><attr>_mask`` where ``<attr>`` is a parameter of the same
    module (every path to the module, so a module reachable twice loses both keys)."""
    keys = set()
    for module_name, module in model.named_modules(remove_duplicate=False):
        prefix = f"{module_name}." if module_name else ""
        for buf in module._buffers:
            if buf.endswith(MASK_SUFFIX) and buf[: -len(MASK_SUFFIX)] in module._parameters:
                keys.add(prefix + buf)
    return keys


def dense_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` without the mask buffers: the keys of the unmasked model.

    The masked weights hold exact zeros (written again first by :func:`~sparsenn.core.masks.apply_masks`,
    a no-op while the masks are enforced); the tensors are the model's own, not copies.
    """
    apply_masks(model)
    drop = _mask_keys(model)
    return {k: v for k, v in model.state_dict().items() if k not in drop}


def save_masks(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write ``{parameter name: bool mask}`` and each mask's pattern to a safetensors file (atomic)."""
    tensors, patterns = {}, {}
    for mp in masked_parameters(model):
        tensors[mp.name] = mp.mask.detach().to("cpu", torch.bool).contiguous()
        patterns[mp.name] = get_pattern(mp.module, mp.attr)
    meta = {"format": FORMAT, "version": str(VERSION), "patterns": json.dumps(patterns)}
    atomic_write(path, st_save(tensors, metadata=meta))
    return Path(path)


def load_masks(model: nn.Module, path: str | os.PathLike) -> list[str]:
    """Attach the masks of a :func:`save_masks` file to ``model``; returns the parameter names.

    Everything is checked against the file's header before a tensor is read, and every mask
    before one is attached: a file that does not fit (unknown parameter, other shape, not
    boolean, not a masks file) raises :class:`MaskFileError` and leaves the model unchanged.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no masks file at {str(path)!r}")
    params = dict(model.named_parameters())
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise MaskFileError(f"{str(path)!r} is not a sparsenn masks file (metadata format="
                                    f"{meta.get('format')!r}, expected {FORMAT!r})")
            if not str(meta.get("version", "")).isdigit() or int(meta["version"]) > VERSION:
                raise MaskFileError(f"{str(path)!r} has masks-file version {meta.get('version')!r}; "
                                    f"this sparsenn reads 1 to {VERSION}")
            problems = []
            for key in f.keys():
                if key not in params:
                    problems.append(f"{key!r} is not a parameter of {type(model).__name__}")
                    continue
                piece = f.get_slice(key)
                shape, dtype = tuple(piece.get_shape()), piece.get_dtype()
                if shape != tuple(params[key].shape) or dtype != "BOOL":
                    problems.append(f"{key!r} is {dtype} {shape}, the parameter is {tuple(params[key].shape)} "
                                    "(a mask must be BOOL of the parameter's shape)")
            if problems:
                raise MaskFileError(f"masks file {str(path)!r} does not fit the model: {'; '.join(problems)}")
            patterns = json.loads(meta.get("patterns", "{}"))
            masks = {k: f.get_tensor(k) for k in f.keys()}
    except MaskFileError:
        raise
    except Exception as e:  # a corrupt header or truncated data, from safetensors or json
        raise MaskFileError(f"cannot read masks file {str(path)!r}: {e}") from e
    if not isinstance(patterns, dict) or not all(isinstance(v, str) for v in patterns.values()):
        raise MaskFileError(f"masks file {str(path)!r} has malformed pattern metadata")
    for name, mask in masks.items():  # checked above: each is a parameter's name, shape and BOOL
        module_name, _, attr = name.rpartition(".")
        attach_mask(model.get_submodule(module_name), attr, mask, pattern=patterns.get(name))
    return list(masks)


def save_pretrained(model: nn.Module, directory: str | os.PathLike, *, masks: bool = True,
                    **kwargs: Any) -> Path:
    """``model.save_pretrained(directory, **kwargs)`` without mask buffers, masks beside it.

    The weights, with exact zeros at masked positions, are written by the model's own
    ``save_pretrained`` (``state_dict=`` :func:`dense_state_dict`), so ``Class.from_pretrained``
    loads them with no unexpected keys. ``masks=True`` also writes ``sparsenn_masks.safetensors``
    (:func:`save_masks`) into ``directory``; otherwise, or for a model without masks, a masks
    file left there by an earlier save is removed, so it cannot be re-attached to other weights.
    """
    if not callable(getattr(model, "save_pretrained", None)):
        raise TypeError(f"{type(model).__name__} has no save_pretrained method (a transformers PreTrainedModel "
                        "has one); for any other model use sn.save or torch.save(dense_state_dict(model))")
    if "state_dict" in kwargs:
        raise TypeError("save_pretrained writes dense_state_dict(model) itself; do not pass state_dict=")
    directory = Path(directory)
    model.save_pretrained(directory, state_dict=dense_state_dict(model), **kwargs)
    target = directory / MASKS_FILE
    if masks and masked_parameters(model):
        save_masks(model, target)
    elif target.exists():
        target.unlink()
    return directory


def from_pretrained(cls: Any, directory: str | os.PathLike, *, masks: bool = True, **kwargs: Any) -> Any:
    """``cls.from_pretrained(directory, **kwargs)``, then the masks of ``directory/sparsenn_masks.safetensors``
    re-attached if the file is there and ``masks`` (:func:`load_masks`). Returns what ``from_pretrained`` returns
    (``(model, info)`` with ``output_loading_info=True``)."""
    if not callable(getattr(cls, "from_pretrained", None)):
        raise TypeError(f"{getattr(cls, '__name__', cls)!r} has no from_pretrained method")
    loaded = cls.from_pretrained(directory, **kwargs)
    model = loaded[0] if isinstance(loaded, tuple) else loaded
    target = Path(directory) / MASKS_FILE
    if masks and target.is_file():
        load_masks(model, target)
    return loaded
