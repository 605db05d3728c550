"""Checkpoints: model, masks, sparsifier and optimizer state in one safetensors file, no pickle.

Tensors are stored by safetensors; everything else (counters, schedule, config,
optimizer hyperparameters) is JSON in the file's metadata, with each tensor replaced
by a reference to its safetensors key. Writes are atomic: the bytes go to a temporary
file in the same folder, are flushed to disk, then renamed over the target, so a crash
mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors import safe_open
from safetensors.torch import save as st_save
from torch import nn

from ..core.masks import MASK_SUFFIX, load_masks

FORMAT = "sparsenn-checkpoint"
VERSION = 1


def _encode(obj: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    if torch.is_tensor(obj):
        tensors[key] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {"__dict__": {k: _encode(v, f"{key}/{k}", tensors) for k, v in obj.items()}}
        return {"__items__": [[k, _encode(v, f"{key}/{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, f"{key}/{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{key}/{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at {key!r} in a checkpoint (no pickle)")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {k: _decode(v, tensors) for k, v in obj["__dict__"].items()}
        if "__items__" in obj:
            return {k: _decode(v, tensors) for k, v in obj["__items__"]}
        if "__tuple__" in obj:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    return obj


def _optimizers(optimizer) -> list[torch.optim.Optimizer]:
    if optimizer is None:
        return []
    return list(optimizer) if isinstance(optimizer, (list, tuple)) else [optimizer]


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def save(path: str | os.PathLike, model: nn.Module, sparsifier=None, *,
         optimizer: torch.optim.Optimizer | Iterable[torch.optim.Optimizer] | None = None,
         extra: dict[str, Any] | None = None) -> Path:
    """Save model (masks included), sparsifier state, optimizer state(s) and ``extra`` (JSON) to ``path``."""
    tensors: dict[str, torch.Tensor] = {}
    tree = {
        "model": _encode(dict(model.state_dict()), "model", tensors),
        "sparsifier": None if sparsifier is None else _encode(sparsifier.state_dict(), "sparsifier", tensors),
        "optimizers": [_encode(o.state_dict(), f"optimizer{i}", tensors) for i, o in enumerate(_optimizers(optimizer))],
        "extra": _encode(extra or {}, "extra", tensors),
    }  # a plain dict of encoded entries: read() decodes each
    meta = {"format": FORMAT, "version": str(VERSION), "tree": json.dumps(tree)}
    atomic_write(path, st_save(tensors, metadata=meta))
    return Path(path)


def read(path: str | os.PathLike) -> dict[str, Any]:
    """The decoded checkpoint: ``{"model", "sparsifier", "optimizers", "extra"}``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {str(path)!r}")
    with safe_open(str(path), framework="pt") as f:  # one read: metadata, then the tensors
        meta = f.metadata() or {}
        if meta.get("format") == FORMAT:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    if meta.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r} is not a sparsenn checkpoint (metadata format={meta.get('format')!r})")
    if int(meta.get("version", 0)) > VERSION:
        raise ValueError(f"{str(path)!r} has checkpoint version {meta['version']}; this sparsenn reads <= {VERSION}")
    return {k: _decode(v, tensors) for k, v in json.loads(meta["tree"]).items()}


def load(path: str | os.PathLike, model: nn.Module, sparsifier=None, *,
         optimizer: torch.optim.Optimizer | Iterable[torch.optim.Optimizer] | None = None) -> dict[str, Any]:
    """Restore what :func:`save` wrote into ``model`` (and ``sparsifier``, ``optimizer``); returns ``extra``.

    A model without masks gets them attached first. Everything is checked before
    anything is changed.
    """
    ckpt = read(path)
    state = ckpt["model"]
    optimizers = _optimizers(optimizer)
    if sparsifier is not None and ckpt["sparsifier"] is None:
        raise ValueError(f"{str(path)!r} holds no sparsifier state")
    if len(optimizers) > len(ckpt["optimizers"]):
        raise ValueError(f"{str(path)!r} holds {len(ckpt['optimizers'])} optimizer state(s), {len(optimizers)} given")
    own = model.state_dict()
    masks = {k[: -len(MASK_SUFFIX)]: v for k, v in state.items() if k.endswith(MASK_SUFFIX) and k not in own}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own and k[: -len(MASK_SUFFIX)] not in masks]
    if missing or unexpected:
        raise ValueError(f"checkpoint does not fit the model: missing {missing}, unexpected {unexpected}")
    wrong = [f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
             if torch.is_tensor(v) and tuple(state[k].shape) != tuple(v.shape)]
    if wrong:
        raise ValueError(f"checkpoint shapes do not fit the model (checkpoint vs model): {'; '.join(wrong)}")
    load_masks(model, masks)
    model.load_state_dict(state, strict=True)
    if sparsifier is not None:
        sparsifier.load_state_dict(ckpt["sparsifier"])
    for opt, st in zip(optimizers, ckpt["optimizers"]):
        opt.load_state_dict(st)
    return ckpt["extra"]
