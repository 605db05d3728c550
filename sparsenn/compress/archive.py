"""The sparse archive: a model's tensors in per-tensor codecs plus a JSON manifest; no pickle anywhere.

``save(path, model)`` writes, ``load(path, model=None)`` reads back (into the given model,
or a model rebuilt from the manifest). Two layouts, the same content:

- **one file** (any path not ending in ``/`` that is not a folder; ``.sparsenn`` by
  convention): a safetensors file whose ``__metadata__`` is ``{"format":
  "sparsenn-archive", "manifest": <JSON>}``;
- **a folder** (an existing folder, or a path ending in ``/``): ``manifest.json`` and
  ``tensors.safetensors`` (metadata ``{"format": "sparsenn-archive"}``); the manifest names the
  payload file in ``"payload"``. The payload is written first and the manifest last, each
  atomically; the digest binds them.

Each tensor of the ``state_dict`` is stored by a codec (:mod:`.codecs`) as arrays named
``<key>/<array>`` (``fc1.weight/mask``, ``fc1.weight/values``): any safetensors reader sees
them. The manifest (``schema_version`` 1) holds: ``format``, ``schema_version``,
``sparsenn_version``; ``model`` (:func:`.manifest.describe`: the module tree and how to
rebuild it); ``tensors`` ``{key: {codec, dtype, shape, meta, arrays}}``; ``aliases``
``{key: key}`` (one tensor under several names: tied weights, stored once); ``masks``
``{mask key: weight key}`` for masks (``<attr>_mask`` buffers) equal to their weight's
nonzero pattern, stored as no bytes at all (other masks are tensors, codec ``bits``);
``bytes`` ``{stored, dense}``; and ``sha256`` over the rest of the manifest and every array's
name, dtype, shape and bytes (corruption, not forgery: the checks stand against forgers).

:func:`load` trusts nothing in a file: the file's size (``max_bytes``), the safetensors
header (:func:`sparsenn.backend.runtime.header.read_header`: every declared span inside the
file) before any array is read; the manifest as JSON (depth, duplicate keys, types, known
keys, ``schema_version``); payload names (no path, no ``..``, no symlink out of the folder);
every array referenced exactly once with its dtype; the digest; the decoded bytes
(``max_bytes`` again) before decoding; each codec's arrays and indices before it allocates;
then the tensors against the model's ``state_dict`` (names, shapes, dtypes). Only then does
the model change. Every problem raises :class:`~sparsenn.backend.runtime.errors.ArchiveError`
(a ValueError) naming the tensor and the problem, and the model is left as it was.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import save as st_save
from torch import nn

from .._version import __version__
from ..backend.runtime.errors import ArchiveError
from ..backend.runtime.header import (
    MAX_DIMS,
    MAX_HEADER,
    TensorEntry,
    check_max_bytes,
    read_header,
)
from ..core.masks import MASK_SUFFIX, canonical_names, load_masks
from ..core.registry import UnknownNameError
from ..train.atomic import atomic_write
from . import manifest as mf
from .codecs import (
    DTYPES,
    choose,
    dtype_name,
    get_codec,
    list_codecs,
    nonzero,
)
from .paths import file_in_folder

MAX_BYTES = 4 << 30  # load's default cap on the file and on the decoded tensors
MANIFEST_FILE = "manifest.json"
PAYLOAD_FILE = "tensors.safetensors"
KEYS = ("format", "schema_version", "sparsenn_version", "model", "tensors", "aliases", "masks", "bytes", "sha256")
ENTRY_KEYS = {"codec", "dtype", "shape", "meta", "arrays"}
_ARRAY_NAME = re.compile(r"[A-Za-z0-9_]{1,64}")
#: safetensors dtype -> numpy dtype of the array read (BF16 / F8 as raw bits)
_NUMPY = {"BOOL": np.bool_, "U8": np.uint8, "I8": np.int8, "I16": np.int16, "U16": np.uint16, "F16": np.float16,
          "BF16": np.uint16, "I32": np.int32, "U32": np.uint32, "F32": np.float32, "I64": np.int64, "U64": np.uint64,
          "F64": np.float64, "F8_E5M2": np.uint8, "F8_E4M3": np.uint8}


# ------------------------------------------------------------------ digest


def digest(manifest: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> str:
    """SHA-256 (hex) of the manifest without ``sha256`` (canonical JSON) and every array's name, dtype, shape, bytes."""
    h = hashlib.sha256()

    def put(b: bytes | memoryview) -> None:
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)

    body = {k: v for k, v in manifest.items() if k != "sha256"}
    put(json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode())
    for k in sorted(arrays):
        a = np.ascontiguousarray(arrays[k])
        put(k.encode())
        put(f"{a.dtype.str}{list(a.shape)}".encode())
        put(memoryview(a.reshape(-1).view(np.uint8)) if a.size else b"")
    return h.hexdigest()


# ------------------------------------------------------------------ save


def _is_folder(path: str | os.PathLike) -> bool:
    return Path(path).is_dir() or str(path).endswith(("/", os.sep))


def _codec_plan(codec: Any, keys: list[str]) -> tuple[str | None, dict[str, tuple[str, dict[str, Any]]]]:
    """``(global codec or None for auto, {key: (codec, options)})`` from save's ``codec`` argument."""
    if isinstance(codec, str):
        if codec == "auto":
            return None, {}
        get_codec(codec)  # UnknownNameError (a ValueError) lists the valid names
        return codec, {}
    if not isinstance(codec, Mapping):
        raise TypeError(f"codec must be 'auto', a codec name ({', '.join(list_codecs())}) or a dict "
                        f"{{tensor name: codec or (codec, options)}}, got {type(codec).__name__}")
    plan = {}
    for key, spec in codec.items():
        if key not in keys:
            raise ValueError(f"codec names {key!r}, which is not a tensor of the model's state_dict "
                             f"(e.g. {', '.join(keys[:5])})")
        name, options = (spec, {}) if isinstance(spec, str) else tuple(spec)
        get_codec(name)
        if not isinstance(options, Mapping):
            raise TypeError(f"options of codec {name!r} for {key!r} must be a dict, got {type(options).__name__}")
        plan[key] = (name, dict(options))
    return None, plan


def _aliases(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """``{key: first key}`` for tensors that are views of the same memory as an earlier key (tied weights)."""
    first: dict[tuple, str] = {}
    out = {}
    for k, t in state.items():
        if not t.numel():
            continue
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if ident in first:
            out[k] = first[ident]
        else:
            first[ident] = k
    return out


def _mask_keys(model: nn.Module, state: dict[str, torch.Tensor]) -> set[str]:
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    return {k for k, t in state.items()
            if k.endswith(MASK_SUFFIX) and k[: -len(MASK_SUFFIX)] in params and t.dtype == torch.bool}


def _encode(key: str, t: torch.Tensor, name: str, options: dict[str, Any]) -> tuple[dict, dict, torch.Tensor | None]:
    """``(arrays, meta, decoded)``; ``decoded`` is the lossy codec's result (``None`` for exact codecs)."""
    spec = get_codec(name)
    what = f"codec {name!r} cannot store {key!r} (shape {list(t.shape)}, {t.dtype})"
    problem = None if options else spec.fits(t)  # with options, encode says what does not fit
    if problem:
        raise ValueError(f"{what}: {problem}")
    try:
        arrays, meta = spec.encode(t, **options)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{what}: {e}") from None
    decoded = None if spec.exact else spec.decode(arrays, meta, tuple(t.shape), dtype_name(t.dtype))
    return arrays, meta, decoded


def save(path: str | os.PathLike, model: nn.Module, *, codec: Any = "auto", min_sparsity: float = 0.0) -> Path:
    """Write ``model``'s ``state_dict`` (masks included) and manifest to ``path`` (one file, or a folder if
    ``path`` is a folder or ends in ``/``); returns the path written (the file, or the folder).

    ``codec``: ``"auto"`` (per tensor, the exact codec with the fewest bytes: ``bitmask`` for sparse
    tensors, ``nm`` where an N:M pattern holds and is smaller, ``dense`` otherwise); a codec name
    (``"bitmask_int8"``, ``"deep"``, ...), used for every tensor it can hold and ``"auto"`` for the rest;
    or ``{tensor name: codec or (codec, options)}`` for some tensors (``{"fc1.weight": ("nm", {"n": 2,
    "m": 4})}``), ``"auto"`` for the rest. Lossy codecs are only used when asked for.
    ``min_sparsity``: ``"auto"`` stores tensors with fewer zeros than this dense.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(min_sparsity, bool) or not isinstance(min_sparsity, (int, float)) or not 0 <= min_sparsity <= 1:
        raise ValueError(f"min_sparsity must be a number in [0, 1], got {min_sparsity!r}")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    for k, t in state.items():
        if t.layout != torch.strided:
            raise TypeError(f"tensor {k!r} has layout {t.layout}; the archive stores dense (strided) tensors")
        dtype_name(t.dtype)
    everywhere, plan = _codec_plan(codec, list(state))
    aliases = _aliases(state)
    mask_keys = _mask_keys(model, state)
    tensors: dict[str, Any] = {}
    arrays: dict[str, np.ndarray] = {}
    decoded: dict[str, torch.Tensor] = {}  # lossy tensors as load will see them
    for k, t in state.items():
        if k in aliases or k in mask_keys:
            continue
        if k in plan:
            name, options = plan[k]
        elif everywhere is not None and get_codec(everywhere).fits(t) is None:
            name, options = everywhere, {}
        else:
            name, options = choose(t, min_sparsity)
        out, meta, lossy = _encode(k, t, name, options)
        if lossy is not None:
            decoded[k] = lossy
        tensors[k] = {"codec": name, "dtype": dtype_name(t.dtype), "shape": list(t.shape), "meta": meta,
                      "arrays": sorted(out)}
        arrays.update({f"{k}/{a}": np.ascontiguousarray(v) for a, v in out.items()})
    masks = {}
    for k in sorted(mask_keys - set(aliases)):
        weight = k[: -len(MASK_SUFFIX)]
        source = aliases.get(weight, weight)
        w = decoded.get(source, state[weight])
        if source in tensors and torch.equal(torch.from_numpy(nonzero(w)), state[k]):
            masks[k] = weight
            continue
        out, meta, _ = _encode(k, state[k], "bits", {})
        tensors[k] = {"codec": "bits", "dtype": "bool", "shape": list(state[k].shape), "meta": meta,
                      "arrays": sorted(out)}
        arrays.update({f"{k}/{a}": v for a, v in out.items()})
    folder = _is_folder(path)
    manifest: dict[str, Any] = {
        "format": mf.FORMAT, "schema_version": mf.SCHEMA_VERSION, "sparsenn_version": __version__,
        "model": mf.describe(model), "tensors": tensors, "aliases": aliases, "masks": masks,
        "bytes": {"stored": sum(a.nbytes for a in arrays.values()),
                  "dense": sum(t.numel() * t.element_size() for t in state.values())},
    }
    if folder:
        manifest["payload"] = PAYLOAD_FILE
    manifest["sha256"] = digest(manifest, arrays)
    text = json.dumps(manifest, allow_nan=False, separators=(",", ":"))
    if folder:
        atomic_write(Path(path) / PAYLOAD_FILE, st_save(arrays, metadata={"format": mf.FORMAT}))
        atomic_write(Path(path) / MANIFEST_FILE, text.encode())
    else:
        atomic_write(path, st_save(arrays, metadata={"format": mf.FORMAT, "manifest": text}))
    return Path(path)


# ------------------------------------------------------------------ reading and checking


@dataclass
class Contents:
    """What :func:`read` found: the checked manifest and the decoded ``state_dict`` (masks included)."""

    manifest: dict[str, Any]
    state: dict[str, torch.Tensor]


def _locate(path: Path, max_bytes: int | None) -> tuple[str, dict[str, Any], Path, dict[str, TensorEntry], int]:
    """``(where, manifest JSON, payload path, header entries, bytes of the manifest file)``."""
    where = repr(str(path))
    if path.is_dir():
        manifest_path = file_in_folder(where, path, MANIFEST_FILE, "the manifest")
        size = os.path.getsize(manifest_path)
        limit = MAX_HEADER if max_bytes is None else min(MAX_HEADER, max_bytes)
        if size > limit:
            raise ArchiveError(f"{where}: {MANIFEST_FILE} is {size} bytes, more than {limit} "
                               "(max_bytes, or the 100 MB limit of a manifest)")
        with open(manifest_path, "rb") as f:
            raw = f.read(limit + 1)
        manifest = mf.parse_json(raw, where)
        _check_version(where, manifest)
        payload = file_in_folder(where, path, manifest.get("payload") if isinstance(manifest, dict) else None,
                          "the payload")
        entries, meta = read_header(payload, None if max_bytes is None else max(0, max_bytes - len(raw)))
        if meta != {"format": mf.FORMAT}:
            raise ArchiveError(f"{where}: {payload.name} has metadata {sorted(meta)}, expected only format")
        return where, manifest, payload, entries, len(raw)
    if not path.is_file():
        raise FileNotFoundError(f"no sparse archive at {str(path)!r}")
    entries, meta = read_header(path, max_bytes)
    if meta.get("format") != mf.FORMAT or set(meta) != {"format", "manifest"}:
        raise ArchiveError(f"{where} is not a sparsenn archive (its safetensors metadata has format="
                           f"{meta.get('format')!r} and keys {sorted(meta)}; expected format={mf.FORMAT!r} "
                           "and a manifest)")
    manifest = mf.parse_json(meta["manifest"], where)
    _check_version(where, manifest)
    return where, manifest, path, entries, 0


def _check_version(where: str, manifest: Any) -> None:
    mf.require(where, manifest, dict, "the manifest")
    if manifest.get("format") != mf.FORMAT:
        raise ArchiveError(f"{where}: the manifest's format is {manifest.get('format')!r}, not {mf.FORMAT!r}")
    version = mf.require(where, manifest.get("schema_version"), int, "'schema_version'")
    if version > mf.SCHEMA_VERSION:
        raise ArchiveError(f"{where} has schema_version {version}, written by a newer sparsenn; this sparsenn "
                           f"({__version__}) reads schema_version <= {mf.SCHEMA_VERSION}: upgrade sparsenn")
    if version < 1:
        raise ArchiveError(f"{where}: schema_version must be a positive integer, got {version}")


def _check_entry(where: str, key: str, e: Any) -> dict[str, Any]:
    what = f"tensor {key!r}"
    e = mf.require(where, e, dict, what)
    if set(e) != ENTRY_KEYS:
        raise ArchiveError(f"{where}: {what} must hold exactly {sorted(ENTRY_KEYS)}, got {sorted(e)}")
    codec = mf.require(where, e["codec"], str, f"{what}: codec")
    try:
        get_codec(codec)
    except UnknownNameError:
        raise ArchiveError(f"{where}: {what}: unknown codec {codec!r}; this sparsenn knows "
                           f"{', '.join(list_codecs())}") from None
    if not isinstance(e["dtype"], str) or e["dtype"] not in DTYPES:
        raise ArchiveError(f"{where}: {what}: unknown dtype {e['dtype']!r}; known: {', '.join(DTYPES)}")
    shape = mf.require(where, e["shape"], list, f"{what}: shape")
    if len(shape) > MAX_DIMS or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
        raise ArchiveError(f"{where}: {what}: shape must be at most {MAX_DIMS} non-negative integers, "
                           f"got {mf._short(shape)}")
    mf.require(where, e["meta"], dict, f"{what}: meta")
    names = mf.require(where, e["arrays"], list, f"{what}: arrays")
    if len(set(map(str, names))) != len(names) or not all(isinstance(a, str) and _ARRAY_NAME.fullmatch(a)
                                                          for a in names):
        raise ArchiveError(f"{where}: {what}: arrays must be distinct names of letters, digits and '_', "
                           f"got {mf._short(names)}")
    return e


def _check_manifest(where: str, manifest: dict[str, Any], folder: bool) -> None:
    keys = set(KEYS) | ({"payload"} if folder else set())
    if set(manifest) != keys:
        raise ArchiveError(f"{where}: the manifest must hold exactly {sorted(keys)}; "
                           f"missing {sorted(keys - set(manifest))}, unknown {sorted(set(manifest) - keys)}")
    mf.require(where, manifest["sparsenn_version"], str, "'sparsenn_version'")
    mf.require(where, manifest["sha256"], str, "'sha256'")
    mf.check_model(where, manifest["model"])
    tensors = mf.require(where, manifest["tensors"], dict, "'tensors'")
    for key, e in tensors.items():
        _check_entry(where, key, e)
    aliases = mf.require(where, manifest["aliases"], dict, "'aliases'")
    for k, v in aliases.items():
        if k in tensors or not isinstance(v, str) or v not in tensors:
            raise ArchiveError(f"{where}: alias {k!r} -> {mf._short(v)} must name a stored tensor, and not be one")
    masks = mf.require(where, manifest["masks"], dict, "'masks'")
    for k, v in masks.items():
        if (k in tensors or k in aliases or not isinstance(v, str) or k != v + MASK_SUFFIX
                or (v not in tensors and v not in aliases)):
            raise ArchiveError(f"{where}: mask {k!r} -> {mf._short(v)} must be '<weight>{MASK_SUFFIX}' for a "
                               "stored weight, and not itself stored")
    total = mf.require(where, manifest["bytes"], dict, "'bytes'")
    if set(total) != {"stored", "dense"} or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                                    for v in total.values()):
        raise ArchiveError(f"{where}: 'bytes' must be {{stored, dense}}, non-negative integers, got {mf._short(total)}")


def _read_arrays(where: str, manifest: dict[str, Any], payload: Path, entries: dict[str, TensorEntry]
                 ) -> dict[str, np.ndarray]:
    """Every array the manifest refers to, each exactly once, read within its checked span."""
    wanted = {f"{k}/{a}" for k, e in manifest["tensors"].items() for a in e["arrays"]}
    missing, extra = sorted(wanted - set(entries)), sorted(set(entries) - wanted)
    if missing or extra:
        raise ArchiveError(f"{where}: the payload does not match the manifest: missing arrays {missing[:5]}, "
                           f"arrays nothing refers to {extra[:5]}")
    stored = sum(e.end - e.begin for e in entries.values())
    if stored != manifest["bytes"]["stored"]:
        raise ArchiveError(f"{where}: the payload holds {stored} bytes of arrays, the manifest says "
                           f"{manifest['bytes']['stored']}")
    out = {}
    with open(payload, "rb") as f:
        start = 8 + int.from_bytes(f.read(8), "little")
        for name, e in sorted(entries.items(), key=lambda kv: kv[1].begin):
            f.seek(start + e.begin)
            raw = bytearray(e.end - e.begin)  # writable: a codec may hand the arrays to compiled code
            if f.readinto(raw) != len(raw):
                raise ArchiveError(f"{where}: array {name!r} is cut short (the file changed while it was read)")
            out[name] = np.frombuffer(raw, dtype=_NUMPY[e.dtype]).reshape(e.shape)
    return out


def _decoded_bytes(manifest: dict[str, Any]) -> int:
    tensors = manifest["tensors"]
    total = sum(math.prod(e["shape"]) * DTYPES[e["dtype"]][0].itemsize for e in tensors.values())
    return total + sum(math.prod(tensors[manifest["aliases"].get(w, w)]["shape"]) for w in manifest["masks"].values())


def read(path: str | os.PathLike, *, max_bytes: int | None = MAX_BYTES) -> Contents:
    """The archive at ``path``, checked whole and decoded (see the module docstring); ArchiveError if it is not sound."""
    check_max_bytes(max_bytes)
    path = Path(path)
    where, manifest, payload, entries, _ = _locate(path, max_bytes)
    _check_manifest(where, manifest, path.is_dir())
    arrays = _read_arrays(where, manifest, payload, entries)
    if digest(manifest, arrays) != manifest["sha256"]:
        raise ArchiveError(f"{where}: the SHA-256 digest does not match the contents (the archive is corrupted "
                           "or was changed after it was written)")
    need = _decoded_bytes(manifest)
    if max_bytes is not None and need > max_bytes:
        raise ArchiveError(f"{where}: the tensors decode to {need} bytes, more than max_bytes={max_bytes}; "
                           "pass a larger max_bytes (or None) if you trust the archive")
    state: dict[str, torch.Tensor] = {}
    for key, e in manifest["tensors"].items():
        mine = {a: arrays[f"{key}/{a}"] for a in e["arrays"]}
        try:
            t = get_codec(e["codec"]).decode(mine, e["meta"], tuple(e["shape"]), e["dtype"])
        except ArchiveError as err:
            raise ArchiveError(f"{where}: tensor {key!r} (codec {e['codec']!r}): {err}") from None
        if tuple(t.shape) != tuple(e["shape"]) or t.dtype != DTYPES[e["dtype"]][0]:
            raise ArchiveError(f"{where}: tensor {key!r} (codec {e['codec']!r}) decoded to {list(t.shape)} "
                               f"{t.dtype}, expected {e['shape']} {e['dtype']}")
        state[key] = t
    for k, v in manifest["aliases"].items():
        state[k] = state[v]
    for k, w in manifest["masks"].items():
        state[k] = torch.from_numpy(nonzero(state[w]))
    return Contents(manifest, state)


# ------------------------------------------------------------------ into the model


def _fit(where: str, model: nn.Module, state: dict[str, torch.Tensor], strict: bool, same_dtype: bool
         ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(new masks {parameter: mask}, tensors to load)``: the archive checked against ``model``'s state_dict."""
    own = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    params = dict(model.named_parameters(remove_duplicate=False))
    new_masks = {k[: -len(MASK_SUFFIX)]: t for k, t in state.items()
                 if k not in own and k.endswith(MASK_SUFFIX) and k[: -len(MASK_SUFFIX)] in params}
    unexpected = sorted(k for k in state if k not in own and k[: -len(MASK_SUFFIX)] not in new_masks)
    missing = sorted(k for k in own if k not in state)
    if strict and (unexpected or missing):
        raise ArchiveError(f"{where} does not fit the model: {len(missing)} of the model's tensors are not in the "
                           f"archive {missing[:5]}, {len(unexpected)} of the archive's are not in the model "
                           f"{unexpected[:5]} (strict=False loads the common ones)")
    wrong = []
    for k, t in state.items():
        ref = own.get(k)
        if ref is None and k[: -len(MASK_SUFFIX)] in new_masks:
            ref = params[k[: -len(MASK_SUFFIX)]].detach().to(torch.bool)
        if ref is None:
            continue
        if tuple(t.shape) != tuple(ref.shape) or ((same_dtype or ref.dtype == torch.bool or t.dtype == torch.bool)
                                                  and t.dtype != ref.dtype):
            wrong.append(f"{k}: archive {list(t.shape)} {t.dtype}, model {list(ref.shape)} {ref.dtype}")
    if wrong:
        raise ArchiveError(f"{where} does not fit the model: {len(wrong)} tensors differ in shape or dtype, "
                           f"e.g. {'; '.join(wrong[:3])}")
    return new_masks, {k: t for k, t in state.items() if k in own or k[: -len(MASK_SUFFIX)] in new_masks}


def _apply(where: str, model: nn.Module, state: dict[str, torch.Tensor], strict: bool, rebuilt: bool) -> None:
    new_masks, tensors = _fit(where, model, state, strict, same_dtype=not rebuilt)
    try:
        _check_tied_masks(model, new_masks)
    except ValueError as e:
        raise ArchiveError(f"{where}: {e}") from None
    # everything is checked: change the model
    if new_masks:
        load_masks(model, new_masks)
    with torch.no_grad():
        model.load_state_dict(tensors, strict=strict, assign=rebuilt)
    if rebuilt and callable(getattr(model, "tie_weights", None)):
        model.tie_weights()


def _check_tied_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """ValueError if two names of one tied parameter carry different masks (what load_masks would refuse)."""
    canonical = canonical_names(model)
    first: dict[str, tuple[str, torch.Tensor]] = {}
    for name, mask in masks.items():
        seen = first.setdefault(canonical[name], (name, mask))
        if seen[1] is not mask and not torch.equal(seen[1], mask):
            raise ValueError(f"{seen[0]!r} and {name!r} are one tied parameter but their masks differ")


def load(path: str | os.PathLike, model: nn.Module | None = None, *, max_bytes: int | None = MAX_BYTES,
         strict: bool = True) -> nn.Module:
    """The model saved at ``path``: loaded into ``model`` (returned), or rebuilt from the manifest if ``model`` is
    ``None`` (``torch.nn`` standard layers, ``sparsenn.models`` registry models, ``transformers`` auto classes).

    ``max_bytes`` (default 4 GiB; ``None``: no cap) caps the file and the decoded tensors. ``strict``: the
    archive holds exactly the model's tensors (masks the model lacks are attached); ``False`` loads the
    common ones. Masks come back as mask buffers (so a ``Sparsifier`` keeps them). Any problem raises
    :class:`~sparsenn.backend.runtime.errors.ArchiveError` and ``model`` is left unchanged.
    """
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module or None, got {type(model).__name__}")
    if not isinstance(strict, bool):
        raise TypeError(f"strict must be True or False, got {strict!r}")
    contents = read(path, max_bytes=max_bytes)
    where = repr(str(path))
    rebuilt = model is None
    if rebuilt:
        shapes = {k: tuple(t.shape) for k, t in contents.state.items()}
        model = mf.rebuild(where, contents.manifest["model"], shapes, max_bytes)
    _apply(where, model, contents.state, strict, rebuilt)
    return model


__all__ = ["MAX_BYTES", "Contents", "digest", "load", "read", "save"]
