"""Keep one replica in step with a shared registry, task by task, and heal what a transient error broke.

A thread listens for the changes other replicas commit (`Registry.changes`: LISTEN/NOTIFY for PostgreSQL) and
hands each changed task to a `TaskSyncer`; a full resync (one snapshot read) runs after every (re)connect and
every `resync_interval_s`, so a missed notification heals. The syncer applies tasks on a bounded pool of
workers, one sync per task at a time: preparing one task's large version never delays another task. A sync
that finds the registry unavailable is retried with exponential backoff; it is not a failure of the task.
While the registry is unreachable the replica keeps serving what it has, and `RegistryHealth` says why it
is not ready.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass

from service.registry.base import RegistryUnavailable, TaskState, UnknownTask
from service.serving.tasks import TaskManager

log = logging.getLogger(__name__)
Known = tuple[TaskState | None, int] | None  # a task's state read in a snapshot, and its generation then


@dataclass
class RegistryHealth:
    restored: bool = False  # tasks have been restored from the registry at least once
    reachable: bool = False
    error: str | None = None
    down_since: float | None = None
    last_sync: float | None = None

    def up(self) -> None:
        if self.down_since is not None:
            log.warning("registry reachable again after %.1f s", time.time() - self.down_since)
        self.reachable = True
        self.error = self.down_since = None
        self.last_sync = time.time()

    def down(self, error: RegistryUnavailable) -> None:
        if self.reachable or self.down_since is None:
            log.error("registry unreachable: %s", error.detail)
            self.down_since = time.time()
        self.reachable, self.error = False, str(error)

    def problem(self) -> str | None:
        """Why this replica is not ready, or None."""
        if not self.reachable:
            return f"registry unreachable: {self.error}"
        return None if self.restored else "tasks not restored yet"


class TaskSyncer:
    """Applies the registry's state to tasks on `workers` threads, one sync per task at a time (a change that
    arrives meanwhile runs right after); a sync the registry could not serve is retried after `retry_s[0]`
    seconds, doubling up to `retry_s[1]`, until it succeeds or a newer change supersedes it."""

    def __init__(self, tasks: TaskManager, workers: int, *, retry_s: tuple[float, float] = (0.5, 30.0),
                 on_applied: Callable[[TaskState | None], None] = lambda state: None):
        self.tasks = tasks
        self.retry_s = retry_s
        self.on_applied = on_applied
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="registry-sync")
        self._cond = threading.Condition()
        self._busy: set[str] = set()
        self._again: dict[str, Known] = {}
        self._attempts: dict[str, int] = {}
        self._retries: list[tuple[float, str]] = []  # (due, task), a heap; stale entries are skipped
        self._due: dict[str, float] = {}
        self._stopped = False
        self._timer = threading.Thread(target=self._retry_loop, name="registry-retry", daemon=True)
        self._timer.start()

    def submit(self, name: str, known: Known = None) -> None:
        """Sync `name` soon: with `known` (a snapshot's state) or by reading its state when the sync runs."""
        with self._cond:
            if self._stopped:
                return
            self._due.pop(name, None)  # this sync supersedes a scheduled retry
            if name in self._busy:
                self._again[name] = known if name not in self._again else None  # two changes: read afresh
                return
            self._busy.add(name)
        self._pool.submit(self._run, name, known)

    def wait(self, timeout: float | None = None) -> bool:
        """Until no sync is running or queued (scheduled retries aside); False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._busy, timeout)

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _run(self, name: str, known: Known) -> None:
        try:
            applied = self.tasks.sync(name, known)
            self._attempts.pop(name, None)
            self.on_applied(applied)
        except (RegistryUnavailable, UnknownTask):
            self._schedule_retry(name)
        except Exception:  # a bug in one task's sync must not stop the others
            log.exception("task %s: sync failed", name)
        with self._cond:
            if name in self._again and not self._stopped:
                self._pool.submit(self._run, name, self._again.pop(name))
                return
            self._again.pop(name, None)
            self._busy.discard(name)
            self._cond.notify_all()

    def _schedule_retry(self, name: str) -> None:
        attempts = self._attempts[name] = self._attempts.get(name, 0) + 1
        delay = min(self.retry_s[1], self.retry_s[0] * 2 ** (attempts - 1))
        log.info("task %s: retrying in %.1f s (attempt %d)", name, delay, attempts + 1)
        with self._cond:
            due = self._due[name] = time.monotonic() + delay
            heapq.heappush(self._retries, (due, name))
            self._cond.notify_all()

    def _retry_loop(self) -> None:
        with self._cond:
            while not self._stopped:
                now = time.monotonic()
                while self._retries and self._retries[0][0] <= now:
                    due, name = heapq.heappop(self._retries)
                    if self._due.get(name) == due:
                        del self._due[name]
                        self._cond.release()  # submit takes the lock itself
                        try:
                            self.submit(name)
                        finally:
                            self._cond.acquire()
                self._cond.wait(self._retries[0][0] - now if self._retries else None)


class Propagator:
    def __init__(self, tasks: TaskManager, resync_interval_s: float, *, workers: int = 4, poll_s: float = 0.5,
                 retry_s: float = 1.0, after_sync: Callable[[], None] = lambda: None,
                 after_apply: Callable[[], None] = lambda: None,
                 observe_lag: Callable[[float], None] = lambda seconds: None):
        self.tasks = tasks
        self.resync_interval_s = resync_interval_s
        self.poll_s, self.retry_s = poll_s, retry_s
        self.after_sync = after_sync  # after each full resync (the app seeds demo tasks and refreshes gauges)
        self.after_apply = after_apply  # after each task synced (on a worker thread)
        self.observe_lag = observe_lag  # seconds from a change's commit to this replica serving it
        self.health = RegistryHealth()
        self.syncer = TaskSyncer(tasks, workers, on_applied=self._applied)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="registry-propagation", daemon=True)

    def resync(self) -> bool:
        """Full resync now: one snapshot read, then every task out of step synced on the workers (waited for
        until tasks were first restored). False (and health says why) if the registry is unreachable."""
        try:
            plan = self.tasks.out_of_step()
        except RegistryUnavailable as exc:
            self.health.down(exc)
            return False
        for name, state, generation in plan:
            self.syncer.submit(name, (state, generation))
        if not self.health.restored:
            self.syncer.wait()
        self.health.up()
        self.health.restored = True
        self.after_sync()
        return True

    def _applied(self, state: TaskState | None) -> None:
        if state is not None and state.changed_at is not None and self.health.restored:
            self.observe_lag(max(0.0, time.time() - state.changed_at))
        self.after_apply()

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        self.syncer.stop()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._follow()
            except RegistryUnavailable as exc:
                self.health.down(exc)
            except Exception:  # a bug here must not end propagation for good
                log.exception("registry propagation failed; retrying")
            self._stop.wait(self.retry_s)

    def _follow(self) -> None:
        """Hand changes to the syncer until the connection drops or the replica stops; the first tick after a
        connect resyncs, since anything may have changed while it was away."""
        next_resync = 0.0
        with closing(self.tasks.registry.changes(self.poll_s)) as changes:
            for task in changes:
                if self._stop.is_set():
                    return
                if task is not None:
                    self.syncer.submit(task)
                if time.monotonic() >= next_resync:
                    if not self.resync():
                        return
                    next_resync = time.monotonic() + self.resync_interval_s
