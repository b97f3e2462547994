"""The Open Inference Protocol (KServe V2) routes, spoken by the official tritonclient against a real uvicorn."""

import base64
import json
import struct

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from service.registry.base import RegistryUnavailable
from service.serving.demo import DEMO_TASKS
from tests.helpers import ADMIN, SAMPLES, png, running, settings_for, upload

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
    with pytest.raises(InferenceServerException, match="has no version 7"):
        v2.infer("shapes", [images_input(binary=True)], model_version="7")
    assert v2.infer("colours", [images_input(binary=True)], model_version="1").get_response()["model_version"] == "1"
    wrong = triton.InferInput("pixels", [1], "BYTES").set_data_from_numpy(np.array([b"x"], dtype=np.object_))
    with pytest.raises(InferenceServerException, match="'images' of datatype BYTES"):
        v2.infer("shapes", [wrong])


def sample_colours() -> list[str]:
    return [p.stem.split("_")[0] for p in SAMPLE_FILES]


@pytest.mark.slow
def test_tritonclient_reads_the_config_and_advertises_only_what_is_served(v2):
    assert set(v2.get_server_metadata()["extensions"]) == {
        "binary_tensor_data", "classification", "model_configuration", "statistics"}
    config = v2.get_model_config("colours")
    assert config["name"] == "colours" and config["max_batch_size"] == 32
    assert config["input"] == [{"name": "images", "data_type": "TYPE_STRING", "format": "FORMAT_NONE", "dims": [1],
                                "reshape": {"shape": []}}]
    assert [(o["name"], o["data_type"]) for o in config["output"]] == [("labels", "TYPE_STRING"),
                                                                        ("probabilities", "TYPE_FP32")]
    assert json.loads(config["parameters"]["classnames"]["string_value"]) == list(DEMO_TASKS["colours"])


@pytest.mark.slow
def test_triton_classification_extension_answers_score_index_label(v2):
    classnames = json.loads(v2.get_model_config("colours")["parameters"]["classnames"]["string_value"])
    outputs = [triton.InferRequestedOutput("probabilities", class_count=3)]
    answer = v2.infer("colours", [images_input(binary=True)], outputs=outputs).as_numpy("probabilities")
    assert answer.shape == (len(SAMPLE_FILES), 3)
    rows = [[entry.decode().split(":", 2) for entry in row] for row in answer]
    for row, colour in zip(rows, sample_colours(), strict=True):
        assert [classnames[int(index)] for _, index, _ in row] == [label for _, _, label in row]
        scores = [float(score) for score, _, _ in row]
        assert scores == sorted(scores, reverse=True) and row[0][2] == colour
    more = [triton.InferRequestedOutput("probabilities", class_count=99, binary_data=False)]  # beyond the classes
    assert v2.infer("colours", [images_input(True)], outputs=more).as_numpy("probabilities").shape == (4, 16)


@pytest.mark.slow
def test_probabilities_alone_are_every_class_in_class_order(v2):
    classnames = json.loads(v2.get_model_config("colours")["parameters"]["classnames"]["string_value"])
    outputs = [triton.InferRequestedOutput("probabilities")]
    probabilities = v2.infer("colours", [images_input(binary=True)], outputs=outputs).as_numpy("probabilities")
    assert probabilities.shape == (len(SAMPLE_FILES), len(classnames))
    assert np.allclose(probabilities.sum(axis=1), 1, atol=1e-4)
    assert [classnames[i] for i in probabilities.argmax(axis=1)] == sample_colours()
    with pytest.raises(InferenceServerException, match="top_k sorts the 'labels' output"):
        v2.infer("colours", [images_input(binary=True)], outputs=outputs, parameters={"top_k": 2})


@pytest.mark.slow
def test_tritonclient_reads_per_version_statistics(v2):
    def entry(stats: dict) -> dict:
        [found] = [m for m in stats["model_stats"] if m["name"] == "colours" and m["version"] == "1"]
        return found

    before = entry(v2.get_inference_statistics("colours"))
    v2.infer("colours", [images_input(binary=True)])
    after = entry(v2.get_inference_statistics("colours"))
    everything = v2.get_inference_statistics()
    assert after["inference_count"] - before["inference_count"] == len(SAMPLE_FILES)
    assert after["execution_count"] - before["execution_count"] == 1
    phases = after["inference_stats"]
    assert phases["success"]["count"] - before["inference_stats"]["success"]["count"] == 1
    for phase in ("success", "compute_input", "compute_infer"):
        assert phases[phase]["ns"] > before["inference_stats"][phase]["ns"]
    assert after["last_inference"] >= before["last_inference"] and after["last_inference"] > 0
    assert {("shapes", "1"), ("colours", "1")} <= {(m["name"], m["version"]) for m in everything["model_stats"]}
    assert entry(v2.get_inference_statistics("colours", "1")) == entry(v2.get_inference_statistics("colours"))


@pytest.mark.slow
def test_stored_versions_are_addressable_by_url(v2, live_service):
    try:
        check_versions_by_url(v2, live_service.url)
    finally:  # the live service is shared: leave only its demo tasks
        httpx.delete(f"{live_service.url}/v1/tasks/v2-versions", headers=ADMIN)


def check_versions_by_url(v2, url: str) -> None:
    for labels in (["red", "blue"], ["red", "blue", "green"]):
        made = httpx.put(f"{url}/v1/tasks/v2-versions", json={"classnames": labels}, headers=ADMIN)
        assert made.status_code == 201, made.text
    assert v2.get_model_metadata("v2-versions")["versions"] == ["1", "2"]
    assert v2.get_model_metadata("v2-versions", "1")["versions"] == ["1"]
    assert v2.is_model_ready("v2-versions", "1") and not v2.is_model_ready("v2-versions", "3")
    old = v2.infer("v2-versions", [images_input(binary=True)], model_version="1")
    new = v2.infer("v2-versions", [images_input(binary=True)])
    assert old.get_response()["model_version"] == "1" and old.as_numpy("labels").shape == (4, 2)
    assert new.get_response()["model_version"] == "2" and new.as_numpy("labels").shape == (4, 3)
    assert json.loads(v2.get_model_config("v2-versions", "1")["parameters"]["classnames"]["string_value"]) == [
        "red", "blue"]
    [stats] = v2.get_inference_statistics("v2-versions", "1")["model_stats"]
    assert (stats["version"], stats["inference_count"]) == ("1", len(SAMPLE_FILES))


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
    (binary_request([png()], outputs=[{"name": "labels", "parameters": {"classification": 2}}]), 422,
     "bad_classification"),
    (binary_request([png()], outputs=[{"name": "probabilities", "parameters": {"classification": 0}}]), 422,
     "bad_classification"),
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


@pytest.mark.anyio
async def test_model_metadata_lists_the_served_version_through_a_registry_outage(backbone, tmp_path, make_coop_bundle,
                                                                                  monkeypatch):
    async with running(backbone, settings_for(tmp_path)) as client:
        await upload(client, "t", make_coop_bundle(backbone, ["a", "b"], seed=1))
        await upload(client, "t", make_coop_bundle(backbone, ["a", "b"], seed=2))
        assert (await client.get("/v2/models/t")).json()["versions"] == ["1", "2"]
        registry = client._transport.app.state.promptserve.tasks.registry

        def unreachable(task):
            raise RegistryUnavailable("the registry is down")

        monkeypatch.setattr(registry, "versions", unreachable)
        during = await client.get("/v2/models/t")
    assert during.status_code == 200 and during.json()["versions"] == ["2"]
