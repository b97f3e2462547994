"""Classify bodies as JSON with base64 images: same answers, limits and error codes as multipart."""

import base64

import pytest

from tests.helpers import assert_same_predictions, classify, png, running, settings_for, upload

pytestmark = pytest.mark.anyio


@pytest.fixture
async def api(backbone, tmp_path):
    async with running(backbone, settings_for(tmp_path)) as client:
        yield client


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


async def test_json_base64_and_data_uris_get_the_multipart_answers(api, backbone, make_coop_bundle):
    await upload(api, "t", make_coop_bundle(backbone, ["a", "b", "c"]))
    images = [png(), png((0, 0, 255))]
    multipart = (await classify(api, "t", images, top_k=3)).json()
    body = {"images": [{"name": "img0.png", "data": b64(images[0])},
                       {"name": "img1.png", "data": "data:image/png;base64," + b64(images[1])}]}
    as_json = await api.post("/v1/tasks/t/classify", params={"top_k": 3}, json=body)
    assert as_json.status_code == 200, as_json.text
    assert as_json.json() == multipart

    many = await api.post("/v1/classify", params={"tasks": "t", "top_k": 3}, json={"images": [{"data": b64(png())}]})
    assert many.status_code == 200, many.text
    result = many.json()["results"][0]
    assert result["filename"] == "image0"
    assert_same_predictions(result["answers"][0]["predictions"], multipart["results"][0]["predictions"])


@pytest.mark.parametrize(("body", "status", "code"), [
    ({"images": [{"data": "not base64!"}]}, 422, "bad_base64"),
    ({"images": [{"data": "data:image/png," + b64(png())}]}, 422, "bad_base64"),
    ({"images": []}, 422, "no_images"),
    ({"pictures": [{"data": b64(png())}]}, 422, "no_images"),
    ({"images": [{"name": 3, "data": b64(png())}]}, 422, "bad_image_field"),
    ({"images": ["just a string"]}, 422, "bad_image_field"),
    ({"images": [{"data": b64(png())}] * 5}, 413, "too_many_images"),
    ({"images": [{"data": "A" * 90_000}]}, 413, "image_too_large"),
    ({"images": [{"data": b64(b"plain text, not an image")}]}, 415, "not_an_image"),
])
async def test_bad_json_images_get_the_multipart_error_codes(backbone, tmp_path, make_coop_bundle, body, status, code):
    settings = settings_for(tmp_path, max_image_bytes=64 * 1024, max_images_per_request=4)
    async with running(backbone, settings) as client:
        await upload(client, "t", make_coop_bundle(backbone, ["a", "b"]))
        response = await client.post("/v1/tasks/t/classify", json=body)
        assert (response.status_code, response.json()["code"]) == (status, code), response.text
        assert (await classify(client, "t", [png()])).status_code == 200


async def test_a_body_that_is_not_json_is_422_and_other_types_415(api, backbone, make_coop_bundle):
    await upload(api, "t", make_coop_bundle(backbone, ["a", "b"]))
    broken = await api.post("/v1/tasks/t/classify", content=b"{not json", headers={"Content-Type": "application/json"})
    assert (broken.status_code, broken.json()["code"]) == (422, "bad_json")
    text = await api.post("/v1/tasks/t/classify", content=b"x", headers={"Content-Type": "text/plain"})
    assert text.status_code == 415 and "application/json" in text.json()["detail"]


async def test_openapi_offers_both_image_bodies(api):
    spec = (await api.get("/openapi.json")).json()
    content = spec["paths"]["/v1/tasks/{task}/classify"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "application/json"} <= set(content)
