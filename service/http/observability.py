"""Request ids, the access log and the log format.

Every answer carries `X-Request-ID`: the client's own when it sent a well-formed one, a new one otherwise. The
id is in scope for the whole request (a context variable, which worker threads inherit), so every log line a
request causes can name it. With `PROMPTSERVE_LOG_FORMAT=json` each log line is one JSON object: the service's,
uvicorn's and open_clip's records all go through the root handler, and the access log is this module's (one line
per request: id, method, route, status, latency, and the tasks and versions that answered).
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import uuid
from collections.abc import Iterable
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUEST_ID_HEADER = "X-Request-ID"
# what a client's id may hold to be echoed: header-safe, short, no spaces (anything else gets a new id)
CLIENT_ID = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")
access_log = logging.getLogger("promptserve.access")


@dataclass
class RequestContext:
    request_id: str
    versions: dict[str, int] = field(default_factory=dict)  # task → the version that answered


_current: ContextVar[RequestContext | None] = ContextVar("promptserve_request", default=None)


def note_versions(answered: Iterable[tuple[str, int]]) -> None:
    """Record which task versions answer the current request (for its access-log line)."""
    context = _current.get()
    if context is not None:
        context.versions.update(answered)


def current_request_id() -> str | None:
    context = _current.get()
    return context.request_id if context else None


class RequestIdMiddleware:
    """Gives each request an id, sends it back as `X-Request-ID`, and (with `log_requests`) logs the request."""

    def __init__(self, app: ASGIApp, log_requests: bool):
        self.app, self.log_requests = app, log_requests

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(REQUEST_ID_HEADER.lower().encode(), b"").decode("latin-1")
        context = RequestContext(given if CLIENT_ID.fullmatch(given) else uuid.uuid4().hex)
        token = _current.set(context)
        status, start = 500, time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = context.request_id
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if self.log_requests:
                _log_request(scope, status, time.perf_counter() - start, context)
            _current.reset(token)


def _log_request(scope: Scope, status: int, seconds: float, context: RequestContext) -> None:
    route = getattr(scope.get("route"), "path", None)
    fields = {"method": scope["method"], "path": scope["path"], "route": route, "status": status,
              "latency_ms": round(seconds * 1000, 3), "tasks": sorted(context.versions),
              "versions": context.versions, "client": (scope.get("client") or [None])[0]}
    access_log.info("%s %s %d", scope["method"], scope["path"], status, extra={"fields": fields})


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, the request id in scope, and any `fields`."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        request_id = current_request_id()
        if request_id is not None:
            entry["request_id"] = request_id
        entry |= getattr(record, "fields", {})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(log_format: str) -> None:
    """The root handler every logger reaches (the service's, uvicorn's with `uvicorn_log_options`, open_clip's)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)


def uvicorn_log_options(log_format: str) -> dict[str, Any]:
    """uvicorn's logging: its own config and access log for text; for json its records reach the root handler
    (no config of its own) and the access log is this module's, which knows the request id and tasks."""
    return {"log_config": None, "access_log": False} if log_format == "json" else {}
