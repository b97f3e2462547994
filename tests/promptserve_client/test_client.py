"""The client's retries and errors, against a real HTTP server that answers from a script."""

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from promptserve_client import AsyncClient, Client, PromptserveError, TaskSummary

Answer = tuple[int, dict[str, str], bytes]
OVERLOADED = json.dumps({"detail": "queue full; retry shortly", "code": "overloaded"}).encode()
TASKS = json.dumps({"tasks": [{"name": "shapes", "method": "zeroshot", "version": 1, "num_classes": 16}]}).encode()


@contextmanager
def scripted_server(answers: list[Answer]) -> Iterator[tuple[str, list[str]]]:
    """An HTTP server giving `answers` in order (the last one again once they run out); yields (url, paths seen)."""
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's naming)
            seen.append(self.path)
            status, headers, body = answers[min(len(seen), len(answers)) - 1]
            self.send_response(status)
            for name, value in {"Content-Length": str(len(body)), **headers}.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", seen
    finally:
        server.shutdown()
        server.server_close()


def overloaded(retry_after: str) -> Answer:
    return 503, {"Retry-After": retry_after, "Content-Type": "application/json"}, OVERLOADED


def test_a_503_is_retried_after_its_retry_after_then_succeeds():
    waits: list[float] = []
    with scripted_server([overloaded("2"), overloaded("1"), (200, {}, TASKS)]) as (url, seen):
        with Client(url, sleep=waits.append) as client:
            assert client.tasks() == [TaskSummary("shapes", "zeroshot", 1, 16)]
    assert waits == [2.0, 1.0] and seen == ["/v1/tasks"] * 3


def test_retries_are_bounded_and_waits_capped_then_the_error_is_typed():
    waits: list[float] = []
    with scripted_server([overloaded("3600")]) as (url, seen):
        with Client(url, max_retries=2, max_retry_wait=5, sleep=waits.append) as client:
            with pytest.raises(PromptserveError) as raised:
                client.tasks()
    assert (raised.value.status, raised.value.code) == (503, "overloaded")
    assert raised.value.detail == "queue full; retry shortly"
    assert waits == [5, 5] and len(seen) == 3


def test_retry_after_as_an_http_date_is_honoured():
    waits: list[float] = []
    later = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=20), usegmt=True)
    with scripted_server([overloaded(later), (200, {}, TASKS)]) as (url, _):
        with Client(url, sleep=waits.append) as client:
            client.tasks()
    assert len(waits) == 1 and 15 < waits[0] <= 20


def test_other_errors_are_not_retried_and_keep_the_servers_code():
    unknown = json.dumps({"detail": "no task named 'x'", "code": "unknown_task"}).encode()
    with scripted_server([(404, {"Content-Type": "application/json"}, unknown)]) as (url, seen):
        with Client(url, sleep=pytest.fail) as client, pytest.raises(PromptserveError) as raised:
            client.task("x")
    assert (raised.value.status, raised.value.code, raised.value.detail) == (404, "unknown_task", "no task named 'x'")
    assert len(seen) == 1


def test_an_error_without_a_json_body_is_still_typed():
    with scripted_server([(502, {"Content-Type": "text/html"}, b"<h1>bad gateway</h1>")]) as (url, _):
        with Client(url) as client, pytest.raises(PromptserveError) as raised:
            client.health()
    assert (raised.value.status, raised.value.code) == (502, "http_error") and "bad gateway" in raised.value.detail


def page(names: list[str], next_cursor: str | None) -> Answer:
    tasks = [{"name": n, "method": "coop", "version": 1, "num_classes": 2} for n in names]
    return 200, {}, json.dumps({"tasks": tasks, "next_cursor": next_cursor}).encode()


def test_the_task_list_follows_its_pages_and_the_url_comes_from_the_environment(monkeypatch):
    with scripted_server([page(["a", "b"], "b"), page(["c"], None)]) as (url, seen):
        monkeypatch.setenv("PROMPTSERVE_URL", url)
        with Client() as client:
            assert [t.name for t in client.tasks()] == ["a", "b", "c"]
    assert seen == ["/v1/tasks", "/v1/tasks?cursor=b"]


@pytest.mark.anyio
async def test_the_async_client_retries_and_pages_like_the_sync_one():
    waits: list[float] = []

    async def record(seconds: float) -> None:
        waits.append(seconds)

    with scripted_server([overloaded("2"), page(["a"], "a"), page(["z"], None)]) as (url, seen):
        async with AsyncClient(url, sleep=record) as client:
            assert [t.name for t in await client.tasks()] == ["a", "z"]
    assert waits == [2.0] and seen == ["/v1/tasks", "/v1/tasks", "/v1/tasks?cursor=a"]
