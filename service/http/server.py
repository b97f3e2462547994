"""uvicorn as the service runs it: bounded header size and time, keep-alive and connection caps.

uvicorn bounds how long an idle keep-alive connection lives, but not how long a client may take to send a
request's headers, and it answers malformed requests with a plain-text 400. `GuardedH11Protocol` adds a
header deadline (the connection gets a JSON 408 and is closed) and JSON bodies for those 400s. The
app's own `RequestLimits` middleware then bounds the body (size, time) and the requests in progress.
"""

from __future__ import annotations

import asyncio

import h11
import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

from service.config import Settings
from service.http.errors import error_bytes
from service.http.observability import uvicorn_log_options


def _raw_response(status: int, reason: bytes, code: str, detail: str) -> bytes:
    body = error_bytes(detail, code)
    return (b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
            % (status, reason, len(body))) + body


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request's headers and JSON errors."""

    header_timeout_s = 10.0
    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the headers are complete
            self._disarm_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_header_timer()  # the next request on this connection gets the same deadline

    def send_400_response(self, msg: str) -> None:
        self.transport.write(_raw_response(400, b"Bad Request", "bad_http_request", msg))
        self.transport.close()

    def _arm_header_timer(self) -> None:
        self._disarm_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timeout)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        detail = f"the request headers did not arrive within {self.header_timeout_s:g} s"
        self.transport.write(_raw_response(408, b"Request Timeout", "header_timeout", detail))
        self.transport.close()


def guarded_protocol(header_timeout_s: float) -> type[GuardedH11Protocol]:
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"header_timeout_s": header_timeout_s})


def serve(app: FastAPI, settings: Settings, host: str, port: int) -> None:
    uvicorn.run(
        app, host=host, port=port, log_level="info",
        http=guarded_protocol(settings.header_timeout_s),
        timeout_keep_alive=max(1, round(settings.keep_alive_timeout_s)),
        # h11 refuses (with the JSON 400 above) headers beyond this; the app answers 431 beyond max_header_bytes.
        h11_max_incomplete_event_size=4 * settings.max_header_bytes,
        limit_concurrency=settings.max_connections,
        **uvicorn_log_options(settings.log_format),
    )
