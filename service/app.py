"""The FastAPI application: wiring only (state, middleware, error bodies)."""

from __future__ import annotations

import asyncio
import copy
import logging
from collections.abc import Callable
from contextlib import asynccontextmanager
from operator import attrgetter

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException
from starlette.types import Scope

from service import __version__
from service.api import AppState, router
from service.api_docs import add_docs_pages
from service.api_v2 import router as v2_router
from service.api_versions import router as versions_router
from service.backbone import Backbone, load_backbone
from service.batcher import MicroBatcher
from service.body_limit import RequestLimits, RouteLimits
from service.config import MiB, Settings
from service.demo import seed_demo_tasks
from service.errors import ServiceError, error_body, error_responses, error_schemas, is_v2_path
from service.images import ImagePreprocessor
from service.metrics import Metrics, MetricsMiddleware
from service.propagation import Propagator
from service.registry import RegistryUnavailable, UnknownTask, open_registry
from service.runtime import ClassifyRuntime
from service.tasks import TaskManager
from service.web import add_web_page

log = logging.getLogger(__name__)


def build_state(settings: Settings, metrics: Metrics, backbone: Backbone | None = None) -> AppState:
    """Load the backbone (unless given), restore every task, and seed the demo task on a fresh registry.
    If the registry is unreachable, the propagation thread restores them once it answers."""
    backbone = backbone or load_backbone(settings.backbone_spec())
    tasks = TaskManager(backbone, open_registry(settings.registry), settings.bundle_limits())
    tasks.prepared_cache_size = settings.prepared_versions
    runtime = ClassifyRuntime(backbone)
    batcher = MicroBatcher(runtime, attrgetter("rows"), max_rows=settings.batch_max_images,
                           max_wait_s=settings.batch_max_wait_ms / 1000,
                           max_queued_rows=settings.batch_max_queued_images, observe=metrics.observe_batch)
    state = AppState(settings, backbone, tasks, metrics, ImagePreprocessor(backbone.preprocess), runtime, batcher,
                     anyio.CapacityLimiter(1), anyio.CapacityLimiter(settings.decode_concurrency))
    state.propagation = Propagator(tasks, settings.resync_interval_s, after_sync=_after_sync(state))
    state.propagation.resync()
    return state


def _after_sync(state: AppState) -> Callable[[], None]:
    """After each sync: seed the demo tasks the first time (a fresh registry), and refresh the gauges."""
    demo_pending = [True] if state.settings.demo else []

    def after_sync() -> None:
        if demo_pending:
            seed_demo_tasks(state.tasks)
            demo_pending.clear()
        state.refresh_task_gauges()

    return after_sync


def create_app(settings: Settings | None = None, backbone: Backbone | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state = await anyio.to_thread.run_sync(build_state, settings, metrics, backbone)
        app.state.promptserve = state
        batch_worker = asyncio.create_task(state.batcher.run())
        state.propagation.start()
        try:
            yield
        finally:
            batch_worker.cancel()
            await anyio.to_thread.run_sync(state.propagation.stop)

    app = FastAPI(title="promptserve", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Many few-shot prompt classifiers on one frozen open_clip backbone.",
                  generate_unique_id_function=lambda route: route.name)
    app.include_router(router)
    app.include_router(versions_router)
    app.include_router(v2_router)
    add_web_page(app)
    add_docs_pages(app)
    app.openapi = lambda: app.openapi_schema or _openapi(app, settings)

    @app.get("/metrics", tags=["health"], summary="Prometheus metrics", response_class=PlainTextResponse,
             responses=error_responses())
    async def prometheus_metrics() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    add_error_handlers(app)
    app.add_middleware(RequestLimits, limits_for=lambda scope: route_limits(scope, settings),
                       max_header_bytes=settings.max_header_bytes, body_timeout_s=settings.body_timeout_s,
                       max_inflight=settings.max_inflight_requests)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app


def _openapi(app: FastAPI, settings: Settings) -> dict:
    """The schema with the error bodies, and this service's request-size settings as maxItems; built once."""
    # a copy: FastAPI shares the routes' openapi_extra dicts between apps, and these limits are per app
    schema = copy.deepcopy(FastAPI.openapi(app))
    schema["components"]["schemas"] |= error_schemas()
    bound = {"maxItems": settings.max_images_per_request}
    for path in ("/v1/tasks/{task}/classify", "/v1/classify"):
        for content in schema["paths"][path]["post"]["requestBody"]["content"].values():
            content["schema"]["properties"]["images"] |= bound
    for path in ("/v2/models/{task}/infer", "/v2/models/{task}/versions/{version}/infer"):
        body = schema["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        body["properties"]["inputs"]["items"]["properties"]["data"] |= bound
    app.openapi_schema = schema
    return schema


def route_limits(scope: Scope, settings: Settings) -> RouteLimits:
    path, post = scope["path"], scope["method"] == "POST"
    if path.endswith("/versions"):
        return RouteLimits(settings.max_bundle_bytes, expensive=post)
    if path.endswith(("classify", "/infer")):
        return RouteLimits(settings.max_classify_body_bytes, expensive=post)
    return RouteLimits(MiB, expensive=False)


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

    @app.exception_handler(RegistryUnavailable)
    async def registry_unavailable(request: Request, exc: RegistryUnavailable) -> JSONResponse:
        return _error(request, 503, f"{exc}; nothing was changed, retry later", "registry_unavailable",
                      headers={"Retry-After": "5"})

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        if exc.status_code == 400:  # FastAPI's answer to a JSON body it cannot parse: a 422 like the others
            return _error(request, 422, f"the request body could not be parsed: {exc.detail}", "bad_json", "body")
        return _error(request, exc.status_code, str(exc.detail), HTTP_CODES.get(exc.status_code, "http_error"),
                      headers=exc.headers)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return _error(request, 500, "internal error; the service logged it", "internal_error")


def _error(request: Request, status: int, detail: str, code: str, field: str | None = None,
           headers: dict[str, str] | None = None) -> JSONResponse:
    body = error_body(detail, code, field, v2=is_v2_path(request.url.path))
    return JSONResponse(body, status_code=status, headers=headers)
