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
