"""Checks of a decoded checkpoint against the model, sparsifier and optimizers it is loaded into.

:func:`sparsenn.load` runs every check here before it changes anything, so a checkpoint that
does not fit, or whose values are out of range, raises :class:`CheckpointError` naming the
tensor or field and leaves the user's objects as they were:

* model: exactly the model's ``state_dict`` names, plus ``<param>_mask`` for parameters the
  model does not mask yet; every tensor with the model's dtype and shape; masks boolean and
  shaped like their parameter.
* sparsifier: counters, sparsity and history of the right types and in range; a generator
  state the generator accepts; the method state accepted by the method (tried on a copy),
  with tensors shaped like the parameters they belong to; the same masked parameters.
* optimizer: as many groups and parameters as the optimizer has; every state tensor shaped
  like its parameter (or a scalar, or broadcastable to it: Adafactor's factored moments,
  or flat over the group: L-BFGS), in the parameter's dtype; finite scalars and
  hyperparameters of the optimizer's own types.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

from ..core.masks import MASK_SUFFIX
from .checkpoint_format import CheckpointError, names_text, short_repr

__all__ = ["check_model", "check_optimizer", "check_sparsifier"]

_MAX_COUNT = 2**63 - 1  # step counters are int64 in torch
# hyperparameter ranges every torch optimizer's constructor enforces
_NONNEGATIVE = ("lr", "eps", "weight_decay", "momentum", "dampening", "lr_decay", "alpha", "lambd")


def _raise(problems: list[str], what: str) -> None:
    if problems:
        more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
        raise CheckpointError(f"checkpoint does not fit the {what}: {'; '.join(problems[:10])}{more}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# ----------------------------------------------------------------------------- model


def check_model(state: dict[str, Any], model: nn.Module) -> dict[str, torch.Tensor]:
    """Check a checkpoint's model state against ``model``; returns the masks to attach first."""
    own = model.state_dict()
    params = dict(model.named_parameters())
    masks, unexpected = {}, []
    for k in state:
        if k in own:
            continue
        if k.endswith(MASK_SUFFIX) and k[: -len(MASK_SUFFIX)] in params:
            masks[k[: -len(MASK_SUFFIX)]] = state[k]
        else:
            unexpected.append(k)
    missing = [k for k in own if k not in state]
    if missing or unexpected:
        raise CheckpointError(f"checkpoint does not fit the model: missing {names_text(missing)}, "
                              f"unexpected {names_text(unexpected)}")
    problems = []
    expected = {k: (v.dtype, tuple(v.shape)) for k, v in own.items() if torch.is_tensor(v)}
    expected.update({n + MASK_SUFFIX: (torch.bool, tuple(params[n].shape)) for n in masks})
    for k, (dtype, shape) in expected.items():
        got = state[k]
        if not torch.is_tensor(got):
            problems.append(f"model/{k}: expected a tensor, got {short_repr(got)}")
        elif got.dtype != dtype:
            problems.append(f"model/{k}: dtype {got.dtype}, the model's is {dtype}")
        elif tuple(got.shape) != shape:
            problems.append(f"model/{k}: shape {tuple(got.shape)}, the model's is {shape}")
    _raise(problems, "model")
    return masks


# ----------------------------------------------------------------------------- sparsifier


def _fraction(v: Any, where: str) -> None:
    if not (_is_number(v) and 0.0 <= v < 1.0):  # NaN fails both comparisons
        raise CheckpointError(f"{where}: expected a sparsity in [0, 1), got {short_repr(v)}")


def _count(v: Any, where: str, high: int = _MAX_COUNT) -> None:
    if not (_is_int(v) and 0 <= v <= high):
        raise CheckpointError(f"{where}: expected an integer in [0, {high}], got {short_repr(v)}")


def _check_method_tensors(state: Any, params: dict[str, nn.Parameter], names: list[str], where: str) -> None:
    """Every ``{name: tensor}`` mapping in a method's state is keyed by masked parameters and shaped like them."""
    if isinstance(state, dict):
        if state and all(torch.is_tensor(v) for v in state.values()):
            for k, v in state.items():
                if k not in names:
                    raise CheckpointError(f"{where}/{k}: not a parameter this sparsifier masks ({', '.join(names)})")
                if tuple(v.shape) != tuple(params[k].shape):
                    raise CheckpointError(f"{where}/{k}: shape {tuple(v.shape)}, the parameter's is "
                                          f"{tuple(params[k].shape)}")
                if not (v.dtype.is_floating_point or v.dtype is torch.bool):
                    raise CheckpointError(f"{where}/{k}: dtype {v.dtype}; expected floating point or bool")
        else:
            for k, v in state.items():
                _check_method_tensors(v, params, names, f"{where}/{k}")
    elif isinstance(state, (list, tuple)):
        for i, v in enumerate(state):
            _check_method_tensors(v, params, names, f"{where}/{i}")


def check_sparsifier(state: dict[str, Any], sparsifier: Any) -> None:
    """Check a checkpoint's sparsifier state against ``sparsifier`` (a :class:`~sparsenn.Sparsifier`)."""
    keys = set(sparsifier.state_dict())  # the sparsifier's own keys: step_count, sparsity, history, ...
    if set(state) != keys:
        raise CheckpointError(f"sparsifier: expected the keys {sorted(keys)}, got {short_repr(sorted(state), 200)}")
    _count(state["step_count"], "sparsifier/step_count")
    _fraction(state["sparsity"], "sparsifier/sparsity")
    history = state["history"]
    if not isinstance(history, list):
        raise CheckpointError(f"sparsifier/history: expected a list of [step, sparsity], got {short_repr(history)}")
    last = 0
    for i, entry in enumerate(history):
        where = f"sparsifier/history/{i}"
        if not (isinstance(entry, (list, tuple)) and len(entry) == 2):
            raise CheckpointError(f"{where}: expected [step, sparsity], got {short_repr(entry)}")
        _count(entry[0], f"{where}/0", state["step_count"])  # updates happen at or before the current step
        if entry[0] < last:
            raise CheckpointError(f"{where}: step {entry[0]} comes after step {last}; steps must not decrease")
        _fraction(entry[1], f"{where}/1")
        last = entry[0]
    gen = state["generator"]
    own_gen = sparsifier.generator.get_state()
    if not (torch.is_tensor(gen) and gen.dtype == own_gen.dtype and tuple(gen.shape) == tuple(own_gen.shape)):
        raise CheckpointError(f"sparsifier/generator: expected a {own_gen.dtype} tensor of shape "
                              f"{tuple(own_gen.shape)}, got {short_repr(gen if not torch.is_tensor(gen) else gen.shape)}")
    try:
        torch.Generator(device=sparsifier.generator.device).set_state(gen)  # a throw-away generator
    except (RuntimeError, ValueError, TypeError) as e:
        raise CheckpointError(f"sparsifier/generator: not a valid generator state ({e})") from None
    config = state["config"]
    if not isinstance(config, dict):
        raise CheckpointError(f"sparsifier/config: expected a dict, got {short_repr(config)}")
    names = list(sparsifier.names)
    if config.get("parameters") != names:
        raise CheckpointError(f"sparsifier/config/parameters: the checkpoint's sparsifier masks "
                              f"{short_repr(config.get('parameters'), 200)}, this one masks {names}")
    if config.get("method") != sparsifier.method.name:
        raise CheckpointError(f"sparsifier/config/method: the checkpoint's sparsifier uses "
                              f"{short_repr(config.get('method'))}, this one {sparsifier.method.name!r}")
    method_state = state["method"]
    if not isinstance(method_state, dict):
        raise CheckpointError(f"sparsifier/method: expected a dict, got {short_repr(method_state)}")
    params = dict(sparsifier.model.named_parameters())
    _check_method_tensors(method_state, params, names, "sparsifier/method")
    # the method's own checks, on a copy that shares the model (memo) but not the method's state
    trial = copy.deepcopy(sparsifier.method, memo={id(sparsifier.model): sparsifier.model, id(sparsifier): sparsifier})
    try:
        trial.load_state_dict(method_state)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, RuntimeError) as e:
        raise CheckpointError(f"sparsifier/method: {e}") from None


# ----------------------------------------------------------------------------- optimizer


def _check_hyper(saved: Any, own: Any, where: str) -> None:
    """``saved`` has the type of the optimizer's own value ``own`` (numbers finite)."""
    if isinstance(own, bool):
        ok = isinstance(saved, bool)
    elif _is_number(own):
        ok = _is_number(saved) and math.isfinite(saved)
    elif isinstance(own, (tuple, list)):
        ok = isinstance(saved, (tuple, list)) and len(saved) == len(own)
        if ok:
            for i, (s, o) in enumerate(zip(saved, own)):
                _check_hyper(s, o, f"{where}/{i}")
    elif torch.is_tensor(own):
        ok = torch.is_tensor(saved) and saved.shape == own.shape and bool(torch.isfinite(saved).all())
    elif own is None:
        ok = saved is None or isinstance(saved, bool)
    else:
        ok = isinstance(saved, type(own))
    if not ok:
        raise CheckpointError(f"{where}: {short_repr(saved)} does not fit the optimizer's value {short_repr(own)}")


def _check_ranges(group: dict[str, Any], where: str) -> None:
    for key in _NONNEGATIVE:
        v = group.get(key)
        if _is_number(v) and not v >= 0:
            raise CheckpointError(f"{where}/{key}: expected a number >= 0, got {v!r}")
    betas = group.get("betas")
    if isinstance(betas, (tuple, list)) and not all(_is_number(b) and 0.0 <= b < 1.0 for b in betas):
        raise CheckpointError(f"{where}/betas: expected numbers in [0, 1), got {short_repr(betas)}")


def _check_state_value(v: Any, param: torch.Tensor, flat: int, where: str) -> None:
    if torch.is_tensor(v):
        shape, own = tuple(v.shape), tuple(param.shape)
        if where.endswith("/step") or (v.numel() <= 1 and v.dim() <= 1 and shape != own):  # a counter or scalar
            if v.numel() != 1 or v.dtype is torch.bool or v.is_complex() or not bool(torch.isfinite(v).all()):
                raise CheckpointError(f"{where}: expected a finite real scalar, got {short_repr(v)}")
            if where.endswith("/step") and bool((v < 0).any()):
                raise CheckpointError(f"{where}: a step count must be >= 0, got {v.item()}")
            return
        fits = shape == own or shape == (flat,) or (
            len(shape) == len(own) and all(s in (1, o) for s, o in zip(shape, own)))
        if not fits:
            raise CheckpointError(f"{where}: shape {shape} does not fit the parameter's {own}")
        if v.dtype != param.dtype:
            raise CheckpointError(f"{where}: dtype {v.dtype}, the parameter's is {param.dtype}")
    elif isinstance(v, (list, tuple)):
        for i, x in enumerate(v):
            _check_state_value(x, param, flat, f"{where}/{i}")
    elif isinstance(v, dict):
        for k, x in v.items():
            _check_state_value(x, param, flat, f"{where}/{k}")
    elif _is_number(v) and not (math.isfinite(v) and (v >= 0 or not where.endswith("/step"))):
        raise CheckpointError(f"{where}: expected a finite number{' >= 0' if where.endswith('/step') else ''}, "
                              f"got {v!r}")


def check_optimizer(state: Any, optimizer: torch.optim.Optimizer, i: int) -> None:
    """Check a checkpoint's ``i``-th optimizer state against ``optimizer``."""
    where = f"optimizers/{i}"
    if not (isinstance(state, dict) and set(state) == {"state", "param_groups"}):
        raise CheckpointError(f"{where}: expected a dict with keys 'state' and 'param_groups', got "
                              f"{short_repr(sorted(state) if isinstance(state, dict) else state)}")
    groups, own_groups = state["param_groups"], optimizer.param_groups
    if not isinstance(groups, list) or len(groups) != len(own_groups):
        n = len(groups) if isinstance(groups, list) else short_repr(groups)
        raise CheckpointError(f"{where}/param_groups: {n} group(s), the optimizer has {len(own_groups)}")
    params: dict[int, tuple[torch.Tensor, int]] = {}  # saved id -> (parameter, numel of its group)
    for g, (saved, own) in enumerate(zip(groups, own_groups)):
        gw = f"{where}/param_groups/{g}"
        ids = saved.get("params") if isinstance(saved, dict) else None
        if not (isinstance(ids, list) and all(_is_int(p) for p in ids)):
            raise CheckpointError(f"{gw}: expected a dict whose 'params' lists integer ids, got {short_repr(saved)}")
        if len(ids) != len(own["params"]):
            raise CheckpointError(f"{gw}/params: {len(ids)} parameter(s), the optimizer's group has "
                                  f"{len(own['params'])}")
        flat = sum(p.numel() for p in own["params"])
        for pid, p in zip(ids, own["params"]):
            if pid in params:
                raise CheckpointError(f"{gw}/params: parameter id {pid} appears twice")
            params[pid] = (p, flat)
        for key, value in own.items():
            if key != "params" and key in saved:
                _check_hyper(saved[key], value, f"{gw}/{key}")
        _check_ranges(saved, gw)
    per_param = state["state"]
    if not isinstance(per_param, dict):
        raise CheckpointError(f"{where}/state: expected a dict, got {short_repr(per_param)}")
    for pid, entry in per_param.items():
        sw = f"{where}/state/{pid}"
        if pid not in params:
            raise CheckpointError(f"{sw}: no parameter with id {pid!r} in param_groups")
        if not (isinstance(entry, dict) and all(isinstance(k, str) for k in entry)):
            raise CheckpointError(f"{sw}: expected a dict of named values, got {short_repr(entry)}")
        p, flat = params[pid]
        for name, v in entry.items():
            _check_state_value(v, p, flat, f"{sw}/{name}")
