"""Prometheus metrics, one registry per app so several apps (tests) never collide."""

from __future__ import annotations

import time
from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, PlatformCollector, ProcessCollector
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)  # memory, CPU, open files of this process
        PlatformCollector(registry=self.registry)  # python_info
        self.requests = Counter(
            "promptserve_requests", "HTTP requests", ["method", "route", "status"], registry=self.registry
        )
        self.errors = Counter("promptserve_errors", "HTTP responses with status >= 400", ["route", "status"],
                              registry=self.registry)
        self.latency = Histogram("promptserve_request_seconds", "HTTP request latency", ["route"],
                                 registry=self.registry)
        self.images = Counter("promptserve_images_classified", "Images classified", ["task"], registry=self.registry)
        self.cached_tasks = Gauge("promptserve_cached_tasks", "Tasks with cached text features",
                                  registry=self.registry)
        self.active_version = Gauge("promptserve_active_version", "Active bundle version", ["task"],
                                    registry=self.registry)
        self.batch_rows = Histogram("promptserve_batch_rows", "Rows (image forwards) per micro-batch",
                                    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 128, 256), registry=self.registry)
        self.queue_depth = Histogram("promptserve_batch_queue_depth", "Rows still queued when a micro-batch starts",
                                     buckets=(0, 1, 2, 4, 8, 16, 32, 64, 128, 256), registry=self.registry)
        self.queue_wait = Histogram("promptserve_batch_queue_seconds", "Time a classify job waited for its batch",
                                    buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5),
                                    registry=self.registry)

    def observe_batch(self, rows: int, waits: Sequence[float], queued_rows: int) -> None:
        self.batch_rows.observe(rows)
        self.queue_depth.observe(queued_rows)
        for wait in waits:
            self.queue_wait.observe(wait)

    def forget_task(self, task: str) -> None:
        """Drop a deleted task's series, so label values stay bounded by the tasks that exist."""
        for gauge in (self.images, self.active_version):
            try:
                gauge.remove(task)
            except KeyError:
                pass


HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class MetricsMiddleware:
    """Counts every response (including ones produced by other middleware) by route template.

    Labels come from fixed sets only: the route template (or "unmatched"), a known HTTP method (or "other"),
    the status code; never the raw path or method a client sent.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        start = time.perf_counter()

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            method = scope["method"] if scope["method"] in HTTP_METHODS else "other"
            self.metrics.requests.labels(method, route, str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)
            if status >= 400:
                self.metrics.errors.labels(route, str(status)).inc()
