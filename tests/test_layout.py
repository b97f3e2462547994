"""The house's rules, read from the code: layers import only downward, no import cycle, no method named outside
its spec, every module says what it is for, and no test module is loaded twice."""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.methods import METHODS
from tests.helpers import ROOT

# service's layers, lowest first: each may import its own layer and the ones below. `config` assembles settings
# for the HTTP app from core and serving; `cli` and `__main__` are the entry points above everything.
LAYERS = {"core": 0, "methods": 1, "bundle": 2, "registry": 3, "serving": 4, "config": 5, "http": 6, "cli": 7,
          "__main__": 7}
PACKAGES = ("service", "trainer", "promptserve_client")


def modules(package: str) -> Iterator[tuple[str, Path]]:
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        yield ".".join(parts[:-1] if parts[-1] == "__init__" else parts), path


def imported(name: str, path: Path) -> set[str]:
    """Every project module `name` imports, deferred imports (inside functions) included."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found |= {base} | {f"{base}.{alias.name}" for alias in node.names}
    return {f for f in found if f.split(".")[0] in PACKAGES}


def resolve(target: str, known: set[str]) -> str | None:
    while target and target not in known:
        target = target.rpartition(".")[0]
    return target or None


def graph() -> dict[str, set[str]]:
    everything = dict(m for package in PACKAGES for m in modules(package))
    known = set(everything)
    return {name: {t for i in imported(name, path) if (t := resolve(i, known)) and t != name}
            for name, path in everything.items()}


def layer(name: str) -> int | None:
    parts = name.split(".")
    return LAYERS.get(parts[1]) if parts[0] == "service" and len(parts) > 1 else None


def test_service_layers_import_only_downward() -> None:
    upward = [f"{name} imports {target}" for name, targets in graph().items() if layer(name) is not None
              for target in targets if layer(target) is not None and layer(target) > layer(name)]
    assert upward == []


def test_no_import_cycle_in_the_project() -> None:
    edges = graph()
    cycles = []
    for start in edges:  # a path from one of start's imports back to start
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in edges.get(node, ()):
                if nxt == start:
                    cycles.append(" -> ".join([*path, start]))
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*path, nxt]))
    assert cycles == []


def test_the_serving_runtime_and_heads_import_no_method() -> None:
    edges = graph()
    for name in ("service.serving.runtime", "service.serving.heads", "service.serving.tasks"):
        named = {t for t in edges[name] if t.startswith("service.methods.") and t != "service.methods.spec"}
        assert named == set(), f"{name} imports method modules {named}"


def test_no_method_name_is_compared_as_a_string_outside_its_spec() -> None:
    """Behaviour that depends on the method lives in its spec or learner: elsewhere, code asks the spec."""
    names = set(METHODS)
    offenders = []
    for package in ("service", "trainer"):
        for name, path in modules(package):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Compare) and "method" in ast.unparse(node):
                    constants = [c.value for c in (node.left, *node.comparators) if isinstance(c, ast.Constant)]
                    offenders += [f"{name}:{node.lineno} compares with {c!r}" for c in constants if c in names]
    assert offenders == []


@pytest.mark.parametrize("package", PACKAGES)
def test_every_module_starts_with_a_docstring_that_says_what_it_is_for(package: str) -> None:
    missing = [name for name, path in modules(package) if path.read_text().strip()
               and not ast.get_docstring(ast.parse(path.read_text()))]
    assert missing == []


def _in_project(path: Path) -> bool:
    return path.is_relative_to(ROOT) and path.relative_to(ROOT).parts[0] in (*PACKAGES, "tests", "bench")


def test_no_module_is_loaded_twice() -> None:
    """Tests are packages: each test and helper module loads under one name only."""
    by_file: dict[str, list[str]] = {}
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if file and _in_project(Path(file).resolve()):
            by_file.setdefault(str(Path(file).resolve()), []).append(name)
    assert {f: names for f, names in by_file.items() if len(names) > 1} == {}
