"""Every ``sn.<name>`` and ``sparsenn.<module>.<name>`` that the README and docs mention exists.

Issue 13 moved every module into layer folders; the public namespace and the names the
documentation teaches must keep working (a renamed function would otherwise only surface
when a reader copies an example).
"""

import importlib
import re
from pathlib import Path

import pytest

import sparsenn as sn

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
pytestmark = pytest.mark.skipif(not DOCS[0].is_file(), reason="no README.md next to the tests (not a source checkout)")


def _resolve(dotted: str):
    """Import the longest importable module prefix of ``dotted``, then get the remaining attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(dotted)


def _mentions(pattern: str) -> list[tuple[str, str]]:
    found = set()
    for doc in DOCS:
        for m in re.finditer(pattern, doc.read_text(encoding="utf-8")):
            found.add((doc.name, m.group(1).rstrip(".")))
    return sorted(found)


SN = _mentions(r"\bsn\.([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)")
DOTTED = [(d, n) for d, n in _mentions(r"(?<![\w/.])(sparsenn(?:\.[A-Za-z_]\w*)+)") if not n.endswith(("py", "md", "yaml"))]


def test_the_docs_mention_names_at_all():
    assert len(SN) > 20 and len(DOTTED) > 10


@pytest.mark.parametrize("doc,name", SN)
def test_every_sn_name_in_the_docs_exists(doc, name):
    obj = sn
    for attr in name.split("."):
        assert hasattr(obj, attr), f"{doc} mentions sn.{name}, which does not exist"
        obj = getattr(obj, attr)


@pytest.mark.parametrize("doc,name", DOTTED)
def test_every_sparsenn_path_in_the_docs_resolves(doc, name):
    try:
        _resolve(name)
    except (ImportError, AttributeError) as e:
        pytest.fail(f"{doc} mentions {name}, which does not resolve ({e})")
