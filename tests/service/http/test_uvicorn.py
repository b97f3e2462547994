"""The service as users run it: `python -m service` in its own uvicorn process, over real TCP."""

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from bench.process import ServiceProcess
from tests.helpers import SAMPLES, TOKEN, classify_sample, coop_bundle_for

pytestmark = pytest.mark.slow


def start(registry: Path) -> ServiceProcess:
    return ServiceProcess(registry, admin_token=TOKEN)


def test_uvicorn_service_serves_swaps_and_restores(tmp_path):
    service = start(tmp_path / "registry")
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

    restarted = start(tmp_path / "registry")
    try:
        restarted.wait_ready()
        tasks = {t["name"]: t["version"] for t in httpx.get(f"{restarted.url}/v1/tasks").json()["tasks"]}
        assert tasks == {"shapes": 1, "colours": 1, "things": 2}
        assert classify_sample(restarted.url, "things").json() == before
    finally:
        restarted.stop()
