"""docs/errors.md lists exactly the (status, code) pairs the service can answer, derived from its source."""

from __future__ import annotations

import ast
import re

from tests.helpers import ROOT, documented_errors

CODE = re.compile(r"^[a-z][a-z0-9_]+$")


def answered_by_the_code() -> set[tuple[int, str]]:
    """Every call that passes an HTTP error status and then (within two arguments) a code, as ServiceError,
    the middleware's `reject`, the server's raw responses and the error handlers do; and every status → code
    table."""
    pairs = set()
    for path in (ROOT / "service").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                pairs |= _call_pairs(node.args)
            elif isinstance(node, ast.Dict):
                pairs |= {(k.value, v.value) for k, v in zip(node.keys, node.values, strict=True)
                          if _is_status(k) and isinstance(v, ast.Constant) and _is_code(v.value)}
    return pairs


def _call_pairs(args: list[ast.expr]) -> set[tuple[int, str]]:
    pairs = set()
    for i, arg in enumerate(args):
        if _is_status(arg):
            code = next((a.value for a in args[i + 1 : i + 3] if isinstance(a, ast.Constant) and _is_code(a.value)),
                        None)
            if code is not None:
                pairs.add((arg.value, code))  # type: ignore[union-attr]
    return pairs


def _is_status(node: ast.expr | None) -> bool:
    return isinstance(node, ast.Constant) and type(node.value) is int and 400 <= node.value < 600


def _is_code(value: object) -> bool:
    return isinstance(value, str) and bool(CODE.match(value))


def test_errors_md_lists_every_code_the_service_answers_and_no_other():
    code, docs = answered_by_the_code(), documented_errors()
    assert len(code) > 40  # the scan finds the codes (a broken scan would pass vacuously)
    assert {"missing from docs/errors.md": sorted(code - docs), "no longer answered": sorted(docs - code)} == {
        "missing from docs/errors.md": [], "no longer answered": []}


def test_every_documented_status_example_is_a_listed_code():
    from service.http.errors import STATUS_DOCS

    assert {(status, example[1]) for status, example in STATUS_DOCS.items()} <= documented_errors()
