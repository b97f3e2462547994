"""Dynamic micro-batching of jobs across concurrent requests.

Requests submit a job and await a future. One worker takes whatever is queued (up to `max_rows` rows), runs
the whole batch in one call in a worker thread, and hands each request its own result. While a batch runs,
the next one fills up, so batches grow with load. The queue is bounded in rows (a row is one image
forward): when full, callers get `Overloaded` at once instead of waiting without limit.

When to start a batch: closed-loop clients all get their answers from one batch and send their next
requests together, but each spends a few milliseconds on the way back, so a worker that starts on the first
arrival splits them into uneven groups (3+5, 2+6) — and the split sustains itself: each group queues while
the other one runs. So the worker waits, never longer than `max_wait_s` after the first job, for
- requests that have announced themselves while they are read and decoded (`incoming()`), and
- as many rows as were in flight when the last batch finished (its rows plus those queued meanwhile): the
  clients it just answered are expected back, which merges the groups;
and only `SETTLE_S` when neither is pending. When load drops, the wait for absent clients costs one
`max_wait_s` once: the next estimate is what actually came.

The batcher knows nothing of images or tasks: `rows` says what a job costs and `run` turns a list of jobs
into one result per job (service/runtime.py supplies both for classification).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import anyio

log = logging.getLogger(__name__)

Job = TypeVar("Job")
Result = TypeVar("Result")
# (rows of a batch, seconds each of its jobs queued, rows still queued behind it when it starts)
BatchObserver = Callable[[int, Sequence[float], int], None]

# A grace for requests that have arrived but not yet announced themselves.
SETTLE_S = 0.002


class Overloaded(Exception):
    """The batch queue is full; the caller should retry later."""


class JobTooLarge(Exception):
    """The job alone costs more rows than the queue may ever hold: retrying cannot help."""


@dataclass
class _Pending(Generic[Job]):
    job: Job
    rows: int
    future: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    queued_at: float = field(default_factory=time.perf_counter)
    started_at: float = 0.0
    finished_at: float = 0.0
    batch: int = 0


@dataclass(frozen=True)
class Ran(Generic[Result]):
    """A job's result, the seconds it queued and its batch ran, and which batch (numbered from 1) ran it."""

    result: Result
    queued_s: float
    run_s: float
    batch: int


class MicroBatcher(Generic[Job, Result]):
    def __init__(self, run: Callable[[list[Job]], Sequence[Result]], rows: Callable[[Job], int], *, max_rows: int,
                 max_wait_s: float, max_queued_rows: int, observe: BatchObserver | None = None):
        self.run_batch, self.rows, self.observe = run, rows, observe
        self.max_rows, self.max_wait_s, self.max_queued_rows = max_rows, max_wait_s, max_queued_rows
        self._queue: deque[_Pending[Job]] = deque()
        self._queued_rows = 0
        self._incoming = 0
        self._expected_rows = 0  # rows in flight when the last batch finished: the clients expected back
        self._arrived: asyncio.Event | None = None
        self._changed: asyncio.Event | None = None
        self.batch_rows: deque[int] = deque(maxlen=1000)  # recent batch sizes in rows, for tests
        self._batches = 0

    @property
    def queued_rows(self) -> int:
        return self._queued_rows

    def check_capacity(self, rows: int) -> None:
        """Raise `Overloaded` if `rows` more would not fit now (lets callers shed load before reading a body),
        `JobTooLarge` if they never could."""
        if rows > self.max_queued_rows:
            raise JobTooLarge(f"this request needs {rows} image forwards; at most {self.max_queued_rows} can queue")
        if self._queued_rows + rows > self.max_queued_rows:
            raise Overloaded(f"{self._queued_rows} rows are already queued (limit {self.max_queued_rows})")

    @contextmanager
    def incoming(self) -> Iterator[None]:
        """Wrap a request's reading and decoding, so a batch about to start waits for it (bounded)."""
        self._incoming += 1
        try:
            yield
        finally:
            self._incoming -= 1
            self._events()[1].set()

    async def submit(self, job: Job) -> Result:
        """The result of `job`, computed in a shared batch."""
        return (await self.run_job(job)).result

    async def run_job(self, job: Job) -> Ran[Result]:
        """`submit`, with where the time went."""
        rows = self.rows(job)
        self.check_capacity(rows)
        pending = _Pending(job, rows)
        self._queue.append(pending)
        self._queued_rows += rows
        arrived, changed = self._events()
        arrived.set()
        changed.set()
        result = await pending.future
        return Ran(result, pending.started_at - pending.queued_at, pending.finished_at - pending.started_at,
                   pending.batch)

    def _events(self) -> tuple[asyncio.Event, asyncio.Event]:
        if self._arrived is None or self._changed is None:  # created lazily, inside the running loop
            self._arrived, self._changed = asyncio.Event(), asyncio.Event()
        return self._arrived, self._changed

    async def run(self) -> None:
        """The worker loop; runs until cancelled."""
        arrived, _ = self._events()
        while True:
            await arrived.wait()
            await self._gather()
            batch = self._take_batch()
            if not self._queue:
                arrived.clear()
            if batch:
                await self._run_batch(batch)

    async def _gather(self) -> None:
        """Wait until the batch is full, nothing more is incoming or expected (after a short settle), or the
        deadline."""
        start = time.perf_counter()
        _, changed = self._events()
        expected = min(self._expected_rows, self.max_rows)
        while self._queued_rows < self.max_rows:
            elapsed = time.perf_counter() - start
            waiting = self._incoming or self._queued_rows < expected
            limit = self.max_wait_s if waiting else min(SETTLE_S, self.max_wait_s)
            if elapsed >= limit:
                return
            changed.clear()
            try:
                await asyncio.wait_for(changed.wait(), timeout=limit - elapsed)
            except TimeoutError:
                return

    def _take_batch(self) -> list[_Pending[Job]]:
        batch: list[_Pending[Job]] = []
        rows = 0
        while self._queue and (not batch or rows + self._queue[0].rows <= self.max_rows):
            pending = self._queue.popleft()
            batch.append(pending)
            rows += pending.rows
        self._queued_rows -= rows
        return batch

    async def _run_batch(self, batch: list[_Pending[Job]]) -> None:
        rows, started = sum(p.rows for p in batch), time.perf_counter()
        self._batches += 1
        for p in batch:
            p.started_at, p.batch = started, self._batches
        self.batch_rows.append(rows)
        if self.observe:
            self.observe(rows, [started - p.queued_at for p in batch], self._queued_rows)
        try:
            results = await anyio.to_thread.run_sync(self.run_batch, [p.job for p in batch])
        except Exception as exc:  # every waiting request learns of the failure
            log.exception("a batch of %d job(s) failed", len(batch))
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(exc)
            return
        self._expected_rows = rows + self._queued_rows
        finished = time.perf_counter()
        for p, result in zip(batch, results, strict=True):
            p.finished_at = finished
            if not p.future.done():  # the client may have gone away
                p.future.set_result(result)
