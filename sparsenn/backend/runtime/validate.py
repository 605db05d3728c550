"""Checks of a sparse layer's saved state before the layer is built or a kernel reads it.

The kernels read their arrays without bounds checks, so state that did not come from
:func:`sparsenn.convert` in this process (a file read by :func:`~.io.load`, a
``state_dict``) is checked field by field against the layer it is for, and every
problem raises :class:`~.errors.ArchiveError` naming the layer, the tensor or field,
and what is wrong:

- the layer's configuration (:func:`check_linear_config`, :func:`check_conv_config`):
  exact keys, positive integer sizes, a known padding mode;
- its extra state (:func:`check_state`): a non-empty plan of positive row counts, each
  routed to ``"dense"``, ``"semi_structured"`` or a packed weight the layer holds; per
  packed weight a registered kernel, integer metadata and the names of its arrays;
- each packed weight (:func:`check_packed`): the matrix it describes is the layer's
  ``(out, in)``, and its arrays are a layout the kernel's ``pack`` makes (dtypes,
  lengths, contiguity, pointers and indices in range and sorted: the kernel's
  ``check``, :mod:`sparsenn.backend.kernels._layout`);
- the dense ``weight`` (present exactly when the plan runs dense somewhere, ``(out, in)``,
  floating point) and the ``bias`` (``(out,)``, float32 where a kernel reads it).

:func:`layer_parts` runs all of these on one layer of a file; the layers themselves
run :func:`check_state` in ``set_extra_state`` and :func:`check_packed` /
:func:`check_bias` before the first product after their state changed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .. import kernels as K
from ..kernels._layout import MAX_DIM
from .errors import ArchiveError

DENSE = "dense"  # a route that runs F.linear / F.conv2d on the dense weight
SEMI_STRUCTURED = "semi_structured"  # a route that runs torch's 2:4 tensors built from the dense weight
DENSE_ROUTES = (DENSE, SEMI_STRUCTURED)
MAX_PLAN = 1024  # (rows, kernel) entries in a plan; conversion makes one per measured batch size
STATE_KEYS = ("plan", "kernel_meta", "kernel_of", "kernel_arrays")  # + optional "label"
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def _fail(where: str, why: str) -> ArchiveError:
    return ArchiveError(f"{where}: {why}")


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _keys(where: str, what: str, d: Any, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict:
    if not isinstance(d, dict):
        raise _fail(where, f"{what} must be a JSON object, got {type(d).__name__}")
    missing = [k for k in required if k not in d]
    unknown = sorted(str(k) for k in d if k not in required and k not in optional)
    if missing or unknown:
        raise _fail(where, f"{what} must have keys {list(required)}" + (f" (optional {list(optional)})" if optional
                                                                        else "")
                    + (f"; missing {missing}" if missing else "") + (f"; unknown {unknown}" if unknown else ""))
    return d


def _ints(where: str, name: str, v: Any, n: int, low: int) -> list[int]:
    if not isinstance(v, (list, tuple)) or len(v) != n or not all(_is_int(x) and low <= x <= MAX_DIM for x in v):
        raise _fail(where, f"{name} must be a list of {n} integers in [{low}, {MAX_DIM}], got {v!r}")
    return [int(x) for x in v]


def _size(where: str, name: str, v: Any) -> int:
    if not _is_int(v) or not 1 <= v <= MAX_DIM:
        raise _fail(where, f"{name} must be an integer in [1, {MAX_DIM}], got {v!r}")
    return int(v)


# ------------------------------------------------------------------ configuration


def check_linear_config(where: str, config: Any) -> dict[str, int]:
    """``{"in_features", "out_features"}``: positive integers."""
    c = _keys(where, "config", config, ("in_features", "out_features"))
    return {k: _size(where, k, c[k]) for k in ("in_features", "out_features")}


def check_conv_config(where: str, config: Any) -> dict[str, Any]:
    """A :class:`~.layers.SparseConv2d` configuration (``SparseConv2d.config()``)."""
    c = _keys(where, "config", config, ("in_channels", "out_channels", "kernel_size", "stride", "padding",
                                        "dilation", "padding_mode"))
    out = {"in_channels": _size(where, "in_channels", c["in_channels"]),
           "out_channels": _size(where, "out_channels", c["out_channels"]),
           "kernel_size": _ints(where, "kernel_size", c["kernel_size"], 2, 1),
           "stride": _ints(where, "stride", c["stride"], 2, 1),
           "padding": _ints(where, "padding", c["padding"], 4, 0),
           "dilation": _ints(where, "dilation", c["dilation"], 2, 1),
           "padding_mode": c["padding_mode"]}
    if out["padding_mode"] not in PADDING_MODES:
        raise _fail(where, f"padding_mode must be one of {list(PADDING_MODES)}, got {out['padding_mode']!r}")
    if out["in_channels"] * out["kernel_size"][0] * out["kernel_size"][1] > MAX_DIM:
        raise _fail(where, f"in_channels * kernel height * kernel width exceeds {MAX_DIM}")
    return out


# ------------------------------------------------------------------ extra state


def _rows(where: str, r: Any) -> int:
    """A plan key: a positive row count (an int, or its decimal string as JSON stores it)."""
    if _is_int(r) and r >= 1:
        return int(r)
    if isinstance(r, str) and r.isascii() and r.isdigit() and len(r) <= 18 and int(r) >= 1:
        return int(r)
    raise _fail(where, f"plan keys must be positive row counts, got {r!r}")


def check_state(where: str, state: Any) -> dict[str, Any]:
    """The layer's extra state, checked and normalized: ``plan`` ``{rows: route}``, ``kernel_meta``,
    ``kernel_of``, ``kernel_arrays`` (one entry per packed weight, the same keys) and ``label``."""
    s = _keys(where, "state", state, STATE_KEYS, ("label",))
    plan, meta, of, arrays = (s[k] for k in STATE_KEYS)
    for name, d in (("plan", plan), ("kernel_meta", meta), ("kernel_of", of), ("kernel_arrays", arrays)):
        if not isinstance(d, dict):
            raise _fail(where, f"{name} must be a JSON object, got {type(d).__name__}")
    if not 1 <= len(plan) <= MAX_PLAN:
        raise _fail(where, f"the plan must have 1 to {MAX_PLAN} (rows, kernel) entries, got {len(plan)}")
    keys = set(of)
    if set(meta) != keys or set(arrays) != keys:
        raise _fail(where, f"kernel_meta, kernel_of and kernel_arrays must name the same packed weights, got "
                           f"{sorted(map(str, meta))}, {sorted(map(str, of))}, {sorted(map(str, arrays))}")
    kernels = K.list_kernels()
    for key in keys:
        if not isinstance(key, str) or not key.isidentifier() or key in DENSE_ROUTES:
            raise _fail(where, f"a packed weight's name must be an identifier other than {DENSE_ROUTES}, got {key!r}")
        if of[key] not in kernels:
            raise _fail(where, f"packed weight {key!r} names kernel {of[key]!r}; known kernels: {', '.join(kernels)}")
        m = meta[key]
        if not isinstance(m, dict) or not all(isinstance(a, str) and _is_int(b) for a, b in m.items()):
            raise _fail(where, f"kernel_meta[{key!r}] must map names to integers, got {m!r}")
        names = arrays[key]
        if (not isinstance(names, list) or not all(isinstance(a, str) and a.isidentifier() for a in names)
                or len(set(names)) != len(names)):
            raise _fail(where, f"kernel_arrays[{key!r}] must be a list of distinct array names, got {names!r}")
    routes = {}
    for r, k in plan.items():
        if not isinstance(k, str) or (k not in keys and k not in DENSE_ROUTES):
            raise _fail(where, f"the plan routes {r!r} rows to {k!r}; this layer holds "
                               f"{', '.join([*DENSE_ROUTES, *sorted(keys)])}")
        routes[_rows(where, r)] = k
    label = s.get("label", "")
    if not isinstance(label, str):
        raise _fail(where, f"label must be a string, got {type(label).__name__}")
    return {"plan": routes, "kernel_meta": {k: {a: int(b) for a, b in meta[k].items()} for k in keys},
            "kernel_of": {k: of[k] for k in keys}, "kernel_arrays": {k: list(arrays[k]) for k in keys},
            "label": label}


# ------------------------------------------------------------------ tensors


def check_packed(where: str, key: str, packed: K.Packed, out: int, cols: int) -> None:
    """``packed`` describes the layer's ``(out, cols)`` matrix in a layout its kernel's ``pack`` makes."""
    why = packed.problem()
    if why is None and (packed.meta["out"], packed.meta["in"]) != (out, cols):
        why = f"it describes a {packed.meta['out']}x{packed.meta['in']} matrix, the layer is {out}x{cols}"
    if why is not None:
        raise _fail(where, f"packed weight {key!r} ({packed.kernel}): {why}")


def check_bias(where: str, bias: torch.Tensor | None, out: int, dtype: torch.dtype | None) -> None:
    """``bias`` is ``None`` or a ``(out,)`` tensor of ``dtype`` (``None``: any floating dtype)."""
    if bias is None:
        return
    if tuple(bias.shape) != (out,):
        raise _fail(where, f"bias must have shape ({out},), got {tuple(bias.shape)}")
    if (bias.dtype != dtype) if dtype is not None else not bias.dtype.is_floating_point:
        raise _fail(where, f"bias must be {str(dtype or 'floating point').removeprefix('torch.')}, "
                           f"got {str(bias.dtype).removeprefix('torch.')}")


def check_weight(where: str, weight: torch.Tensor, out: int, cols: int, dtype: torch.dtype | None) -> None:
    """The dense weight: an ``(out, cols)`` tensor of ``dtype`` (``None``: any floating dtype)."""
    if tuple(weight.shape) != (out, cols):
        raise _fail(where, f"weight must have shape ({out}, {cols}), got {tuple(weight.shape)}")
    if (weight.dtype != dtype) if dtype is not None else not weight.dtype.is_floating_point:
        raise _fail(where, f"weight must be {str(dtype or 'floating point').removeprefix('torch.')}, "
                           f"got {str(weight.dtype).removeprefix('torch.')}")


def _array(where: str, name: str, t: torch.Tensor) -> np.ndarray:
    if t.device.type != "cpu":
        raise _fail(where, f"tensor {name!r} is on {t.device}, packed arrays live on the CPU")
    try:
        return t.detach().numpy()
    except (TypeError, RuntimeError):
        raise _fail(where, f"tensor {name!r} has dtype {str(t.dtype).removeprefix('torch.')}, "
                           "which is no packed array's dtype") from None


@dataclass
class LayerParts:
    """What a checked file entry builds a sparse layer from."""

    out: int
    cols: int
    plan: dict[int, str]
    packed: dict[str, K.Packed]
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    label: str


def layer_parts(where: str, out: int, cols: int, state: Any, tensors: dict[str, torch.Tensor], prefix: str,
                has_bias: bool) -> LayerParts:
    """Check one sparse layer of a file: its extra ``state`` and its tensors (``prefix + name``) for an
    ``(out, cols)`` product whose architecture has a bias iff ``has_bias``."""
    s = check_state(where, state)
    packed = {}
    for key in sorted(s["kernel_of"]):
        arrays = {}
        for a in s["kernel_arrays"][key]:
            name = f"{prefix}{key}_{a}"
            if name not in tensors:
                raise _fail(where, f"packed weight {key!r} needs tensor {name!r}, which the file does not hold")
            arrays[a] = _array(where, name, tensors[name])
        packed[key] = K.Packed(s["kernel_of"][key], arrays, s["kernel_meta"][key])
        check_packed(where, key, packed[key], out, cols)
    weight, bias = tensors.get(prefix + "weight"), tensors.get(prefix + "bias")
    dense = sorted({k for k in s["plan"].values() if k in DENSE_ROUTES})
    if dense and weight is None:
        raise _fail(where, f"the plan runs {dense[0]!r} but the file holds no tensor {prefix + 'weight'!r}")
    if weight is not None:
        if not dense:
            raise _fail(where, f"the file holds {prefix + 'weight'!r} but no batch size runs dense")
        check_weight(where, weight, out, cols, torch.float32 if packed else None)  # the kernels' input dtype
    if has_bias != (bias is not None):
        raise _fail(where, f"the architecture's layer has {'a' if has_bias else 'no'} bias, the file stores "
                           f"{'none' if bias is None else 'one'} ({prefix + 'bias'!r})")
    check_bias(where, bias, out, torch.float32 if packed or weight is None else weight.dtype)
    return LayerParts(out, cols, s["plan"], packed, weight, bias, s["label"])


# ------------------------------------------------------------------ the model-level input check


def check_input_spec(spec: Any) -> list[dict[str, Any]] | None:
    """The saved input check of :func:`sparsenn.convert` (``check_inputs=True``): ``None`` or a list of
    ``{"kind": "arg" | "kwarg", "key", "shape", "ndim", "dtype"}``."""
    where = "input_spec"
    if spec is None:
        return None
    if not isinstance(spec, list):
        raise _fail(where, f"must be a list or null, got {type(spec).__name__}")
    for s in spec:
        s = _keys(where, "an entry", s, ("kind", "key", "shape", "ndim", "dtype"))
        if s["kind"] == "arg":
            ok = _is_int(s["key"]) and 0 <= s["key"] <= MAX_DIM
        else:
            ok = s["kind"] == "kwarg" and isinstance(s["key"], str)
        if not ok:
            raise _fail(where, f"an entry must be kind 'arg' with an index or 'kwarg' with a name, got "
                               f"{s['kind']!r} / {s['key']!r}")
        if not isinstance(s["shape"], list) or len(s["shape"]) > 64:
            raise _fail(where, f"shape must be a list of at most 64 sizes, got {s['shape']!r}")
        _ints(where, "shape", s["shape"], len(s["shape"]), 0)
        if not _is_int(s["ndim"]) or s["ndim"] != (len(s["shape"]) + 1 if s["ndim"] else 0) or (
                s["ndim"] == 0 and s["shape"]):
            raise _fail(where, f"ndim must be the shape's length + 1 (0 for a scalar), got {s['ndim']!r}")
        if not isinstance(s["dtype"], str) or not isinstance(getattr(torch, s["dtype"], None), torch.dtype):
            raise _fail(where, f"dtype must name a torch dtype, got {s['dtype']!r}")
    return spec
