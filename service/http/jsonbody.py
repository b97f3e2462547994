"""Request bodies read and parsed at a cost bounded by their size and by a count of values fixed per route.

`json.loads` materialises every value before anyone can count them (`{"images": [{}, {}, ...]}` costs ~28×
its bytes), raises RecursionError on deep nesting and ValueError on a 5000-digit integer. `parse_json` runs
the standard library's reference scanner (`json.scanner.py_make_scanner`; strings are still decoded in C)
with a counter on every value, a nesting limit and a digit limit, so parsing stops the moment a body holds
more than its route allows, and every fault is a short 4xx.
"""

from __future__ import annotations

import json
import json.decoder
import json.scanner
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from starlette.requests import Request

from service.serving.errors import ServiceError

MAX_DEPTH = 32
MAX_INT_DIGITS = 32
_Scan = Callable[[str, int], tuple[Any, int]]
# The json package's reference parsers (public in its modules since Python 2.6; typeshed leaves them out).
_JSON_OBJECT: Callable[..., tuple[Any, int]] = vars(json.decoder)["JSONObject"]
_JSON_ARRAY: Callable[..., tuple[Any, int]] = vars(json.decoder)["JSONArray"]
_SCANSTRING: Callable[..., tuple[str, int]] = vars(json.decoder)["scanstring"]  # the C implementation
_MAKE_SCANNER: Callable[[Any], _Scan] = vars(json.scanner)["py_make_scanner"]
_WHITESPACE = re.compile(r"[ \t\n\r]*")


async def read_body(request: Request) -> bytearray:
    """The whole body from the request's stream, into one buffer sized by Content-Length when it is declared
    (the middleware has bounded it), so reading costs the body's size once; not cached on the request, so the
    caller's buffer is the only copy."""
    declared = request.headers.get("content-length", "")
    if not (declared.isascii() and declared.isdigit()):
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
        return body
    body, filled = bytearray(int(declared)), 0
    view = memoryview(body)
    async for chunk in request.stream():
        view[filled : filled + len(chunk)] = chunk  # the server holds the client to its Content-Length
        filled += len(chunk)
    view.release()
    return body


def parse_json(body: bytearray, *, max_values: int) -> Any:
    """The JSON value of a body holding at most `max_values` values (413 beyond), nested at most MAX_DEPTH
    deep, integers of at most MAX_INT_DIGITS digits, no NaN or Infinity (422 for those and for bad JSON).

    The buffer is emptied once decoded to text, so the bytes, the text and the parsed strings are never all
    held at once: parsing peaks at twice the body."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ServiceError(422, "bad_json", f"the body is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    del body[:]
    try:
        return _Scanner(max_values).parse(text)
    except json.JSONDecodeError as exc:
        raise ServiceError(422, "bad_json", f"the body is not valid JSON: {exc}") from None


class _Scanner:
    """The context `py_make_scanner` reads its parsers from, with every value counted and nesting bounded."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_string = staticmethod(_SCANSTRING)

    def __init__(self, max_values: int):
        self.max_values, self.values, self.depth = max_values, 0, 0
        self.memo: dict[str, str] = {}
        self.scan_once = _MAKE_SCANNER(self)

    def parse(self, text: str) -> Any:
        start = _end_of_whitespace(text, 0)
        try:
            value, end = self._counted(self.scan_once)(text, start)
        except StopIteration as stop:
            raise json.JSONDecodeError("Expecting value", text, stop.value) from None
        end = _end_of_whitespace(text, end)
        if end != len(text):
            raise json.JSONDecodeError("Extra data", text, end)
        return value

    def parse_object(self, s_and_end: tuple[str, int], strict: bool, scan_once: _Scan, *hooks: Any) -> Any:
        with self._nested():
            return _JSON_OBJECT(s_and_end, strict, self._counted(scan_once), *hooks)

    def parse_array(self, s_and_end: tuple[str, int], scan_once: _Scan) -> Any:
        with self._nested():
            return _JSON_ARRAY(s_and_end, self._counted(scan_once))

    def parse_int(self, digits: str) -> int:
        if len(digits.lstrip("-")) > MAX_INT_DIGITS:
            raise ServiceError(422, "bad_json", f"the body holds an integer of {len(digits)} digits; at most "
                               f"{MAX_INT_DIGITS} are accepted")
        return int(digits)

    def parse_constant(self, name: str) -> Any:
        raise ServiceError(422, "bad_json", f"{name} is not a JSON value")

    def _counted(self, scan_once: _Scan) -> _Scan:
        def counted(text: str, index: int) -> tuple[Any, int]:
            self.values += 1
            if self.values > self.max_values:
                raise ServiceError(413, "too_many_values", f"the JSON body holds more than the {self.max_values} "
                                   "values this route accepts")
            return scan_once(text, index)

        return counted

    @contextmanager
    def _nested(self) -> Iterator[None]:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise ServiceError(422, "bad_json", f"the JSON body is nested deeper than {MAX_DEPTH} levels")
        try:
            yield
        finally:
            self.depth -= 1


def _end_of_whitespace(text: str, index: int) -> int:
    match = _WHITESPACE.match(text, index)
    return match.end() if match else index
