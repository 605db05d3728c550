"""Checks of what a checkpoint says about rebuilding its model (``extra["sparsenn"]``).

``sparsenn prune/report/convert`` rebuild the model a checkpoint holds from the model name,
arguments, input shape and seed that :func:`~sparsenn.cli.recipes.runner.checkpoint_meta`
wrote. From a stranger's file these are hostile values: each is checked against
:mod:`.bounds` (and the data spec against the recipe schema's ``data`` section) before
anything is built, and the model is first built on PyTorch's ``meta`` device (shapes, no
memory) and compared with the file's tensors, so the real model can never be larger than
what the file already holds.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from ...train.checkpoint import CheckpointError
from ...train.checkpoint_format import names_text
from .bounds import input_shape_problems, model_args_problems, seed_problems

__all__ = ["check_fits", "checked_meta"]

_WHERE = "extra.sparsenn"


def _number_or_none(v: Any) -> bool:
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))


def checked_meta(meta: Any, source: str | os.PathLike) -> dict[str, Any]:
    """A copy of ``extra["sparsenn"]`` (``{}`` if absent) whose fields are all within bounds;
    :class:`~sparsenn.CheckpointError` listing every field that is not."""
    from .schema import SCHEMA, _walk

    if meta is None:
        return {}
    if not isinstance(meta, dict):
        raise CheckpointError(f"{str(source)!r}: {_WHERE}: expected a mapping, got {type(meta).__name__}")
    meta, problems = dict(meta), []
    if "seed" in meta:
        problems += seed_problems(meta["seed"], f"{_WHERE}.seed")
    if meta.get("input_shape") is not None:
        problems += input_shape_problems(meta["input_shape"], f"{_WHERE}.input_shape")
    model = meta.get("model")
    if model is not None:
        if not (isinstance(model, dict) and isinstance(model.get("name"), str) and set(model) <= {"name", "args"}):
            problems.append(f"{_WHERE}.model: expected {{name: str, args: mapping}}, got {model!r}"[:300])
        else:
            problems += model_args_problems(model.get("args") or {}, f"{_WHERE}.model.args")
    if meta.get("data") is not None:
        meta["data"] = _walk(SCHEMA["data"], meta["data"], f"{_WHERE}.data", problems)
    metrics = meta.get("metrics")
    if metrics is not None and not (isinstance(metrics, dict) and all(map(_number_or_none, metrics.values()))):
        problems.append(f"{_WHERE}.metrics: expected a mapping of names to numbers, got {metrics!r}"[:300])
    if problems:
        raise CheckpointError(f"{str(source)!r}: the checkpoint's metadata is invalid or out of bounds: "
                              + "; ".join(problems))
    return meta


def check_fits(probe: nn.Module, state: dict[str, Any], what: str, source: str | os.PathLike) -> None:
    """``probe`` (the model built on the meta device) has exactly the file's tensor names and shapes
    (masks aside, which loading attaches)."""
    own = probe.state_dict()
    missing = [k for k in own if k not in state]
    wrong = [f"{k}: model {tuple(v.shape)} vs checkpoint {tuple(state[k].shape)}" for k, v in own.items()
             if k in state and torch.is_tensor(v) and tuple(v.shape) != tuple(state[k].shape)]
    if missing or wrong:
        raise CheckpointError(f"{str(source)!r}: checkpoint does not fit the model {what}: "
                              + "; ".join(([f"missing {names_text(missing)}"] if missing else []) + wrong[:10]))
