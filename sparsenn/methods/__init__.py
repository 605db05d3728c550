"""Registered sparsity methods (``sn.list_methods()``)."""

from __future__ import annotations

from .._registry import Registry
from .base import Method, ScoreContext

METHODS: Registry[type[Method]] = Registry("method")


def register_method(name: str):
    """Class decorator: register a :class:`Method` subclass under ``name``."""

    def deco(cls: type[Method]) -> type[Method]:
        cls.name = name
        METHODS.register(name, cls)
        return cls

    return deco


def make_method(spec, **kwargs) -> Method:
    """A :class:`Method` from an instance (returned as is) or a registered name."""
    if isinstance(spec, Method):
        if kwargs:
            raise ValueError("method keyword arguments are only accepted with a method name")
        return spec
    return METHODS.get(spec)(**kwargs)


def list_methods() -> list[str]:
    return METHODS.names()


__all__ = ["METHODS", "Method", "ScoreContext", "list_methods", "make_method", "register_method"]
