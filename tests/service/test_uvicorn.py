"""The service as users run it: `python -m service` in its own uvicorn process, over real TCP."""

import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

from service.bundle import BackboneRef, Manifest, PromptLayout, encode_bundle

pytestmark = pytest.mark.slow
SAMPLES = Path(__file__).parents[2] / "service" / "assets" / "samples"
TOKEN = "uvicorn-test-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServiceProcess:
    def __init__(self, registry: Path | str, **settings: str):
        """`python -m service` on a free port; `settings` are extra PROMPTSERVE_* variables (lower-case names)."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = os.environ | {"PROMPTSERVE_REGISTRY": str(registry), "PROMPTSERVE_ADMIN_TOKEN": TOKEN}
        env |= {f"PROMPTSERVE_{name.upper()}": value for name, value in settings.items()}
        self.log = tempfile.TemporaryFile()  # a file, not a pipe: a chatty service never blocks on a full pipe
        self.process = subprocess.Popen(
            [sys.executable, "-m", "service", "--port", str(self.port)],
            env=env, stdout=self.log, stderr=subprocess.STDOUT,
        )

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def wait_ready(self, timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"service exited early:\n{self.output()}")
            try:
                response = httpx.get(f"{self.url}/readyz", timeout=2)
                if response.status_code == 200:
                    return response.json()
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise AssertionError("service did not become ready")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


def classify_sample(url: str, task: str) -> httpx.Response:
    files = [("images", (p.name, p.read_bytes(), "image/png")) for p in sorted(SAMPLES.glob("*.png"))]
    return httpx.post(f"{url}/v1/tasks/{task}/classify", files=files, params={"top_k": 2}, timeout=60)


def coop_bundle_for(backbone: dict, classes: list[str], seed: int) -> bytes:
    ctx = torch.randn(4, backbone["text_width"], generator=torch.Generator().manual_seed(seed)) * 0.02
    ref = BackboneRef(backbone["model"], backbone["pretrained"], backbone["fingerprint"])
    manifest = Manifest("coop", ref, tuple(classes), PromptLayout(4, backbone["text_width"]))
    return encode_bundle(manifest, {"ctx": ctx})


def test_uvicorn_service_serves_swaps_and_restores(tmp_path):
    service = ServiceProcess(tmp_path / "registry")
    try:
        backbone = service.wait_ready()["backbone"]
        # the README's example: the embedded tiny CLIP names the sample images' shape and colour
        files = [("images", (p.name, p.read_bytes(), "image/png")) for p in sorted(SAMPLES.glob("*.png"))]
        demo = httpx.post(f"{service.url}/v1/classify", params=[("tasks", "shapes"), ("tasks", "colours")],
                          files=files, timeout=60)
        assert demo.status_code == 200, demo.text
        for result in demo.json()["results"]:
            colour, shape = result["filename"].removesuffix(".png").split("_")
            top = {a["task"]: a["predictions"][0]["label"] for a in result["answers"]}
            assert top == {"shapes": shape, "colours": colour}, result

        headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/octet-stream"}
        versions = {v: [f"thing{i} v{v}" for i in range(3)] for v in (1, 2)}

        def upload(version: int) -> httpx.Response:
            data = coop_bundle_for(backbone, versions[version], version)
            return httpx.post(f"{service.url}/v1/tasks/things/versions", content=data, headers=headers, timeout=60)

        assert upload(1).status_code == 201
        with ThreadPoolExecutor(4) as pool:
            answers = [pool.submit(classify_sample, service.url, "things") for _ in range(12)]
            assert upload(2).status_code == 201
            answers = [a.result() for a in answers]
        for answer in answers:
            assert answer.status_code == 200
            body = answer.json()
            labels = {p["label"] for r in body["results"] for p in r["predictions"]}
            assert labels <= set(versions[body["version"]])
        before = classify_sample(service.url, "things").json()
        assert before["version"] == 2
    finally:
        service.stop()

    restarted = ServiceProcess(tmp_path / "registry")
    try:
        restarted.wait_ready()
        tasks = {t["name"]: t["version"] for t in httpx.get(f"{restarted.url}/v1/tasks").json()["tasks"]}
        assert tasks == {"shapes": 1, "colours": 1, "things": 2}
        assert classify_sample(restarted.url, "things").json() == before
    finally:
        restarted.stop()
