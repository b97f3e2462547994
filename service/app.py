"""The FastAPI application: wiring only (state, middleware, error bodies)."""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from operator import attrgetter

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.types import Scope

from service import __version__
from service.api import AppState, router
from service.backbone import Backbone, load_backbone
from service.batcher import MicroBatcher
from service.body_limit import BodySizeLimit
from service.config import MiB, Settings
from service.demo import seed_demo_tasks
from service.errors import ServiceError
from service.images import ImagePreprocessor
from service.metrics import Metrics, MetricsMiddleware
from service.registry import UnknownTask, open_registry
from service.runtime import ClassifyRuntime
from service.tasks import TaskManager

log = logging.getLogger(__name__)


def build_state(settings: Settings, metrics: Metrics, backbone: Backbone | None = None) -> AppState:
    """Load the backbone (unless given), restore every task, and seed the demo task on a fresh registry."""
    backbone = backbone or load_backbone(settings.backbone_spec())
    tasks = TaskManager(backbone, open_registry(settings.registry), settings.max_classes)
    tasks.restore()
    if settings.demo:
        seed_demo_tasks(tasks)
    runtime = ClassifyRuntime(backbone)
    batcher = MicroBatcher(runtime, attrgetter("rows"), max_rows=settings.batch_max_images,
                           max_wait_s=settings.batch_max_wait_ms / 1000,
                           max_queued_rows=settings.batch_max_queued_images, observe=metrics.observe_batch)
    state = AppState(settings, backbone, tasks, metrics, ImagePreprocessor(backbone.preprocess), runtime, batcher,
                     anyio.CapacityLimiter(1))
    state.refresh_task_gauges()
    return state


def create_app(settings: Settings | None = None, backbone: Backbone | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state = await anyio.to_thread.run_sync(build_state, settings, metrics, backbone)
        app.state.promptserve = state
        batch_worker = asyncio.create_task(state.batcher.run())
        try:
            yield
        finally:
            batch_worker.cancel()

    app = FastAPI(title="promptserve", version=__version__, lifespan=lifespan,
                  description="Many few-shot prompt classifiers on one frozen open_clip backbone.")
    app.include_router(router)

    @app.get("/metrics", tags=["health"], summary="Prometheus metrics", response_class=PlainTextResponse)
    async def prometheus_metrics() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return JSONResponse({"detail": exc.message, "code": exc.code}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(UnknownTask)
    async def unknown_task(request: Request, exc: UnknownTask) -> JSONResponse:
        return JSONResponse({"detail": exc.args[0], "code": "unknown_task"}, status_code=404)

    def body_limit(scope: Scope) -> int:
        path = scope["path"]
        if path.endswith("/versions"):
            return settings.max_bundle_bytes
        if path.endswith("classify"):
            return settings.max_classify_body_bytes
        return MiB

    app.add_middleware(BodySizeLimit, limit_for=body_limit)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app
