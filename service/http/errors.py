"""Every error leaves as JSON: {"detail": message, "code": code} (+ "field" for bundle faults; V2 routes add the
protocol's "error", OpenAI-shaped routes OpenAI's "error" object). The handlers here turn the layers' exceptions
into those bodies.

Every code the service answers is listed in docs/errors.md; `error_responses` documents them in the OpenAPI.
"""

from __future__ import annotations

import errno
import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import fastapi.routing
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match

from service.registry.base import RegistryDamage, RegistryUnavailable, UnknownTask
from service.serving.errors import ServiceError

log = logging.getLogger(__name__)


class ErrorBody(BaseModel):
    """Every error the service answers outside /v2."""

    code: str = Field(description="stable machine-readable code (docs/errors.md)")
    detail: str = Field(description="what was wrong, for a person")
    field: str | None = Field(None, description="the parameter or bundle field at fault, e.g. query.top_k")


class V2ErrorBody(BaseModel):
    """Errors of the Open Inference Protocol routes: the protocol's `error`, plus the service's code."""

    error: str = Field(description="the message V2 clients (tritonclient) show")
    code: str
    detail: str


MAX_DETAIL_CHARS = 1000  # an error names the problem; it never echoes a body back


def error_body(detail: str, code: str, field: str | None = None, *, v2: bool = False) -> dict[str, Any]:
    detail = _bounded(detail, MAX_DETAIL_CHARS)
    body = {"detail": detail, "code": code} | ({"field": _bounded(field, 200)} if field is not None else {})
    return {"error": detail} | body if v2 else body


def _bounded(text: str, limit: int) -> str:
    """At most `limit` characters, and encodable (a lone surrogate a client sent becomes '?')."""
    text = text if len(text) <= limit else f"{text[:limit]}… ({len(text) - limit} more characters)"
    return text.encode("utf-8", "replace").decode("utf-8")


def summarize_errors(errors: Sequence[Mapping[str, Any]], shown: int = 3) -> str:
    """Validation errors as one short line: the first few, by location, and how many more there were."""
    parts = [f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', 'invalid')}" for e in errors[:shown]]
    more = f" (and {len(errors) - shown} more)" if len(errors) > shown else ""
    return "; ".join(parts) + more


def error_bytes(detail: str, code: str, *, v2: bool = False) -> bytes:
    """The same body for the ASGI-level middleware, which answers before FastAPI is involved."""
    return json.dumps(error_body(detail, code, v2=v2)).encode()


def is_v2_path(path: str) -> bool:
    return path == "/v2" or path.startswith("/v2/")


OPENAI_PATHS = ("/v1/embeddings", "/v1/models")


def openai_error(body: dict[str, Any], path: str) -> dict[str, Any]:
    """`body` with OpenAI's {"error": {"message", "type", "param", "code"}} added on the OpenAI-shaped routes,
    whose clients (the `openai` package) show only that."""
    if not path.startswith(OPENAI_PATHS):
        return body
    kind = "invalid_request_error" if body["code"] not in ("missing_token", "bad_token") else "authentication_error"
    return body | {"error": {"message": body["detail"], "type": kind, "param": body.get("field"), "code": body["code"]}}


def storage_error(exc: OSError) -> ServiceError:
    """A registry write that failed: 507 when the disk (or quota) is full, else 503; nothing was activated."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return ServiceError(507, "storage_full", f"the registry has no space left ({exc.strerror}); "
                            "the previous version keeps serving")
    return ServiceError(503, "storage_unavailable", f"the registry could not be written ({exc.strerror or exc}); "
                        "the previous version keeps serving", headers={"Retry-After": "5"})


# status → (description, example code, example detail): the examples the OpenAPI shows for each status
STATUS_DOCS: dict[int, tuple[str, str, str]] = {
    401: ("no bearer token on a guarded route", "missing_token",
          "this endpoint needs 'Authorization: Bearer <token>'"),
    403: ("wrong token, or admin routes disabled (no PROMPTSERVE_ADMIN_TOKEN)", "bad_token",
          "the bearer token is not valid for this endpoint"),
    404: ("no such task (or version)", "unknown_task", "unknown task 'shapes'"),
    408: ("the request body did not arrive in time", "body_timeout", "the request body did not arrive within 30 s"),
    413: ("body, image, pixel, image-count or answer-size limit exceeded", "too_many_images",
          "at most 32 images a request"),
    415: ("wrong content type, or not a supported image format", "bad_content_type",
          "send images as multipart/form-data in the field 'images', or as application/json"),
    422: ("invalid parameter, body, image or bundle (`field` names what, where known)", "invalid_request",
          "query.top_k: Input should be less than or equal to 1000"),
    429: ("a pinned version that is not prepared, beyond this client's or this task's budget; retry after "
          "`Retry-After`", "too_many_pins", "version 3 of 't' is not prepared and client 10.0.0.2 may have 6 versions "
          "prepared for pins a minute; retry in 10 s, or pin a prepared version"),
    431: ("request headers too large", "headers_too_large",
          "request headers hold 20000 bytes, more than the 16384 allowed"),
    503: ("overloaded, registry unreachable or not writable; retry after `Retry-After`", "overloaded",
          "64 requests in progress; retry shortly"),
    507: ("the registry's disk is full; nothing was activated", "storage_full",
          "the registry has no space left (No space left on device); the previous version keeps serving"),
}
# answered on every route: by the ASGI middleware (431), and for a query parameter the route does not take (422);
# and on every route that takes a body (408, 413)
ALWAYS = (422, 431)
WITH_BODY = (408, 413)


def error_responses(*statuses: int, v2: bool = False) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route: each status with its schema, description and an example body."""
    # a $ref, not `model`: FastAPI would file a model under the route's own media type (text/plain for /metrics)
    schema = {"$ref": f"#/components/schemas/{(V2ErrorBody if v2 else ErrorBody).__name__}"}
    return {status: {"description": STATUS_DOCS[status][0], "content": {"application/json": {
        "schema": schema, "example": error_body(STATUS_DOCS[status][2], STATUS_DOCS[status][1], v2=v2)}}}
        for status in sorted({*statuses, *ALWAYS})}


def error_schemas() -> dict[str, Any]:
    """The components `error_responses` refers to."""
    return {model.__name__: model.model_json_schema() for model in (ErrorBody, V2ErrorBody)}


HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}


def add_error_handlers(app: FastAPI) -> None:
    """Every error leaves as {"detail", "code"} JSON (V2 routes add `error`); an unexpected one as a logged
    500, never a bare page."""

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return _error(request, exc.status, exc.message, exc.code, exc.field, exc.headers)

    @app.exception_handler(UnknownTask)
    async def unknown_task(request: Request, exc: UnknownTask) -> JSONResponse:
        return _error(request, 404, exc.args[0], "unknown_task")

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ()))
        return _error(request, 422, f"{where}: {first.get('msg', 'invalid')}", "invalid_request", where)

    @app.exception_handler(RegistryDamage)
    async def registry_damage(request: Request, exc: RegistryDamage) -> JSONResponse:
        # a stored version whose file on disk cannot be served, met while activating or pinning it
        return _error(request, 422, f"that version cannot be served: {exc}", "invalid_bundle")

    @app.exception_handler(RegistryUnavailable)
    async def registry_unavailable(request: Request, exc: RegistryUnavailable) -> JSONResponse:
        return _error(request, 503, f"{exc}; nothing was changed, retry later", "registry_unavailable",
                      headers={"Retry-After": "5"})

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        if exc.status_code == 400:  # FastAPI's answer to a JSON body it cannot parse: a 422 like the others
            return _error(request, 422, f"the request body could not be parsed: {exc.detail}", "bad_json", "body")
        if exc.status_code == 405:
            allowed = ", ".join(allowed_methods(request))
            return _error(request, 405, f"{request.method} is not allowed here; allowed: {allowed}",
                          "method_not_allowed", headers={"Allow": allowed})
        return _error(request, exc.status_code, str(exc.detail), HTTP_CODES.get(exc.status_code, "http_error"),
                      headers=exc.headers)

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, exc: ClientDisconnect) -> JSONResponse:
        # Not a fault of the service: nobody reads this answer, the metrics count it as 499 (as nginx does).
        log.info("client closed the connection during %s %s", request.method, request.url.path)
        return _error(request, 499, "the client closed the connection before its request was read",
                      "client_closed")

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return _error(request, 500, "internal error; the service logged it", "internal_error")


def every_route(app: FastAPI) -> Iterator[Any]:
    """Each route of the app with its effective settings (path, methods, dependencies), those of included routers
    too: FastAPI ≥ 0.165 keeps an included router as one entry of `app.routes`."""
    contexts = getattr(fastapi.routing, "iter_route_contexts", None)
    return iter(contexts(app.routes) if contexts else app.routes)


def allowed_methods(request: Request) -> list[str]:
    """Every method some route takes at this path (Starlette's 405 names only the first route that matched)."""
    methods: set[str] = set()
    for route in every_route(request.app):
        route_methods = getattr(route, "methods", None)
        if route_methods and route.matches(request.scope)[0] is not Match.NONE:
            methods |= route_methods
    return sorted(methods)


def _error(request: Request, status: int, detail: str, code: str, field: str | None = None,
           headers: Mapping[str, str] | None = None) -> JSONResponse:
    body = openai_error(error_body(detail, code, field, v2=is_v2_path(request.url.path)), request.url.path)
    return JSONResponse(body, status_code=status, headers=headers)
