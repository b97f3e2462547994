"""Dynamic micro-batching of image encoding across concurrent requests.

Requests enqueue their preprocessed images and await a future. One worker takes whatever is queued (up
to `max_batch` images, waiting at most `max_wait_s` for more once the first arrives), runs one forward
pass in a worker thread, and hands each request its rows. While a batch runs, the next one fills up, so
batches grow with load. The queue is bounded: when full, callers get `Overloaded` at once instead of
waiting without limit.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import anyio
import torch

log = logging.getLogger(__name__)


class Overloaded(Exception):
    """The batch queue is full; the caller should retry later."""


@dataclass
class _Pending:
    pixels: torch.Tensor
    future: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class MicroBatcher:
    def __init__(self, encode: Callable[[torch.Tensor], torch.Tensor], *, max_batch: int, max_wait_s: float,
                 max_queued_images: int):
        self.encode_batch = encode
        self.max_batch, self.max_wait_s, self.max_queued_images = max_batch, max_wait_s, max_queued_images
        self._queue: deque[_Pending] = deque()
        self._queued_images = 0
        self._arrived: asyncio.Event | None = None
        self.batch_sizes: list[int] = []  # recent forward-pass sizes, for metrics and tests

    async def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Image features for `pixels` [B, 3, H, W], computed in a shared batch."""
        if self._queued_images + len(pixels) > self.max_queued_images:
            raise Overloaded(f"{self._queued_images} images are already queued (limit {self.max_queued_images})")
        pending = _Pending(pixels)
        self._queue.append(pending)
        self._queued_images += len(pixels)
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
            if self.max_wait_s > 0 and self._queued_images < self.max_batch:
                await asyncio.sleep(self.max_wait_s)
            batch = self._take_batch()
            if not self._queue:
                self._wake().clear()
            if batch:
                await self._run_batch(batch)

    def _take_batch(self) -> list[_Pending]:
        batch, images = [], 0
        while self._queue and (not batch or images + len(self._queue[0].pixels) <= self.max_batch):
            pending = self._queue.popleft()
            batch.append(pending)
            images += len(pending.pixels)
        self._queued_images -= images
        return batch

    async def _run_batch(self, batch: list[_Pending]) -> None:
        pixels = torch.cat([p.pixels for p in batch])
        self.batch_sizes = (self.batch_sizes + [len(pixels)])[-1000:]
        try:
            features = await anyio.to_thread.run_sync(self.encode_batch, pixels)
        except Exception as exc:  # every waiting request learns of the failure
            log.exception("image encoding failed for a batch of %d", len(pixels))
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(exc)
            return
        for p, rows in zip(batch, features.split([len(p.pixels) for p in batch]), strict=True):
            if not p.future.done():  # the client may have gone away
                p.future.set_result(rows)
