"""The ``sparsenn`` command, its recipes, the demo and the built-in benchmark."""

from .main import main

__all__ = ["main"]
