"""Save and load a converted model without measuring again: safetensors + JSON, no pickle.

:func:`save` writes every tensor of the converted model's ``state_dict`` (the packed
arrays, dense weights, biases, other layers' parameters and buffers) with safetensors;
the metadata holds, as JSON, each sparse layer's type, configuration and plan, the
input check and the conversion summary. :func:`load` needs the dense architecture
(an instance of the model class, any weights): it swaps in the sparse layers the file
describes, loads every tensor (strictly: names and shapes must match) and restores
the summary and the input check. ``torch.save(converted)`` works too (pickle).
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

from ...core.masks import remove_masks
from ...train.checkpoint import atomic_write
from .conversion import INPUT_SPEC_ATTR, _replace, attach_input_check
from .layers import SparseConv2d, SparseLinear
from .summary import ConversionSummary

FORMAT = "sparsenn-runtime"
VERSION = 1


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
    atomic_write(path, st_save(tensors, metadata=meta))
    return Path(path)


def _empty(kind: str, config: dict[str, Any], state: dict[str, Any], tensors: dict[str, torch.Tensor],
           prefix: str) -> nn.Module:
    """A sparse layer with the file's plan, its buffers shaped (and filled) from the file."""
    def get(name):
        return tensors.get(prefix + name)

    plan = {int(r): k for r, k in state["plan"].items()}
    weight, bias = get("weight"), get("bias")
    from .. import kernels as K

    packed = {key: K.Packed(state["kernel_of"][key], {a: get(f"{key}_{a}").numpy() for a in arrays},
                            {m: int(v) for m, v in state["kernel_meta"][key].items()})
              for key, arrays in state["kernel_arrays"].items()}
    if kind == "SparseLinear":
        layer = SparseLinear(config["out_features"], config["in_features"], plan, packed, weight, bias,
                             state.get("label", ""))
    else:
        c = config
        layer = SparseConv2d(c["in_channels"], c["out_channels"], tuple(c["kernel_size"]), tuple(c["stride"]),
                             tuple(c["padding"]), tuple(c["dilation"]), c["padding_mode"], plan, packed, weight,
                             bias, state.get("label", ""))
    layer.set_extra_state(state)
    return layer


def _fits(module: nn.Module, entry: dict[str, Any]) -> bool:
    """Whether the architecture's ``module`` is the dense layer the file's sparse layer replaced."""
    c = entry["config"]
    if entry["type"] == "SparseLinear":
        return isinstance(module, (nn.Linear, SparseLinear)) and (module.in_features, module.out_features) == (
            c["in_features"], c["out_features"])
    return isinstance(module, (nn.Conv2d, SparseConv2d)) and (
        module.in_channels, module.out_channels, list(module.kernel_size)) == (
        c["in_channels"], c["out_channels"], list(c["kernel_size"]))


def _describe(entry: dict[str, Any]) -> str:
    c = entry["config"]
    if entry["type"] == "SparseLinear":
        return f"Linear({c['in_features']}, {c['out_features']})"
    return f"Conv2d({c['in_channels']}, {c['out_channels']}, kernel_size={tuple(c['kernel_size'])})"


def load(path: str | os.PathLike, model: nn.Module) -> nn.Module:
    """Rebuild the converted model saved at ``path`` into ``model`` (the dense architecture); returns it.

    ``model`` is changed in place (its layers replaced, every tensor loaded) and put in
    eval mode. A file that does not fit the architecture raises ValueError naming the
    mismatching entries; nothing is measured.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no converted model at {str(path)!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (the dense architecture), got {type(model).__name__}")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{str(path)!r} is not a converted sparsenn model (format={meta.get('format')!r})")
        if int(meta.get("version", 0)) > VERSION:
            raise ValueError(f"{str(path)!r} has version {meta['version']}; this sparsenn reads <= {VERSION}")
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118  (safe_open is not a dict)
    layers = json.loads(meta["layers"])
    remove_masks(model)
    names = dict(model.named_modules())
    missing = [n for n in layers if n not in names]
    if missing:
        raise ValueError(f"the file's sparse layers {missing} are not modules of the given model")
    wrong = [f"{n or 'the model'}: file {_describe(e)}, model {type(names[n]).__name__}"
             + (f"({names[n].in_features}, {names[n].out_features})" if isinstance(names[n], nn.Linear) else "")
             for n, e in layers.items() if not _fits(names[n], e)]
    if wrong:
        raise ValueError(f"{str(path)!r} does not fit the model: {'; '.join(wrong)}")
    for name, entry in layers.items():
        layer = _empty(entry["type"], entry["config"], entry["state"], tensors, f"{name}." if name else "")
        if name:
            _replace(model, name, layer)
        else:  # the converted model is a single layer
            model = layer
    own = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    absent = sorted(set(own) - set(tensors))
    extra = sorted(set(tensors) - set(own))
    wrong = [f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(v.shape)}" for k, v in own.items()
             if k in tensors and tuple(tensors[k].shape) != tuple(v.shape)]
    if absent or extra or wrong:
        raise ValueError(f"{str(path)!r} does not fit the model: missing {absent}, unexpected {extra}"
                         + (f", shapes {wrong}" if wrong else ""))
    model.load_state_dict(tensors, strict=False)
    summary = json.loads(meta.get("summary") or "null")
    if summary is not None:
        model.conversion_summary = ConversionSummary.from_dict(summary)
    spec = json.loads(meta.get("input_spec") or "null")
    if spec is not None:
        attach_input_check(model, spec)
    return model.eval()
