"""Keep one replica in step with a shared registry.

A thread listens for the changes other replicas commit (`Registry.changes`: LISTEN/NOTIFY for PostgreSQL)
and applies each one as it arrives; a full resync runs after every (re)connect and every
`resync_interval_s`, so a missed notification heals. While the registry is unreachable the replica keeps
serving what it has, and `RegistryHealth` says why it is not ready.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass

from service.registry.base import RegistryUnavailable
from service.serving.tasks import TaskManager

log = logging.getLogger(__name__)


@dataclass
class RegistryHealth:
    restored: bool = False  # tasks have been restored from the registry at least once
    reachable: bool = False
    error: str | None = None
    down_since: float | None = None
    last_sync: float | None = None

    def up(self) -> None:
        self.restored = self.reachable = True
        self.error = self.down_since = None
        self.last_sync = time.time()

    def down(self, error: str) -> None:
        if self.reachable or self.down_since is None:
            log.error("registry unreachable: %s", error)
            self.down_since = time.time()
        self.reachable, self.error = False, error

    def problem(self) -> str | None:
        """Why this replica is not ready, or None."""
        if not self.reachable:
            return f"registry unreachable: {self.error}"
        return None if self.restored else "tasks not restored yet"


class Propagator:
    def __init__(self, tasks: TaskManager, resync_interval_s: float, *, poll_s: float = 0.5, retry_s: float = 1.0,
                 after_sync: Callable[[], None] = lambda: None):
        self.tasks = tasks
        self.resync_interval_s = resync_interval_s
        self.poll_s, self.retry_s = poll_s, retry_s
        self.after_sync = after_sync
        self.health = RegistryHealth()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="registry-propagation", daemon=True)

    def resync(self) -> bool:
        """Full resync now; False (and health says why) if the registry is unreachable."""
        try:
            self.tasks.resync()
            self.after_sync()
        except RegistryUnavailable as exc:
            self.health.down(str(exc))
            return False
        self.health.up()
        return True

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._follow()
            except RegistryUnavailable as exc:
                self.health.down(str(exc))
            except Exception:  # a bug here must not end propagation for good
                log.exception("registry propagation failed; retrying")
            self._stop.wait(self.retry_s)

    def _follow(self) -> None:
        """Apply changes until the connection drops or the replica stops; the first tick after a connect
        resyncs, since anything may have changed while it was away."""
        next_resync = 0.0
        with closing(self.tasks.registry.changes(self.poll_s)) as changes:
            for task in changes:
                if self._stop.is_set():
                    return
                if task is not None:
                    self.tasks.sync(task)
                    self.after_sync()
                if time.monotonic() >= next_resync:
                    if not self.resync():
                        return
                    next_resync = time.monotonic() + self.resync_interval_s
