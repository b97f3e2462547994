"""The image precision as users meet it: every demo answer is the same at bf16 and int8 as at fp32, /readyz names the
precision that serves, and a service whose quantized model is broken starts on fp32 and says why."""

from __future__ import annotations

import httpx
import pytest

from bench.process import ServiceProcess
from service.core.backbone import BackboneSpec, load_backbone
from tests.helpers import SAMPLES, TOKEN, break_int8_model, running, settings_for

pytestmark = pytest.mark.slow


async def demo_answers(tmp_path, precision: str) -> tuple[list, dict]:
    """The README's demo request (every sample, both demo tasks, top 2) and /readyz, at `precision`."""
    backbone = load_backbone(BackboneSpec("promptserve-tiny", "world-v1", device="cpu", image_backend="auto",
                                          image_precision=precision, onnx_cache_dir=str(tmp_path / "onnx")))
    settings = settings_for(tmp_path / precision, model="promptserve-tiny", pretrained="world-v1", demo=True)
    files = [("images", (p.name, p.read_bytes(), "image/png")) for p in sorted(SAMPLES.glob("*.png"))]
    async with running(backbone, settings) as client:
        answer = await client.post("/v1/classify", params=[("tasks", "shapes"), ("tasks", "colours"), ("top_k", 2)],
                                   files=files)
        ready = await client.get("/readyz")
    assert answer.status_code == 200, answer.text
    return answer.json()["results"], ready.json()["backbone"]


@pytest.mark.anyio
async def test_demo_answers_are_unchanged_at_every_precision(tmp_path):
    fp32, _ = await demo_answers(tmp_path, "fp32")
    for precision in ("bf16", "int8"):
        results, backbone = await demo_answers(tmp_path, precision)
        assert backbone["image_precision"] == precision
        assert backbone["image_precision_check"]["trials"][0]["serves"]
        for got, expected in zip(results, fp32, strict=True):
            for a, b in zip(got["answers"], expected["answers"], strict=True):
                assert [p["label"] for p in a["predictions"]] == [p["label"] for p in b["predictions"]]
                assert [p["probability"] for p in a["predictions"]] == pytest.approx(
                    [p["probability"] for p in b["predictions"]], abs=0.01)


def test_a_service_with_a_broken_quantized_model_serves_fp32_and_says_why(tmp_path):
    def start() -> ServiceProcess:
        return ServiceProcess(tmp_path / "registry", admin_token=TOKEN, image_precision="int8",
                              onnx_cache_dir=str(tmp_path / "onnx"))

    service = start()
    try:
        assert service.wait_ready()["backbone"]["image_precision"] == "int8"
    finally:
        service.stop()
    (quantized,) = (tmp_path / "onnx").glob("*-int8*.onnx")
    break_int8_model(quantized)

    service = start()
    try:
        backbone = service.wait_ready()["backbone"]
        assert backbone["image_precision"] == "fp32" and backbone["image_backend"] == "onnx"
        assert backbone["image_precision_check"]["fallback"].startswith("int8 not used: cosine to fp32")
        assert "int8 not used: cosine to fp32" in service.output()  # the startup log says it too
        files = [("images", (p.name, p.read_bytes(), "image/png")) for p in sorted(SAMPLES.glob("*.png"))]
        answer = httpx.post(f"{service.url}/v1/tasks/shapes/classify", files=files, timeout=60)
        assert [r["predictions"][0]["label"] for r in answer.json()["results"]] == [
            p.stem.split("_")[1] for p in sorted(SAMPLES.glob("*.png"))]
    finally:
        service.stop()
