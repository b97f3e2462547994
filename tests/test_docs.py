"""The docs name only what exists: every file path, `python -m` module and dotted code name they cite resolves in
this repository (they drift when code moves, and a reader follows them)."""

from __future__ import annotations

import importlib
import importlib.util
import re
from pathlib import Path

import pytest

from tests.helpers import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PATH = re.compile(r"(?<![\w/.-])((?:service|trainer|bench|tests|deploy|docs|promptserve_client)/[\w./-]*[\w/])")
MODULE = re.compile(r"python3? -m ([\w.]+)")
DOTTED = re.compile(r"`((?:service|trainer|bench)\.[\w.]+)")


def _resolves(dotted: str) -> bool:
    parts = dotted.rstrip(".").split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            if not hasattr(obj, name):
                return False
            obj = getattr(obj, name)
        return True
    return False


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_path_a_doc_cites_exists(doc: Path) -> None:
    missing = sorted({p for p in PATH.findall(doc.read_text()) if not (ROOT / p.split("::")[0]).exists()})
    assert missing == []


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_module_and_code_name_a_doc_cites_resolves(doc: Path) -> None:
    text = doc.read_text()
    modules = sorted({m for m in MODULE.findall(text) if importlib.util.find_spec(m) is None})
    names = sorted({d for d in DOTTED.findall(text) if not _resolves(d)})
    assert (modules, names) == ([], [])


def _section(text: str, heading: str) -> str:
    start = text.index(heading)
    end = text.find("\n## ", start + len(heading))
    return text[start : end if end != -1 else len(text)]


def test_the_readme_lists_every_setting_and_no_other() -> None:
    from service.config import Settings

    section = _section((ROOT / "README.md").read_text(), "## Configuration")
    named = {name.removeprefix("PROMPTSERVE_") for name in re.findall(r"`([A-Z][A-Z0-9_]+)`", section)}
    named.discard("")  # `PROMPTSERVE_` itself
    assert named == {field.upper() for field in Settings.model_fields}


def test_the_bundle_format_lists_every_registered_method() -> None:
    from service.methods import METHODS

    doc = (ROOT / "docs" / "bundle-format.md").read_text()
    method_row = next(line for line in doc.splitlines() if line.startswith("| `method` |"))
    tensor_rows = [line for line in _section(doc, "## Tensors").splitlines() if line.startswith("| `")]
    for name in METHODS:
        assert f"`{name}`" in method_row, f"the method row does not list {name}"
        assert any(f"`{name}`" in row.split("|")[1] for row in tensor_rows), f"no tensors row for {name}"


LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_link_a_doc_makes_stays_in_the_repository(doc: Path) -> None:
    targets = [t for t in LINK.findall(doc.read_text()) if "://" not in t and not t.startswith("mailto:")]
    outside = [t for t in targets if not (doc.parent / t).resolve().is_relative_to(ROOT)]
    missing = [t for t in targets if t not in outside and not (doc.parent / t).exists()]
    assert (outside, missing) == ([], [])
