"""The FastAPI application: wiring only (state, routes, middleware, error bodies, the OpenAPI document)."""

from __future__ import annotations

import asyncio
import copy
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from operator import attrgetter
from typing import Any

import anyio
from fastapi import Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import PlainTextResponse
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.types import Scope

from service import __version__
from service.config import MiB, Settings, unknown_variables
from service.core.backbone import Backbone, load_backbone
from service.http.deps import AppState, require_classify
from service.http.errors import add_error_handlers, error_responses, error_schemas, every_route
from service.http.limits import RequestLimits, RouteLimits
from service.http.metrics import Metrics, MetricsMiddleware
from service.http.observability import REQUEST_ID_HEADER, RequestIdMiddleware
from service.http.query import reject_unknown_query
from service.http.routes import docs, embeddings, kserve_v2, v1, versions, web, zero_shot
from service.registry import open_registry
from service.registry.base import RegistryUnavailable
from service.serving.batcher import MicroBatcher
from service.serving.demo import seed_demo_tasks
from service.serving.images import DecodeLimits, ImagePreprocessor
from service.serving.pipeline import AnswerLimits, ClassifyPipeline
from service.serving.preparation import PinBudget, PinWorker
from service.serving.propagation import Propagator
from service.serving.runtime import ClassifyRuntime
from service.serving.tasks import TaskManager
from service.serving.warmup import BackgroundWarmup, ColdStarts
from service.serving.zero_shot import ZeroShotCache

log = logging.getLogger(__name__)
MAX_QUEUED_PINS = 16  # pinned versions waiting to be prepared; beyond, 429 (docs/registry.md)


def build_state(settings: Settings, metrics: Metrics, backbone: Backbone | None = None) -> AppState:
    """Load the backbone (unless given), read the registry's index of tasks and warm what the startup warm-up
    allows, and seed the demo task on a fresh registry. If the registry is unreachable, the propagation thread
    restores them once it answers."""
    backbone = backbone or load_backbone(settings.backbone_spec())
    registry = open_registry(settings.registry, settings.registry_timeout_s, settings.registry_pool_size)
    tasks = TaskManager(backbone, registry, settings.bundle_limits(), settings.feature_memory_bytes,
                        on_cold_load=metrics.cold_load.observe)
    tasks.prepared_cache_size = settings.prepared_versions
    runtime = ClassifyRuntime(backbone)
    batcher = MicroBatcher(runtime, attrgetter("rows"), max_rows=settings.batch_max_images,
                           max_wait_s=settings.batch_max_wait_ms / 1000,
                           max_queued_rows=settings.batch_max_queued_images, observe=metrics.observe_batch)
    s = settings
    limits = AnswerLimits(DecodeLimits(s.max_image_bytes, s.max_image_pixels, s.max_request_pixels,
                                       s.max_aspect_ratio), s.max_answer_predictions)
    pipeline = ClassifyPipeline(batcher, ImagePreprocessor(backbone.preprocess), limits, s.decode_concurrency,
                                on_classified=lambda task, images: metrics.images.labels(task).inc(images))
    propagation = Propagator(tasks, settings.resync_interval_s, workers=settings.propagation_workers,
                             observe_lag=metrics.propagation_lag.observe)
    pins = PinBudget(s.pin_preparations_per_minute, max_queued=MAX_QUEUED_PINS)
    zero_shot_cache = ZeroShotCache(backbone, tasks.limits, settings.zero_shot_cache_size)
    state = AppState(settings, backbone, tasks, metrics, runtime, pipeline, anyio.CapacityLimiter(1), PinWorker(), pins,
                     propagation, zero_shot_cache, ColdStarts(tasks, settings.cold_start_timeout_s),
                     BackgroundWarmup(tasks))
    metrics.watch_fleet(propagation.health, tasks.failure_counts)
    metrics.watch_tasks(tasks)
    propagation.after_sync = _after_sync(state)
    if propagation.resync():
        started = time.monotonic()
        warmed = tasks.warm_up(deadline=started + settings.startup_warmup_s)
        log.info("%d task(s) listed, %d activated in %.1f s before ready", len(tasks.names()), warmed,
                 time.monotonic() - started)
    return state


def _after_sync(state: AppState) -> Callable[[], None]:
    """After each full resync: offer the demo tasks the first time (the registry seeds them only if it never
    held a task), and refresh the gauges."""
    demo_pending = [True] if state.settings.demo else []

    def after_sync() -> None:
        if demo_pending:
            try:
                seed_demo_tasks(state.tasks)
                demo_pending.clear()
            except RegistryUnavailable as exc:  # offered again after the next resync
                log.warning("demo tasks not seeded yet: %s", exc)

    return after_sync


def create_app(settings: Settings | None = None, backbone: Backbone | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        for name in unknown_variables(os.environ):
            log.warning("unknown setting %s is ignored (settings: service/config.py, README)", name)
        state = await anyio.to_thread.run_sync(build_state, settings, metrics, backbone)
        app.state.promptserve = state
        batch_worker = asyncio.create_task(state.pipeline.batcher.run())
        state.propagation.start()
        if settings.background_warmup:
            state.warmup.start()
        try:
            yield
        finally:
            batch_worker.cancel()
            await anyio.to_thread.run_sync(state.propagation.stop)
            await anyio.to_thread.run_sync(state.warmup.stop)
            state.cold_starts.close()
            state.pin_worker.close()
            await anyio.to_thread.run_sync(state.tasks.registry.close)

    app = _App(settings, title="promptserve", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
               description="Many few-shot prompt classifiers on one frozen open_clip backbone.",
               generate_unique_id_function=lambda route: route.name, dependencies=[Depends(reject_unknown_query)])
    app.include_router(v1.router)
    app.include_router(versions.router)
    app.include_router(zero_shot.router)
    app.include_router(embeddings.router)
    app.include_router(kserve_v2.router)
    web.add_web_page(app)
    docs.add_docs_pages(app)

    @app.get("/metrics", tags=["health"], summary="Prometheus metrics", response_class=PlainTextResponse,
             responses=error_responses())
    async def prometheus_metrics() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    add_error_handlers(app)
    app.add_middleware(RequestLimits, limits_for=lambda scope: route_limits(scope, settings),
                       max_header_bytes=settings.max_header_bytes, body_timeout_s=settings.body_timeout_s,
                       max_inflight=settings.max_inflight_requests,
                       max_inflight_body_bytes=settings.max_inflight_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    if settings.cors_origins:  # outside the limits, so their refusals carry the CORS headers a browser needs
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"],
                           allow_headers=["*"], expose_headers=[REQUEST_ID_HEADER, "Retry-After"])
    app.add_middleware(RequestIdMiddleware, log_requests=settings.log_format == "json")  # outermost: every answer
    return app


class _App(FastAPI):
    """FastAPI whose OpenAPI document is `_openapi`'s (overriding the method, not assigning to it, keeps it typed)."""

    def __init__(self, settings: Settings, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.promptserve_settings = settings

    def openapi(self) -> dict[str, Any]:
        return self.openapi_schema or _openapi(self, self.promptserve_settings)


def _openapi(app: FastAPI, settings: Settings) -> dict[str, Any]:
    """The schema with the error bodies, this service's request-size settings as maxItems, and classify's bearer
    token optional when no classify token is set; built once."""
    # a copy: FastAPI shares the routes' openapi_extra dicts between apps, and these limits are per app
    schema = copy.deepcopy(FastAPI.openapi(app))
    schema["components"]["schemas"] |= error_schemas()
    bound = {"maxItems": settings.max_images_per_request}
    for path in ("/v1/tasks/{task}/classify", "/v1/classify", "/v1/zero-shot"):
        for content in schema["paths"][path]["post"]["requestBody"]["content"].values():
            content["schema"]["properties"]["images"] |= bound
    if settings.classify_token is None:
        for path, method in _guarded_by(app, require_classify):
            schema["paths"][path][method]["security"] = [{}, *schema["paths"][path][method]["security"]]
    for path in ("/v2/models/{task}/infer", "/v2/models/{task}/versions/{version}/infer"):
        body = schema["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        body["properties"]["inputs"]["items"]["properties"]["data"] |= bound
    app.openapi_schema = schema
    return schema


SMALL_BODY_BYTES = 64 * 1024  # every other body is a small JSON document (an alias target)
INFERENCE_PATHS = ("classify", "/infer", "/v1/zero-shot", "/v1/embeddings")


def _guarded_by(app: FastAPI, guard: Callable[..., None]) -> list[tuple[str, str]]:
    """(OpenAPI path, method) of every operation that depends on `guard`."""
    return [(route.path_format, method.lower()) for route in every_route(app)
            if isinstance(route.original_route if hasattr(route, "original_route") else route, APIRoute)
            and route.include_in_schema and any(d.dependency is guard for d in route.dependencies)
            for method in route.methods or ()]


def route_limits(scope: Scope, settings: Settings) -> RouteLimits:
    path, post = scope["path"], scope["method"] == "POST"
    if path.endswith("/versions"):
        return RouteLimits(settings.max_bundle_bytes, expensive=post)
    if path.endswith(INFERENCE_PATHS):
        return RouteLimits(settings.max_classify_body_bytes, expensive=post)
    if scope["method"] == "PUT" and path.startswith("/v1/tasks/") and path.count("/") == 3:
        return RouteLimits(MiB, expensive=True)  # a task from labels encodes them, like an upload
    return RouteLimits(SMALL_BODY_BYTES, expensive=False)
