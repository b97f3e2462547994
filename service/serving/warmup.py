"""Cold tasks into memory: for a request (a bounded wait) and in the background (at the lowest CPU priority).

A replica is ready once it has read the registry's index, not once every task is in memory (`TaskManager`). A
request for a cold task waits up to `timeout_s` for its activation, which runs on a small pool of its own (never
on the event loop, never behind an upload); past it the request answers 503 with Retry-After while the activation
goes on, so the retry finds the task warm. Concurrent requests for one cold task share one activation. The
background warm-up activates cold tasks, most used first, while the feature memory budget has room.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
from concurrent.futures import Future, ThreadPoolExecutor

from service.serving.activation import ActiveTask
from service.serving.errors import ServiceError
from service.serving.preparation import lowest_priority
from service.serving.tasks import TaskManager

log = logging.getLogger(__name__)


class ColdStarts:
    """Activations of cold tasks for requests: one per task at a time, on `workers` threads."""

    def __init__(self, tasks: TaskManager, timeout_s: float, workers: int = 2):
        self.tasks, self.timeout_s = tasks, timeout_s
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="cold-activation")
        self._loading: dict[str, Future[ActiveTask]] = {}
        self._lock = threading.Lock()

    async def get(self, name: str) -> ActiveTask:
        """The task's active version, activated first if it is cold (UnknownTask if there is no such task)."""
        task = self.tasks.warm(name)
        if task is not None:
            return task
        try:
            return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(self._activation(name))), self.timeout_s)
        except TimeoutError:
            retry = max(1, math.ceil(self.timeout_s / 4))
            raise ServiceError(503, "task_warming", f"task {name!r} is being loaded into memory and took longer than "
                               f"{self.timeout_s:g} s (PROMPTSERVE_COLD_START_TIMEOUT_S); retry in {retry} s",
                               headers={"Retry-After": str(retry)}) from None

    def _activation(self, name: str) -> Future[ActiveTask]:
        with self._lock:
            future = self._loading.get(name)
            if future is not None:
                return future
            future = self._loading[name] = self._executor.submit(self.tasks.activate_cold, name)
        # outside the lock: a callback on a future that is already done runs at once, in this thread
        future.add_done_callback(lambda done: self._done(name, done))
        return future

    def _done(self, name: str, future: Future[ActiveTask]) -> None:
        with self._lock:
            if self._loading.get(name) is future:
                del self._loading[name]

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class BackgroundWarmup:
    """A thread at the lowest CPU priority that keeps activating cold tasks while the memory budget has room."""

    def __init__(self, tasks: TaskManager, poll_s: float = 1.0):
        self.tasks, self.poll_s = tasks, poll_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="background-warmup", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        lowest_priority()
        while not self._stop.is_set():
            try:
                warmed = self.tasks.warm_up(stop=self._stop)
            except Exception:  # a bug here must not end the warm-up for good
                log.exception("background warm-up failed; retrying")
                warmed = 0
            if warmed:
                log.info("background warm-up: %d task(s) activated, %d warm", warmed, len(self.tasks.all()))
            self._stop.wait(self.poll_s)
