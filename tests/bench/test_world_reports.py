"""The world benchmarks' reports: regenerating one replaces its generated block and keeps the prose around it, and
the docs hold blocks their own commands wrote."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.base_to_novel import GENERATED, write_report
from tests.helpers import ROOT


def test_a_regenerated_report_keeps_the_prose_around_its_block(tmp_path: Path) -> None:
    path = tmp_path / "doc.md"
    begin, end = GENERATED[0].format("bench/x.py"), GENERATED[1]
    write_report(path, "first tables", "bench/x.py")
    assert path.read_text() == f"{begin}\nfirst tables\n{end}\n"
    path.write_text(f"intro\n\n{path.read_text()}\nwhat it shows\n")
    write_report(path, "second tables", "bench/x.py")
    assert path.read_text() == f"intro\n\n{begin}\nsecond tables\n{end}\n\nwhat it shows\n"


@pytest.mark.parametrize("script", ["base_to_novel", "tgpt_world"])
def test_the_docs_hold_the_blocks_their_commands_wrote(script: str) -> None:
    text = (ROOT / "docs" / f"{script}.md").read_text()
    block = text[text.index(GENERATED[0].format(f"bench/{script}.py")):text.index(GENERATED[1])]
    assert f"Command: `PYTHONPATH=. python bench/{script}.py --out docs/{script}.md`" in block
    assert block.count("### ") >= 2 and "| zero-shot CLIP |" in block
