"""Read the "sparse-bitmask" checkpoints of ``compressed-tensors`` (Neural Magic / vLLM), without that library.

Sparse models on the Hugging Face Hub (SparseGPT and Wanda models of llm-compressor) were published in
this format; the library removed its decompressor in 2026 (0.15). The reader below is written from the
format's definition, ``BitmaskTensor`` / ``bitmask_compress`` of compressed-tensors 0.3 to 0.14:

A dense tensor ``W`` of shape ``(d0, ..., dk)`` is stored as four tensors under one prefix:

- ``<prefix>.shape``: int64 ``[k + 1]``, the dense shape;
- ``<prefix>.compressed``: 1-D, ``W``'s dtype, the entries with ``W != 0`` in row-major order;
- ``<prefix>.bitmask``: uint8 ``(d0, ..., d(k-1), ceil(dk / 8))``, ``numpy.packbits(W != 0, axis=-1,
  bitorder="little")``: bit ``j % 8`` (least significant first) of byte ``j // 8`` of a last-axis row
  flags column ``j``; the padding bits of a row's last byte are zero;
- ``<prefix>.row_offsets``: int64 ``(d0, ..., d(k-1))``, ``cumsum(counts, dim=0) - counts`` with ``counts``
  the non-zeros per last-axis row (for a matrix: where row ``i`` starts in ``compressed``; 0-d for 1-D).

Zeros come back as +0.0 (the compressor counts -0.0 as zero). Names: from 0.9 on, a targeted module's
``<module>.weight`` is stored under the prefix ``<module>`` and everything else is stored as is; before
0.9 every tensor was compressed under its full name as the prefix (``fc.weight.bitmask``). A prefix
ending in ``.weight`` therefore marks the older naming. ``config.json`` declares the format: under
``quantization_config`` (0.7+; ``compression_config`` in 0.5 and 0.6; at the top level in 0.3 and
0.4), ``sparsity_config = {"format": "sparse-bitmask", "targets", "ignore", "global_sparsity",
"sparsity_structure"}``.

Files from strangers are hostile. Everything is checked before a tensor is allocated: each file's
safetensors header (:func:`~sparsenn.backend.runtime.header.read_header`), the shard index (file
names stay inside the folder; the map and the files agree), the four tensors of every prefix against
each other (declared shape vs bitmask and row offsets, the bitmask's padding bits, its count of ones
vs the values, every row offset), and the totals (files and returned tensors) against ``max_bytes``.
Anything wrong raises :class:`~sparsenn.backend.runtime.errors.ArchiveError` naming the tensor, and a
model passed in is left unchanged.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from torch import nn

from ..backend.runtime.errors import ArchiveError
from ..backend.runtime.header import (
    DTYPE_BYTES,
    MAX_DIMS,
    TensorEntry,
    check_max_bytes,
    read_header,
)
from ..core.masks import MASK_SUFFIX, attach_masks
from .paths import file_in_folder

__all__ = ["MAX_BYTES", "SUPPORTED_FORMATS", "load_compressed_tensors", "read_sparse_bitmask"]

MAX_BYTES = 2**35  # 32 GiB: the default cap on the files read and on the tensors returned, each
MAX_JSON_BYTES = 64_000_000  # config.json and the shard index
SUPPORTED_FORMATS = ("sparse-bitmask", "dense")
PARTS = ("shape", "compressed", "bitmask", "row_offsets")
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
_COMPRESSION_KEYS = ("quantization_config", "compression_config", "sparsity_config")
_INT_DTYPES = ("I64", "I32")  # shape and row_offsets (the compressor writes int64)
_WORD = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}  # same-size integers for bit copies


@dataclass(frozen=True)
class _Stored:
    """One tensor as stored: its file and its checked header entry."""

    file: Path
    entry: TensorEntry


@dataclass(frozen=True)
class _Packed:
    """The four stored tensors of one compressed tensor and the dense shape they declare."""

    name: str  # the dense tensor's name
    prefix: str
    parts: dict[str, _Stored]
    shape: tuple[int, ...]


def read_sparse_bitmask(path: str | os.PathLike, *, max_bytes: int | None = MAX_BYTES) -> dict[str, torch.Tensor]:
    """``{name: dense tensor}`` of a sparse-bitmask checkpoint: every compressed tensor decompressed, others as stored.

    ``path`` is a safetensors file or a model folder (``model.safetensors``, or shards listed by
    ``model.safetensors.index.json``; its ``config.json``, if any, must declare a format of
    :data:`SUPPORTED_FORMATS`). ``max_bytes`` caps the files' total size and, separately, the returned
    tensors' total size (``None``: no cap). Malformed input raises ``ArchiveError``.
    """
    return _read(path, max_bytes)[0]


def load_compressed_tensors(folder: str | os.PathLike, model: nn.Module | None = None, *,
                            max_bytes: int | None = MAX_BYTES, masks: bool = False) -> nn.Module:
    """A ``transformers`` model holding the decompressed weights of the checkpoint folder ``folder``.

    Without ``model``, one is built from ``config.json`` (its compression config removed) with
    ``AutoConfig`` and ``AutoModelForCausalLM.from_config`` (never remote code), in the dtype of the
    stored weights. With ``model``, that model is filled and returned: every tensor of its
    ``state_dict`` must be in the file (tied parameters: under one of their names) with the same shape
    and dtype, and nothing else may be; its sparsenn masks stay and are enforced on the loaded weights
    (with ``masks=True`` those of compressed weights are replaced by the file's). Everything
    is checked before the first weight is written, so on ``ArchiveError`` the model is unchanged.
    ``masks=True`` attaches a sparsenn mask (``W != 0``, the stored bitmask) to every weight that was
    stored compressed, so sparse training or :func:`sparsenn.convert` can take over.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no checkpoint folder at {str(folder)!r}")
    tensors, compressed = _read(folder, max_bytes)
    if model is None:
        model = _build_model(folder, tensors)
    params = dict(model.named_parameters(remove_duplicate=False))
    _fill(model, tensors, {n: tensors[n] != 0 for n in compressed if n in params} if masks else {})
    return model


# ----------------------------------------------------------------------------- reading


def _read(path: str | os.PathLike, max_bytes: int | None) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The dense tensors and the names of those that were stored compressed."""
    check_max_bytes(max_bytes)
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no safetensors file or checkpoint folder at {str(path)!r}")
    if path.is_dir():
        config = _read_json(path / CONFIG_FILE) if (path / CONFIG_FILE).is_file() else None
        if config is not None:
            _check_format(path / CONFIG_FILE, config)
        stored = _stored_in_folder(path, max_bytes)
    else:
        stored = _stored_in_files([path], max_bytes)
    packed, plain = _group(stored)
    total = sum(math.prod(p.shape) * DTYPE_BYTES[p.parts["compressed"].entry.dtype] for p in packed) + sum(s.entry.end - s.entry.begin for s in plain.values())
    if max_bytes is not None and total > max_bytes:
        raise ArchiveError(f"{str(path)!r}: the decompressed tensors would take {total} bytes, more than "
                           f"max_bytes={max_bytes}; pass a larger max_bytes (or None) if you trust it")
    out = {}
    for p in packed:
        out[p.name] = _decompress(p)
    for name, s in plain.items():
        out[name] = _load(s, name)
    return out, [p.name for p in packed]


def _read_json(path: Path) -> dict:
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise ArchiveError(f"{str(path)!r} is {size} bytes; a JSON file here may have at most {MAX_JSON_BYTES}")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ArchiveError(f"{str(path)!r} is not valid JSON ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict):
        raise ArchiveError(f"{str(path)!r} must hold a JSON object, got {type(data).__name__}")
    return data


def _compression_config(config: dict) -> dict | None:
    """The dict holding ``sparsity_config`` (and quantization), whichever release wrote ``config.json``."""
    for key in ("quantization_config", "compression_config"):
        if config.get(key) is not None:
            return config[key]
    if config.get("sparsity_config") is not None:  # 0.3 and 0.4: at the top level
        return {"sparsity_config": config["sparsity_config"]}
    return None


def _check_format(where: Path, config: dict) -> None:
    """Refuse what this reader cannot turn into the dense weights: other formats, quantized or transformed weights."""
    comp = _compression_config(config)
    if comp is None:
        return
    if not isinstance(comp, dict):
        raise ArchiveError(f"{str(where)!r}: the compression config must be a JSON object, got {type(comp).__name__}")
    method = comp.get("quant_method", "compressed-tensors")
    if method != "compressed-tensors":
        raise ArchiveError(f"{str(where)!r}: quant_method {method!r} is not compressed-tensors; "
                           "only compressed-tensors sparse-bitmask checkpoints are read here")
    sparsity = comp.get("sparsity_config") or {}
    if not isinstance(sparsity, dict):
        raise ArchiveError(f"{str(where)!r}: sparsity_config must be a JSON object, got {type(sparsity).__name__}")
    fmt = sparsity.get("format", "dense")
    if fmt not in SUPPORTED_FORMATS:
        raise ArchiveError(f"{str(where)!r}: sparsity format {fmt!r} is not supported; supported: "
                           f"{', '.join(SUPPORTED_FORMATS)}")
    if comp.get("config_groups") or comp.get("transform_config") or comp.get("kv_cache_scheme"):
        raise ArchiveError(f"{str(where)!r}: the checkpoint is quantized or transformed (config_groups, "
                           "transform_config or kv_cache_scheme); only unquantized sparse-bitmask weights are read")


def _stored_in_folder(folder: Path, max_bytes: int | None) -> dict[str, _Stored]:
    if (folder / SINGLE_FILE).is_file():
        return _stored_in_files([folder / SINGLE_FILE], max_bytes)
    index_path = folder / INDEX_FILE
    if not index_path.is_file():
        raise ArchiveError(f"{str(folder)!r} holds neither {SINGLE_FILE} nor {INDEX_FILE}")
    index = _read_json(index_path)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) for k in weight_map):
        raise ArchiveError(f"{str(index_path)!r}: weight_map must map tensor names to shard file names")
    files = {name: file_in_folder(repr(str(index_path)), folder, name, "shard") for name in dict.fromkeys(weight_map.values())}
    stored = _stored_in_files(list(files.values()), max_bytes)
    for name, s in stored.items():
        if name not in weight_map:
            raise ArchiveError(f"{str(index_path)!r}: tensor {name!r} of {s.file.name!r} is not in the weight_map")
        if files[weight_map[name]] != s.file:
            raise ArchiveError(f"{str(index_path)!r}: tensor {name!r} is mapped to {weight_map[name]!r} but stored "
                               f"in {s.file.name!r}")
    missing = [n for n in weight_map if n not in stored]
    if missing:
        raise ArchiveError(f"{str(index_path)!r}: tensor {missing[0]!r} (and {len(missing) - 1} more) of the "
                           "weight_map is in none of the shards")
    return stored


def _stored_in_files(files: list[Path], max_bytes: int | None) -> dict[str, _Stored]:
    stored: dict[str, _Stored] = {}
    total = 0
    for file in files:
        total += file.stat().st_size
        if max_bytes is not None and total > max_bytes:
            raise ArchiveError(f"the checkpoint's files take more than max_bytes={max_bytes} bytes (at "
                               f"{str(file)!r}); pass a larger max_bytes (or None) if you trust it")
        entries, _ = read_header(file, max_bytes)
        for name, entry in entries.items():
            if name in stored:
                raise ArchiveError(f"tensor {name!r} is stored twice, in {stored[name].file.name!r} and "
                                   f"{file.name!r}")
            stored[name] = _Stored(file, entry)
    return stored


def _group(stored: dict[str, _Stored]) -> tuple[list[_Packed], dict[str, _Stored]]:
    """Split the stored tensors into compressed groups (checked against each other) and plain tensors."""
    groups: dict[str, dict[str, _Stored]] = {}
    plain = {}
    for name, s in stored.items():
        prefix, _, part = name.rpartition(".")
        if prefix and part in PARTS:
            groups.setdefault(prefix, {})[part] = s
        else:
            plain[name] = s
    old_naming = any(p == "weight" or p.endswith(".weight") for p in groups)  # before 0.9: the full name
    packed = []
    for prefix, parts in groups.items():
        missing = [p for p in PARTS if p not in parts]
        if missing:
            raise ArchiveError(f"compressed tensor {prefix!r}: {', '.join(prefix + '.' + m for m in missing)} "
                               f"missing (a sparse-bitmask tensor stores {', '.join(PARTS)})")
        name = prefix if old_naming else prefix + ".weight"
        if name in plain:
            raise ArchiveError(f"tensor {name!r} is stored both plain and compressed (under {prefix!r})")
        packed.append(_check_parts(name, prefix, parts))
    return packed, plain


def _check_parts(name: str, prefix: str, parts: dict[str, _Stored]) -> _Packed:
    """Check the four tensors' dtypes and shapes against each other and the declared dense shape."""
    def bad(part: str, why: str) -> ArchiveError:
        return ArchiveError(f"compressed tensor {prefix!r}: {prefix}.{part} {why}")

    shape_entry = parts["shape"].entry
    if shape_entry.dtype not in _INT_DTYPES or len(shape_entry.shape) != 1 or not 1 <= shape_entry.shape[0] <= MAX_DIMS:
        raise bad("shape", f"must be a 1-D int64 tensor of 1 to {MAX_DIMS} entries, got {shape_entry.dtype} "
                           f"{list(shape_entry.shape)}")
    shape = tuple(int(d) for d in _numpy(parts["shape"], prefix + ".shape"))
    if any(d < 0 for d in shape):
        raise bad("shape", f"declares a negative dimension: {list(shape)}")
    rows, cols = shape[:-1], shape[-1]
    bitmask, offsets, values = parts["bitmask"].entry, parts["row_offsets"].entry, parts["compressed"].entry
    if bitmask.dtype != "U8" or bitmask.shape != (*rows, -(-cols // 8)):
        raise bad("bitmask", f"must be uint8 of shape {[*rows, -(-cols // 8)]} for the dense shape {list(shape)}, "
                             f"got {bitmask.dtype} {list(bitmask.shape)}")
    if offsets.dtype not in _INT_DTYPES or offsets.shape != rows:
        raise bad("row_offsets", f"must be int64 of shape {list(rows)} for the dense shape {list(shape)}, "
                                 f"got {offsets.dtype} {list(offsets.shape)}")
    if len(values.shape) != 1 or values.shape[0] > math.prod(shape):
        raise bad("compressed", f"must be 1-D with at most {math.prod(shape)} values (the dense shape "
                                f"{list(shape)}), got {list(values.shape)}")
    if values.dtype == "BOOL":
        raise bad("compressed", "is BOOL; the values of a weight are numbers")
    return _Packed(name, prefix, parts, shape)


def _load(s: _Stored, name: str) -> torch.Tensor:
    """One stored tensor (its header already checked against the file)."""
    try:
        with safe_open(str(s.file), framework="pt") as f:
            return f.get_tensor(name)
    except Exception as e:  # safetensors' own errors: a file changed since its header was read, ...
        raise ArchiveError(f"tensor {name!r} of {str(s.file)!r} cannot be read: {e}") from e


def _numpy(s: _Stored, name: str) -> np.ndarray:
    return _load(s, name).numpy()  # only integer parts (shape, bitmask, row_offsets) are read this way


def _decompress(p: _Packed) -> torch.Tensor:
    """The dense tensor: check the bitmask's padding, its count of ones and every row offset, then scatter."""
    prefix, (*rows, cols) = p.prefix, p.shape
    nrows = math.prod(rows)
    packed = _numpy(p.parts["bitmask"], prefix + ".bitmask").reshape(nrows, -(-cols // 8))
    bits = np.unpackbits(packed, axis=-1, bitorder="little")
    if bits[:, cols:].any():
        row = int(np.nonzero(bits[:, cols:].any(axis=1))[0][0])
        raise ArchiveError(f"compressed tensor {prefix!r}: {prefix}.bitmask sets padding bits beyond column "
                           f"{cols} (row {row}); the format leaves them zero")
    mask = bits[:, :cols].astype(bool)
    counts = mask.sum(axis=1, dtype=np.int64)
    n_values = p.parts["compressed"].entry.shape[0]
    if int(counts.sum()) != n_values:
        raise ArchiveError(f"compressed tensor {prefix!r}: {prefix}.bitmask flags {int(counts.sum())} non-zeros, "
                           f"{prefix}.compressed holds {n_values} values")
    counts = counts.reshape(rows)
    expected = np.cumsum(counts, axis=0) - counts if counts.ndim else np.zeros((), np.int64)
    offsets = _numpy(p.parts["row_offsets"], prefix + ".row_offsets").astype(np.int64)
    if not np.array_equal(offsets, expected):
        where = tuple(int(i) for i in np.argwhere(offsets != expected)[0])
        raise ArchiveError(f"compressed tensor {prefix!r}: {prefix}.row_offsets{list(where)} is "
                           f"{int(offsets[where])}, the bitmask puts that row at {int(expected[where])}")
    values = _load(p.parts["compressed"], prefix + ".compressed")
    word = _WORD[values.element_size()]
    dense = torch.zeros(math.prod(p.shape), dtype=word)
    dense[torch.from_numpy(mask.reshape(-1))] = values.view(word)  # a bit-for-bit copy, whatever the dtype
    return dense.view(values.dtype).reshape(p.shape)


# ----------------------------------------------------------------------------- the model


def _build_model(folder: Path, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """``AutoModelForCausalLM.from_config`` of ``config.json`` without its compression config, in the weights' dtype."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    where = folder / CONFIG_FILE
    if not where.is_file():
        raise ArchiveError(f"{str(folder)!r} has no {CONFIG_FILE}; pass the model to fill as model=")
    config = {k: v for k, v in _read_json(where).items() if k not in _COMPRESSION_KEYS}
    model_type = config.pop("model_type", None)
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise ArchiveError(f"{str(where)!r}: model_type {model_type!r} is not a transformers model type "
                           "(remote code is never run); pass the model to fill as model=")
    config.pop("auto_map", None)
    try:
        cfg = CONFIG_MAPPING[model_type].from_dict(config)
    except Exception as e:
        raise ArchiveError(f"{str(where)!r}: transformers cannot build a {model_type} config from it: {e}") from e
    floats = [t.dtype for t in tensors.values() if t.is_floating_point()]
    dtype = max(set(floats), key=floats.count) if floats else torch.float32
    try:
        return transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype, trust_remote_code=False)
    except ValueError as e:
        raise ArchiveError(f"{str(where)!r}: {model_type} is not a causal language model transformers knows "
                           f"({e}); pass the model to fill as model=") from e


def _fill(model: nn.Module, tensors: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> None:
    """Check every tensor against ``model`` (names, tied names, shapes, dtypes), then load them all and
    attach ``masks`` (``{parameter name: bool}``; a mask the model has already is replaced, before the
    load enforces it)."""
    state = model.state_dict()
    mask_keys = {k for k in state if k.endswith(MASK_SUFFIX) and k[: -len(MASK_SUFFIX)] in state}
    unexpected = [k for k in tensors if k not in state or k in mask_keys]
    if unexpected:
        raise ArchiveError(f"tensor {unexpected[0]!r} (and {len(unexpected) - 1} more) of the checkpoint is not in "
                           f"{type(model).__name__}'s state_dict")
    owner = {name: id(t) for name, t in (*model.named_parameters(remove_duplicate=False),
                                          *model.named_buffers(remove_duplicate=False))}
    aliases: dict[int, list[str]] = {}
    for name in state:
        if name not in mask_keys:
            aliases.setdefault(owner.get(name, id(state[name])), []).append(name)
    full = {k: state[k] for k in mask_keys}
    for names in aliases.values():
        present = [n for n in names if n in tensors]
        if not present:
            raise ArchiveError(f"the checkpoint has no tensor {names[0]!r} for {type(model).__name__}")
        first = tensors[present[0]]
        for n in present[1:]:
            if tensors[n].dtype != first.dtype or not torch.equal(tensors[n], first):
                raise ArchiveError(f"tensors {present[0]!r} and {n!r} are one tied parameter in the model but differ "
                                   "in the checkpoint")
        want = state[names[0]]
        if first.shape != want.shape or first.dtype != want.dtype:
            raise ArchiveError(f"tensor {present[0]!r} is {first.dtype} {list(first.shape)} in the checkpoint, "
                               f"{want.dtype} {list(want.shape)} in the model (convert the model first, e.g. "
                               f"model.to({first.dtype}))")
        full.update({n: first for n in names})
        mask = next((masks[n] for n in present if n in masks), None)
        if mask is not None:
            full.update({n + MASK_SUFFIX: mask for n in names if n + MASK_SUFFIX in full})
    with torch.no_grad():
        model.load_state_dict(full, strict=True)
    if masks:
        attach_masks(model, masks)
