"""Reading recipes: YAML (``yaml.safe_load``), ``--set key.path=value`` overrides, bundled examples."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

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
    import yaml

    try:
        return yaml.safe_load(text)
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
        node[parts[-1]] = _yaml_value(value)
    return out


def parse_recipe(text: str, source: str = "recipe", overrides: Iterable[str] = ()) -> dict[str, Any]:
    """Parse YAML ``text``, apply ``overrides`` and validate; raises :class:`RecipeError`."""
    import yaml

    try:
        raw = yaml.safe_load(text)
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


def load_recipe(path: str | Path, overrides: Iterable[str] = ()) -> dict[str, Any]:
    """Read, override and validate the recipe at ``path`` (a file or a bundled example's name)."""
    path = resolve_recipe_path(path)
    return parse_recipe(path.read_text(), path.name, overrides)
