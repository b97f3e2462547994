"""Every benchmark script imports (its own imports resolve against the current code), so a refactor elsewhere
cannot leave a recorded command broken without a failing test."""

import importlib
from pathlib import Path

import pytest

SCRIPTS = sorted(p.stem for p in (Path(__file__).parents[2] / "bench").glob("*.py") if p.stem != "__init__")


@pytest.mark.parametrize("name", SCRIPTS)
def test_the_benchmark_script_imports(name):
    module = importlib.import_module(f"bench.{name}")
    assert module.__doc__, f"bench/{name}.py should say what it measures and how to run it"
