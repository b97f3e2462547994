"""Request limits enforced at the ASGI level, before anything is parsed or buffered.

Per request: header size (431), declared or streamed body size (413), the time the body may take to arrive
(408: a client trickling its body cannot hold a worker). Every request that carries a body, and every request
to an expensive route, counts against two caps answered 503 before a byte of the body is read: requests in
progress, and body bytes in progress (each request reserves its declared Content-Length, or its route's limit
when it declares none). Parsing costs a small constant times the body (docs/serving.md, "Memory"), so the
second cap bounds the memory that requests in progress can take.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.http.errors import error_bytes, is_v2_path


@dataclass(frozen=True)
class RouteLimits:
    max_body_bytes: int
    expensive: bool  # counts against the in-progress cap


class RequestLimits:
    def __init__(self, app: ASGIApp, limits_for: Callable[[Scope], RouteLimits], *, max_header_bytes: int,
                 body_timeout_s: float, max_inflight: int, max_inflight_body_bytes: int):
        self.app, self.limits_for = app, limits_for
        self.max_header_bytes, self.body_timeout_s, self.max_inflight = max_header_bytes, body_timeout_s, max_inflight
        self.max_inflight_body_bytes = max_inflight_body_bytes
        self.inflight = self.inflight_body_bytes = 0  # the event loop is single-threaded: plain counters are exact

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        v2 = is_v2_path(scope["path"])  # V2 clients read the protocol's `error` field
        header_bytes = sum(len(k) + len(v) for k, v in scope["headers"])
        if header_bytes > self.max_header_bytes:
            await reject(send, 431, "headers_too_large", f"request headers hold {header_bytes} bytes, more than the "
                         f"{self.max_header_bytes} allowed", v2=v2)
            return
        limits = self.limits_for(scope)
        headers = dict(scope["headers"])
        declared = _length(headers.get(b"content-length"))
        if declared is not None and declared > limits.max_body_bytes:
            await _reject_size(send, limits.max_body_bytes, v2)
            return
        carries_body = bool(declared) or b"transfer-encoding" in headers
        if not (limits.expensive or carries_body):
            await self._guarded(scope, receive, send, limits, v2)
            return
        reserved = declared if declared is not None else limits.max_body_bytes
        if self.inflight >= self.max_inflight or self.inflight_body_bytes + reserved > self.max_inflight_body_bytes:
            await reject(send, 503, "overloaded", f"{self.inflight} requests ({self.inflight_body_bytes} body bytes) "
                         "in progress; retry shortly", [(b"retry-after", b"1")], v2=v2)
            return
        self.inflight += 1
        self.inflight_body_bytes += reserved
        try:
            await self._guarded(scope, receive, send, limits, v2)
        finally:
            self.inflight -= 1
            self.inflight_body_bytes -= reserved

    async def _guarded(self, scope: Scope, receive: Receive, send: Send, limits: RouteLimits, v2: bool) -> None:
        deadline = anyio.current_time() + self.body_timeout_s
        received, body_done, rejected = 0, False, False

        async def limited_receive() -> Message:
            nonlocal received, body_done, rejected
            if rejected:
                return {"type": "http.disconnect"}
            if body_done:
                return await receive()
            with anyio.move_on_after(deadline - anyio.current_time()) as timer:
                message = await receive()
            if timer.cancelled_caught:
                rejected = True
                await reject(send, 408, "body_timeout", f"the request body did not arrive within "
                             f"{self.body_timeout_s:g} s", CLOSE, v2=v2)
                return {"type": "http.disconnect"}
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if received > limits.max_body_bytes:
                    rejected = True
                    await _reject_size(send, limits.max_body_bytes, v2)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            if not rejected:  # the 4xx already went out; drop whatever the app says after the disconnect
                await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not rejected:  # after a rejection the app only fails on the disconnect we fed it
                raise


def _length(value: bytes | None) -> int | None:
    """A Content-Length as the server passed it (h11 has refused malformed ones); None when absent."""
    return int(value) if value is not None and value.isdigit() and len(value) <= 18 else None


CLOSE = [(b"connection", b"close")]  # the rest of the body is never read, so the connection cannot be reused


async def _reject_size(send: Send, limit: int, v2: bool) -> None:
    await reject(send, 413, "body_too_large", f"request body exceeds the {limit}-byte limit", CLOSE, v2=v2)


async def reject(send: Send, status: int, code: str, detail: str,
                 extra_headers: list[tuple[bytes, bytes]] | None = None, *, v2: bool = False) -> None:
    body = error_bytes(detail, code, v2=v2)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               *(extra_headers or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
