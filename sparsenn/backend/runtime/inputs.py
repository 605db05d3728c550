"""The example input: its tensors, calling a model with it, tiling it to a batch size; the input check.

A model input is a tensor (``model(x)``), a tuple/list of arguments (``model(*x)``) or a
dict of keyword arguments (``model(**x)``); tensors carry the batch in dim 0.
:func:`attach_input_check` adds a model-level forward pre-hook that rejects inputs whose
dtype or non-batch shape differ from the example's (TypeError / ValueError naming the
input, expected and given); its spec is JSON-ready (``INPUT_SPEC_ATTR``), so
:func:`sparsenn.backend.runtime.save` keeps it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

INPUT_SPEC_ATTR = "_sparsenn_input_spec"  # JSON-ready: saved with the model
INPUT_CHECK_ATTR = "_sparsenn_input_check"  # the same with torch types, for the hook


def tensors_of(example: Any) -> list[tuple[str, torch.Tensor]]:
    """``(path, tensor)`` of the tensors of a model input: ``x``, ``(x, y)`` or ``{"x": x}``."""
    if isinstance(example, torch.Tensor):
        return [("input", example)]
    if isinstance(example, (tuple, list)):
        return [(f"input[{i}]", t) for i, t in enumerate(example) if isinstance(t, torch.Tensor)]
    if isinstance(example, dict):
        return [(f"input[{k!r}]", t) for k, t in example.items() if isinstance(t, torch.Tensor)]
    return []


def call_model(model: nn.Module, example: Any) -> Any:
    """``model(x)``, ``model(*x)`` or ``model(**x)``."""
    if isinstance(example, torch.Tensor):
        return model(example)
    if isinstance(example, (tuple, list)):
        return model(*example)
    return model(**example)


def tile(t: torch.Tensor, n: int) -> torch.Tensor:
    """``t`` repeated along dim 0 to exactly ``n`` entries."""
    reps = -(-n // t.shape[0])
    return t.repeat(reps, *([1] * (t.dim() - 1)))[:n].contiguous()


def token_count(model: nn.Module, example: Any) -> int | None:
    """Tokens of a one-sequence example for a text generator (``None`` otherwise).

    A model with ``generate`` (a ``transformers`` causal language model) given a dict
    holding ``input_ids`` of shape ``(1, L)`` is converted per *token*: its "batch size"
    ``b`` is ``b`` tokens of that sequence, so ``b = 1`` is one step of token-by-token
    decoding (every Linear multiplies one row) and ``b = L`` the prompt (prefill).
    """
    if not (callable(getattr(model, "generate", None)) and isinstance(example, dict)):
        return None
    ids = example.get("input_ids")
    if isinstance(ids, torch.Tensor) and ids.dim() == 2 and ids.shape[0] == 1:
        return int(ids.shape[1])
    return None


def tile_tokens(t: torch.Tensor, n: int) -> torch.Tensor:
    """``t (1, L, ...)`` cut or repeated along dim 1 to exactly ``n`` tokens."""
    reps = -(-n // t.shape[1])
    return t.repeat(1, reps, *([1] * (t.dim() - 2)))[:, :n].contiguous()


def at_batch(example: Any, n: int, batch0: int, tokens: bool = False) -> Any:
    """The example input with every tensor whose dim 0 is the batch (``batch0``) tiled to ``n``;
    with ``tokens`` (see :func:`token_count`) every ``(1, batch0, ...)`` tensor cut or repeated to ``n`` tokens."""
    def one(t):
        if not isinstance(t, torch.Tensor) or not t.dim():
            return t
        if tokens:
            return tile_tokens(t, n) if t.dim() >= 2 and t.shape[0] == 1 and t.shape[1] == batch0 else t
        return tile(t, n) if t.shape[0] == batch0 else t

    if isinstance(example, torch.Tensor):
        return one(example)
    if isinstance(example, (tuple, list)):
        return type(example)(one(t) for t in example)
    return {k: one(v) for k, v in example.items()}


def output_tensors(out: Any) -> list[torch.Tensor]:
    """The tensors of a model output: a tensor, or those in a tuple/list/dict."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for t in out if isinstance(t, torch.Tensor)]
    return []


def input_spec(example: Any) -> list[dict[str, Any]]:
    """JSON-ready description of the example's tensors: kind (arg/kwarg), key, non-batch shape, ndim, dtype."""
    spec = []
    if isinstance(example, torch.Tensor):
        items = [("arg", 0, example)]
    elif isinstance(example, (tuple, list)):
        items = [("arg", i, t) for i, t in enumerate(example)]
    else:
        items = [("kwarg", k, t) for k, t in example.items()]
    for kind, key, t in items:
        if isinstance(t, torch.Tensor):
            spec.append({"kind": kind, "key": key, "shape": list(t.shape[1:]), "ndim": t.dim(),
                         "dtype": str(t.dtype).removeprefix("torch.")})
    return spec


def _shape_text(ndim: int, rest: Sequence[int]) -> str:
    return "(" + ", ".join(["B", *map(str, rest)]) + ")" if ndim else "()"


def _fast_spec(spec: list[dict[str, Any]]) -> list[tuple]:
    """The spec with torch types, for a check that costs about a microsecond per call."""
    return [(s["kind"] == "arg", s["key"], s["ndim"], torch.Size(s["shape"]), getattr(torch, s["dtype"]), s)
            for s in spec]


def check_inputs(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook of a converted model: the input's dtype and non-batch shape must match the example's."""
    for positional, key, ndim, shape, dtype, s in module.__dict__.get(INPUT_CHECK_ATTR, ()):
        if positional:
            if key >= len(args):
                continue
            t = args[key]
        elif key in kwargs:
            t = kwargs[key]
        else:
            continue
        if not isinstance(t, torch.Tensor) or t.dtype != dtype or t.dim() != ndim or t.shape[1:] != shape:
            _bad_input(t, s)


def _bad_input(t: Any, s: dict[str, Any]) -> None:
    where = f"input {s['key']}" if s["kind"] == "arg" else f"input {s['key']!r}"
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{where}: expected a tensor, got {type(t).__name__}")
    dtype = str(t.dtype).removeprefix("torch.")
    if dtype != s["dtype"]:
        raise TypeError(f"{where}: the converted model expects dtype {s['dtype']}, got {dtype}")
    raise ValueError(f"{where}: the converted model expects shape {_shape_text(s['ndim'], s['shape'])} "
                     f"(any batch size B), got {tuple(t.shape)}")


def attach_input_check(model: nn.Module, spec: list[dict[str, Any]]) -> None:
    """Add (once) the input-check pre-hook to ``model`` with ``spec`` (see :func:`input_spec`)."""
    model.__dict__[INPUT_SPEC_ATTR] = spec
    model.__dict__[INPUT_CHECK_ATTR] = _fast_spec(spec)
    if not any(h is check_inputs for h in model._forward_pre_hooks.values()):
        model.register_forward_pre_hook(check_inputs, with_kwargs=True)
