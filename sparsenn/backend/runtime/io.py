"""Save and load a converted model without measuring again: safetensors + JSON, no pickle.

:func:`save` writes every tensor of the converted model's ``state_dict`` (the packed
arrays, dense weights, biases, other layers' parameters and buffers) with safetensors;
the metadata holds, as JSON, each sparse layer's type, configuration and plan, the
input check, the conversion summary, the BatchNorms folded into convolutions (load
makes each an ``nn.Identity`` and gives its convolution a bias), the RMSNorm modules run
as one call (:mod:`.norms`; load checks and replaces them alike, as it does the sibling products, gated MLPs,
attentions and decoder layers of :mod:`.siblings`, :mod:`.gated_mlp`, :mod:`.attention` and :mod:`.decoder_layer`),
and a SHA-256 digest of all of it (names, dtypes,
shapes, bytes, metadata). :func:`load` needs the dense architecture (an instance of
the model class, any weights).

Use these rather than ``torch.save``: that pickles the model, and unpickling runs
whatever code the file names. A file is data from a stranger: :func:`load` trusts
nothing in it and changes nothing until all of it is checked; every problem raises
:class:`~.errors.ArchiveError` (a ValueError) naming the layer or tensor:

1. the safetensors header (:mod:`.header`): file size <= ``max_bytes``, header length,
   JSON structure, each tensor's declared bytes inside the file, before reading a tensor;
2. the metadata: format, version, known keys, the digest (a flipped bit anywhere fails
   it; the digest detects corruption, not forgery: the checks below make a forged file
   safe), JSON of the right types;
3. each sparse layer against the architecture's module it replaces and its tensors
   against its configuration (:mod:`.validate`): pointers, indices, lengths, dtypes,
   metadata, plan, weight and bias;
4. the whole ``state_dict``: exactly the model's tensor names, shapes and dtypes.

Only then are the sparse layers swapped in and the tensors copied, so a file that
fails leaves the model as it was.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as st_save
from torch import nn

from ...core.masks import MASK_SUFFIX, masked_parameters, remove_masks
from ...train.checkpoint import atomic_write
from .attention import ATTENTIONS_ATTR, fuse_attentions
from .decoder_layer import LAYERS_ATTR, fuse_decoder_layers
from .conversion import FOLDED_ATTR, INPUT_SPEC_ATTR, _replace, attach_input_check
from .errors import ArchiveError
from .gated_mlp import MLPS_ATTR, fuse_gated_mlps
from .header import check_max_bytes, read_header
from .layers import SparseConv2d, SparseLinear
from .linear_activation import ACTIVATIONS_ATTR, fuse_linear_activations
from .pooling import POOLS_ATTR, compile_pools
from .pooling import compilable as compilable_pool
from .linear_activation import fusable as fusable_activation
from .residual_norm import RESIDUAL_NORMS_ATTR, fuse_residual_norms
from .residual_norm import fusable as fusable_residual_norm
from .norms import NORMS_ATTR, fusable, fuse_rms_norms
from .siblings import SIBLINGS_ATTR, SiblingGroup, fuse_siblings
from .summary import ConversionSummary
from .validate import (
    check_conv_config,
    check_input_spec,
    check_linear_config,
    layer_parts,
)

FORMAT = "sparsenn-runtime"
VERSION = 2  # 2: with the "sha256" digest; version 1 files (no digest) still load, checked the same way
MAX_BYTES = 4 << 30  # load's default cap on the file size
META_KEYS = ("format", "version", "layers", "input_spec", "summary", "sha256", "folded", "rms_norms", "siblings",
             "gated_mlps", "attentions", "decoder_layers", "linear_activations", "residual_norms", "pools")
LAYER_TYPES = ("SparseLinear", "SparseConv2d")
#: metadata key -> the attribute of a converted model holding the module names a rewrite replaced
_NAME_LISTS = {"rms_norms": NORMS_ATTR, "gated_mlps": MLPS_ATTR, "attentions": ATTENTIONS_ATTR,
               "decoder_layers": LAYERS_ATTR, "linear_activations": ACTIVATIONS_ATTR,
               "residual_norms": RESIDUAL_NORMS_ATTR, "pools": POOLS_ATTR}
#: rewrites of a module around one sparse Linear, applied once the file's layers are built: metadata key ->
#: (the check of a module, the rewrite, what such a module is made of)
_OVER_SPARSE = {"linear_activations": (fusable_activation, fuse_linear_activations,
                                       "made of one sparse Linear of the file and a GELU"),
                "residual_norms": (fusable_residual_norm, fuse_residual_norms,
                                   "made of one sparse Linear of the file, a dropout and a LayerNorm")}


def digest(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """SHA-256 (hex) of every tensor's name, dtype, shape and bytes and every metadata entry but ``sha256``."""
    h = hashlib.sha256()

    def put(b: bytes | memoryview) -> None:
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)

    for k in sorted(metadata):
        if k != "sha256":
            put(k.encode())
            put(metadata[k].encode())
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous().reshape(-1)
        put(k.encode())
        put(f"{str(t.dtype).removeprefix('torch.')}{list(tensors[k].shape)}".encode())
        put(memoryview(t.view(torch.uint8).numpy()) if t.numel() else b"")
    return h.hexdigest()


def _layers(model: nn.Module) -> dict[str, dict[str, Any]]:
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, SparseConv2d):
            out[name] = {"type": "SparseConv2d", "config": m.config(), "state": m.get_extra_state()}
        elif isinstance(m, SparseLinear):
            out[name] = {"type": "SparseLinear", "config": {"in_features": m.in_features,
                                                            "out_features": m.out_features},
                         "state": m.get_extra_state()}
    return out


def save(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write a converted model (see :func:`sparsenn.convert`) to ``path`` (atomically)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    tensors: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if isinstance(value, torch.Tensor):
            tensors[key] = value.detach().cpu().contiguous().clone()  # clone: safetensors refuses shared memory
    summary = getattr(model, "conversion_summary", None)
    meta = {
        "format": FORMAT, "version": str(VERSION),
        "layers": json.dumps(_layers(model)),
        "input_spec": json.dumps(model.__dict__.get(INPUT_SPEC_ATTR)),
        "summary": json.dumps(summary.to_dict() if isinstance(summary, ConversionSummary) else None),
    }
    folded = model.__dict__.get(FOLDED_ATTR)
    if folded:
        meta["folded"] = json.dumps([list(p) for p in folded])
    siblings = model.__dict__.get(SIBLINGS_ATTR)
    if siblings:
        meta["siblings"] = json.dumps([g.to_json() for g in siblings])
    for key, attr in _NAME_LISTS.items():  # the names of the modules each rewrite replaced
        names = model.__dict__.get(attr)
        if key in _OVER_SPARSE:  # not those whose Linear was restored dense
            names = [n for n in names or () if any(type(c) is SparseLinear for c in model.get_submodule(n).children())]
        if names:
            meta[key] = json.dumps(list(names))
    meta["sha256"] = digest(tensors, meta)
    atomic_write(path, st_save(tensors, metadata=meta))
    return Path(path)


# ------------------------------------------------------------------ reading and checking


def _json(where: str, meta: dict[str, str], key: str) -> Any:
    try:
        return json.loads(meta.get(key, "null"))
    except (ValueError, RecursionError) as e:
        raise ArchiveError(f"{where}: metadata {key!r} is not valid JSON ({type(e).__name__}: {e})") from None


def _read(path: Path, max_bytes: int | None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The file's tensors and metadata, the header checked before any tensor is read."""
    where = repr(str(path))
    entries, meta = read_header(path, max_bytes)
    if meta.get("format") != FORMAT:
        raise ArchiveError(f"{where} is not a converted sparsenn model (format={meta.get('format')!r})")
    version = meta.get("version", "")
    if not (version.isascii() and version.isdigit() and len(version) < 10 and 1 <= int(version)):
        raise ArchiveError(f"{where}: version must be a positive integer, got {version!r}")
    if int(version) > VERSION:
        raise ArchiveError(f"{where} has version {version}; this sparsenn reads <= {VERSION}")
    unknown = sorted(set(meta) - set(META_KEYS))
    missing = [k for k in ("layers", *(("sha256",) if int(version) >= 2 else ())) if k not in meta]
    if unknown or missing:
        raise ArchiveError(f"{where}: metadata keys must be among {list(META_KEYS)}"
                           + (f"; unknown {unknown}" if unknown else "") + (f"; missing {missing}" if missing else ""))
    try:
        with safe_open(str(path), framework="pt") as f:
            if set(f.keys()) != set(entries):
                raise ArchiveError(f"{where} changed while it was read")
            tensors = {k: f.get_tensor(k) for k in entries}
    except ArchiveError:
        raise
    except Exception as e:  # noqa: BLE001  (safetensors' own checks: SafetensorError and the like)
        raise ArchiveError(f"{where}: safetensors cannot read it ({type(e).__name__}: {e})") from None
    if "sha256" in meta and digest(tensors, meta) != meta["sha256"]:
        raise ArchiveError(f"{where}: the SHA-256 digest does not match the contents (the file is corrupted "
                           "or was changed after it was written)")
    return tensors, meta


def _module_config(module: nn.Module) -> tuple[str, dict[str, Any]] | None:
    """``(type, config)`` of a module the file's sparse layer may replace, as the file would store it."""
    if isinstance(module, SparseConv2d):
        return "SparseConv2d", module.config()
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return None
        return "SparseConv2d", {"in_channels": module.in_channels, "out_channels": module.out_channels,
                                "kernel_size": list(module.kernel_size), "stride": list(module.stride),
                                "padding": list(module._reversed_padding_repeated_twice),
                                "dilation": list(module.dilation), "padding_mode": module.padding_mode}
    if isinstance(module, (nn.Linear, SparseLinear)):
        return "SparseLinear", {"in_features": module.in_features, "out_features": module.out_features}
    return None


def _describe(kind: str, c: dict[str, Any]) -> str:
    if kind == "SparseLinear":
        return f"Linear({c['in_features']}, {c['out_features']})"
    return (f"Conv2d({c['in_channels']}, {c['out_channels']}, kernel_size={tuple(c['kernel_size'])}, "
            f"stride={tuple(c['stride'])}, padding={tuple(c['padding'])}, dilation={tuple(c['dilation'])}, "
            f"padding_mode={c['padding_mode']!r})")


def _entries(where: str, meta: dict[str, str], names: dict[str, nn.Module]) -> dict[str, tuple[str, dict, Any]]:
    """The file's sparse layers ``{name: (type, config, state)}``, checked against the architecture."""
    layers = _json(where, meta, "layers")
    if not isinstance(layers, dict):
        raise ArchiveError(f"{where}: metadata 'layers' must be a JSON object, got {type(layers).__name__}")
    missing = [n for n in layers if n not in names]
    if missing:
        raise ArchiveError(f"the file's sparse layers {missing} are not modules of the given model")
    nested = sorted(n for n in layers for o in layers if o != n and (o == "" or n.startswith(o + ".")))
    if nested:
        raise ArchiveError(f"{where}: sparse layers {nested} lie inside another sparse layer")
    out, wrong = {}, []
    for name, e in layers.items():
        lw = f"layer {name or '(the model)'!r}"
        if not isinstance(e, dict) or set(e) != {"type", "config", "state"} or e["type"] not in LAYER_TYPES:
            raise ArchiveError(f"{where}: {lw} must be {{type: one of {list(LAYER_TYPES)}, config, state}}")
        config = (check_linear_config if e["type"] == "SparseLinear" else check_conv_config)(lw, e["config"])
        have = _module_config(names[name])
        if have != (e["type"], config):
            model_text = _describe(*have) if have else type(names[name]).__name__
            wrong.append(f"{name or 'the model'}: file {_describe(e['type'], config)}, model {model_text}")
        out[name] = (e["type"], config, e["state"])
    if wrong:
        raise ArchiveError(f"{where} does not fit the model: {'; '.join(wrong)}")
    return out


def _folded(where: str, meta: dict[str, str], names: dict[str, nn.Module]) -> list[tuple[str, str]]:
    """The file's folded ``(conv, batchnorm)`` pairs, checked against the architecture."""
    if "folded" not in meta:
        return []
    pairs = _json(where, meta, "folded")
    if not isinstance(pairs, list) or not all(isinstance(p, list) and len(p) == 2 and all(isinstance(n, str) for n in p)
                                              for p in pairs):
        raise ArchiveError(f"{where}: metadata 'folded' must be a list of [convolution, batchnorm] name pairs")
    used = [n for p in pairs for n in p]
    if len(set(used)) != len(used):
        raise ArchiveError(f"{where}: metadata 'folded' names a module twice")
    for conv, bn in pairs:
        c, b = names.get(conv), names.get(bn)
        if not isinstance(c, nn.Conv2d) or not isinstance(b, nn.BatchNorm2d) or b.num_features != c.out_channels:
            raise ArchiveError(f"{where}: folded pair ({conv!r}, {bn!r}) is not a Conv2d and a BatchNorm2d of its "
                               f"{getattr(c, 'out_channels', '?')} channels in the given model")
    return [(conv, bn) for conv, bn in pairs]


def _name_list(where: str, meta: dict[str, str], key: str) -> list[str]:
    """Metadata ``key``: a list of distinct module names (``[]`` when absent)."""
    if key not in meta:
        return []
    names = _json(where, meta, key)
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
        raise ArchiveError(f"{where}: metadata {key!r} must be a list of distinct module names")
    return names


def _modules_named(where: str, meta: dict[str, str], key: str, model: nn.Module, accepts, what: str) -> list[str]:
    """Metadata ``key``: module names of ``model``, each one that ``accepts`` (else ``ArchiveError`` naming them as
    not ``what``)."""
    names = _name_list(where, meta, key)
    modules = dict(model.named_modules())
    bad = [n for n in names if not n or n not in modules or not accepts(modules[n])]
    if bad:
        raise ArchiveError(f"{where}: metadata {key!r} names {bad[:3]}, not {what}")
    return names


def _pools(where: str, meta: dict[str, str], model: nn.Module) -> list[str]:
    """The file's compiled max pools, each checked to be a max pool of the given model the kernel takes."""
    return _modules_named(where, meta, "pools", model, compilable_pool,
                          "max pools of the given model that the compiled kernel takes")


def _rms_norms(where: str, meta: dict[str, str], model: nn.Module) -> list[str]:
    """The file's fused RMSNorm module names, each checked to be an RMSNorm of the given model."""
    return _modules_named(where, meta, "rms_norms", model, fusable,
                          "RMSNorm modules of the given model that F.rms_norm computes exactly")


def _siblings(where: str, meta: dict[str, str]) -> list[SiblingGroup]:
    """The file's sibling groups (checked against the architecture by :func:`.siblings.fuse_siblings`)."""
    if "siblings" not in meta:
        return []
    groups = _json(where, meta, "siblings")
    ok = isinstance(groups, list) and all(
        isinstance(g, list) and len(g) == 3 and isinstance(g[0], str) and isinstance(g[1], str)
        and isinstance(g[2], list) and all(isinstance(n, str) for n in g[2]) for g in groups)
    if not ok:
        raise ArchiveError(f"{where}: metadata 'siblings' must be a list of [parent, name, [member names]]")
    return [SiblingGroup(p, n, tuple(m)) for p, n, m in groups]


def _apply_siblings(where: str, model: nn.Module, groups: list[SiblingGroup], mlps: list[str],
                    attentions: list[str], layers: list[str]) -> None:
    """The sibling groups, then the gated MLPs, attentions and decoder layers over them (each checked against
    ``model`` first)."""
    for key, fuse, names in (("siblings", fuse_siblings, groups), ("gated_mlps", fuse_gated_mlps, mlps),
                             ("attentions", fuse_attentions, attentions), ("decoder_layers", fuse_decoder_layers, layers)):
        try:
            fuse(model, names)
        except ValueError as e:
            raise ArchiveError(f"{where}: metadata {key!r} does not fit the model: {e}") from None


def _over_sparse_layers(where: str, meta: dict[str, str], key: str, shaped: nn.Module, built: dict[str, nn.Module],
                        fusable_module, what: str) -> list[str]:
    """The file's modules of ``key`` (Linear + GELU, residual LayerNorms), each checked (``fusable_module``) on a
    shallow copy of the module whose children are the file's sparse layers, so the model is not changed yet."""
    names = _name_list(where, meta, key)
    modules = dict(shaped.named_modules())
    bad = []
    for name in names:
        parent = modules.get(name) if name else None
        if parent is None:
            bad.append(name)
            continue
        probe = copy.copy(parent)
        probe._modules = {c: built.get(f"{name}.{c}", m) for c, m in parent._modules.items()}
        if not fusable_module(probe):
            bad.append(name)
    if bad:
        raise ArchiveError(f"{where}: metadata {key!r} names {bad[:3]}, not modules of the given model {what}")
    return names


def _apply_folds(model: nn.Module, pairs: list[tuple[str, str]]) -> nn.Module:
    """The structure of folded pairs: each BatchNorm an ``nn.Identity``, each convolution with a bias."""
    for conv_name, bn_name in pairs:
        conv = model.get_submodule(conv_name)
        if conv.bias is None:
            conv.bias = nn.Parameter(torch.zeros(conv.out_channels, dtype=conv.weight.dtype), requires_grad=False)
        _replace(model, bn_name, nn.Identity())
    return model


def _build(name: str, kind: str, config: dict[str, Any], state: Any, tensors: dict[str, torch.Tensor],
           module: nn.Module) -> nn.Module:
    """The sparse layer ``name`` from its checked configuration, state and tensors."""
    prefix = f"{name}." if name else ""
    lw = f"layer {name or '(the model)'!r}"
    if kind == "SparseLinear":
        out, cols = config["out_features"], config["in_features"]
    else:
        out, cols = config["out_channels"], config["in_channels"] * config["kernel_size"][0] * config["kernel_size"][1]
    p = layer_parts(lw, out, cols, state, tensors, prefix, getattr(module, "bias", None) is not None)
    if kind == "SparseLinear":
        return SparseLinear(out, cols, p.plan, p.packed, p.weight, p.bias, p.label)
    c = config
    return SparseConv2d(c["in_channels"], c["out_channels"], tuple(c["kernel_size"]), tuple(c["stride"]),
                        tuple(c["padding"]), tuple(c["dilation"]), c["padding_mode"], p.plan, p.packed, p.weight,
                        p.bias, p.label)


def _kept_tensors(where: str, model: nn.Module, built: dict[str, nn.Module], tensors: dict[str, torch.Tensor]
                ) -> dict[str, torch.Tensor]:
    """The file's tensors for the modules kept (not replaced), after checking the whole state_dict:
    the model's names (masks removed, sparse layers swapped) with their shapes and dtypes."""
    masks = {mp.name + MASK_SUFFIX for mp in masked_parameters(model)}

    def replaced(key: str) -> bool:
        return any(n == "" or key.startswith(n + ".") for n in built)

    kept = {k: v for k, v in model.state_dict().items()
            if isinstance(v, torch.Tensor) and k not in masks and not replaced(k)}
    new = {(f"{n}." if n else "") + k: v for n, layer in built.items()
           for k, v in layer.state_dict().items() if isinstance(v, torch.Tensor)}
    own = {**kept, **new}
    absent = sorted(set(own) - set(tensors))
    extra = sorted(set(tensors) - set(own))
    wrong = [f"{k}: file {tuple(tensors[k].shape)} {str(tensors[k].dtype).removeprefix('torch.')} vs model "
             f"{tuple(v.shape)} {str(v.dtype).removeprefix('torch.')}" for k, v in kept.items()
             if k in tensors and (tuple(tensors[k].shape) != tuple(v.shape) or tensors[k].dtype != v.dtype)]
    if absent or extra or wrong:
        raise ArchiveError(f"{where} does not fit the model: missing {absent}, unexpected {extra}"
                           + (f", shapes/dtypes {wrong}" if wrong else ""))
    return {k: tensors[k] for k in kept}


def load(path: str | os.PathLike, model: nn.Module, *, max_bytes: int | None = MAX_BYTES) -> nn.Module:
    """Rebuild the converted model saved at ``path`` into ``model`` (the dense architecture); returns it.

    Everything in the file is checked first (see the module docstring); a file that is
    malformed, corrupted, larger than ``max_bytes`` (default 4 GiB; ``None``: no cap) or
    does not fit the architecture raises :class:`~.errors.ArchiveError` (a ValueError)
    naming the layer or tensor, and ``model`` is left unchanged. Otherwise ``model`` is
    changed in place (masks removed, its layers replaced, every tensor loaded) and put
    in eval mode; nothing is measured.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no converted model at {str(path)!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (the dense architecture), got {type(model).__name__}")
    check_max_bytes(max_bytes)
    where = repr(str(path))
    tensors, meta = _read(path, max_bytes)
    folded = _folded(where, meta, dict(model.named_modules()))
    norms = _rms_norms(where, meta, model)
    siblings, mlps = _siblings(where, meta), _name_list(where, meta, "gated_mlps")
    attentions, layers = _name_list(where, meta, "attentions"), _name_list(where, meta, "decoder_layers")
    shaped = model
    if folded or siblings or mlps or attentions or layers:  # the structure checked on a copy before the model changes
        shaped = _apply_folds(copy.deepcopy(model), folded)
        fuse_rms_norms(shaped, norms if layers else [])  # decoder layers are checked over their fused norms
        _apply_siblings(where, shaped, siblings, mlps, attentions, layers)
    names = dict(shaped.named_modules())
    entries = _entries(where, meta, names)
    spec = check_input_spec(_json(where, meta, "input_spec"))
    summary = _json(where, meta, "summary")
    if summary is not None:
        try:
            summary = ConversionSummary.from_dict(summary)
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as e:
            raise ArchiveError(f"{where}: metadata 'summary' is malformed ({type(e).__name__}: {e})") from None
    built = {name: _build(name, kind, config, state, tensors, names[name])
             for name, (kind, config, state) in entries.items()}
    kept = _kept_tensors(where, shaped, built, tensors)
    over_sparse = {key: _over_sparse_layers(where, meta, key, shaped, built, check, what)
                   for key, (check, _, what) in _OVER_SPARSE.items()}
    pools = _pools(where, meta, shaped)
    # everything is checked: change the model
    if folded:
        _apply_folds(model, folded)
        model.__dict__[FOLDED_ATTR] = folded
    if norms:
        fuse_rms_norms(model, norms)
        model.__dict__[NORMS_ATTR] = norms
    if siblings or mlps or attentions or layers:
        _apply_siblings(where, model, siblings, mlps, attentions, layers)
        model.__dict__[SIBLINGS_ATTR] = siblings
        model.__dict__[MLPS_ATTR] = mlps
        model.__dict__[ATTENTIONS_ATTR] = attentions
        model.__dict__[LAYERS_ATTR] = layers
    if "" in built:  # the converted model is a single layer
        model = built[""]
    else:
        remove_masks(model)
        for name, layer in built.items():
            _replace(model, name, layer)
        model.load_state_dict(kept, strict=False)
    for key, names in over_sparse.items():
        if names:
            _OVER_SPARSE[key][1](model, names)
            model.__dict__[_NAME_LISTS[key]] = names
    if pools:
        compile_pools(model, pools)
        model.__dict__[POOLS_ATTR] = pools
    if summary is not None:
        model.conversion_summary = summary
    if spec is not None:
        attach_input_check(model, spec)
    return model.eval()
