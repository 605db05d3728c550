"""Which parameters get masks: by module type, name pattern or explicit list, minus an exclude list.

A *selector* is a module type (``nn.Linear``), a string, or a list of these. A string
is an ``fnmatch`` pattern over module names (``"fc1"``, ``"encoder.*"``) or
fully-qualified parameter names (``"fc1.weight"``, ``"*.bias"``). A string that
matches module names selects the weights of those modules and of the modules inside
them (``"attn"`` includes ``attn.out_proj.weight``); otherwise it is matched against
parameter names. Every string must match something, so a typo is an error rather
than a silent no-op.
"""

from __future__ import annotations

import fnmatch
from typing import Iterable, Union

from torch import nn

Selector = Union[type, str, Iterable[Union[type, str]], None]

#: module types masked when ``include`` is not given
DEFAULT_TYPES: tuple[type, ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention)

_MHA_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


def weight_attrs(module: nn.Module) -> list[str]:
    """The weight-like parameters a module owns directly (not biases, not norms' scales).

    Linear/Conv/Embedding: ``weight``. MultiheadAttention: its input projections (its
    ``out_proj`` is a Linear of its own). Other modules: parameters named ``weight`` or
    ``*_weight``, else every parameter with two or more dimensions.
    """
    own = dict(module.named_parameters(recurse=False))
    if isinstance(module, nn.MultiheadAttention):
        return [a for a in _MHA_WEIGHTS if own.get(a) is not None]
    if isinstance(module, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)):
        return []
    named = [a for a in own if a == "weight" or a.endswith("_weight")]
    return named or [a for a, p in own.items() if p.dim() >= 2]


def subtree_weights(module_name: str, module: nn.Module) -> list[str]:
    """Weight parameter names of ``module`` and every module inside it (its MHA's ``out_proj`` too)."""
    prefix = f"{module_name}." if module_name else ""
    return [f"{prefix}{sub}.{a}" if sub else f"{prefix}{a}"
            for sub, m in module.named_modules() for a in weight_attrs(m)]


def _as_list(sel: Selector) -> list:
    if sel is None:
        return []
    if isinstance(sel, (str, type)):
        return [sel]
    return list(sel)


def _resolve(model: nn.Module, sel: Selector, role: str) -> list[str]:
    params = [n for n, _ in model.named_parameters()]
    modules = dict(model.named_modules())
    chosen: list[str] = []
    for item in _as_list(sel):
        if isinstance(item, type):
            if not issubclass(item, nn.Module):
                raise TypeError(f"{role} type {item.__name__} is not an nn.Module subclass")
            hits = [n for m, mod in modules.items() if isinstance(mod, item) for n in subtree_weights(m, mod)]
        elif isinstance(item, str):
            matched_modules = [m for m in modules if m and fnmatch.fnmatchcase(m, item)]
            if matched_modules:  # module names first: "fc1", "c*" mean those modules' weights
                hits = [n for m in matched_modules for n in subtree_weights(m, modules[m])]
            else:
                hits = [n for n in params if fnmatch.fnmatchcase(n, item)]
            if not hits and not matched_modules:
                raise ValueError(
                    f"{role} entry {item!r} matches no parameter or module of {type(model).__name__}; "
                    f"parameters: {', '.join(params) or '(none)'}"
                )
        else:
            raise TypeError(f"{role} entries must be module types or name patterns, got {item!r}")
        chosen += [h for h in hits if h not in chosen]
    return chosen


def select_parameters(model: nn.Module, include: Selector = None, exclude: Selector = None) -> list[str]:
    """Fully-qualified names of the parameters to mask, in ``named_parameters`` order."""
    included = set(_resolve(model, DEFAULT_TYPES if include is None else include, "include"))
    excluded = set(_resolve(model, exclude, "exclude"))
    names = [n for n, _ in model.named_parameters() if n in included and n not in excluded]
    if not names:
        raise ValueError(
            f"no parameters of {type(model).__name__} selected for masking "
            f"(include={include!r}, exclude={exclude!r})"
        )
    return names
