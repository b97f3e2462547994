"""Timing loops shared by the benchmarks: a call repeated for a while, and closed-loop HTTP clients."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httpx


def timed_rate(step: Callable[[], object], items_per_step: int, seconds: float, warmup: int = 1) -> float:
    """Items per second of `step`, run repeatedly for about `seconds` after `warmup` calls."""
    for _ in range(warmup):
        step()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        count += items_per_step
    return count / (time.perf_counter() - start)


@dataclass(frozen=True)
class ClientRun:
    rate: float  # requests (one image each) per second
    client_cpu: float  # the load generator's process CPU seconds per wall second while measuring


Send = Callable[[httpx.AsyncClient], Awaitable[httpx.Response]]


async def closed_loop(client: httpx.AsyncClient, send: Send, clients: int, seconds: float) -> ClientRun:
    """`clients` concurrent loops, each sending its next request when the previous one is answered."""
    done = 0

    async def loop(deadline: float) -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            (await send(client)).raise_for_status()
            done += 1

    cpu, start = time.process_time(), time.perf_counter()
    await asyncio.gather(*(loop(start + seconds) for _ in range(clients)))
    wall = time.perf_counter() - start
    return ClientRun(done / wall, (time.process_time() - cpu) / wall)
