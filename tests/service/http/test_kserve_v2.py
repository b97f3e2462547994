"""The Open Inference Protocol (KServe V2) routes, spoken by the official tritonclient against a real uvicorn."""

import base64
import json
import struct

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from service.serving.demo import DEMO_TASKS
from tests.helpers import SAMPLES, png, running, settings_for, upload

SAMPLE_FILES = sorted(SAMPLES.glob("*.png"))


def sample_shapes() -> list[str]:
    return [p.stem.split("_")[1] for p in SAMPLE_FILES]


def images_input(binary: bool) -> triton.InferInput:
    images = [p.read_bytes() for p in SAMPLE_FILES]
    tensor = triton.InferInput("images", [len(images)], "BYTES")
    data = images if binary else [base64.b64encode(image) for image in images]
    return tensor.set_data_from_numpy(np.array(data, dtype=np.object_), binary_data=binary)


@pytest.fixture(scope="module")
def v2(live_service):
    client = triton.InferenceServerClient(live_service.url.removeprefix("http://"))
    yield client
    client.close()


@pytest.mark.slow
def test_tritonclient_sees_a_live_server_and_its_tasks_as_models(v2):
    assert v2.is_server_live() and v2.is_server_ready()
    assert v2.get_server_metadata()["name"] == "promptserve"
    index = {m["name"]: m for m in v2.get_model_repository_index()}
    assert {"shapes", "colours"} <= set(index) and index["shapes"]["state"] == "READY"
    metadata = v2.get_model_metadata("shapes")
    assert metadata["inputs"] == [{"name": "images", "datatype": "BYTES", "shape": [-1]}]
    assert [(o["name"], o["datatype"]) for o in metadata["outputs"]] == [("labels", "BYTES"), ("probabilities", "FP32")]
    assert v2.is_model_ready("shapes") and not v2.is_model_ready("no-such-task")
    assert v2.get_model_metadata("shapes", "1")["versions"] == ["1"]
    assert v2.is_model_ready("shapes", "1") and not v2.is_model_ready("shapes", "7")


@pytest.mark.slow
def test_tritonclient_infers_with_its_default_binary_tensors(v2, live_service):
    result = v2.infer("shapes", [images_input(binary=True)])
    labels = result.as_numpy("labels")
    probabilities = result.as_numpy("probabilities")
    classes = len(DEMO_TASKS["shapes"])
    assert labels.shape == probabilities.shape == (len(SAMPLE_FILES), classes)
    assert [label.decode() for label in labels[:, 0]] == sample_shapes()
    assert np.all(np.diff(probabilities, axis=1) <= 0) and np.allclose(probabilities.sum(axis=1), 1, atol=1e-4)

    # the same request path as classify: the same numbers as /v1 for the same images
    files = [("images", (p.name, p.read_bytes(), "image/png")) for p in SAMPLE_FILES]

    v1 = httpx.post(f"{live_service.url}/v1/tasks/shapes/classify", files=files, params={"top_k": classes}, timeout=60)
    for row, answer in zip(probabilities, v1.json()["results"], strict=True):
        assert row == pytest.approx([p["probability"] for p in answer["predictions"]], abs=1e-5)


@pytest.mark.slow
def test_tritonclient_infers_json_tensors_with_a_top_k_parameter(v2):
    outputs = [triton.InferRequestedOutput(name, binary_data=False) for name in ("labels", "probabilities")]
    result = v2.infer("shapes", [images_input(binary=False)], outputs=outputs, parameters={"top_k": 2},
                      request_id="req-1")
    assert result.get_response()["id"] == "req-1"
    labels = result.as_numpy("labels")
    assert labels.shape == result.as_numpy("probabilities").shape == (len(SAMPLE_FILES), 2)
    assert [str(label, "utf-8") if isinstance(label, bytes) else label for label in labels[:, 0]] == sample_shapes()


@pytest.mark.slow
def test_tritonclient_gets_the_servers_error_messages(v2):
    with pytest.raises(InferenceServerException, match="no-such-task"):
        v2.infer("no-such-task", [images_input(binary=True)])
    with pytest.raises(InferenceServerException, match="serves version 1, not 7"):
        v2.infer("shapes", [images_input(binary=True)], model_version="7")
    assert v2.infer("colours", [images_input(binary=True)], model_version="1").get_response()["model_version"] == "1"
    wrong = triton.InferInput("pixels", [1], "BYTES").set_data_from_numpy(np.array([b"x"], dtype=np.object_))
    with pytest.raises(InferenceServerException, match="'images' of datatype BYTES"):
        v2.infer("shapes", [wrong])


# Malformed requests, straight through the ASGI app (micro backbone): each a 4xx with a code.

Request = tuple[bytes, dict[str, str]]


def binary_request(elements: list[bytes], *, shape=None, size_delta=0, header_delta=0, cut=0, **fields) -> Request:
    raw = b"".join(struct.pack("<I", len(e)) + e for e in elements)
    header = json.dumps({"inputs": [{"name": "images", "datatype": "BYTES", "shape": shape or [len(elements)],
                                     "parameters": {"binary_data_size": len(raw) + size_delta - cut}}],
                         **fields}).encode()
    return header + raw[: len(raw) - cut], {"Inference-Header-Content-Length": str(len(header) + header_delta)}


def json_request(data: list, shape: list[int] | None = None, **fields) -> Request:
    tensor = {"name": "images", "datatype": "BYTES", "shape": shape or [len(data)], "data": data}
    return json.dumps({"inputs": [tensor], **fields}).encode(), {}


def with_trailing_bytes(request: Request) -> Request:
    header, _ = request
    return header + b"stray", {"Inference-Header-Content-Length": str(len(header))}


@pytest.mark.anyio
@pytest.mark.parametrize(("request_", "status", "code"), [
    (binary_request([b"\x00" * 10], cut=3), 422, "bad_binary_data"),
    (binary_request([png()], shape=[2]), 422, "bad_shape"),
    (binary_request([png()], size_delta=5), 422, "bad_binary_data"),
    (binary_request([png()], header_delta=10**6), 422, "bad_header_length"),
    (binary_request([png()] * 5), 413, "too_many_images"),
    (binary_request([b"\x00" * 70_000]), 413, "image_too_large"),
    (binary_request([b"not an image"]), 415, "not_an_image"),
    (binary_request([png()], parameters={"top_k": 0}), 422, "bad_top_k"),
    (binary_request([png()], outputs=[{"name": "logits"}]), 422, "unknown_output"),
    ((b'{"inputs": "nope"}', {}), 422, "bad_infer_request"),
    (with_trailing_bytes(json_request([base64.b64encode(png()).decode()])), 422, "bad_binary_data"),
    (json_request([1]), 422, "bad_input"),
    (json_request(["%%"]), 422, "bad_base64"),
    (json_request([], shape=[0]), 422, "no_images"),
], ids=lambda value: value if isinstance(value, str) else None)
async def test_malformed_infer_requests_get_4xx_with_a_code_and_reach_no_encoder(
        backbone, tmp_path, make_coop_bundle, request_, status, code):
    settings = settings_for(tmp_path, max_image_bytes=64 * 1024, max_images_per_request=4)
    async with running(backbone, settings) as client:
        await upload(client, "t", make_coop_bundle(backbone, ["a", "b"]))
        forwards = client._transport.app.state.promptserve.runtime.forwards
        body, headers = request_
        response = await client.post("/v2/models/t/infer", content=body, headers=headers)
        assert response.status_code == status, response.text
        assert response.json()["code"] == code and response.json()["error"]
        assert not forwards, "a refused request must not reach the image encoder"
        good_body, good_headers = binary_request([png()])
        assert (await client.post("/v2/models/t/infer", content=good_body, headers=good_headers)).status_code == 200


@pytest.mark.anyio
async def test_infer_needs_the_classify_token_when_one_is_set(backbone, tmp_path, make_coop_bundle):
    async with running(backbone, settings_for(tmp_path, classify_token="reader")) as client:
        await upload(client, "t", make_coop_bundle(backbone, ["a", "b"]))
        body, headers = binary_request([png()])
        refused = await client.post("/v2/models/t/infer", content=body, headers=headers)
        assert refused.status_code == 401 and refused.json()["code"] == "missing_token" and refused.json()["error"]
        allowed = await client.post("/v2/models/t/infer", content=body,
                                    headers=headers | {"Authorization": "Bearer reader"})
        assert allowed.status_code == 200 and allowed.headers["content-type"] == "application/json"
        assert [o["name"] for o in allowed.json()["outputs"]] == ["labels", "probabilities"]


@pytest.mark.anyio
async def test_errors_answered_before_the_routes_carry_the_protocol_error_field(backbone, tmp_path):
    async with running(backbone, settings_for(tmp_path, max_header_bytes=2048)) as client:
        too_large = await client.get("/v2/health/live", headers={"X-Pad": "x" * 4096})
        unknown = await client.get("/v2/no-such-route")
        v1 = await client.get("/healthz", headers={"X-Pad": "x" * 4096})
    assert too_large.status_code == 431 and too_large.json()["code"] == "headers_too_large"
    assert too_large.json()["error"] == too_large.json()["detail"]
    assert unknown.status_code == 404 and unknown.json()["error"]
    assert v1.status_code == 431 and "error" not in v1.json()
