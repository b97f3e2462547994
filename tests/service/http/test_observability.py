"""Request ids, JSON logs (a real uvicorn process), CORS and the warning about unknown PROMPTSERVE_* variables."""

import json
import re

import httpx
import pytest

from bench.process import ServiceProcess
from service.config import unknown_variables
from tests.helpers import SAMPLES, running, settings_for

pytestmark = pytest.mark.anyio
GENERATED = re.compile(r"[0-9a-f]{32}")


async def test_every_answer_carries_a_request_id_echoed_or_generated(backbone, tmp_path):
    async with running(backbone, settings_for(tmp_path, max_header_bytes=4096)) as client:
        echoed = await client.get("/healthz", headers={"X-Request-ID": "client-7f:a/b"})
        generated = await client.get("/v1/tasks/none")  # an error answer too
        refused = await client.get("/healthz", headers={"X-Request-ID": "has spaces in it"})
        too_big = await client.get("/healthz", headers={"X-Pad": "x" * 5000})  # answered by the limits middleware
        second = await client.get("/healthz")
    assert echoed.headers["x-request-id"] == "client-7f:a/b"
    assert generated.status_code == 404 and GENERATED.fullmatch(generated.headers["x-request-id"])
    assert GENERATED.fullmatch(refused.headers["x-request-id"])
    assert too_big.status_code == 431 and GENERATED.fullmatch(too_big.headers["x-request-id"])
    assert second.headers["x-request-id"] != generated.headers["x-request-id"]


async def test_cors_is_off_by_default_and_answers_the_configured_origins(backbone, tmp_path):
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization"}
    async with running(backbone, settings_for(tmp_path)) as client:
        plain = await client.get("/v1/tasks", headers={"Origin": "https://app.example"})
    assert "access-control-allow-origin" not in plain.headers
    async with running(backbone, settings_for(tmp_path, cors_origins="https://app.example")) as client:
        allowed = await client.get("/v1/tasks", headers={"Origin": "https://app.example"})
        other = await client.get("/v1/tasks", headers={"Origin": "https://evil.example"})
        checked = await client.options("/v1/classify", headers=preflight)
    assert allowed.headers["access-control-allow-origin"] == "https://app.example"
    assert "x-request-id" in allowed.headers["access-control-expose-headers"].lower()
    assert "access-control-allow-origin" not in other.headers
    assert checked.status_code == 200 and "POST" in checked.headers["access-control-allow-methods"]


def test_unknown_variables_are_named_with_the_setting_meant():
    environ = {"PROMPTSERVE_DEMO_TASK": "x", "PROMPTSERVE_MODEL": "m", "PROMPTSERVE_URL": "u", "HOME": "/"}
    assert unknown_variables(environ) == ["PROMPTSERVE_DEMO_TASK (did you mean PROMPTSERVE_DEMO?)"]


@pytest.mark.slow
def test_json_logs_are_one_object_per_line_with_request_id_route_tasks_and_versions(tmp_path):
    service = ServiceProcess(tmp_path / "registry", log_format="json", demo_task="shapes")
    try:
        service.wait_ready()
        files = [("images", (p.name, p.read_bytes(), "image/png")) for p in sorted(SAMPLES.glob("*.png"))[:2]]
        answer = httpx.post(f"{service.url}/v1/classify", params={"tasks": ["shapes", "colours"]}, files=files,
                            headers={"X-Request-ID": "trace-42"}, timeout=60)
        assert answer.status_code == 200 and answer.headers["x-request-id"] == "trace-42"
    finally:
        service.process.terminate()
        service.process.wait(timeout=30)
        output = service.output()
        service.log.close()
    lines = [line for line in output.splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line is JSON: app, uvicorn, open_clip alike
    assert {"time", "level", "logger", "message"} <= set(records[0])
    [access] = [r for r in records if r["logger"] == "promptserve.access" and r.get("request_id") == "trace-42"]
    assert access["route"] == "/v1/classify" and access["status"] == 200 and access["latency_ms"] > 0
    assert access["tasks"] == ["colours", "shapes"] and access["versions"] == {"shapes": 1, "colours": 1}
    assert any(r["logger"].startswith("uvicorn") for r in records)
    assert any("promptserve-tiny model config" in r["message"] for r in records)  # open_clip's, via the root
    [warning] = [r for r in records if "PROMPTSERVE_DEMO_TASK" in r["message"]]
    assert warning["level"] == "WARNING" and "did you mean PROMPTSERVE_DEMO?" in warning["message"]
