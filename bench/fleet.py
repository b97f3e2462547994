"""Fleet propagation: how fast a replica follows a shared PostgreSQL registry, and whether one task's large
version delays another task's change, with propagation workers = 1 (the baseline: one task at a time, as
before issue 19) and = N, measured in the same run.

    python bench/fleet.py --tasks 200 --workers 4 [--url postgresql://postgres@127.0.0.1:5432]

In one process, on the embedded tiny CLIP: a writer task manager commits, a reader follows through its
Propagator (LISTEN/NOTIFY, pooled connections). Prints
  restore: a fresh replica listing --tasks tasks (one snapshot read) and then activating every one (bundles over
           pooled connections, features computed: the writer stored bundles only): seconds and connections opened;
  unrelated delay: on two tasks warm on the reader, a small version committed 0.2 s after a large one (2,000
           classes × 10 templates = 20,000 prompts to encode) — from its commit to the reader serving it — and
           the large one's own lag, per worker count, with the ratio of the small one's delay at 1 worker to N.
A database of its own is created on the server and dropped at the end.
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).parents[1]))

from service.bundle.codec import encode_bundle  # noqa: E402
from service.bundle.manifest import build_manifest  # noqa: E402
from service.core.backbone import Backbone, BackboneSpec, load_backbone  # noqa: E402
from service.registry.postgres import PostgresRegistry  # noqa: E402
from service.serving.activation import BundleLimits  # noqa: E402
from service.serving.propagation import Propagator  # noqa: E402
from service.serving.tasks import TaskManager  # noqa: E402


def zeroshot(backbone: Backbone, classes: int, templates: int, salt: str) -> bytes:
    manifest = build_manifest("zeroshot", backbone, [f"{salt} class {i}" for i in range(classes)],
                              options={"templates": [f"a photo {j} of a {{}}." for j in range(templates)]})
    return encode_bundle(manifest, {})


def wait_serving(manager: TaskManager, task: str, version: int, timeout: float = 300) -> float:
    start = time.monotonic()
    while getattr(manager.in_memory(task), "version", None) != version:
        if time.monotonic() - start > timeout:
            raise TimeoutError(task)
        time.sleep(0.005)
    return time.monotonic()


def restore(url: str, backbone: Backbone, tasks: int, workers: int) -> tuple[float, float, int]:
    writer = PostgresRegistry(url)
    for i in range(tasks):
        writer.store_and_activate(f"t{i}", zeroshot(backbone, 4, 1, f"r{i}"), "zeroshot")
    writer.close()
    registry = PostgresRegistry(url)
    follower = Propagator(TaskManager(backbone, registry, BundleLimits()), 30, workers=workers)
    start = time.monotonic()
    assert follower.resync() and len(follower.tasks.names()) == tasks
    listed = time.monotonic() - start
    assert follower.tasks.warm_up() == tasks
    activated = time.monotonic() - start
    opened = registry._pool.get_stats().get("connections_num", 0)
    follower.stop()
    registry.close()
    return listed, activated, opened


def unrelated_delay(url: str, backbone: Backbone, workers: int, round_: int) -> tuple[float, float]:
    writer = PostgresRegistry(url)
    reader = TaskManager(backbone, PostgresRegistry(url), BundleLimits())
    follower = Propagator(reader, 30, workers=workers, poll_s=0.05)
    follower.start()
    while not follower.health.restored:
        time.sleep(0.01)
    large, small = f"large{round_}", f"small{round_}"
    for name in (large, small):  # warm on the reader, so it prepares their next versions as they commit
        writer.store_and_activate(name, zeroshot(backbone, 2, 1, f"{name} first"), "zeroshot")
        while name not in reader.names():
            time.sleep(0.005)
        reader.get(name)
    committed_large = time.monotonic()
    writer.store_and_activate(large, zeroshot(backbone, 2000, 10, large), "zeroshot")
    time.sleep(0.2)
    committed_small = time.monotonic()
    writer.store_and_activate(small, zeroshot(backbone, 2, 1, small), "zeroshot")
    small_delay = wait_serving(reader, small, 2) - committed_small
    large_lag = wait_serving(reader, large, 2) - committed_large
    follower.stop()
    writer.close()
    reader.registry.close()
    return small_delay, large_lag


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="postgresql://postgres@127.0.0.1:5432", help="server (no database)")
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    name = f"promptserve_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(f"{args.url}/postgres", autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        backbone = load_backbone(BackboneSpec("promptserve-tiny", "world-v1", device="cpu"))
        listed, activated, opened = restore(f"{args.url}/{name}", backbone, args.tasks, args.workers)
        print(f"restore: {args.tasks} tasks listed in {listed:.2f} s, all activated in {activated:.2f} s, "
              f"{opened} connection(s) opened "
              f"({args.workers} workers)")
        delays = {}
        for workers in (1, args.workers):
            runs = [unrelated_delay(f"{args.url}/{name}", backbone, workers, r + workers * 100)
                    for r in range(args.rounds)]
            delays[workers] = sorted(small for small, _ in runs)[len(runs) // 2]
            print(f"workers={workers}: small task served {delays[workers] * 1000:.0f} ms after its commit "
                  f"(median of {len(runs)}: {', '.join(f'{s * 1000:.0f}' for s, _ in runs)} ms); large task "
                  f"{', '.join(f'{large:.1f}' for _, large in runs)} s")
        print(f"unrelated delay ratio, 1 worker / {args.workers} workers: "
              f"{delays[1] / max(delays[args.workers], 1e-3):.1f}x")
    finally:
        with psycopg.connect(f"{args.url}/postgres", autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    main()
