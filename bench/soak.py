"""Soak: N clients classify against a real `python -m service` process while a new version of the task is
uploaded every second, for a set time; then the same again with pin churn beside it.

    python bench/soak.py --clients 8 --duration 60 --pin-clients 4

Every version gets its own class labels ("circle #17"), so an answer is *mixed* when any of its labels
does not belong to the version it names. Prints requests/s, p50/p99 latency, failed requests, mixed-version
answers, uploads and their latency, and the server's RSS at start and end. Exits 1 if any request failed or
mixed versions.

With `--pin-clients M` (default 4) the run has two phases of `--duration` each: the baseline (classify and
uploads), then the same load plus M clients cycling `?version=N` pins through the stored versions of a second
task whose versions cost real text encoding (more of them than the service keeps prepared, so every pin
misses), each client under its own address (`X-Forwarded-For`, which uvicorn trusts from 127.0.0.1). It
prints the upload latency of both phases and their ratio, and how the pins were answered.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parents[1]))

from bench.process import ServiceProcess  # noqa: E402
from service.bundle.codec import encode_bundle  # noqa: E402
from service.bundle.manifest import Manifest  # noqa: E402
from service.core.records import BackboneRef  # noqa: E402
from service.serving.demo import DEMO_TASKS  # noqa: E402

TOKEN = "soak-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/octet-stream"}
SAMPLES = Path(__file__).parents[1] / "service" / "assets" / "samples"
TASK, CHURN = "soak", "churn"
CHURN_VERSIONS = 12  # more than PROMPTSERVE_PREPARED_VERSIONS (4): a pin cycling through them always misses
CHURN_CLASSES, CHURN_TEMPLATES = 250, 4  # text prompts per churn version: its preparation costs real encoding


def zeroshot(ref: BackboneRef, classes: tuple[str, ...], templates: int = 1) -> bytes:
    options = {"templates": [f"a photo of a {{}}, take {t}." for t in range(templates)]}
    return encode_bundle(Manifest("zeroshot", ref, classes, options=options), {})


@dataclass
class Versions:
    """version number -> its labels, filled by the uploader from the server's answers; upload latencies."""

    labels: dict[int, set[str]] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    failed: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def upload(self, client: httpx.Client, url: str, ref: BackboneRef, salt: int) -> None:
        classes = tuple(f"{shape} #{salt}" for shape in DEMO_TASKS["shapes"])
        start = time.perf_counter()
        try:
            response = client.post(f"{url}/v1/tasks/{TASK}/versions", content=zeroshot(ref, classes), headers=ADMIN)
            response.raise_for_status()
        except httpx.HTTPError:
            with self.lock:
                self.failed += 1
            return
        with self.lock:
            self.latencies.append(time.perf_counter() - start)
            self.labels[response.json()["version"]] = set(classes)


def uploader(url: str, ref: BackboneRef, versions: Versions, stop: threading.Event, interval: float,
             salts: list[int]) -> None:
    with httpx.Client(timeout=120) as client:
        while not stop.wait(interval):
            salts[0] += 1
            versions.upload(client, url, ref, salts[0])


def classify_loop(url: str, files: list, stop: threading.Event, out: list) -> None:
    with httpx.Client(timeout=60) as client:
        while not stop.is_set():
            start = time.perf_counter()
            try:
                response = client.post(f"{url}/v1/tasks/{TASK}/classify", files=files, params={"top_k": 3})
                ok = response.status_code == 200
                body = response.json() if ok else None
            except (httpx.HTTPError, ValueError):
                ok, body = False, None
            elapsed = time.perf_counter() - start
            if body is None:
                out.append((elapsed, None, None))
            else:
                labels = {p["label"] for r in body["results"] for p in r["predictions"]}
                out.append((elapsed, body["version"], labels))


def pin_loop(url: str, files: list, stop: threading.Event, address: str, outcomes: Counter) -> None:
    """One client cycling pins through the churn task's versions, as fast as it is answered."""
    with httpx.Client(timeout=120, headers={"X-Forwarded-For": address}) as client:
        version = 0
        while not stop.is_set():
            version = version % CHURN_VERSIONS + 1
            try:
                status = client.post(f"{url}/v1/tasks/{CHURN}/classify", files=files,
                                     params={"version": version, "top_k": 1}).status_code
            except httpx.HTTPError:
                status = 0
            outcomes[status] += 1
            if status == 429:
                stop.wait(0.2)  # a polite client would honour Retry-After; this one only slows down a little


@dataclass
class Phase:
    answers: list
    uploads: list[float]
    wall: float
    pins: Counter


def run_phase(url: str, ref: BackboneRef, versions: Versions, files: list, args: argparse.Namespace, pin_clients: int,
              salts: list[int]) -> Phase:
    stop = threading.Event()
    results: list[list] = [[] for _ in range(args.clients)]
    pins: Counter = Counter()
    uploads_before = len(versions.latencies)
    threads = [threading.Thread(target=classify_loop, args=(url, files, stop, out)) for out in results]
    threads += [threading.Thread(target=pin_loop, args=(url, files[:1], stop, f"10.0.0.{i + 1}", pins))
                for i in range(pin_clients)]
    threads.append(threading.Thread(target=uploader, args=(url, ref, versions, stop, args.swap_interval, salts)))
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    time.sleep(args.duration)
    stop.set()
    for thread in threads:
        thread.join()
    return Phase([r for out in results for r in out], versions.latencies[uploads_before:],
                 time.perf_counter() - started, pins)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def report(name: str, phase: Phase, versions: Versions, images: int) -> tuple[int, int]:
    failed = sum(1 for _, version, _ in phase.answers if version is None)
    mixed = sum(1 for _, version, labels in phase.answers
                if version is not None and not labels <= versions.labels.get(version, set()))
    latencies = [elapsed for elapsed, version, _ in phase.answers if version is not None]
    seen = {version for _, version, _ in phase.answers if version is not None}
    n = len(phase.answers)
    print(f"-- {name}: {phase.wall:.1f} s")
    print(f"requests        {n} ({n / phase.wall:.1f}/s, {images * n / phase.wall:.1f} img/s)")
    print(f"latency         p50 {percentile(latencies, 0.5) * 1000:.0f} ms, "
          f"p99 {percentile(latencies, 0.99) * 1000:.0f} ms")
    print(f"failed          {failed}")
    print(f"mixed-version   {mixed}")
    print(f"uploads         {len(phase.uploads)} ok; latency p50 {percentile(phase.uploads, 0.5) * 1000:.0f} ms, "
          f"p99 {percentile(phase.uploads, 0.99) * 1000:.0f} ms, max {max(phase.uploads, default=0) * 1000:.0f} ms; "
          f"{len(seen)} distinct versions answered")
    if phase.pins:
        print("pins            " + ", ".join(f"{count} × {status or 'transport error'}"
                                            for status, count in sorted(phase.pins.items())))
    return failed, mixed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load (per phase)")
    parser.add_argument("--swap-interval", type=float, default=1.0, help="seconds between uploads")
    parser.add_argument("--pin-clients", type=int, default=4, help="clients cycling pins in the second phase "
                        "(0: one phase, no pins)")
    args = parser.parse_args()

    files = [("images", (p.name, p.read_bytes(), "image/png")) for p in sorted(SAMPLES.glob("*.png"))]
    with tempfile.TemporaryDirectory() as tmp:
        server = ServiceProcess(Path(tmp) / "registry", admin_token=TOKEN)
        url = server.url
        try:
            info = server.wait_ready()["backbone"]
            ref = BackboneRef(info["model"], info["pretrained"], info["fingerprint"])
            versions, salts = Versions(), [1]
            with httpx.Client(timeout=600) as client:
                versions.upload(client, url, ref, 1)
                if args.pin_clients:
                    start = time.perf_counter()
                    for v in range(CHURN_VERSIONS):
                        classes = tuple(f"thing {i} of batch {v}" for i in range(CHURN_CLASSES))
                        client.post(f"{url}/v1/tasks/{CHURN}/versions", content=zeroshot(ref, classes, CHURN_TEMPLATES),
                                    headers=ADMIN).raise_for_status()
                    each = (time.perf_counter() - start) / CHURN_VERSIONS
                    print(f"{CHURN_VERSIONS} churn versions of {CHURN_CLASSES} classes × {CHURN_TEMPLATES} templates: "
                          f"{each:.2f} s each to upload (about a pin's preparation)")
            versions.latencies.clear()
            rss_start = server.rss() / 2**20
            phases = [("baseline", run_phase(url, ref, versions, files, args, 0, salts))]
            if args.pin_clients:
                phases.append((f"with {args.pin_clients} pin clients",
                               run_phase(url, ref, versions, files, args, args.pin_clients, salts)))
            rss_end = server.rss() / 2**20
        finally:
            server.stop()

    print(f"clients {args.clients}, a new version every {args.swap_interval:g} s, {len(files)} images a request")
    bad = [report(name, phase, versions, len(files)) for name, phase in phases]
    if len(phases) == 2:
        base, churn = phases[0][1].uploads, phases[1][1].uploads
        print(f"upload latency under pin churn / baseline: p50 {percentile(churn, 0.5) / percentile(base, 0.5):.2f}, "
              f"p99 {percentile(churn, 0.99) / percentile(base, 0.99):.2f}")
    print(f"uploads failed  {versions.failed}")
    print(f"server RSS      {rss_start:.0f} MiB at start, {rss_end:.0f} MiB at end")
    sys.exit(1 if any(failed or mixed for failed, mixed in bad) or versions.failed else 0)


if __name__ == "__main__":
    main()
