"""Tasks at scale: with T tasks × C classes in a registry (a directory, or PostgreSQL), how long a replica takes to
be ready, the first request to a cold task and requests to warm ones (p50/p99), the features' memory against the
budget, and a second replica's start on the same registry (which must compute no feature).

    PYTHONPATH=. .venv/bin/python bench/scale.py --tasks 10000 --classes 100
    PYTHONPATH=. .venv/bin/python bench/scale.py --tasks 1000 --classes 100 --model ViT-B-32 --random-weights
    PYTHONPATH=. .venv/bin/python bench/scale.py --tasks 10000 --postgres postgresql://postgres@127.0.0.1:5432

The registry is seeded once per (model, tasks, classes) under --registry (with --postgres: in a database of that
server named after them) and reused: zero-shot bundles whose classes
are drawn from a vocabulary, each stored and activated with its class text features stored beside it as the replica
that activated it would (computed once for the vocabulary: a class's features do not depend on the other classes).
Baseline, in the same run: the same replica's start on an empty registry. Both replicas run with the background
warm-up off, so the tasks the cold requests pick are cold.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from bench.process import ServiceProcess
from service.bundle.codec import decode_bundle
from service.core.backbone import Backbone, BackboneSpec, load_backbone
from service.registry import open_registry
from service.registry.base import bundle_sha256
from service.serving.artefacts import ArtefactKey, encode_features
from service.serving.text_features import text_features
from service.serving.zero_shot import zero_shot_bundle

ROOT = Path(__file__).resolve().parents[1]
IMAGE = (ROOT / "service" / "assets" / "samples" / "red_star.png").read_bytes()
TEMPLATES = ["a photo of a {}."]
VOCABULARY = 2000  # class names drawn from; also the service's default class limit per bundle


def seed_registry(location: str, backbone: Backbone, tasks: int, classes: int) -> None:
    """T zero-shot tasks with their stored features, written once (a directory's marker file, or the task count of
    the benchmark's own database, says it is done)."""
    marker = Path(location) / ".seeded"
    want = f"{backbone.spec.model} {backbone.spec.pretrained} {tasks}x{classes}"
    if location.startswith("postgresql://"):
        if len(open_registry(location).active_versions()) == tasks:
            return
    elif marker.exists() and marker.read_text() == want:
        return
    elif marker.parent.exists() and any(marker.parent.iterdir()):
        sys.exit(f"{location} holds another registry; pass an empty or new --registry")
    names = [f"class {i:04d}" for i in range(VOCABULARY)]
    started = time.monotonic()
    vocabulary = text_features(decode_bundle(zero_shot_bundle(backbone, names, TEMPLATES)), backbone)
    print(f"seeding: vocabulary features ({VOCABULARY} classes) in {time.monotonic() - started:.1f} s", flush=True)
    registry, key, rng = open_registry(location), ArtefactKey.of(backbone), random.Random(0)
    for t in range(tasks):
        chosen = rng.sample(range(VOCABULARY), classes)
        data = zero_shot_bundle(backbone, [names[i] for i in chosen], TEMPLATES)
        registry.store_and_activate(f"task-{t:06d}", data, "zeroshot")
        registry.store_artefact(f"task-{t:06d}", bundle_sha256(data), key.id,
                                encode_features(vocabulary[chosen], bundle_sha256(data), key))
        if (t + 1) % max(1, tasks // 10) == 0:
            print(f"seeding: {t + 1}/{tasks} tasks ({time.monotonic() - started:.0f} s)", flush=True)
    if not location.startswith("postgresql://"):
        marker.write_text(want)


def postgres_database(server: str, name: str, *, fresh: bool) -> str:
    """The URL of database `name` on `server` (created if missing; emptied first when `fresh`)."""
    import psycopg  # only this path needs the driver

    with psycopg.connect(f"{server}/postgres", autocommit=True) as admin:
        if fresh:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
        if admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is None:
            admin.execute(f'CREATE DATABASE "{name}"')
    return f"{server}/{name}"


def start(registry: str, settings: dict[str, str]) -> tuple[ServiceProcess, float, dict]:
    started = time.monotonic()
    service = ServiceProcess(registry, **settings)
    ready = service.wait_ready(timeout=600)
    return service, time.monotonic() - started, ready


def cold_tasks(client: httpx.Client, count: int, seed: int) -> list[str]:
    """`count` tasks the listing says are cold, read a page of 1,000 at a time (the bulk path)."""
    cold, cursor = [], None
    while True:
        page = client.get("/v1/tasks", params={"limit": 1000, **({"cursor": cursor} if cursor else {})}).json()
        cold += [t["name"] for t in page["tasks"] if not t["warm"]]
        cursor = page["next_cursor"]
        if cursor is None:
            return random.Random(seed).sample(cold, min(count, len(cold)))


def latencies(client: httpx.Client, tasks: list[str]) -> list[float]:
    seconds = []
    for task in tasks:
        started = time.perf_counter()
        response = client.post(f"/v1/tasks/{task}/classify", files=[("images", ("star.png", IMAGE, "image/png"))])
        seconds.append(time.perf_counter() - started)
        response.raise_for_status()
    return seconds


def percentiles(seconds: list[float]) -> str:
    ordered = sorted(seconds)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return f"p50 {statistics.median(ordered) * 1000:6.1f} ms  p99 {p99 * 1000:6.1f} ms  (n={len(ordered)})"


def features(service: ServiceProcess) -> dict[str, float]:
    """Where the replica's features came from (loaded, computed, stored) and its evictions, from /metrics."""
    counts = {}
    for family in text_string_to_metric_families(httpx.get(f"{service.url}/metrics").text):
        for sample in family.samples:
            if sample.name == "promptserve_task_features_total":
                counts[sample.labels["source"]] = sample.value
            elif sample.name == "promptserve_task_evictions_total":
                counts["evictions"] = sample.value
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--model", default="promptserve-tiny")
    parser.add_argument("--pretrained", default="world-v1")
    parser.add_argument("--random-weights", action="store_true", help="seeded random weights (no --pretrained)")
    parser.add_argument("--registry", help="directory where the seeded registry is kept between runs")
    parser.add_argument("--postgres", help="a PostgreSQL server URL (no database): the registry is a database there")
    parser.add_argument("--budget-mib", type=float, default=8, help="PROMPTSERVE_FEATURE_MEMORY_BYTES, in MiB")
    parser.add_argument("--startup-warmup-s", default="5")
    parser.add_argument("--requests", type=int, default=200, help="cold (then warm) requests, one task each")
    args = parser.parse_args()
    pretrained = None if args.random_weights else args.pretrained
    backbone = load_backbone(BackboneSpec(args.model, pretrained, device="cpu"))
    label = f"promptserve-scale-{args.model}-{args.tasks}x{args.classes}"
    if args.postgres:
        registry = postgres_database(args.postgres, label.lower().replace("-", "_"), fresh=False)
    else:
        registry = args.registry or str(Path(tempfile.gettempdir()) / label)
    print(f"registry: {registry}", flush=True)
    seed_registry(registry, backbone, args.tasks, args.classes)
    budget = int(args.budget_mib * 2**20)
    settings = {"model": args.model, "pretrained": pretrained or "", "device": "cpu", "demo": "false",
                "feature_memory_bytes": str(budget), "startup_warmup_s": args.startup_warmup_s,
                "background_warmup": "false", "cold_start_timeout_s": "60"}

    with tempfile.TemporaryDirectory() as empty:
        empty_registry = postgres_database(args.postgres, "promptserve_scale_empty", fresh=True) if args.postgres \
            else empty
        baseline, baseline_ready, _ = start(empty_registry, settings)
        baseline.stop()
    first, first_ready, readiness = start(registry, settings)
    try:
        with httpx.Client(base_url=first.url, timeout=120) as client:
            warm_at_ready = readiness["warm_tasks"]
            picked = cold_tasks(client, args.requests, seed=1)
            cold = latencies(client, picked)
            warm = latencies(client, picked[-min(len(picked), 50):])  # still warm: the most recently used
            after = client.get("/readyz").json()
        second, second_ready, second_readiness = start(registry, settings)
        try:
            with httpx.Client(base_url=second.url, timeout=120) as client:
                second_cold = latencies(client, cold_tasks(client, args.requests, seed=2))
            second_features = features(second)
        finally:
            second.stop()
        first_features, rss = features(first), first.rss()
    finally:
        first.stop()

    kind = "PostgreSQL" if args.postgres else "directory"
    shape = f"{args.tasks} tasks x {args.classes} classes, {args.model}, {kind} registry"
    print(f"\n{shape}; feature budget {budget / 2**20:g} MiB")
    print(f"ready: empty registry {baseline_ready:5.1f} s | {args.tasks} tasks {first_ready:5.1f} s "
          f"(+{first_ready - baseline_ready:.1f} s; {warm_at_ready} warm at ready) | "
          f"second replica {second_ready:5.1f} s ({second_readiness['warm_tasks']} warm)")
    print(f"first request, cold task:  {percentiles(cold)}")
    print(f"request, warm task:        {percentiles(warm)}")
    print(f"second replica, cold task: {percentiles(second_cold)}")
    print(f"memory: features {after['feature_memory_bytes'] / 2**20:.1f} MiB of {budget / 2**20:g} MiB "
          f"({after['warm_tasks']} warm tasks, {first_features['evictions']:.0f} evictions); process RSS "
          f"{rss / 2**20:.0f} MiB")
    print(f"features: first replica {first_features['artefact']:.0f} loaded, {first_features['computed']:.0f} "
          f"computed; second replica {second_features['artefact']:.0f} loaded, "
          f"{second_features['computed']:.0f} computed")
    print(json.dumps({"tasks": args.tasks, "classes": args.classes, "model": args.model, "budget": budget,
                      "ready_empty_s": baseline_ready, "ready_s": first_ready, "second_ready_s": second_ready,
                      "cold_ms": sorted(round(s * 1000, 1) for s in cold),
                      "memory_bytes": after["feature_memory_bytes"], "first": first_features,
                      "second": second_features}))


if __name__ == "__main__":
    main()
