"""Models the user names by their factory: ``package.module:function`` returns an ``nn.Module``.

``sparsenn run`` (``model: {name: "mypkg.models:make_net", args: {width: 64}}``) and
``--model mypkg.models:make_net --model-arg width=64`` import ``mypkg.models`` (from
``sys.path``: the working folder, ``PYTHONPATH``, installed packages), call ``make_net``
with the arguments and check that it returned an ``nn.Module``. Naming a factory runs
that module's code, as running a script would: modules of Python's standard library
(``os:system``) are refused, and a checkpoint's metadata never imports anything by
itself (the user names the factory on the command line).
"""

from __future__ import annotations

import importlib
import re
import sys
from typing import Any, Callable

from torch import nn

__all__ = ["FactoryError", "call_factory", "factory_problem", "is_factory", "load_factory", "model_constructor"]

_DOTTED = r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*"
_REFERENCE = re.compile(rf"^({_DOTTED}):({_DOTTED})$")


class FactoryError(ValueError):
    """A model factory cannot be imported, is not callable, or did not return an ``nn.Module``."""


def is_factory(name: Any) -> bool:
    """Whether ``name`` refers to a factory (``module:function``) rather than a registered model."""
    return isinstance(name, str) and ":" in name


def factory_problem(name: str) -> str | None:
    """Why ``name`` is not a well-formed, allowed factory reference; None when it is (no import)."""
    match = _REFERENCE.match(name)
    if match is None:
        return f"{name!r} is not a factory reference; expected package.module:function, e.g. mypkg.models:make_net"
    top = match.group(1).split(".")[0]
    if top in getattr(sys, "stdlib_module_names", ()) or top == "builtins":
        return (f"{name!r}: {top!r} is a module of Python's standard library; a model factory lives in your own "
                f"package")
    return None


def load_factory(name: str) -> Callable[..., Any]:
    """The callable ``name`` (``package.module:function``) refers to; :class:`FactoryError` if none."""
    problem = factory_problem(name)
    if problem:
        raise FactoryError(problem)
    module_name, attr = name.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise FactoryError(f"{name!r}: no module {e.name!r} (is its folder on sys.path: the working folder, "
                               f"PYTHONPATH, or an installed package?)") from None
        raise FactoryError(f"{name!r}: importing {module_name!r} failed: {e}") from None
    except Exception as e:  # noqa: BLE001 - the user's module failed to import: say so, with its message
        raise FactoryError(f"{name!r}: importing {module_name!r} failed: {type(e).__name__}: {e}") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = sorted(n for n in dir(obj) if not n.startswith("_") and callable(getattr(obj, n, None)))
            shown = ", ".join(public[:20]) + (", ..." if len(public) > 20 else "")
            raise FactoryError(f"{name!r}: {module_name!r} has no attribute {attr!r}; its callables: "
                               f"{shown or '(none)'}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise FactoryError(f"{name!r} is not callable (it is {type(obj).__name__}); name a function or class "
                           f"that returns an nn.Module")
    return obj


def model_constructor(name: str) -> Callable[..., Any]:
    """A registered model's class (``lenet300100``), or the factory ``name`` refers to."""
    if is_factory(name):
        return load_factory(name)
    from ...core.registry import UnknownNameError
    from ...models.zoo import MODELS

    try:
        return MODELS.get(name)
    except UnknownNameError as e:
        raise FactoryError(f"{e} (or a factory as package.module:function)") from None


def call_factory(name: str, args: dict[str, Any]) -> nn.Module:
    """``load_factory(name)(**args)``, checked to be an ``nn.Module``."""
    factory = load_factory(name)
    try:
        model = factory(**args)
    except TypeError as e:  # wrong arguments
        raise FactoryError(f"{name}({_call_args(args)}) failed: {e}") from None
    if not isinstance(model, nn.Module):
        raise FactoryError(f"{name}({_call_args(args)}) returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _call_args(args: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in args.items())
