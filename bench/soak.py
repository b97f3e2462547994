"""Soak: N clients classify against a real `python -m service` process while a new version of the task is
uploaded every second, for a set time.

    python bench/soak.py --clients 8 --duration 60

Every version gets its own class labels ("circle #17"), so an answer is *mixed* when any of its labels
does not belong to the version it names. Prints requests/s, p50/p99 latency, failed requests, mixed-version
answers, uploads, and the server's RSS at start and end. Exits 1 if any request failed or mixed versions.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parents[1]))

from bench.process import ServiceProcess  # noqa: E402
from service.bundle.codec import encode_bundle  # noqa: E402
from service.bundle.manifest import Manifest  # noqa: E402
from service.core.records import BackboneRef  # noqa: E402
from service.serving.demo import DEMO_TASKS  # noqa: E402

TOKEN = "soak-token"
SAMPLES = Path(__file__).parents[1] / "service" / "assets" / "samples"
TASK = "soak"


class Versions:
    """version number -> its labels, filled by the uploader from the server's answers."""

    def __init__(self) -> None:
        self.labels: dict[int, set[str]] = {}
        self.failed = 0
        self.lock = threading.Lock()

    def upload(self, client: httpx.Client, url: str, ref: BackboneRef, salt: int) -> None:
        classes = tuple(f"{shape} #{salt}" for shape in DEMO_TASKS["shapes"])
        manifest = Manifest("zeroshot", ref, classes, options={"templates": ["a photo of a {}."]})
        try:
            response = client.post(f"{url}/v1/tasks/{TASK}/versions", content=encode_bundle(manifest, {}),
                                   headers={"Authorization": f"Bearer {TOKEN}",
                                            "Content-Type": "application/octet-stream"})
            response.raise_for_status()
        except httpx.HTTPError:
            with self.lock:
                self.failed += 1
            return
        with self.lock:
            self.labels[response.json()["version"]] = set(classes)


def uploader(url: str, ref: BackboneRef, versions: Versions, stop: threading.Event, interval: float) -> None:
    with httpx.Client(timeout=60) as client:
        salt = 1
        while not stop.wait(interval):
            salt += 1
            versions.upload(client, url, ref, salt)


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


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    parser.add_argument("--swap-interval", type=float, default=1.0, help="seconds between uploads")
    args = parser.parse_args()

    files = [("images", (p.name, p.read_bytes(), "image/png")) for p in sorted(SAMPLES.glob("*.png"))]
    with tempfile.TemporaryDirectory() as tmp:
        server = ServiceProcess(Path(tmp) / "registry", admin_token=TOKEN)
        url = server.url
        try:
            info = server.wait_ready()["backbone"]
            ref = BackboneRef(info["model"], info["pretrained"], info["fingerprint"])
            versions = Versions()
            with httpx.Client(timeout=60) as client:
                versions.upload(client, url, ref, 1)
            rss_start = server.rss() / 2**20
            stop = threading.Event()
            results: list[list] = [[] for _ in range(args.clients)]
            threads = [threading.Thread(target=classify_loop, args=(url, files, stop, out)) for out in results]
            threads.append(threading.Thread(target=uploader, args=(url, ref, versions, stop, args.swap_interval)))
            started = time.perf_counter()
            for thread in threads:
                thread.start()
            time.sleep(args.duration)
            stop.set()
            for thread in threads:
                thread.join()
            wall = time.perf_counter() - started
            rss_end = server.rss() / 2**20
        finally:
            server.stop()

    answers = [r for out in results for r in out]
    failed = sum(1 for _, version, _ in answers if version is None)
    mixed = sum(1 for _, version, labels in answers
                if version is not None and not labels <= versions.labels.get(version, set()))
    latencies = [elapsed for elapsed, version, _ in answers if version is not None]
    seen = {version for _, version, _ in answers if version is not None}
    print(f"clients {args.clients}, {wall:.1f} s, a new version every {args.swap_interval:g} s, "
          f"{len(files)} images a request")
    print(f"requests        {len(answers)} ({len(answers) / wall:.1f}/s, {len(files) * len(answers) / wall:.1f} img/s)")
    if latencies:
        print(f"latency         p50 {percentile(latencies, 0.5) * 1000:.0f} ms, "
              f"p99 {percentile(latencies, 0.99) * 1000:.0f} ms")
    print(f"failed          {failed}")
    print(f"mixed-version   {mixed}")
    print(f"uploads         {len(versions.labels)} ok, {versions.failed} failed; "
          f"{len(seen)} distinct versions answered")
    print(f"server RSS      {rss_start:.0f} MiB at start, {rss_end:.0f} MiB at end")
    sys.exit(1 if failed or mixed or versions.failed else 0)


if __name__ == "__main__":
    main()
