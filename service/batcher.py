"""Dynamic micro-batching of jobs across concurrent requests.

Requests submit a job and await a future. One worker takes whatever is queued (up to `max_rows` rows,
waiting at most `max_wait_s` for more once the first arrives), runs the whole batch in one call in a worker
thread, and hands each request its own result. While a batch runs, the next one fills up, so batches grow
with load. The queue is bounded in rows (a row is one image forward): when full, callers get `Overloaded`
at once instead of waiting without limit.

The batcher knows nothing of images or tasks: `rows` says what a job costs and `run` turns a list of jobs
into one result per job (service/runtime.py supplies both for classification).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import anyio

log = logging.getLogger(__name__)

Job = TypeVar("Job")
Result = TypeVar("Result")


class Overloaded(Exception):
    """The batch queue is full; the caller should retry later."""


@dataclass
class _Pending(Generic[Job]):
    job: Job
    rows: int
    future: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class MicroBatcher(Generic[Job, Result]):
    def __init__(self, run: Callable[[list[Job]], Sequence[Result]], rows: Callable[[Job], int], *, max_rows: int,
                 max_wait_s: float, max_queued_rows: int):
        self.run_batch, self.rows = run, rows
        self.max_rows, self.max_wait_s, self.max_queued_rows = max_rows, max_wait_s, max_queued_rows
        self._queue: deque[_Pending[Job]] = deque()
        self._queued_rows = 0
        self._arrived: asyncio.Event | None = None
        self.batch_rows: deque[int] = deque(maxlen=1000)  # recent batch sizes in rows, for metrics and tests

    @property
    def queued_rows(self) -> int:
        return self._queued_rows

    def check_capacity(self, rows: int) -> None:
        """Raise `Overloaded` if `rows` more would not fit; lets callers shed load before reading a body."""
        if self._queued_rows + rows > self.max_queued_rows:
            raise Overloaded(f"{self._queued_rows} rows are already queued (limit {self.max_queued_rows})")

    async def submit(self, job: Job) -> Result:
        """The result of `job`, computed in a shared batch."""
        rows = self.rows(job)
        self.check_capacity(rows)
        pending = _Pending(job, rows)
        self._queue.append(pending)
        self._queued_rows += rows
        self._wake().set()
        return await pending.future

    def _wake(self) -> asyncio.Event:
        if self._arrived is None:
            self._arrived = asyncio.Event()
        return self._arrived

    async def run(self) -> None:
        """The worker loop; runs until cancelled."""
        while True:
            await self._wake().wait()
            if self.max_wait_s > 0 and self._queued_rows < self.max_rows:
                await asyncio.sleep(self.max_wait_s)
            batch = self._take_batch()
            if not self._queue:
                self._wake().clear()
            if batch:
                await self._run_batch(batch)

    def _take_batch(self) -> list[_Pending[Job]]:
        batch, rows = [], 0
        while self._queue and (not batch or rows + self._queue[0].rows <= self.max_rows):
            pending = self._queue.popleft()
            batch.append(pending)
            rows += pending.rows
        self._queued_rows -= rows
        return batch

    async def _run_batch(self, batch: list[_Pending[Job]]) -> None:
        self.batch_rows.append(sum(p.rows for p in batch))
        try:
            results = await anyio.to_thread.run_sync(self.run_batch, [p.job for p in batch])
        except Exception as exc:  # every waiting request learns of the failure
            log.exception("a batch of %d job(s) failed", len(batch))
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(exc)
            return
        for p, result in zip(batch, results, strict=True):
            if not p.future.done():  # the client may have gone away
                p.future.set_result(result)
