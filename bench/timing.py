"""Timing loops shared by the benchmarks: a call repeated for a while, closed-loop HTTP clients, and waiting for
a server process to answer."""

from __future__ import annotations

import asyncio
import subprocess
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


def wait_until_answering(process: subprocess.Popen, url: str, timeout_s: float = 300) -> bool:
    """True once GET `url` answers 200; False if the process exits or `timeout_s` passes first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return True
        except httpx.TransportError:
            time.sleep(0.3)
    return False
