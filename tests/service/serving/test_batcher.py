import asyncio
import threading
import time

import pytest
import torch

from service.serving.batcher import JobTooLarge, MicroBatcher, Overloaded

pytestmark = pytest.mark.anyio


def image_batcher(encode, **limits) -> MicroBatcher:
    """Jobs are pixel batches, one row per image; a batch is one call of `encode` on all of them."""
    def run(jobs: list[torch.Tensor]) -> list[torch.Tensor]:
        return list(encode(torch.cat(jobs)).split([len(j) for j in jobs]))

    return MicroBatcher(run, len, **limits)


async def test_concurrent_requests_share_batches_and_get_their_own_rows(backbone):
    batcher = image_batcher(backbone.encode_images, max_rows=16, max_wait_s=0.02, max_queued_rows=64)
    worker = asyncio.create_task(batcher.run())
    requests = [torch.randn(n, 3, 32, 32) for n in (1, 3, 2, 5, 1, 4)]
    try:
        answers = await asyncio.gather(*(batcher.submit(p) for p in requests))
    finally:
        worker.cancel()
    for pixels, features in zip(requests, answers, strict=True):
        assert torch.allclose(features, backbone.encode_images(pixels), atol=1e-5)
    assert max(batcher.batch_rows) > 5, "concurrent requests were never batched together"
    assert sum(batcher.batch_rows) == 16


async def test_a_full_queue_refuses_at_once_instead_of_hanging(backbone):
    release = threading.Event()

    def slow_encode(pixels):
        release.wait(timeout=10)
        return backbone.encode_images(pixels)

    batcher = image_batcher(slow_encode, max_rows=2, max_wait_s=0, max_queued_rows=4)
    worker = asyncio.create_task(batcher.run())
    try:
        running = asyncio.create_task(batcher.submit(torch.randn(2, 3, 32, 32)))
        await asyncio.sleep(0.05)  # the worker has taken it and is blocked in the encoder
        queued = [asyncio.create_task(batcher.submit(torch.randn(2, 3, 32, 32))) for _ in range(2)]
        await asyncio.sleep(0.01)
        with pytest.raises(Overloaded):
            await asyncio.wait_for(batcher.submit(torch.randn(1, 3, 32, 32)), timeout=1)
        release.set()
        results = await asyncio.gather(running, *queued)
    finally:
        worker.cancel()
    assert [len(r) for r in results] == [2, 2, 2]


async def test_an_encoder_failure_reaches_every_waiting_request():
    def broken(pixels):
        raise RuntimeError("encoder exploded")

    batcher = image_batcher(broken, max_rows=8, max_wait_s=0.01, max_queued_rows=8)
    worker = asyncio.create_task(batcher.run())
    try:
        outcomes = await asyncio.gather(*(batcher.submit(torch.zeros(1, 3, 4, 4)) for _ in range(3)),
                                        return_exceptions=True)
    finally:
        worker.cancel()
    assert all(isinstance(o, RuntimeError) for o in outcomes)


async def test_closed_loop_clients_are_not_split_into_small_batches():
    """Eight clients, each sending its next request as soon as it has its answer, and each request taking
    a few milliseconds to decode: every batch after the first holds all eight."""
    def forward(jobs):
        time.sleep(0.02)
        return jobs

    batcher = MicroBatcher(forward, lambda job: 1, max_rows=32, max_wait_s=0.5, max_queued_rows=64)
    worker = asyncio.create_task(batcher.run())

    async def client(decode_s: float):
        for _ in range(6):
            with batcher.incoming():
                await asyncio.sleep(decode_s)
            await batcher.submit(decode_s)

    try:
        await asyncio.gather(*(client(0.001 * (1 + k % 4)) for k in range(8)))
    finally:
        worker.cancel()
    assert list(batcher.batch_rows) == [8] * 6


async def test_a_stalled_incoming_request_delays_a_batch_by_at_most_the_wait_bound():
    batcher = MicroBatcher(lambda jobs: jobs, lambda job: 1, max_rows=8, max_wait_s=0.05, max_queued_rows=8)
    worker = asyncio.create_task(batcher.run())
    try:
        with batcher.incoming():  # a request that never finishes decoding
            start = time.perf_counter()
            assert await asyncio.wait_for(batcher.submit("job"), timeout=5) == "job"
            waited = time.perf_counter() - start
    finally:
        worker.cancel()
    assert 0.05 <= waited < 1.0


async def test_batches_report_their_rows_and_queue_waits():
    seen = []
    batcher = MicroBatcher(lambda jobs: jobs, len, max_rows=8, max_wait_s=0, max_queued_rows=8,
                           observe=lambda rows, waits, depth: seen.append((rows, len(waits), depth)))
    worker = asyncio.create_task(batcher.run())
    try:
        await asyncio.gather(batcher.submit("ab"), batcher.submit("cde"))
    finally:
        worker.cancel()
    assert seen == [(5, 2, 0)]


async def test_closed_loop_clients_split_into_two_groups_merge_into_full_batches():
    """Each client's next request comes back a few milliseconds after its answer, unannounced (the network,
    the client's own work): the groups a first split makes (here 3 + 5) still merge into batches of eight."""
    def forward(jobs):
        time.sleep(0.02)
        return jobs

    batcher = MicroBatcher(forward, lambda job: 1, max_rows=32, max_wait_s=0.2, max_queued_rows=64)
    worker = asyncio.create_task(batcher.run())

    async def client(delay_s: float, back_s: float):
        await asyncio.sleep(delay_s)  # the first requests arrive in two groups
        for _ in range(8):
            await batcher.submit(back_s)
            await asyncio.sleep(back_s)

    try:
        await asyncio.gather(*(client(0.0 if k < 3 else 0.01, 0.001 * (1 + k % 4)) for k in range(8)))
    finally:
        worker.cancel()
    rows = list(batcher.batch_rows)
    assert rows[0] == 3 and all(r == 8 for r in rows[1:-1]), rows  # the last: what the first group left over


async def test_a_job_larger_than_the_whole_queue_is_refused_as_too_large_not_as_overload():
    batcher = MicroBatcher(lambda jobs: jobs, len, max_rows=4, max_wait_s=0, max_queued_rows=8)
    with pytest.raises(JobTooLarge, match="needs 9 image forwards; at most 8"):
        await batcher.submit("x" * 9)
