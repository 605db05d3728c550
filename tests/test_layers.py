"""The package's folders are layers; a module imports only its own layer and the ones below.

The order is the one in docs/DESIGN.md ("Layers"). Every import counts, including those
inside functions and under ``TYPE_CHECKING``: a lazy import of a higher layer is still a
dependency on it."""

import ast
from pathlib import Path

import pytest

import sparsenn

PACKAGE = Path(sparsenn.__file__).resolve().parent

# lowest first; a folder (or top-level module) may import its own layer and those before it
LAYERS = [
    {"_version", "core"},
    {"data", "models"},
    {"train"},
    {"create", "robust", "federated"},
    {"structured"},
    {"backend"},
    {"compress"},
    {"report"},
    {"cli"},
]
LEVEL = {part: i for i, parts in enumerate(LAYERS) for part in parts}


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if rel.parts == ("__init__.py",):  # the public namespace re-exports every layer
            continue
        yield rel


def _imported_parts(rel: Path) -> list[tuple[int, str]]:
    """``(line, top-level part of sparsenn)`` for every import of sparsenn in a module."""
    tree = ast.parse((PACKAGE / rel).read_text(), str(rel))
    package = list(rel.parts[:-1]) if rel.name != "__init__.py" else list(rel.parts[:-1])
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "sparsenn":
                    found.append((node.lineno, parts[1] if len(parts) > 1 else ""))
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                parts = (node.module or "").split(".")
                if parts[0] != "sparsenn":
                    continue
                target = parts[1:]
            else:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                if node.level - 1 > len(package):
                    raise AssertionError(f"{rel}:{node.lineno}: relative import beyond the package")
                target = base + (node.module.split(".") if node.module else [])
            if not target:  # `from sparsenn import x` / `from .. import x` at the top: x names the part
                found.extend((node.lineno, alias.name) for alias in node.names)
            else:
                found.append((node.lineno, target[0]))
    return found


def _own_part(rel: Path) -> str:
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def test_every_folder_has_a_layer():
    parts = {_own_part(rel) for rel in _modules()}
    assert parts <= set(LEVEL), f"folders or modules without a layer: {sorted(parts - set(LEVEL))}"


@pytest.mark.parametrize("rel", list(_modules()), ids=str)
def test_lower_layers_never_import_higher_ones(rel):
    own = LEVEL[_own_part(rel)]
    bad = [f"line {line}: imports sparsenn.{part} (layer {LEVEL.get(part, '?')}: {part})"
           for line, part in _imported_parts(rel) if part == "" or LEVEL.get(part, len(LAYERS)) > own]
    assert not bad, f"{rel} (layer {own}) " + "; ".join(bad)


def test_the_checker_sees_lazy_and_relative_imports(tmp_path, monkeypatch):
    """The rule's own reference case: a function-level relative import of a higher layer is found."""
    fake = tmp_path / "core"
    fake.mkdir()
    (fake / "x.py").write_text("def f():\n    from ..cli import main\n    import sparsenn.report.plots\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", tmp_path)
    assert _imported_parts(Path("core/x.py")) == [(2, "cli"), (3, "report")]
