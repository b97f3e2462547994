"""`GET /v1/models` and `POST /v1/embeddings` in OpenAI's shape: the official `openai` client against a real uvicorn
(texts; images through `extra_body`), and the limits and refusals in-process."""

import base64
import math

import httpx
import numpy as np
import pytest

from service.http.deps import AppState
from service.serving.heads import ImageForward
from service.serving.images import decode_images
from service.serving.text_features import text_embeddings
from tests.helpers import ADMIN, SAMPLES, png, running, settings_for

openai = pytest.importorskip("openai", reason="openai is in the test extra")
pytestmark = pytest.mark.anyio
SAMPLE_FILES = sorted(SAMPLES.glob("*.png"))
COLOURS = ["red", "blue", "green", "yellow", "purple"]


def data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def oa(live_service):
    client = openai.OpenAI(base_url=f"{live_service.url}/v1", api_key="unused", max_retries=0)
    yield client
    client.close()


@pytest.mark.slow
def test_the_openai_client_lists_the_backbone_and_embeds_texts(oa):
    [model] = oa.models.list().data
    assert model.id == "promptserve-tiny" and model.object == "model"
    answer = oa.embeddings.create(model=model.id, input=["a photo of a red star.", "a blue circle"])  # base64
    as_floats = oa.embeddings.create(model=model.id, input="a photo of a red star.", encoding_format="float")
    assert answer.object == "list" and answer.model == model.id and [e.index for e in answer.data] == [0, 1]
    vectors = np.array([e.embedding for e in answer.data])
    assert vectors.shape == (2, model.model_extra["embedding_dimensions"])
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    assert np.allclose(as_floats.data[0].embedding, vectors[0], atol=1e-6)
    assert answer.usage.prompt_tokens == answer.usage.total_tokens > 4
    with pytest.raises(openai.NotFoundError, match="known: \\['promptserve-tiny'\\]"):
        oa.embeddings.create(model="text-embedding-3-small", input="cat")


@pytest.mark.slow
def test_an_images_embedding_classifies_like_classify_for_a_zero_shot_task(oa, live_service):
    """softmax(logit_scale × image · label) from /v1/embeddings equals /v1/classify of a task made from the labels."""
    task = f"{live_service.url}/v1/tasks/embed-colours"
    made = httpx.put(task, json={"classnames": COLOURS}, headers=ADMIN)
    assert made.status_code in (200, 201), made.text
    files = [("images", (p.name, p.read_bytes(), "image/png")) for p in SAMPLE_FILES]
    try:
        classified = httpx.post(f"{task}/classify", params={"top_k": len(COLOURS)}, files=files,
                                timeout=60).json()["results"]
    finally:  # the live service is shared: leave only its demo tasks
        httpx.delete(task, headers=ADMIN)
    [model] = oa.models.list().data
    images = oa.embeddings.create(model=model.id, input=[data_uri(p.read_bytes()) for p in SAMPLE_FILES],
                                  extra_body={"modality": "image"})
    labels = oa.embeddings.create(model=model.id, input=[f"a photo of a {c}." for c in COLOURS])
    logits = model.model_extra["logit_scale"] * np.array([e.embedding for e in images.data]) @ np.array(
        [e.embedding for e in labels.data]).T
    probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    for row, result in zip(probabilities, classified, strict=True):
        by_label = {p["label"]: p["probability"] for p in result["predictions"]}
        assert np.allclose(row, [by_label[c] for c in COLOURS], atol=1e-4)
        assert COLOURS[int(row.argmax())] == result["predictions"][0]["label"]


def embed(client, **body):
    return client.post("/v1/embeddings", json={"model": "test-micro", **body})


async def test_image_embeddings_ride_the_classify_runtime_and_match_its_features(backbone, tmp_path):
    async with running(backbone, settings_for(tmp_path)) as client:
        state: AppState = client._transport.app.state.promptserve
        images = [png((200, 30, 30)), png((30, 30, 200), size=(60, 30))]
        answer = await embed(client, input=[data_uri(d) for d in images], modality="image", encoding_format="float")
        forward = state.runtime.forwards[-1]
        pixels = state.pipeline.preprocessor.batch(decode_images([("a", d) for d in images],
                                                                 state.pipeline.limits.decode))
    assert answer.status_code == 200, answer.text
    assert (forward.kind, forward.rows) == (ImageForward.PLAIN, 2)  # one shared forward, as classify runs it
    got = np.array([e["embedding"] for e in answer.json()["data"]])
    assert np.allclose(got, backbone.encode_images(pixels).numpy(), atol=1e-5)
    assert answer.json()["usage"] == {"prompt_tokens": 0, "total_tokens": 0}


async def test_text_embeddings_are_the_prompt_aware_encoders_and_base64_is_little_endian_float32(backbone, tmp_path):
    async with running(backbone, settings_for(tmp_path)) as client:
        answer = await embed(client, input=["a red square", ""], encoding_format="base64")
    vectors = [np.frombuffer(base64.b64decode(e["embedding"]), "<f4") for e in answer.json()["data"]]
    expected = text_embeddings(backbone, ["a red square", ""]).numpy()
    assert np.allclose(vectors, expected, atol=1e-6)
    assert answer.json()["usage"]["prompt_tokens"] == len(backbone.text.tokenizer.encode("a red square")) + 2 + 2


@pytest.mark.parametrize(("body", "status", "code", "says"), [
    ({"input": []}, 422, "no_inputs", "empty"),
    ({"input": [[1, 2, 3]]}, 422, "bad_input", "token arrays"),
    ({"input": ["x" * 2001]}, 422, "text_too_long", "2001 characters"),
    ({"input": ["word " * 80]}, 422, "text_too_long", "tokens"),
    ({"input": ["cat"] * 257}, 413, "too_many_inputs", "256"),
    ({"input": ["cat"], "dimensions": 3}, 422, "bad_dimensions", "not 3"),
    ({"input": ["cat"], "model": "gpt"}, 404, "unknown_model", "known: ['test-micro']"),
    ({"input": ["http://example.com/cat.png"], "modality": "image"}, 422, "bad_input", "fetches no URLs"),
    ({"input": ["not base64!"], "modality": "image"}, 422, "bad_base64", "input[0]"),
    ({"input": [data_uri(png())] * 33, "modality": "image"}, 413, "too_many_images", "32"),
    ({"input": [data_uri(b"not an image")], "modality": "image"}, 415, "not_an_image", "input[0]"),
    ({"input": ["cat"], "modality": "audio"}, 422, "bad_embedding_request", "body.modality"),
    ({"input": ["cat"], "colour": "red"}, 422, "bad_embedding_request", "body.colour"),
])
async def test_bad_embedding_requests_get_a_4xx_naming_the_problem(backbone, tmp_path, body, status, code, says):
    async with running(backbone, settings_for(tmp_path)) as client:
        response = await client.post("/v1/embeddings", json={"model": "test-micro"} | body)
    assert (response.status_code, response.json()["code"]) == (status, code), response.text
    assert says in response.json()["detail"]


async def test_models_lists_the_backbone_with_what_scores_its_embeddings(backbone, tmp_path):
    async with running(backbone, settings_for(tmp_path)) as client:
        listing = (await client.get("/v1/models")).json()
        one = await client.get("/v1/models/test-micro")
        unknown = await client.get("/v1/models/gpt-4")
    [card] = listing["data"]
    assert listing["object"] == "list" and card == one.json()
    assert card["embedding_dimensions"] == backbone.sizes.embed_dim and card["modalities"] == ["text", "image"]
    assert math.isclose(card["logit_scale"], backbone.logit_scale, rel_tol=1e-6)
    assert unknown.status_code == 404 and unknown.json()["code"] == "unknown_model"
