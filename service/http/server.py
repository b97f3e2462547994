"""uvicorn as the service runs it: every connection closed by some timer, a connection cap the process's
descriptors can hold, and JSON bodies for the errors the server itself answers.

uvicorn bounds how long an idle keep-alive connection lives, but nothing else about the client: not how long
it may take to send a request's headers, nor what happens after an answer while the client still owes the
body it declared (e.g. `GET` with a Content-Length, a byte, then silence), nor a client that stops reading
an answer. `GuardedH11Protocol` keeps one deadline running whenever the server waits for the client and no
request is in the app (closing the connection, with a JSON 408 if no request was under way), disconnects a
client that leaves an answer unread for `send_timeout_s`, and refuses connections beyond the cap at once.
The app's own `RequestLimits` middleware bounds the body (size, time) and the requests in progress.

At start, `serve` raises the open-files soft limit to hold the connection cap (or lowers the cap to fit),
and says so in the log; if descriptors run out anyway, the log gets one line per interval, not a traceback
for every failed accept.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import resource
import time
from typing import TYPE_CHECKING, Any

import h11
import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

from service.http.errors import error_bytes
from service.http.observability import uvicorn_log_options

if TYPE_CHECKING:  # the settings module loads torch; the protocol and the accept handler do not need it
    from service.config import Settings

log = logging.getLogger(__name__)
SPARE_DESCRIPTORS = 64  # beside connections: the listening socket, registry files, PostgreSQL, logs, model files


def _raw_response(status: int, reason: bytes, code: str, detail: str, retry_after: bool = False) -> bytes:
    body = error_bytes(detail, code)
    extra = b"retry-after: 1\r\n" if retry_after else b""
    return (b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%sconnection: close\r\n\r\n"
            % (status, reason, len(body), extra)) + body


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on every wait for the client, a send deadline, a connection cap
    enforced at accept, and JSON errors."""

    header_timeout_s = 10.0
    send_timeout_s = 30.0
    max_connections: int | None = None
    _wait_timer: asyncio.TimerHandle | None = None  # the server waits for the client; no request in the app
    _send_timer: asyncio.TimerHandle | None = None  # the client does not take what the server sends

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if self.max_connections is not None and len(self.connections) > self.max_connections:
            detail = f"the server holds its limit of {self.max_connections} connections; retry shortly"
            self._close(_raw_response(503, b"Service Unavailable", "too_many_connections", detail, retry_after=True))
            return
        self._arm_wait_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._app_is_working():  # the request's headers are complete: the app's own limits apply now
            self._cancel_wait_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # may start a pipelined request
        if not self.transport.is_closing() and not self._app_is_working():
            self._arm_wait_timer()  # whatever the client still sends (the next request, a body) gets a deadline

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._send_timer is None:
            self._send_timer = self.loop.call_later(self.send_timeout_s, self._send_timeout)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None

    def send_400_response(self, msg: str) -> None:
        self._close(_raw_response(400, b"Bad Request", "bad_http_request", msg))

    def _app_is_working(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _arm_wait_timer(self) -> None:
        self._cancel_wait_timer()
        self._wait_timer = self.loop.call_later(self.header_timeout_s, self._wait_timeout)

    def _cancel_wait_timer(self) -> None:
        if self._wait_timer is not None:
            self._wait_timer.cancel()
            self._wait_timer = None

    def _cancel_timers(self) -> None:
        self._cancel_wait_timer()
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None

    def _wait_timeout(self) -> None:
        self._wait_timer = None
        if self.transport.is_closing() or self._app_is_working():
            return
        if self.conn.their_state is h11.IDLE:  # no request, or only part of its headers
            detail = f"the request headers did not arrive within {self.header_timeout_s:g} s"
            self._close(_raw_response(408, b"Request Timeout", "header_timeout", detail))
        else:  # answered, but the client still owes (part of) the body it declared
            self._close(b"")

    def _send_timeout(self) -> None:
        self._send_timer = None
        log.info("closing a connection whose client left an answer unread for %g s", self.send_timeout_s)
        self.transport.abort()

    def _close(self, final: bytes) -> None:
        """Write `final` and close; a client that reads nothing cannot keep the connection by filling its buffer."""
        if final:
            self.transport.write(final)
        if self.transport.get_write_buffer_size():
            self.transport.abort()
        else:
            self.transport.close()


def guarded_protocol(header_timeout_s: float, send_timeout_s: float,
                     max_connections: int | None) -> type[GuardedH11Protocol]:
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {
        "header_timeout_s": header_timeout_s, "send_timeout_s": send_timeout_s, "max_connections": max_connections})


def fit_connections_to_descriptors(max_connections: int | None) -> int:
    """A connection cap this process's open-files limit can hold: the soft limit raised towards the hard one if
    needed, else the cap lowered; either is logged."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = (max_connections or soft) + SPARE_DESCRIPTORS
    if soft < wanted and (hard == resource.RLIM_INFINITY or hard > soft):
        raised = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
        log.info("raised the open-files soft limit from %d to %d to hold %s connections", soft, raised,
                 max_connections)
        soft = raised
    cap = soft - SPARE_DESCRIPTORS
    if cap < 1:
        raise SystemExit(f"the open-files limit ({soft}) leaves no room for connections: raise it above "
                         f"{SPARE_DESCRIPTORS}")
    if max_connections is None or cap < max_connections:
        log.warning("connection cap set to %d (MAX_CONNECTIONS %s): the open-files limit is %d and %d descriptors "
                    "stay spare", cap, max_connections, soft, SPARE_DESCRIPTORS)
        return cap
    return max_connections


class AcceptFailures:
    """A loop exception handler: asyncio logs a traceback every time accept() fails for want of descriptors
    (each second while it lasts); this logs one line per interval, with the count, and passes on the rest."""

    def __init__(self, interval_s: float = 10.0):
        self.interval_s = interval_s
        self.last = -float("inf")
        self.failed = 0

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if not (isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
                and "accept" in context.get("message", "")):
            loop.default_exception_handler(context)
            return
        self.failed += 1
        now = time.monotonic()
        if now - self.last >= self.interval_s:
            log.error("out of descriptors: %d accept() call(s) failed (%s) since the last report; new connections "
                      "wait in the backlog until some close", self.failed, exc.strerror)
            self.last, self.failed = now, 0


class _Server(uvicorn.Server):
    async def serve(self, sockets: Any = None) -> None:
        asyncio.get_running_loop().set_exception_handler(AcceptFailures())
        await super().serve(sockets)


def serve(app: FastAPI, settings: Settings, host: str, port: int) -> None:
    max_connections = fit_connections_to_descriptors(settings.max_connections)
    config = uvicorn.Config(
        app, host=host, port=port, log_level="info",
        http=guarded_protocol(settings.header_timeout_s, settings.body_timeout_s, max_connections),
        timeout_keep_alive=max(1, round(settings.keep_alive_timeout_s)),
        # h11 refuses (with the JSON 400 above) headers beyond this; the app answers 431 beyond max_header_bytes.
        h11_max_incomplete_event_size=4 * settings.max_header_bytes,
        **uvicorn_log_options(settings.log_format),
    )
    _Server(config).run()
