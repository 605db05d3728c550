"""The checkpoint file: one safetensors file, JSON metadata, boolean tensors as bits, a CRC-32 per tensor.

Layout (version 2). safetensors stores the tensors; its string metadata holds:

* ``format``: ``"sparsenn-checkpoint"``; ``version``: ``"2"``.
* ``tree``: JSON ``{"model", "sparsifier", "optimizers", "extra"}``, each value encoded by
  :func:`encode`: JSON scalars as themselves, lists as lists, ``{"__dict__": {...}}`` for
  a dict with string keys, ``{"__items__": [[key, value], ...]}`` for other keys (an
  optimizer's integer parameter ids), ``{"__tuple__": [...]}``, ``{"__tensor__": key}``
  for a tensor stored under ``key``, and ``{"__bits__": key, "shape": [...]}`` for a
  boolean tensor (a mask) stored as ``numpy.packbits`` of its flattened entries (uint8,
  most significant bit first, ``ceil(numel / 8)`` bytes, padding bits zero): 1 bit per
  mask entry instead of a byte.
* ``checksums``: JSON ``{"tree": crc, "tensors": {key: crc}}``, the ``zlib.crc32`` of the
  ``tree`` string (UTF-8) and of every tensor's bytes as stored. CRC-32 detects every
  single-bit flip and every burst up to 32 bits; it is a guard against corruption
  (disk, copy, truncation), not against a forger, who can recompute it.

:func:`read_file` checks the file before anything else uses it: format and version,
every checksum, every entry of the tree (well-formed, each tensor referenced exactly
once, packed bits of the right length), and raises :class:`CheckpointError` naming the
tensor or field. Version 1 files (sparsenn before checksums: masks as bool tensors, no
``checksums``) are still read, with a warning that corruption cannot be detected.
"""

from __future__ import annotations

import json
import math
import os
import warnings
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as st_save

__all__ = ["FORMAT", "SECTIONS", "VERSION", "CheckpointError", "crc32", "decode", "encode", "names_text", "read_file",
           "serialize", "short_repr"]

FORMAT = "sparsenn-checkpoint"
VERSION = 2
SECTIONS = ("model", "sparsifier", "optimizers", "extra")
_MAX_DIMS = 64  # a packed tensor's shape: more dimensions than any tensor torch can hold


class CheckpointError(ValueError):
    """A checkpoint is unreadable, corrupted, malformed, or does not fit the model, sparsifier or
    optimizer it is loaded into. The message names the file, tensor or field, and the problem."""


def short_repr(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def names_text(names: list[str], limit: int = 10) -> str:
    """``['a', 'b', ...]`` with at most ``limit`` names and a count of the rest."""
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return f"{names[:limit]}{more}"


# ----------------------------------------------------------------------------- tensors as bytes


def crc32(t: torch.Tensor) -> int:
    """CRC-32 of a tensor's bytes in memory order (the bytes safetensors writes on a little-endian host)."""
    t = t.detach().cpu().contiguous()
    return zlib.crc32(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else 0


def pack_bits(t: torch.Tensor) -> torch.Tensor:
    """A boolean tensor's entries, flattened, as ``numpy.packbits`` bytes (MSB first)."""
    return torch.from_numpy(np.packbits(t.detach().cpu().reshape(-1).numpy()))


def unpack_bits(packed: torch.Tensor, shape: Any, where: str) -> torch.Tensor:
    """The boolean tensor of ``shape`` that :func:`pack_bits` stored, after checking the lengths."""
    if (not isinstance(shape, list) or len(shape) > _MAX_DIMS
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise CheckpointError(f"{where}: the shape of packed bits must be a list of non-negative integers, "
                              f"got {short_repr(shape)}")
    n = math.prod(shape)
    if packed.dtype is not torch.uint8 or packed.dim() != 1:
        raise CheckpointError(f"{where}: packed bits must be a 1-D uint8 tensor, got {packed.dtype} "
                              f"of shape {tuple(packed.shape)}")
    if packed.numel() != (n + 7) // 8:
        raise CheckpointError(f"{where}: {packed.numel()} bytes of packed bits, but shape {tuple(shape)} "
                              f"needs {(n + 7) // 8}")
    if n % 8 and int(packed[-1]) & (0xFF >> (n % 8)):
        raise CheckpointError(f"{where}: the padding bits after the last of {n} entries are not zero")
    bits = np.unpackbits(packed.numpy(), count=n).astype(bool)
    return torch.from_numpy(bits).reshape(shape)


# ----------------------------------------------------------------------------- the tree


def encode(obj: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON-able form of ``obj``; its tensors go to ``tensors`` under keys derived from ``key``."""
    if torch.is_tensor(obj):
        t = obj.detach().cpu().contiguous()
        if t.dtype is torch.bool:
            tensors[key] = pack_bits(t)
            return {"__bits__": key, "shape": list(t.shape)}
        tensors[key] = t.clone()  # safetensors refuses tensors that share memory
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {"__dict__": {k: encode(v, f"{key}/{k}", tensors) for k, v in obj.items()}}
        return {"__items__": [[k, encode(v, f"{key}/{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [encode(v, f"{key}/{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode(v, f"{key}/{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at {key!r} in a checkpoint (no pickle)")


def _tensor(key: Any, tensors: dict[str, torch.Tensor], where: str, used: set[str]) -> torch.Tensor:
    if not isinstance(key, str) or key not in tensors:
        raise CheckpointError(f"{where}: refers to tensor {short_repr(key)}, which is not in the file")
    if key in used:
        raise CheckpointError(f"{where}: tensor {key!r} is referred to twice")
    used.add(key)
    return tensors[key]


def decode(node: Any, tensors: dict[str, torch.Tensor], where: str, used: set[str]) -> Any:
    """Inverse of :func:`encode`; every malformed entry raises :class:`CheckpointError` naming ``where``."""
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    if isinstance(node, list):
        return [decode(v, tensors, f"{where}/{i}", used) for i, v in enumerate(node)]
    if isinstance(node, dict):
        keys = set(node)
        if keys == {"__tensor__"}:
            return _tensor(node["__tensor__"], tensors, where, used)
        if keys == {"__bits__", "shape"}:
            return unpack_bits(_tensor(node["__bits__"], tensors, where, used), node["shape"], where)
        if keys == {"__dict__"} and isinstance(node["__dict__"], dict):
            return {k: decode(v, tensors, f"{where}/{k}", used) for k, v in node["__dict__"].items()}
        if keys == {"__tuple__"} and isinstance(node["__tuple__"], list):
            return tuple(decode(v, tensors, f"{where}/{i}", used) for i, v in enumerate(node["__tuple__"]))
        if keys == {"__items__"} and isinstance(node["__items__"], list):
            out: dict[Any, Any] = {}
            for pair in node["__items__"]:
                if not (isinstance(pair, list) and len(pair) == 2
                        and (pair[0] is None or isinstance(pair[0], (bool, int, float, str)))):
                    raise CheckpointError(f"{where}: malformed [key, value] pair {short_repr(pair)}")
                if pair[0] in out:
                    raise CheckpointError(f"{where}: key {pair[0]!r} appears twice")
                out[pair[0]] = decode(pair[1], tensors, f"{where}/{pair[0]}", used)
            return out
    raise CheckpointError(f"{where}: malformed entry {short_repr(node)}")


# ----------------------------------------------------------------------------- the file


def serialize(sections: dict[str, Any]) -> bytes:
    """The file's bytes for ``{"model", "sparsifier", "optimizers", "extra"}`` (plain Python values)."""
    tensors: dict[str, torch.Tensor] = {}
    tree = {"model": encode(sections["model"], "model", tensors),
            "sparsifier": None if sections["sparsifier"] is None else encode(sections["sparsifier"], "sparsifier",
                                                                              tensors),
            "optimizers": [encode(o, f"optimizer{i}", tensors) for i, o in enumerate(sections["optimizers"])],
            "extra": encode(sections["extra"], "extra", tensors)}
    tree_json = json.dumps(tree)
    sums = {"tree": zlib.crc32(tree_json.encode()), "tensors": {k: crc32(t) for k, t in tensors.items()}}
    meta = {"format": FORMAT, "version": str(VERSION), "tree": tree_json, "checksums": json.dumps(sums)}
    return st_save(tensors, metadata=meta)


def _version(meta: dict[str, str], name: str) -> int:
    v = meta.get("version")
    if not (isinstance(v, str) and v.isdigit() and len(v) <= 6) or not 1 <= int(v) <= VERSION:
        raise CheckpointError(f"{name} has checkpoint version {short_repr(v)}; this sparsenn reads versions 1 to "
                              f"{VERSION}")
    return int(v)


def _json(meta: dict[str, str], field: str, name: str) -> Any:
    if field not in meta:
        raise CheckpointError(f"{name}: metadata field {field!r} is missing")
    try:
        return json.loads(meta[field])
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{name}: metadata field {field!r} is not valid JSON ({e})") from None


def _is_crc(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**32


def _verify(meta: dict[str, str], tensors: dict[str, torch.Tensor], name: str) -> None:
    sums = _json(meta, "checksums", name)
    if not (isinstance(sums, dict) and set(sums) == {"tree", "tensors"} and _is_crc(sums["tree"])
            and isinstance(sums["tensors"], dict) and all(_is_crc(v) for v in sums["tensors"].values())):
        raise CheckpointError(f"{name}: metadata field 'checksums' is malformed: {short_repr(sums)}")
    got = zlib.crc32(meta.get("tree", "").encode())
    if got != sums["tree"]:
        raise CheckpointError(f"{name}: metadata 'tree': checksum mismatch (stored {sums['tree']:08x}, "
                              f"computed {got:08x}): the file is corrupted")
    unlisted, absent = sorted(set(tensors) - set(sums["tensors"])), sorted(set(sums["tensors"]) - set(tensors))
    if unlisted:
        raise CheckpointError(f"{name}: tensor {unlisted[0]!r} has no checksum")
    if absent:
        raise CheckpointError(f"{name}: tensor {absent[0]!r} is listed in the checksums but not in the file")
    for key, t in tensors.items():
        got = crc32(t)
        if got != sums["tensors"][key]:
            raise CheckpointError(f"{name}: tensor {key!r}: checksum mismatch (stored {sums['tensors'][key]:08x}, "
                                  f"computed {got:08x}): the file is corrupted")


def read_file(path: str | os.PathLike) -> dict[str, Any]:
    """The checked, decoded sections of the checkpoint at ``path`` (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {str(path)!r}")
    name = repr(str(path))
    try:
        with safe_open(str(path), framework="pt") as f:  # one read: metadata, then the tensors
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise CheckpointError(f"{name} is not a sparsenn checkpoint (metadata format={meta.get('format')!r})")
            version = _version(meta, name)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as e:  # truncated, or not a safetensors file at all
        raise CheckpointError(f"{name} is not a readable checkpoint ({e})") from e
    if version >= 2:
        _verify(meta, tensors, name)
    else:
        warnings.warn(f"{name} is a version 1 checkpoint, written without checksums: corruption cannot be "
                      f"detected. Save it again to add them.", UserWarning, stacklevel=3)
    tree = _json(meta, "tree", name)
    if not isinstance(tree, dict) or set(tree) != set(SECTIONS):
        raise CheckpointError(f"{name}: metadata 'tree' must have exactly the keys {', '.join(SECTIONS)}; "
                              f"got {short_repr(sorted(tree) if isinstance(tree, dict) else tree)}")
    used: set[str] = set()
    try:
        out = {s: decode(tree[s], tensors, s, used) for s in SECTIONS}
    except RecursionError:
        raise CheckpointError(f"{name}: metadata 'tree' is nested too deeply") from None
    stray = sorted(set(tensors) - used)
    if stray:
        raise CheckpointError(f"{name}: tensor {stray[0]!r} is stored but nothing in the metadata refers to it")
    expect = {"model": dict, "optimizers": list, "extra": dict}
    for section, kind in expect.items():
        if not isinstance(out[section], kind):
            raise CheckpointError(f"{name}: {section}: expected a {kind.__name__}, got {short_repr(out[section])}")
    if out["sparsifier"] is not None and not isinstance(out["sparsifier"], dict):
        raise CheckpointError(f"{name}: sparsifier: expected a dict or null, got {short_repr(out['sparsifier'])}")
    bad = [k for k, v in out["model"].items() if not torch.is_tensor(v) and not k.endswith("_extra_state")]
    if bad:
        raise CheckpointError(f"{name}: model/{bad[0]}: expected a tensor, got {short_repr(out['model'][bad[0]])}")
    return out
