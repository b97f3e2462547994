"""Prometheus metrics, one registry per app so several apps (tests) never collide."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence

from prometheus_client import CollectorRegistry, Counter, Histogram, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.serving.propagation import RegistryHealth
from service.serving.tasks import TaskManager


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
        self.batch_rows = Histogram("promptserve_batch_rows", "Rows (image forwards) per micro-batch",
                                    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 128, 256), registry=self.registry)
        self.queue_depth = Histogram("promptserve_batch_queue_depth", "Rows still queued when a micro-batch starts",
                                     buckets=(0, 1, 2, 4, 8, 16, 32, 64, 128, 256), registry=self.registry)
        self.queue_wait = Histogram("promptserve_batch_queue_seconds", "Time a classify job waited for its batch",
                                    buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5),
                                    registry=self.registry)
        self.propagation_lag = Histogram(
            "promptserve_propagation_lag_seconds", "From a change committed to the registry (by any replica) to "
            "this replica serving it", buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
            registry=self.registry)
        self.cold_load = Histogram(
            "promptserve_cold_load_seconds", "From a request (or the warm-up) needing a task not in memory to its "
            "active version being warm", buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry)

    def watch_fleet(self, health: RegistryHealth, failures: Callable[[], dict[str, int]]) -> None:
        """Registry reachability, last sync and tasks not serving what the registry holds, read at each scrape."""
        self.registry.register(_FleetCollector(health, failures))

    def watch_tasks(self, tasks: TaskManager) -> None:
        """Tasks listed and warm, their memory against the budget, evictions and where features came from, read
        at each scrape (one pass over the listing, however many tasks)."""
        self.registry.register(_TasksCollector(tasks))

    def observe_batch(self, rows: int, waits: Sequence[float], queued_rows: int) -> None:
        self.batch_rows.observe(rows)
        self.queue_depth.observe(queued_rows)
        for wait in waits:
            self.queue_wait.observe(wait)

    def forget_task(self, task: str) -> None:
        """Drop a deleted task's series, so label values stay bounded by the tasks that exist."""
        try:
            self.images.remove(task)
        except KeyError:
            pass


class _FleetCollector(Collector):
    def __init__(self, health: RegistryHealth, failures: Callable[[], dict[str, int]]):
        self.health, self.failures = health, failures

    def describe(self) -> Iterable[Metric]:
        return []  # families are built at scrape time

    def collect(self) -> Iterable[Metric]:
        health = self.health
        yield GaugeMetricFamily("promptserve_registry_reachable", "1 while the registry answers",
                                value=float(health.reachable))
        yield GaugeMetricFamily("promptserve_registry_last_sync_timestamp_seconds",
                                "Unix time of the last successful full resync with the registry (0: none yet)",
                                value=health.last_sync or 0)
        failed = GaugeMetricFamily("promptserve_failed_tasks", "Tasks not serving the registry's active version, by "
                                   "reason: bundle (cannot be served here), damaged (registry files), waiting "
                                   "(registry unavailable; retried)", labels=["reason"])
        for reason, count in self.failures().items():
            failed.add_metric([reason], count)
        yield failed


class _TasksCollector(Collector):
    def __init__(self, tasks: TaskManager):
        self.tasks = tasks

    def describe(self) -> Iterable[Metric]:
        return []  # families are built at scrape time

    def collect(self) -> Iterable[Metric]:
        tasks = self.tasks
        yield GaugeMetricFamily("promptserve_tasks", "Tasks this replica serves (listed from the registry), warm or "
                                "cold", value=len(tasks.names()))
        yield GaugeMetricFamily("promptserve_cached_tasks", "Warm tasks: active version in memory (text features "
                                "cached)", value=len(tasks.all()))
        yield GaugeMetricFamily("promptserve_feature_memory_bytes", "Memory the warm tasks' heads hold",
                                value=tasks.warm_bytes)
        yield GaugeMetricFamily("promptserve_feature_memory_budget_bytes", "PROMPTSERVE_FEATURE_MEMORY_BYTES (0: no "
                                "limit)", value=tasks.feature_memory_bytes)
        yield CounterMetricFamily("promptserve_task_evictions", "Warm tasks evicted beyond the memory budget",
                                  value=tasks.counts["evictions"])
        features = CounterMetricFamily("promptserve_task_features", "Class text features of prepared versions, by "
                                       "where they came from: artefact (stored by a replica), computed (here), "
                                       "stored (computed here and stored for the others)", labels=["source"])
        for source in ("artefact", "computed"):
            features.add_metric([source], tasks.counts[f"features_{source}"])
        features.add_metric(["stored"], tasks.counts["artefacts_stored"])
        yield features
        active = GaugeMetricFamily("promptserve_active_version", "Active bundle version", labels=["task"])
        for name in tasks.names():
            version = tasks.active_version(name)
            if version is not None:
                active.add_metric([name], version)
        yield active


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
