"""YAML for files from strangers: bounded in size, nesting and alias expansion.

``yaml.safe_load`` builds no objects but plain data, yet a 1 KB document can still
describe 10**9 nodes by aliasing anchors ("billion laughs"): the parse is cheap, and the
first ``repr`` or walk over the result never ends. :func:`load_yaml` refuses texts over
:data:`~.bounds.MAX_RECIPE_BYTES`, nesting deeper than :data:`~.bounds.MAX_YAML_DEPTH`,
aliases that refer to their own anchor, and documents whose aliases expand to more than
:data:`~.bounds.MAX_YAML_NODES` nodes, all before any Python object is built.

Numbers follow YAML 1.2 (what most users expect), not PyYAML's YAML 1.1: ``2:4`` is
the string ``"2:4"`` (YAML 1.1: the base-60 number 124) and ``1e-3`` is a float
(YAML 1.1: a string, for want of a dot).
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from .bounds import MAX_RECIPE_BYTES, MAX_YAML_DEPTH, MAX_YAML_NODES

__all__ = ["YamlLimitError", "load_yaml"]


class YamlLimitError(ValueError):
    """A YAML text exceeds a limit (size, nesting, alias expansion) or aliases itself."""


_INT_12 = re.compile(r"""^(?:[-+]?0b[0-1_]+
                         |[-+]?0[0-7_]+
                         |[-+]?(?:0|[1-9][0-9_]*)
                         |[-+]?0x[0-9a-fA-F_]+)$""", re.X)
_FLOAT_12 = re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                           |[-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
                           |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
                           |[-+]?\.(?:inf|Inf|INF)
                           |\.(?:nan|NaN|NAN))$""", re.X)
_NUMBER_TAGS = {"tag:yaml.org,2002:int": _INT_12, "tag:yaml.org,2002:float": _FLOAT_12}


def _where(node: Any) -> str:
    mark = getattr(node, "start_mark", None)
    return f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""


class _BoundedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` with YAML 1.2 numbers, a nesting limit and an alias-expansion limit."""

    yaml_implicit_resolvers = {
        first: [(tag, _NUMBER_TAGS.get(tag, regexp)) for tag, regexp in resolvers]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise YamlLimitError(f"{_where(self.peek_event())}nested deeper than {MAX_YAML_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_document(self, node):
        _check_expansion(node)
        return super().construct_document(node)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _check_expansion(root: yaml.Node) -> None:
    """Count the nodes of ``root`` with every alias expanded (shared nodes counted once per use)
    without expanding them; raise at a cycle or past :data:`MAX_YAML_NODES`."""
    size: dict[int, int] = {}
    open_: set[int] = set()  # on the current path: reaching one again is a cycle
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            open_.discard(key)
            size[key] = 1 + sum(size[id(c)] for c in _children(node))
            if size[key] > MAX_YAML_NODES:
                raise YamlLimitError(f"{_where(root)}aliases expand to more than {MAX_YAML_NODES} nodes "
                                     f"(an alias bomb?)")
            continue
        if key in size:
            continue
        if key in open_:
            raise YamlLimitError(f"{_where(node)}an alias refers to its own anchor (a recursive structure)")
        open_.add(key)
        stack.append((node, True))
        for child in _children(node):
            if id(child) in open_:
                raise YamlLimitError(f"{_where(child)}an alias refers to its own anchor (a recursive structure)")
            if id(child) not in size:
                stack.append((child, False))


def load_yaml(text: str) -> Any:
    """Parse one YAML document like ``yaml.safe_load`` within the limits above.

    Raises :class:`YamlLimitError` for a limit, ``yaml.YAMLError`` for bad syntax.
    """
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_RECIPE_BYTES:
        raise YamlLimitError(f"the text has {size} bytes; a recipe may have at most {MAX_RECIPE_BYTES}")
    loader = _BoundedLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()
