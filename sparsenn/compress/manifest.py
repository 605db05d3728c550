"""The archive's JSON manifest: what the model is, and how to build it again without the user's code.

``describe(model)`` records the module tree (every module's qualified name and class) and,
where sparsenn can rebuild the model from data alone, how:

- ``torch.nn`` trees: each module of a whitelisted standard class (:data:`TORCH_LAYERS`:
  Linear, Conv, BatchNorm, norms, activations, pooling, dropout, Sequential/ModuleList/
  ModuleDict, ...) with its constructor arguments;
- ``sparsenn.models`` registry models: the registry name and constructor arguments (read
  back from the model's attributes and checked by building the model on the meta device);
- ``transformers`` models: the class name and ``config.to_json_string()``; rebuilt only
  through the classes of transformers' own auto mappings (``AutoModelFor*.from_config``),
  never with ``trust_remote_code`` and never from a config with ``auto_map``.

``rebuild(manifest, ...)`` builds the model back: first on the meta device (nothing is
allocated), so that the parameter shapes and total bytes are checked against the archive
and ``max_bytes``; then for real. Classes are never imported by a name read from a file:
names are looked up in fixed tables. Everything else raises
:class:`~sparsenn.backend.runtime.errors.ArchiveError` asking for ``model=``.

:func:`check_json` and :func:`parse_json` bound what a hostile manifest can make the reader do
(depth, duplicate keys, non-finite numbers).
"""

from __future__ import annotations

import inspect
import json
import math
import sys
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from ..backend.runtime.errors import ArchiveError
from ..models import MODELS

FORMAT = "sparsenn-archive"
SCHEMA_VERSION = 1
MAX_DEPTH = 32  # nesting of the manifest's JSON

_CONV = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "bias",
         "padding_mode")
_TCONV = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "output_padding", "groups", "bias",
          "dilation", "padding_mode")
_BN = ("num_features", "eps", "momentum", "affine", "track_running_stats")
_POOL = ("kernel_size", "stride", "padding", "dilation", "return_indices", "ceil_mode")
_AVG = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad")
#: the torch.nn classes rebuilt from a manifest, and the constructor arguments recorded for each
TORCH_LAYERS: dict[type[nn.Module], tuple[str, ...]] = {
    nn.Linear: ("in_features", "out_features", "bias"),
    nn.Conv1d: _CONV, nn.Conv2d: _CONV, nn.Conv3d: _CONV,
    nn.ConvTranspose1d: _TCONV, nn.ConvTranspose2d: _TCONV,
    nn.BatchNorm1d: _BN, nn.BatchNorm2d: _BN, nn.BatchNorm3d: _BN,
    nn.LayerNorm: ("normalized_shape", "eps", "elementwise_affine", "bias"),
    nn.GroupNorm: ("num_groups", "num_channels", "eps", "affine"),
    nn.RMSNorm: ("normalized_shape", "eps", "elementwise_affine"),
    nn.Embedding: ("num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq",
                   "sparse"),
    nn.ReLU: ("inplace",), nn.ReLU6: ("inplace",), nn.SiLU: ("inplace",), nn.GELU: ("approximate",),
    nn.Tanh: (), nn.Sigmoid: (), nn.Identity: (), nn.Mish: ("inplace",), nn.Hardswish: ("inplace",),
    nn.LeakyReLU: ("negative_slope", "inplace"), nn.ELU: ("alpha", "inplace"),
    nn.Softmax: ("dim",), nn.LogSoftmax: ("dim",),
    nn.Dropout: ("p", "inplace"), nn.Dropout1d: ("p", "inplace"), nn.Dropout2d: ("p", "inplace"),
    nn.MaxPool1d: _POOL, nn.MaxPool2d: _POOL, nn.AvgPool1d: _AVG, nn.AvgPool2d: _AVG,
    nn.AdaptiveAvgPool1d: ("output_size",), nn.AdaptiveAvgPool2d: ("output_size",),
    nn.AdaptiveMaxPool2d: ("output_size", "return_indices"),
    nn.Flatten: ("start_dim", "end_dim"), nn.Unflatten: ("dim", "unflattened_size"),
}
CONTAINERS: tuple[type[nn.Module], ...] = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
_BY_NAME = {f"torch.nn.{cls.__name__}": cls for cls in (*TORCH_LAYERS, *CONTAINERS)}
_FLAGS = ("bias",)  # arguments that say whether the module has that parameter


def class_name(module: nn.Module) -> str:
    cls = type(module)
    if cls in TORCH_LAYERS or cls in CONTAINERS:
        return f"torch.nn.{cls.__name__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def _jsonable(value: Any) -> Any:
    """``value`` as JSON (tuples as lists); ValueError for anything else or a non-finite float."""
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return value
    raise ValueError(f"not storable as JSON: {value!r}")


def _torch_args(module: nn.Module) -> dict[str, Any] | None:
    names = TORCH_LAYERS.get(type(module))
    if names is None:
        return {} if type(module) in CONTAINERS else None
    args = {}
    try:
        for name in names:
            if name in _FLAGS:
                args[name] = getattr(module, name, None) is not None
            else:
                args[name] = _jsonable(getattr(module, name))
    except (AttributeError, ValueError):
        return None
    return args


def _registry_entry(model: nn.Module) -> dict[str, Any] | None:
    """``{"name", "kwargs"}`` for a registry model whose arguments its attributes hold (checked by a meta build)."""
    name = next((n for n in MODELS.names() if MODELS.get(n) is type(model)), None)
    if name is None:
        return None
    kwargs = {}
    for p in list(inspect.signature(type(model).__init__).parameters.values())[1:]:
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and hasattr(model, p.name):
            try:
                kwargs[p.name] = _jsonable(getattr(model, p.name))
            except ValueError:
                return None
    try:
        with torch.device("meta"):
            built = MODELS.get(name)(**kwargs)
    except Exception:  # noqa: BLE001  (the arguments read back do not build it: not rebuildable)
        return None
    theirs, mine = _shapes(built), _shapes(model)
    if any(mine.get(k) != v for k, v in theirs.items()) or any(k not in theirs and not k.endswith("_mask")
                                                                 for k in mine):
        return None
    return {"name": name, "kwargs": kwargs}


def _transformers_entry(model: nn.Module) -> dict[str, Any] | None:
    transformers = sys.modules.get("transformers")
    if transformers is None or not isinstance(model, transformers.PreTrainedModel):
        return None
    try:
        config = json.loads(model.config.to_json_string(use_diff=False))
    except (TypeError, ValueError):
        return None
    if not isinstance(config, dict) or "auto_map" in config:
        return None
    return {"class": type(model).__name__, "config": config}


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def describe(model: nn.Module) -> dict[str, Any]:
    """``{"class", "modules", "registry", "transformers"}``: the model's module tree and how to rebuild it."""
    modules = []
    for name, m in model.named_modules():
        entry: dict[str, Any] = {"name": name, "class": class_name(m)}
        args = _torch_args(m)
        if args is not None:
            entry["args"] = args
        modules.append(entry)
    return {"class": class_name(model), "modules": modules, "registry": _registry_entry(model),
            "transformers": _transformers_entry(model)}


# ------------------------------------------------------------------ hostile JSON


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ArchiveError(f"the manifest repeats the key {dup!r} in one object")
    return out


def _no_constant(name: str) -> Any:
    raise ArchiveError(f"the manifest holds the non-finite number {name}")


def parse_json(text: str | bytes, where: str) -> Any:
    """The manifest's JSON (ArchiveError for invalid UTF-8/JSON, duplicate keys, NaN/Infinity, deep nesting)."""
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        value = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except ArchiveError as e:
        raise ArchiveError(f"{where}: {e}") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ArchiveError(f"{where}: the manifest is not valid JSON ({type(e).__name__}: {e})") from None
    check_json(value, where)
    return value


def check_json(value: Any, where: str) -> None:
    """ArchiveError if ``value`` nests deeper than :data:`MAX_DEPTH` (checked without recursion)."""
    stack = [(value, 0)]
    while stack:
        v, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ArchiveError(f"{where}: the manifest nests deeper than {MAX_DEPTH} levels")
        if isinstance(v, dict):
            stack.extend((x, depth + 1) for x in v.values())
        elif isinstance(v, list):
            stack.extend((x, depth + 1) for x in v)


def require(where: str, value: Any, kind: type | tuple[type, ...], what: str) -> Any:
    """``value`` if it is of ``kind`` (bool is not an int), else ArchiveError naming ``what``."""
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        ok = False
    else:
        ok = isinstance(value, kind)
    if not ok:
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise ArchiveError(f"{where}: {what} must be {names}, got {type(value).__name__} {_short(value)}")
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_model(where: str, model: Any) -> dict[str, Any]:
    """The manifest's ``model`` section, its structure checked (names and classes are strings, nothing more)."""
    model = require(where, model, dict, "'model'")
    if set(model) != {"class", "modules", "registry", "transformers"}:
        raise ArchiveError(f"{where}: 'model' must hold exactly class, modules, registry and transformers, "
                           f"got {sorted(model)}")
    require(where, model["class"], str, "'model.class'")
    for i, m in enumerate(require(where, model["modules"], list, "'model.modules'")):
        require(where, m, dict, f"'model.modules[{i}]'")
        if not {"name", "class"} <= set(m) <= {"name", "class", "args"}:
            raise ArchiveError(f"{where}: 'model.modules[{i}]' must hold name, class and optionally args, "
                               f"got {sorted(m)}")
        require(where, m["name"], str, f"'model.modules[{i}].name'")
        require(where, m["class"], str, f"'model.modules[{i}].class'")
        if "args" in m:
            require(where, m["args"], dict, f"'model.modules[{i}].args'")
    return model


# ------------------------------------------------------------------ rebuilding


def _args(where: str, entry: dict[str, Any], cls: type[nn.Module]) -> dict[str, Any]:
    expected = set(TORCH_LAYERS.get(cls, ()))
    args = require(where, entry.get("args"), dict, f"module {entry['name']!r}: args")
    if set(args) != expected:
        raise ArchiveError(f"{where}: module {entry['name']!r} ({cls.__name__}): args must be exactly "
                           f"{sorted(expected)}, got {sorted(args)}")
    out = {}
    for k, v in args.items():
        if isinstance(v, list):
            if len(v) > 8 or not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
                raise ArchiveError(f"{where}: module {entry['name']!r}: argument {k!r} must be a short list of "
                                   f"integers, got {_short(v)}")
            v = tuple(v)
        elif not (v is None or isinstance(v, (bool, int, float, str))):
            raise ArchiveError(f"{where}: module {entry['name']!r}: argument {k!r} has a {type(v).__name__}")
        out[k] = v
    return out


def _torch_tree(where: str, modules: list[dict[str, Any]]) -> Callable[[], nn.Module] | None:
    """A builder for a tree of whitelisted torch.nn modules (``None`` if any module is of another class)."""
    if not modules or any(m.get("class") not in _BY_NAME for m in modules):
        return None
    plan = []
    seen: dict[str, type[nn.Module]] = {}
    for m in modules:
        name, cls = m["name"], _BY_NAME[m["class"]]
        parent, _, child = name.rpartition(".")
        if (name == "") != (not seen) or (name and (parent not in seen or not child)):
            raise ArchiveError(f"{where}: module {name!r} comes before its parent, or twice")
        if name and seen[parent] not in CONTAINERS:
            raise ArchiveError(f"{where}: module {name!r} lies inside {parent!r}, which is not a container")
        seen[name] = cls
        plan.append((name, parent, child, cls, {} if cls in CONTAINERS else _args(where, m, cls)))

    def build() -> nn.Module:
        built: dict[str, nn.Module] = {}
        for name, parent, child, cls, args in plan:
            built[name] = cls(**args)
            if name:
                built[parent].add_module(child, built[name])
        return built[""]

    return build


def _transformers_builder(where: str, entry: Any, tensors: int) -> Callable[[], nn.Module]:
    entry = require(where, entry, dict, "'model.transformers'")
    if set(entry) != {"class", "config"}:
        raise ArchiveError(f"{where}: 'model.transformers' must hold exactly class and config, got {sorted(entry)}")
    cls_name = require(where, entry["class"], str, "'model.transformers.class'")
    config = dict(require(where, entry["config"], dict, "'model.transformers.config'"))
    if "auto_map" in config or "trust_remote_code" in config:
        raise ArchiveError(f"{where}: the transformers config asks for remote code (auto_map); it is not run: "
                           "pass model=")
    model_type = require(where, config.pop("model_type", None), str, "the config's model_type")
    for k, v in config.items():  # a layer holds at least one tensor: no million-layer skeletons to build
        if "layers" in k and isinstance(v, int) and not isinstance(v, bool) and v > tensors:
            raise ArchiveError(f"{where}: the config's {k}={v} exceeds the archive's {tensors} tensors")
    try:
        from transformers import AutoConfig
        from transformers.models.auto import modeling_auto
    except ImportError:
        raise ArchiveError(f"{where} holds a transformers model; install transformers or pass model=") from None
    try:
        cfg = AutoConfig.for_model(model_type, **config)
    except Exception as e:  # noqa: BLE001  (any config error from a stranger's values)
        raise ArchiveError(f"{where}: transformers cannot build a {model_type!r} config from the manifest "
                           f"({type(e).__name__}: {_short(str(e))})") from None
    for auto_name in sorted(n for n in dir(modeling_auto) if n.startswith("AutoModel")):
        auto = getattr(modeling_auto, auto_name)
        names = getattr(getattr(auto, "_model_mapping", None), "_model_mapping", None)  # model_type -> class name(s)
        if not isinstance(names, Mapping):
            continue
        listed = names.get(model_type, ())
        if cls_name == listed or (isinstance(listed, (tuple, list)) and cls_name in listed):
            return lambda auto=auto: auto.from_config(cfg, trust_remote_code=False)
    raise ArchiveError(f"{where}: {cls_name!r} is not a class of transformers' auto mappings for "
                       f"model_type {model_type!r}; pass model=")


def _registry_builder(where: str, entry: Any) -> Callable[[], nn.Module]:
    entry = require(where, entry, dict, "'model.registry'")
    if set(entry) != {"name", "kwargs"}:
        raise ArchiveError(f"{where}: 'model.registry' must hold exactly name and kwargs, got {sorted(entry)}")
    name = require(where, entry["name"], str, "'model.registry.name'")
    kwargs = require(where, entry["kwargs"], dict, "'model.registry.kwargs'")
    if name not in MODELS:
        raise ArchiveError(f"{where}: model {name!r} is not in sparsenn's registry ({', '.join(MODELS.names())}); "
                           "pass model=")
    return lambda: MODELS.get(name)(**kwargs)


def builder(where: str, model: dict[str, Any], tensors: int) -> Callable[[], nn.Module]:
    """How to build the manifest's model (transformers, then registry, then a torch.nn tree); ArchiveError if none.
    ``tensors``: how many tensors the archive holds (bounds the layers a config may ask for)."""
    if model.get("transformers") is not None:
        return _transformers_builder(where, model["transformers"], tensors)
    if model.get("registry") is not None:
        return _registry_builder(where, model["registry"])
    build = _torch_tree(where, model["modules"])
    if build is None:
        raise ArchiveError(f"{where}: the model is a {model['class']!r}, which sparsenn cannot rebuild from data "
                           "alone (only torch.nn standard layers, sparsenn.models registry models and transformers "
                           "auto classes); pass model= (an instance of the architecture)")
    return build


def rebuild(where: str, model: dict[str, Any], expected: dict[str, tuple[int, ...]], max_bytes: int | None
            ) -> nn.Module:
    """Build the manifest's model: on the meta device first, checked against ``expected`` (``{key: shape}`` of
    the archive's tensors) and ``max_bytes``, then for real."""
    build = builder(where, model, len(expected))
    try:
        with torch.device("meta"):
            skeleton = build()
    except ArchiveError:
        raise
    except Exception as e:  # noqa: BLE001  (a constructor refusing a stranger's arguments)
        raise ArchiveError(f"{where}: the manifest's model cannot be built ({type(e).__name__}: "
                           f"{_short(str(e))})") from None
    nbytes = sum(t.numel() * t.element_size() for t in (*skeleton.parameters(), *skeleton.buffers()))
    if max_bytes is not None and nbytes > max_bytes:
        raise ArchiveError(f"{where}: the manifest's model needs {nbytes} bytes, more than max_bytes={max_bytes}")
    have = _shapes(skeleton)
    wrong = sorted(k for k in set(have) | set(expected)
                   if have.get(k) != expected.get(k) and not (k.endswith("_mask") and k not in have))
    if wrong:
        k = wrong[0]
        raise ArchiveError(f"{where}: the model the manifest describes does not match its tensors: {len(wrong)} "
                           f"differ, e.g. {k!r}: model {have.get(k)}, archive {expected.get(k)}")
    del skeleton
    try:
        return build()
    except Exception as e:  # noqa: BLE001
        raise ArchiveError(f"{where}: the manifest's model cannot be built ({type(e).__name__}: "
                           f"{_short(str(e))})") from None


__all__ = ["CONTAINERS", "FORMAT", "SCHEMA_VERSION", "TORCH_LAYERS", "builder", "check_json", "check_model", "describe",
           "parse_json", "rebuild", "require"]
