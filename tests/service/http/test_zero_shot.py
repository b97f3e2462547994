"""Labels at request time (`POST /v1/zero-shot`) and a task from a list of labels (`PUT /v1/tasks/{task}`)."""

import base64
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import ADMIN, assert_same_predictions, count_calls, png, running, settings_for

pytestmark = pytest.mark.anyio
LABELS = ["red", "green", "blue", "yellow"]
IMAGES = [png((220, 30, 30)), png((30, 40, 220))]


def multipart(labels, templates=(), images=IMAGES):
    files = [("images", (f"img{i}.png", data, "image/png")) for i, data in enumerate(images)]
    return {"files": files, "data": {"labels": list(labels), "templates": list(templates)}}


def json_body(labels, templates=None, images=IMAGES):
    body = {"images": [{"name": f"img{i}.png", "data": base64.b64encode(d).decode()} for i, d in enumerate(images)],
            "labels": labels}
    return {"json": body | ({"templates": templates} if templates is not None else {})}


async def test_zero_shot_answers_like_a_task_made_from_the_same_labels(backbone, tmp_path):
    async with running(backbone, settings_for(tmp_path)) as client:
        made = await client.put("/v1/tasks/paint", json={"classnames": LABELS}, headers=ADMIN)
        assert made.status_code == 201 and made.json()["method"] == "zeroshot" and made.json()["version"] == 1
        task = await client.post("/v1/tasks/paint/classify", params={"top_k": 4},
                                 files=multipart(LABELS)["files"])
        open_vocab = await client.post("/v1/zero-shot", **multipart(LABELS))
        as_json = await client.post("/v1/zero-shot", **json_body(LABELS))
    assert open_vocab.status_code == as_json.status_code == 200, open_vocab.text
    body = open_vocab.json()
    assert body["labels"] == LABELS and body["templates"] == ["a photo of a {}."]
    assert [r["filename"] for r in body["results"]] == ["img0.png", "img1.png"]
    for mine, theirs, again in zip(body["results"], task.json()["results"], as_json.json()["results"], strict=True):
        assert len(mine["predictions"]) == 4  # every label by default, like Hugging Face's pipeline
        assert_same_predictions(mine["predictions"], theirs["predictions"])
        assert_same_predictions(again["predictions"], theirs["predictions"])


async def test_a_repeated_label_set_encodes_no_text_and_another_order_is_its_own_set(backbone, tmp_path, monkeypatch):
    calls = count_calls(monkeypatch, backbone.text)
    async with running(backbone, settings_for(tmp_path)) as client:
        first = await client.post("/v1/zero-shot", params={"top_k": 1}, **multipart(LABELS, ["a {} thing."]))
        encoded = len(calls)
        again = await client.post("/v1/zero-shot", params={"top_k": 1}, **json_body(LABELS, ["a {} thing."]))
        assert len(calls) == encoded > 0  # the cached features answered
        await client.post("/v1/zero-shot", **multipart(LABELS[::-1], ["a {} thing."]))
        assert len(calls) > encoded
        state = client._transport.app.state.promptserve
    assert first.json()["results"] == again.json()["results"]
    assert first.json()["templates"] == ["a {} thing."] and state.zero_shot.misses == 2


async def test_the_label_cache_is_bounded(backbone, tmp_path):
    async with running(backbone, settings_for(tmp_path, zero_shot_cache_size=2)) as client:
        for n in range(4):
            assert (await client.post("/v1/zero-shot", **multipart([f"thing {n}", "other"]))).status_code == 200
        cache = client._transport.app.state.promptserve.zero_shot
        assert len(cache._entries) == 2 and cache.cached(["thing 0", "other"], None) is None
        assert cache.cached(["thing 3", "other"], None) is not None


@pytest.mark.parametrize(("labels", "templates", "field", "says"), [
    (["cat", "cat"], None, "body.labels", "duplicate class 'cat'"),
    (["cat", " "], None, "body.labels", "blank"),
    (["cat", "x" * 201], None, "body.labels", "200"),
    (["a", "b", "c", "d"], None, "body.labels", "exceed this service's limit 3"),  # the classes limit
    (["cat"], ["no placeholder"], "body.templates", "templates"),
    (["cat"], ["x" * 300 + " {}"], "body.templates", "300 characters"),  # the format's template length
    (["cat"], [f"{'w ' * 100}{{}}"], "body.labels", "context length"),  # a prompt beyond the text context
])
async def test_labels_are_refused_like_a_bundles_class_names(backbone, tmp_path, labels, templates, field, says):
    async with running(backbone, settings_for(tmp_path, max_classes=3)) as client:
        response = await client.post("/v1/zero-shot", **json_body(labels, templates))
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["code"] == "invalid_labels" and body["field"] == field and says in body["detail"], body


async def test_labels_count_against_the_prompts_to_encode(backbone, tmp_path):
    async with running(backbone, settings_for(tmp_path, max_text_prompts=5)) as client:
        response = await client.post("/v1/zero-shot", **json_body(["a", "b", "c"], ["x {}.", "y {}."]))
    assert response.status_code == 422 and "3 classes × 2 templates" in response.json()["detail"]


async def test_a_request_without_labels_or_images_names_what_is_missing(backbone, tmp_path):
    async with running(backbone, settings_for(tmp_path)) as client:
        no_labels = await client.post("/v1/zero-shot", **multipart([]))
        not_strings = await client.post("/v1/zero-shot", **json_body([1, 2]))
        no_images = await client.post("/v1/zero-shot", json={"images": [], "labels": ["cat"]})
    assert (no_labels.status_code, no_labels.json()["code"]) == (422, "no_labels")
    assert (not_strings.status_code, not_strings.json()["code"]) == (422, "bad_text_field")
    assert (no_images.status_code, no_images.json()["code"]) == (422, "no_images")


@given(document=st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                             lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                           max_size=3), max_leaves=8),
       labels=st.one_of(st.none(), st.lists(st.text(max_size=12), max_size=4), st.text(max_size=5)))
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_any_json_body_gets_an_answer_or_a_4xx_never_a_5xx(zero_shot_client, document, labels):
    body = document if labels is None else {"images": json_body(["x"])["json"]["images"], "labels": labels}
    response = zero_shot_client.post("/v1/zero-shot", content=json.dumps(body),
                                     headers={"Content-Type": "application/json"})
    assert response.status_code in (200, 413, 422), response.text
    assert response.status_code != 200 or all(r["predictions"][0]["label"] in labels
                                              for r in response.json()["results"])


@pytest.fixture(scope="module")
def zero_shot_client(backbone, tmp_path_factory):
    """A synchronous client of the app in-process (Hypothesis drives it example by example)."""
    from fastapi.testclient import TestClient

    from service.http.app import create_app

    app = create_app(settings_for(tmp_path_factory.mktemp("zs")), backbone=backbone)
    with TestClient(app) as client:
        yield client


async def test_put_from_labels_versions_like_an_upload(backbone, tmp_path):
    async with running(backbone, settings_for(tmp_path)) as client:
        unauthorized = await client.put("/v1/tasks/paint", json={"classnames": LABELS})
        first = await client.put("/v1/tasks/paint", json={"classnames": LABELS}, headers=ADMIN)
        same = await client.put("/v1/tasks/paint", json={"classnames": LABELS}, headers=ADMIN)
        second = await client.put("/v1/tasks/paint", json={"classnames": LABELS[:2], "templates": ["art of {}"]},
                                  headers=ADMIN)
        await client.put("/v1/tasks/paint/aliases/prod", json={"version": 1}, headers=ADMIN)
        pinned = await client.post("/v1/classify", params={"tasks": ["paint@prod", "paint"]},
                                   files=multipart(LABELS)["files"][:1])
        bad = await client.put("/v1/tasks/paint", json={"classnames": ["a", "a"]}, headers=ADMIN)
        extra = await client.put("/v1/tasks/paint", json={"classnames": ["a"], "colour": 1}, headers=ADMIN)
        versions = (await client.get("/v1/tasks/paint/versions")).json()
    assert unauthorized.status_code == 401
    assert (first.status_code, same.status_code, second.status_code) == (201, 200, 201)
    assert same.json()["version"] == 1 and second.json()["version"] == 2
    assert second.json()["classnames"] == LABELS[:2] and second.json()["options"]["templates"] == ["art of {}"]
    answers = pinned.json()["results"][0]["answers"]
    assert [(a["task"], a["version"], len(a["predictions"])) for a in answers] == [("paint", 1, 4), ("paint", 2, 2)]
    assert bad.status_code == 422 and bad.json()["field"] == "classnames" and "duplicate" in bad.json()["detail"]
    assert extra.status_code == 422 and extra.json()["field"] == "body.colour"
    assert [v["version"] for v in versions["versions"]] == [1, 2] and versions["active"] == 2


async def test_zero_shot_needs_the_classify_token_when_one_is_set(backbone, tmp_path):
    async with running(backbone, settings_for(tmp_path, classify_token="c-token")) as client:
        anonymous = await client.post("/v1/zero-shot", **multipart(LABELS))
        allowed = await client.post("/v1/zero-shot", headers={"Authorization": "Bearer c-token"}, **multipart(LABELS))
    assert anonymous.status_code == 401 and allowed.status_code == 200


def test_the_openapi_documents_the_zero_shot_body(backbone, tmp_path):
    from service.http.app import create_app

    spec = create_app(settings_for(tmp_path, max_images_per_request=5), backbone=backbone).openapi()
    body = spec["paths"]["/v1/zero-shot"]["post"]["requestBody"]["content"]
    for form in body.values():
        assert {"images", "labels"} <= set(form["schema"]["required"])
        assert form["schema"]["properties"]["images"]["maxItems"] == 5
        assert form["schema"]["properties"]["labels"]["minItems"] == 1

