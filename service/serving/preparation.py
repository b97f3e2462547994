"""Who may make the service prepare a version for a `?version=` pin, and where that work runs.

Preparing a version (decoding it, computing its class text features) costs up to seconds of CPU. Uploads and
admin changes do it in the activation worker; a pin of a version that is neither active nor among the prepared
ones (`PROMPTSERVE_PREPARED_VERSIONS`) needs it too, and any client may ask for one. So:

- `PinWorker` prepares pinned versions in a thread of their own at the lowest CPU priority (nice 19, with the
  threads its torch calls start): an upload never waits behind a pin, and a pin takes only the CPU that
  classify requests and uploads leave over;
- `PinBudget` bounds the pins that need preparing, per client and per task: each may have at most
  `per_minute` prepared a minute (token buckets, refilled continuously), a client one at a time, and at most
  `max_queued` wait at once. Pins of prepared versions cost nothing and are not counted.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)


class PinWorker:
    """One dedicated thread, at the lowest CPU priority, for preparing pinned versions."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="pin-preparation", initializer=lowest_priority)
        self.queued = 0  # waiting or running

    async def run(self, func: Callable[..., T], *args: Any) -> T:
        self.queued += 1
        try:
            return await asyncio.wrap_future(self._executor.submit(func, *args))
        finally:
            self.queued -= 1

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def lowest_priority() -> None:
    """Nice 19 for this thread (Linux schedules threads by their own nice value; threads it starts inherit it)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except OSError as exc:  # not permitted here: pins still run, at normal priority
        log.warning("%s runs at normal CPU priority: %s", threading.current_thread().name, exc)


class PinRefused(Exception):
    def __init__(self, reason: str, retry_after_s: float):
        super().__init__(reason)
        self.retry_after_s = retry_after_s


@dataclass
class _Bucket:
    tokens: float
    at: float


class PinBudget:
    """Token buckets per client and per task for pins that need a preparation, and one at a time per client."""

    MAX_KEYS = 4096  # buckets kept; full ones carry no state and are dropped first

    def __init__(self, per_minute: int, max_queued: int, clock: Callable[[], float] = time.monotonic):
        self.per_minute, self.max_queued, self.clock = per_minute, max_queued, clock
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self._running: set[str] = set()

    def take(self, client: str, task: str, queued: int) -> None:
        """Grant one preparation, to be followed by `done(client)`, or raise PinRefused saying why."""
        if self.per_minute == 0:
            raise PinRefused("pinned versions are not prepared on demand here "
                             "(PROMPTSERVE_PIN_PREPARATIONS_PER_MINUTE=0)", 60)
        if client in self._running:
            raise PinRefused("this client already has a pinned version being prepared", 1)
        if queued >= self.max_queued:
            raise PinRefused(f"{queued} pinned versions are waiting to be prepared", 1)
        self._forget_some()
        keys = (f"client {client}", f"task {task}")
        buckets = [self._bucket(key) for key in keys]
        waits = [0.0 if b.tokens >= 1 else (1 - b.tokens) * 60 / self.per_minute for b in buckets]
        if max(waits) > 0:
            who = keys[0] if waits[0] >= waits[1] else keys[1]
            raise PinRefused(f"{who} may have {self.per_minute} versions prepared for pins a minute", max(waits))
        for bucket in buckets:
            bucket.tokens -= 1
        self._running.add(client)

    def done(self, client: str) -> None:
        self._running.discard(client)

    def _bucket(self, key: str) -> _Bucket:
        """`key`'s bucket, refilled for the time since it was last used."""
        now = self.clock()
        bucket = self._buckets.pop(key, None) or _Bucket(float(self.per_minute), now)
        bucket.tokens = min(self.per_minute, bucket.tokens + (now - bucket.at) * self.per_minute / 60)
        bucket.at = now
        self._buckets[key] = bucket  # most recently used last
        return bucket

    def _forget_some(self) -> None:
        """Keep at most MAX_KEYS buckets: full ones first (a new bucket starts full), then the least recent."""
        if len(self._buckets) <= self.MAX_KEYS:
            return
        now, rate = self.clock(), self.per_minute / 60
        full = [key for key, b in self._buckets.items() if b.tokens + (now - b.at) * rate >= self.per_minute]
        for key in full:
            del self._buckets[key]
        while len(self._buckets) > self.MAX_KEYS:
            self._buckets.popitem(last=False)
