"""Which parameters get masks: by module type, name pattern or explicit list, minus an exclude list.

A *selector* is a module type (``nn.Linear``), a string, or a list of these. A string
is an ``fnmatch`` pattern over module names (``"fc1"``, ``"encoder.*"``) or
fully-qualified parameter names (``"fc1.weight"``, ``"*.bias"``). A string that
matches module names selects the weights of those modules and of the modules inside
them (``"attn"`` includes ``attn.out_proj.weight``); otherwise it is matched against
parameter names. Every string must match something, so a typo is an error rather
than a silent no-op.

A pattern that removes whole output units (``channel``) would remove outputs of the
model itself when applied to its output layer: classes of a classifier, tokens of a
language-model head. :func:`select_parameters` given such a pattern leaves the output
layer out (with a :class:`DenseOutputLayerWarning`) unless ``include`` names it; the
output layer is :func:`output_layer`, the last Linear/Conv in module order.
"""


from __future__ import annotations

import fnmatch
import warnings
from typing import Iterable, Union

from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _SpectralNorm, _WeightNorm
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from .masks import canonical_names
from .patterns import Pattern, parse_pattern

Selector = Union[type, str, Iterable[Union[type, str]], None]

#: module types masked when ``include`` is not given
DEFAULT_TYPES: tuple[type, ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention)

_MHA_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


def _weight_like(attr: str) -> bool:
    return attr == "weight" or attr.endswith("_weight")


def computed_weights(module: nn.Module) -> dict[str, str | None]:
    """Tensors of ``module`` computed from other parameters, and what to mask for them.

    ``{tensor name: path (relative to module) of the parameter whose zeros are the tensor's zeros,
    or None if there is none}``. Weight normalization (``w = g * v / ||v||``, Salimans & Kingma
    2016; ``torch.nn.utils.weight_norm`` and ``parametrizations.weight_norm``) masks the direction
    ``v``, never the magnitude ``g`` (zeroing ``g`` would zero whole rows). Spectral normalization
    (``w = w_orig / sigma``) masks ``w_orig``. Other parametrizations (orthogonal, user-defined,
    chains) map zeros of their parameters to nothing in particular: None, refused when selected.
    """
    out: dict[str, str | None] = {}
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, WeightNorm):
            out[hook.name] = hook.name + "_v"
        elif isinstance(hook, SpectralNorm):
            out[hook.name] = hook.name + "_orig"
    if parametrize.is_parametrized(module):
        for tensor, plist in module.parametrizations.items():
            kinds = [type(p) for p in plist]
            if kinds == [_WeightNorm] and hasattr(plist, "original1"):
                out[tensor] = f"parametrizations.{tensor}.original1"
            elif kinds == [_SpectralNorm] and hasattr(plist, "original"):
                out[tensor] = f"parametrizations.{tensor}.original"
            else:
                out[tensor] = None
    return out


def _computed_from(module: nn.Module) -> set[str]:
    """Own parameters that feed a computed weight (weight norm's ``g``/``v``, spectral norm's ``_orig``)."""
    return {f"{h.name}{s}" for h in module._forward_pre_hooks.values() if isinstance(h, (WeightNorm, SpectralNorm))
            for s in ("_g", "_v", "_orig")}


def weight_attrs(module: nn.Module) -> list[str]:
    """The weight-like parameters of a module (not biases, not norms' scales), relative to it.

    Linear/Conv/Embedding: ``weight``. MultiheadAttention: its input projections (its
    ``out_proj`` is a Linear of its own). Other modules: parameters named ``weight`` or
    ``*_weight``, else every parameter with two or more dimensions. A computed weight
    (weight norm, spectral norm, parametrizations; :func:`computed_weights`) stands for the
    parameter to mask; one that no parameter can mask is returned under its own name (which
    is not a parameter's: :func:`select_parameters` refuses it if it stays selected).
    """
    if isinstance(module, parametrize.ParametrizationList):
        return []  # the parametrized module decides
    own = dict(module.named_parameters(recurse=False))
    if isinstance(module, nn.MultiheadAttention):
        return [a for a in _MHA_WEIGHTS if own.get(a) is not None]
    if isinstance(module, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)):
        return []
    computed = computed_weights(module)
    hidden = _computed_from(module)
    own = {a: p for a, p in own.items() if a not in hidden}
    named = [a for a in own if _weight_like(a)] + [computed[t] or t for t in computed if _weight_like(t)]
    if named:
        return named
    return [a for a, p in own.items() if p.dim() >= 2] + [computed[t] or t for t in computed]


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


def _names(model: nn.Module) -> dict[str, str]:
    """``{name: the name of what gets masked}`` for every name a selector may match: every parameter name
    (a tied parameter's names map to its canonical one) and every computed weight (``fc.weight`` of a
    weight-normed layer maps to ``fc.weight_v``; one that cannot be masked maps to itself)."""
    out = canonical_names(model)
    for module_name, module in model.named_modules(remove_duplicate=False):
        prefix = f"{module_name}." if module_name else ""
        for tensor, target in computed_weights(module).items():
            out.setdefault(prefix + tensor, out.get(prefix + target, prefix + target) if target else prefix + tensor)
    return out


def _resolve(model: nn.Module, sel: Selector, role: str, names: dict[str, str]) -> list[str]:
    modules = dict(model.named_modules(remove_duplicate=False))
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
                hits = [n for n in names if fnmatch.fnmatchcase(n, item)]
            if not hits and not matched_modules:
                params = [n for n, _ in model.named_parameters()]
                raise ValueError(
                    f"{role} entry {item!r} matches no parameter or module of {type(model).__name__}; "
                    f"parameters: {', '.join(params) or '(none)'}"
                )
        else:
            raise TypeError(f"{role} entries must be module types or name patterns, got {item!r}")
        hits = [names.get(h, h) for h in hits]  # tied and computed weights: what actually gets masked
        chosen += [h for h in dict.fromkeys(hits) if h not in chosen]
    return chosen


def _refuse(model: nn.Module, name: str) -> None:
    module_name, _, tensor = name.rpartition(".")
    module = model.get_submodule(module_name)
    kinds = ", ".join(type(p).__name__ for p in module.parametrizations[tensor]) \
        if parametrize.is_parametrized(module, tensor) else "a computation"
    raise ValueError(
        f"cannot mask {name!r}: it is computed by {kinds}, and zeros in its parameters are not zeros "
        f"of {name!r} (only weight norm and spectral norm are masked through, at v / the original weight); "
        f"exclude it (exclude=[{module_name!r}]) or remove the parametrization"
    )


class DenseOutputLayerWarning(UserWarning):
    """A pattern that removes output units left the model's output layer dense (see :func:`select_parameters`)."""


_OUTPUT_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def output_layer(model: nn.Module) -> tuple[str, str] | None:
    """``(module name, weight name)`` of the layer that most likely produces the model's output.

    The last Linear or Conv module in registration (``named_modules``) order, and the
    ``named_parameters`` name of its weight (another module's name if the weight is tied,
    e.g. a language-model head sharing the embedding). Registration order puts the head
    last in torchvision (``fc``, ``classifier``, ``heads.head``) and ``transformers``
    (``lm_head``, ``classifier``) models; a model that registers its head before layers
    that run earlier must exclude the head itself. ``None`` if there is no such layer.
    """
    last = None
    for module_name, module in model.named_modules():
        if isinstance(module, _OUTPUT_TYPES) and isinstance(module._parameters.get("weight"), nn.Parameter):
            last = module_name, module.weight
    if last is None:
        return None
    weight_name = next(n for n, p in model.named_parameters() if p is last[1])
    return last[0], weight_name


def _named_explicitly(include: Selector, names: Iterable[str]) -> bool:
    """``include`` has a string equal to one of ``names`` (no glob, no type)."""
    return any(isinstance(item, str) and item in names for item in _as_list(include))


def select_parameters(model: nn.Module, include: Selector = None, exclude: Selector = None, *,
                      pattern: Pattern | str | None = None, warn: bool = True) -> list[str]:
    """Canonical names of the parameters to mask, in ``named_parameters`` order, each tensor once.

    A tied parameter is selected (or excluded) by any of its names. A computed weight selects the
    parameter that masks it (:func:`computed_weights`); one that none can mask is an error.
    With a ``pattern`` that removes whole output units (``channel``), the model's
    :func:`output_layer` is left out, with a :class:`DenseOutputLayerWarning` (``warn``),
    unless a string in ``include`` names it exactly (``"fc"`` or ``"fc.weight"``) or it is
    the only layer selected.
    """
    names = _names(model)
    included = _resolve(model, DEFAULT_TYPES if include is None else include, "include", names)
    excluded = set(_resolve(model, exclude, "exclude", names))
    params = [n for n, _ in model.named_parameters()]
    for name in included:
        if name not in excluded and name not in params:
            _refuse(model, name)
    chosen = set(included) - excluded
    selected = [n for n in params if n in chosen]
    if not selected:
        raise ValueError(
            f"no parameters of {type(model).__name__} selected for masking "
            f"(include={include!r}, exclude={exclude!r})"
        )
    if pattern is not None and parse_pattern(pattern).removes_outputs and len(selected) > 1:
        found = output_layer(model)
        if found is not None and found[1] in selected:
            module_name, weight_name = found
            named = {module_name, f"{module_name}.weight", weight_name, weight_name.rpartition(".")[0]}
            if not _named_explicitly(include, named):
                selected.remove(weight_name)
                if warn:
                    warnings.warn(
                        f"pattern {parse_pattern(pattern).name!r} removes whole output units, so the output layer "
                        f"{module_name!r} ({type(model.get_submodule(module_name)).__name__}, "
                        f"{model.get_parameter(weight_name).shape[0]} outputs) stays dense: pruning it would remove "
                        f"outputs of the model (classes, tokens). To prune it anyway, name it: "
                        f"include=[..., {module_name!r}]; to silence this, exclude=[{module_name!r}]",
                        DenseOutputLayerWarning, stacklevel=3,
                    )
    return selected
