"""Checkpoints: model, masks, sparsifier and optimizer state in one safetensors file, no pickle.

Tensors are stored by safetensors, masks as bits; everything else (counters, schedule,
config, optimizer hyperparameters) is JSON in the file's metadata, with a CRC-32 of every
tensor and of the JSON (:mod:`.checkpoint_format`). Writes are atomic (:mod:`.atomic`):
the bytes go to a temporary file in the same folder, are flushed to disk, then renamed
over the target, so a crash mid-write leaves the previous checkpoint intact.

:func:`load` checks the whole file first (checksums, structure, then every tensor and
field against the model, sparsifier and optimizers, :mod:`.checkpoint_checks`) and only
then changes anything; a bad checkpoint raises :class:`CheckpointError` and leaves them
as they were. The loaded masks are enforced: weights at masked positions are zero after
loading even if the file holds other values there.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from ..core.masks import apply_masks, load_masks
from .atomic import atomic_write
from .checkpoint_checks import check_model, check_optimizer, check_sparsifier
from .checkpoint_format import FORMAT, VERSION, CheckpointError, read_file, serialize

__all__ = ["FORMAT", "VERSION", "CheckpointError", "atomic_write", "load", "read", "restore", "save"]


def _densified(sparsifier):
    """The sparsifier's masked-dense view while a checkpoint is written or read (``backend="sparse"``)."""
    densified = getattr(sparsifier, "densified", None)
    return densified() if densified is not None else nullcontext()


def _optimizers(optimizer) -> list[torch.optim.Optimizer]:
    if optimizer is None:
        return []
    return list(optimizer) if isinstance(optimizer, (list, tuple)) else [optimizer]


def save(path: str | os.PathLike, model: nn.Module, sparsifier=None, *,
         optimizer: torch.optim.Optimizer | Iterable[torch.optim.Optimizer] | None = None,
         extra: dict[str, Any] | None = None) -> Path:
    """Save model (masks included), sparsifier state, optimizer state(s) and ``extra`` (JSON) to ``path``.

    With a ``Sparsifier(backend="sparse")`` the file holds the masked-dense model and optimizer state
    (:meth:`~sparsenn.Sparsifier.densified`), so it loads with either backend."""
    with _densified(sparsifier):
        data = serialize({"model": dict(model.state_dict()),
                          "sparsifier": None if sparsifier is None else sparsifier.state_dict(),
                          "optimizers": [o.state_dict() for o in _optimizers(optimizer)],
                          "extra": extra or {}})
    atomic_write(path, data)
    return Path(path)


def read(path: str | os.PathLike) -> dict[str, Any]:
    """The decoded checkpoint ``{"model", "sparsifier", "optimizers", "extra"}``, its checksums and
    structure checked (:class:`CheckpointError` otherwise); masks come back as bool tensors."""
    return read_file(path)


def restore(ckpt: dict[str, Any], model: nn.Module, sparsifier=None, *,
            optimizer: torch.optim.Optimizer | Iterable[torch.optim.Optimizer] | None = None,
            source: str | os.PathLike | None = None) -> dict[str, Any]:
    """Put a checkpoint that :func:`read` returned into ``model`` (and ``sparsifier``, ``optimizer``);
    returns its ``extra``. Everything is checked before anything changes; errors name ``source``."""
    optimizers = _optimizers(optimizer)
    with _densified(sparsifier):  # backend="sparse": read into the masked-dense layers, sparse again after
        try:
            new_masks = _check(ckpt, model, sparsifier, optimizers)
        except CheckpointError as e:
            raise CheckpointError(f"{str(source)!r}: {e}" if source is not None else str(e)) from None
        load_masks(model, new_masks)
        model.load_state_dict(ckpt["model"], strict=True)
        apply_masks(model)  # the file's weights at masked positions do not survive: masks are enforced
        if sparsifier is not None:
            sparsifier.load_state_dict(ckpt["sparsifier"])
        for opt, st in zip(optimizers, ckpt["optimizers"]):
            opt.load_state_dict(st)
    return ckpt["extra"]


def _check(ckpt: dict[str, Any], model: nn.Module, sparsifier, optimizers: list) -> dict[str, torch.Tensor]:
    """Every check of :mod:`.checkpoint_checks`; returns the masks the model does not have yet."""
    new_masks = check_model(ckpt["model"], model)
    if sparsifier is not None:
        if ckpt["sparsifier"] is None:
            raise CheckpointError("the checkpoint holds no sparsifier state")
        check_sparsifier(ckpt["sparsifier"], sparsifier)
    if len(optimizers) > len(ckpt["optimizers"]):
        raise CheckpointError(f"the checkpoint holds {len(ckpt['optimizers'])} optimizer state(s), "
                              f"{len(optimizers)} given")
    for i, (opt, st) in enumerate(zip(optimizers, ckpt["optimizers"])):
        check_optimizer(st, opt, i)
    return new_masks


def load(path: str | os.PathLike, model: nn.Module, sparsifier=None, *,
         optimizer: torch.optim.Optimizer | Iterable[torch.optim.Optimizer] | None = None) -> dict[str, Any]:
    """Restore what :func:`save` wrote into ``model`` (and ``sparsifier``, ``optimizer``); returns ``extra``.

    A model without masks gets them attached. The whole file is checked before anything is
    changed: a corrupted or foreign checkpoint, or one that does not fit, raises
    :class:`CheckpointError` (a ``ValueError``) naming the tensor or field, and the model,
    sparsifier and optimizers are left as they were. Weights at masked positions are zero
    afterwards, whatever the file holds there.
    """
    return restore(read(path), model, sparsifier, optimizer=optimizer, source=path)
