"""Reading recipes: bounded YAML (:mod:`.safe_yaml`), ``--set key.path=value`` overrides, bundled examples."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from .safe_yaml import YamlLimitError, load_yaml
from .bounds import MAX_RECIPE_BYTES
from .schema import RecipeError, validate

__all__ = ["EXAMPLES_DIR", "apply_overrides", "example_path", "list_examples", "load_recipe", "parse_recipe",
           "resolve_recipe_path"]

EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"


def list_examples() -> list[str]:
    """Names of the bundled example recipes (``sparsenn/recipes/examples/NAME.yaml``)."""
    return sorted(p.stem for p in EXAMPLES_DIR.glob("*.yaml"))


def example_path(name: str) -> Path:
    """The path of a bundled example recipe; unknown names list the valid ones."""
    path = EXAMPLES_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"no bundled example recipe {name!r}; valid: {', '.join(list_examples())}")
    return path


def _yaml_value(text: str) -> Any:
    """``text`` read as a YAML value (``1``, ``0.5``, ``[a, b]``, ``true``), else the text itself;
    raises :class:`~.safe_yaml.YamlLimitError` when it is over a limit (an alias bomb)."""
    import yaml

    try:
        return load_yaml(text)
    except yaml.YAMLError:
        return text


def apply_overrides(recipe: dict[str, Any], overrides: Iterable[str], source: str = "recipe") -> dict[str, Any]:
    """``recipe`` with each ``"key.path=value"`` set (the value is read as YAML: ``1``, ``0.5``,
    ``[a, b]``, ``true``); missing sections are created. The result still needs :func:`validate`."""
    out = dict(recipe)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise RecipeError(source, [f"--set {item!r}: expected KEY.PATH=VALUE, e.g. train.epochs=1"])
        parts = key.strip().split(".")
        node = out
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                raise RecipeError(source, [f"--set {item!r}: {'.'.join(parts[:i + 1])} is not a section"])
            node[part] = child = dict(child)
            node = child
        try:
            node[parts[-1]] = _yaml_value(value)
        except YamlLimitError as e:
            raise RecipeError(source, [f"--set {_short(item)}: {e}"]) from None
    return out


def _short(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def parse_recipe(text: str, source: str = "recipe", overrides: Iterable[str] = ()) -> dict[str, Any]:
    """Parse YAML ``text``, apply ``overrides`` and validate; raises :class:`RecipeError`."""
    import yaml

    try:
        raw = load_yaml(text)
    except YamlLimitError as e:
        raise RecipeError(source, [str(e)]) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        raise RecipeError(source, [f"{where}not valid YAML ({problem})"]) from None
    if raw is None:
        raw = {}
    if isinstance(raw, dict):
        raw = apply_overrides(raw, overrides, source)
    recipe = validate(raw, source)
    if recipe["name"] is None:
        recipe["name"] = Path(source).stem if source.endswith((".yaml", ".yml")) else "recipe"
    return recipe


def resolve_recipe_path(path: str | Path) -> Path:
    """``path`` if it is a file, else the bundled example of that name; FileNotFoundError otherwise."""
    path = Path(path)
    if path.is_file():
        return path
    if path.suffix == "" and (EXAMPLES_DIR / f"{path.name}.yaml").is_file():
        return EXAMPLES_DIR / f"{path.name}.yaml"
    raise FileNotFoundError(f"no recipe file {str(path)!r} (bundled examples: {', '.join(list_examples())})")


def read_recipe_text(path: Path) -> str:
    """The text of the recipe file ``path``: at most :data:`~.bounds.MAX_RECIPE_BYTES` (checked before
    reading), UTF-8; a :class:`RecipeError` naming the file otherwise."""
    import os
    import stat

    source = path.name
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO must not block the open
    except OSError as e:
        raise RecipeError(source, [f"cannot read the file ({e.strerror})"]) from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise RecipeError(source, ["not a regular file"])
        if info.st_size > MAX_RECIPE_BYTES:
            raise RecipeError(source, [f"the file has {info.st_size} bytes; a recipe may have at most "
                                       f"{MAX_RECIPE_BYTES}"])
        data = f.read(MAX_RECIPE_BYTES + 1)
    if len(data) > MAX_RECIPE_BYTES:  # it grew since fstat
        raise RecipeError(source, [f"the file has more than {MAX_RECIPE_BYTES} bytes; a recipe may have at most "
                                   f"{MAX_RECIPE_BYTES}"])
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecipeError(source, [f"not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); save the "
                                   f"recipe as UTF-8"]) from None


def load_recipe(path: str | Path, overrides: Iterable[str] = ()) -> dict[str, Any]:
    """Read, override and validate the recipe at ``path`` (a file or a bundled example's name)."""
    path = resolve_recipe_path(path)
    return parse_recipe(read_recipe_text(path), path.name, overrides)
