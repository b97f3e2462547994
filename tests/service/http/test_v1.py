"""The HTTP API through httpx against the real app (real backbone, real registry directory)."""

import asyncio
import io
import pickle

import anyio
import httpx
import pytest
import torch
from PIL import Image

from service.bundle.codec import encode_bundle
from service.bundle.manifest import Manifest
from service.core.records import PromptLayout
from service.serving.heads import ImageForward
from service.serving.runtime import Forward
from tests.helpers import ADMIN, OCTET, TOKEN, assert_same_predictions, classify, png, running, settings_for, upload

pytestmark = pytest.mark.anyio


async def test_upload_then_classify_answers_with_the_task_version(client, backbone, make_coop_bundle):
    classes = ["red square", "green square", "blue square"]
    created = await upload(client, "colours", make_coop_bundle(backbone, classes))
    assert created.status_code == 201, created.text
    assert created.json()["version"] == 1 and created.json()["classnames"] == classes

    answer = await classify(client, "colours", [png(), png((0, 0, 255))], top_k=2)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["version"] == 1 and len(body["results"]) == 2
    for result in body["results"]:
        assert len(result["predictions"]) == 2
        assert {p["label"] for p in result["predictions"]} <= set(classes)
        assert result["predictions"][0]["probability"] >= result["predictions"][1]["probability"]

    detail = (await client.get("/v1/tasks/colours")).json()
    assert detail["method"] == "coop" and detail["bundle_bytes"] > 0
    assert detail["backbone"]["fingerprint"] == backbone.fingerprint
    assert (await client.get("/v1/tasks")).json()["tasks"][0]["name"] == "colours"


async def test_probabilities_match_the_cached_text_features(client, backbone, make_coop_bundle):
    classes = ["a", "b", "c", "d"]
    bundle = make_coop_bundle(backbone, classes, seed=3)
    await upload(client, "t", bundle)
    body = (await classify(client, "t", [png()], top_k=4)).json()
    from service.bundle.codec import decode_bundle
    from service.serving.text_features import text_features

    pixels = backbone.preprocess(Image.open(io.BytesIO(png())).convert("RGB"))[None]
    expected = (backbone.logit_scale * backbone.encode_images(pixels) @ text_features(decode_bundle(bundle),
                                                                                       backbone).T).softmax(-1)[0]
    got = {p["label"]: p["probability"] for p in body["results"][0]["predictions"]}
    assert got == pytest.approx({c: float(expected[i]) for i, c in enumerate(classes)}, abs=1e-5)


async def test_reupload_under_concurrent_classify_never_fails_or_mixes_versions(client, backbone, make_coop_bundle):
    classes_of = {v: [f"class{i} v{v}" for i in range(3)] for v in (1, 2, 3)}
    await upload(client, "swap", make_coop_bundle(backbone, classes_of[1]))
    answers: list[httpx.Response] = []

    async def keep_classifying():
        for _ in range(12):
            answers.append(await classify(client, "swap", [png(), png((0, 200, 0))], top_k=3))

    async with anyio.create_task_group() as group:
        for _ in range(4):
            group.start_soon(keep_classifying)
        for version in (2, 3):
            response = await upload(client, "swap", make_coop_bundle(backbone, classes_of[version], seed=version))
            assert response.status_code == 201 and response.json()["version"] == version

    assert len(answers) == 48 and all(a.status_code == 200 for a in answers)
    seen = set()
    for answer in answers:
        body = answer.json()
        seen.add(body["version"])
        labels = {p["label"] for r in body["results"] for p in r["predictions"]}
        assert labels == set(classes_of[body["version"]]), "a response mixed two versions"
    assert 1 in seen or 2 in seen
    assert (await classify(client, "swap", [png()])).json()["version"] == 3


def nan_bundle(backbone) -> bytes:
    import safetensors.torch

    from service.bundle.codec import MANIFEST_KEY

    manifest = Manifest("coop", backbone.ref(), ("a", "b"), PromptLayout(4, backbone.text.width))
    ctx = torch.full((4, backbone.text.width), float("nan"))
    return safetensors.torch.save({"ctx": ctx}, metadata={MANIFEST_KEY: manifest.to_json()})


def wrong_shape_bundle(backbone) -> bytes:
    manifest = Manifest("coop", backbone.ref(), ("a", "b"), PromptLayout(4, backbone.text.width + 1))
    return encode_bundle(manifest, {"ctx": torch.zeros(4, backbone.text.width + 1)})


BAD_BUNDLES = {
    "corrupt": (lambda b, o, m: m(b, ["x", "y"])[:-40], 422, "tensors"),
    "pickle": (lambda b, o, m: pickle.dumps({"ctx": torch.zeros(4, 64)}), 422, "not a safetensors bundle"),
    "wrong fingerprint": (lambda b, o, m: m(o, ["x", "y"]), 422, "backbone.fingerprint"),
    "nan tensor": (lambda b, o, m: nan_bundle(b), 422, "NaN"),
    "wrong shapes": (lambda b, o, m: wrong_shape_bundle(b), 422, "prompt.ctx_dim"),
    "oversized": (lambda b, o, m: b"\0" * (300 * 1024), 413, "limit"),
    "too many classes": (lambda b, o, m: m(b, [f"c{i}" for i in range(9)]), 422, "classnames"),
}


@pytest.mark.parametrize("case", sorted(BAD_BUNDLES))
async def test_failed_upload_keeps_the_previous_version_serving(
    case, backbone, other_backbone, make_coop_bundle, tmp_path
):
    make_data, status, words = BAD_BUNDLES[case]
    settings = settings_for(tmp_path, max_bundle_bytes=256 * 1024, max_classes=8)
    async with running(backbone, settings) as client:
        assert (await upload(client, "t", make_coop_bundle(backbone, ["old a", "old b"]))).status_code == 201
        response = await upload(client, "t", make_data(backbone, other_backbone, make_coop_bundle))
        assert response.status_code == status, response.text
        assert words in response.json()["detail"]
        assert (await client.get("/v1/tasks/t")).json()["version"] == 1
        answer = (await classify(client, "t", [png()])).json()
        assert answer["version"] == 1 and answer["results"][0]["predictions"][0]["label"].startswith("old")
    stored = sorted(p.name for p in (tmp_path / "registry" / "t").iterdir())
    assert stored == ["00000001.bundle", "00000001.json", "ACTIVE", "artefacts"]


async def test_upload_needs_the_admin_token(client, backbone, make_coop_bundle):
    data = make_coop_bundle(backbone, ["a", "b"])
    missing = await client.post("/v1/tasks/t/versions", content=data, headers=OCTET)
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    wrong = await client.post("/v1/tasks/t/versions", content=data, headers={**OCTET, "Authorization": "Bearer no"})
    assert wrong.status_code == 403
    assert (await client.delete("/v1/tasks/t")).status_code == 401
    assert (await client.get("/v1/tasks")).json()["tasks"] == []


async def test_uploads_are_disabled_without_a_configured_token(backbone, tmp_path, make_coop_bundle):
    async with running(backbone, settings_for(tmp_path, admin_token=None)) as client:
        response = await upload(client, "t", make_coop_bundle(backbone, ["a", "b"]))
        assert response.status_code == 403 and "PROMPTSERVE_ADMIN_TOKEN" in response.json()["detail"]


async def test_classify_can_be_token_protected(backbone, tmp_path, make_coop_bundle):
    async with running(backbone, settings_for(tmp_path, classify_token="reader")) as client:
        await upload(client, "t", make_coop_bundle(backbone, ["a", "b"]))
        assert (await classify(client, "t", [png()])).status_code == 401
        files = [("images", ("x.png", png(), "image/png"))]
        for token in ("reader", TOKEN):
            ok = await client.post("/v1/tasks/t/classify", files=files, headers={"Authorization": f"Bearer {token}"})
            assert ok.status_code == 200


READ_ROUTES = [("GET", "/v1/tasks"), ("GET", "/v1/tasks/t"), ("GET", "/v1/tasks/t/versions"),
               ("GET", "/v1/tasks/t/aliases"), ("GET", "/v2/models/t"), ("GET", "/v2/models/t/versions/1"),
               ("POST", "/v2/repository/index")]
HEALTH_ROUTES = ["/healthz", "/readyz", "/v2/health/live", "/v2/health/ready", "/v2/models/t/ready"]


async def test_with_a_classify_token_every_read_route_needs_it_and_health_routes_do_not(
        backbone, tmp_path, make_coop_bundle):
    async with running(backbone, settings_for(tmp_path, classify_token="reader")) as client:
        await upload(client, "t", make_coop_bundle(backbone, ["a", "b"]))
        for method, path in READ_ROUTES:
            assert (await client.request(method, path)).status_code == 401, path
            wrong = await client.request(method, path, headers={"Authorization": "Bearer nope"})
            assert wrong.status_code == 403, path
            for token in ("reader", TOKEN):
                answer = await client.request(method, path, headers={"Authorization": f"Bearer {token}"})
                assert answer.status_code == 200, (path, answer.text)
        for path in ("/v1/tasks/nope", "/v2/models/nope"):  # without the token, whether a task exists is not told
            assert (await client.get(path)).status_code == 401
        for path in HEALTH_ROUTES:
            assert (await client.get(path)).status_code == 200, path


def truncated_png() -> bytes:
    return png(size=(64, 64))[:60]


def huge_pixel_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (3000, 3000)).save(buffer, format="PNG")  # a few KB on disk, 9 Mpx decoded
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("images", "status", "code"),
    [
        ([b"just some text"], 415, "not_an_image"),
        ([truncated_png()], 422, "corrupt_image"),
        ([huge_pixel_png()], 413, "image_too_many_pixels"),
        ([png(size=(300, 300)) + b"\0" * 70_000], 413, "image_too_large"),
        ([png()] * 5, 413, "too_many_images"),
    ],
)
async def test_bad_images_get_4xx_and_the_service_keeps_serving(
    images, status, code, backbone, tmp_path, make_coop_bundle
):
    settings = settings_for(tmp_path, max_image_pixels=1_000_000, max_image_bytes=64 * 1024, max_images_per_request=4)
    async with running(backbone, settings) as client:
        await upload(client, "t", make_coop_bundle(backbone, ["a", "b"]))
        response = await classify(client, "t", images)
        assert response.status_code == status, response.text
        assert response.json()["code"] == code
        assert (await classify(client, "t", [png()])).status_code == 200


async def test_request_body_over_the_limit_is_refused_while_streaming(backbone, tmp_path, make_coop_bundle):
    async with running(backbone, settings_for(tmp_path, max_bundle_bytes=1000)) as client:

        async def chunks():
            for _ in range(10):
                yield b"\0" * 500

        response = await client.post("/v1/tasks/t/versions", content=chunks(), headers={**ADMIN, **OCTET})
        assert response.status_code == 413 and response.json()["code"] == "body_too_large"
        assert (await client.get("/v1/tasks")).json()["tasks"] == []


async def test_wrong_content_types_are_415(client, backbone, make_coop_bundle):
    data = make_coop_bundle(backbone, ["a", "b"])
    as_form = await client.post("/v1/tasks/t/versions", files={"bundle": ("b", data)}, headers=ADMIN)
    assert as_form.status_code == 415 and "application/octet-stream" in as_form.json()["detail"]
    await upload(client, "t", data)
    as_raw = await client.post("/v1/tasks/t/classify", content=png(), headers={"Content-Type": "image/png"})
    assert as_raw.status_code == 415
    no_files = await client.post("/v1/tasks/t/classify", data={"x": "1"}, files={})
    assert no_files.status_code in (415, 422)


async def test_delete_then_unknown_task_is_404(client, backbone, make_coop_bundle):
    await upload(client, "t", make_coop_bundle(backbone, ["a", "b"]))
    assert (await client.delete("/v1/tasks/t", headers=ADMIN)).status_code == 204
    assert (await client.get("/v1/tasks/t")).status_code == 404
    missing = await classify(client, "t", [png()])
    assert missing.status_code == 404 and missing.json()["code"] == "unknown_task"
    assert (await client.delete("/v1/tasks/t", headers=ADMIN)).status_code == 404
    assert (await client.get("/v1/tasks/..bad")).status_code == 422


async def test_restart_restores_every_task_and_version(backbone, tmp_path, make_coop_bundle):
    settings = settings_for(tmp_path)
    async with running(backbone, settings) as client:
        await upload(client, "a", make_coop_bundle(backbone, ["x", "y"]))
        await upload(client, "b", make_coop_bundle(backbone, ["p", "q"]))
        await upload(client, "b", make_coop_bundle(backbone, ["p2", "q2"], seed=1))
        before = (await classify(client, "b", [png()])).json()
    async with running(backbone, settings) as client:
        tasks = {t["name"]: t["version"] for t in (await client.get("/v1/tasks")).json()["tasks"]}
        assert tasks == {"a": 1, "b": 2}
        assert (await classify(client, "b", [png()])).json() == before


async def test_a_broken_stored_bundle_is_reported_and_others_still_restore(backbone, tmp_path, make_coop_bundle):
    settings = settings_for(tmp_path)
    async with running(backbone, settings) as client:
        await upload(client, "good", make_coop_bundle(backbone, ["x", "y"]))
        await upload(client, "bad", make_coop_bundle(backbone, ["x", "y"]))
    (tmp_path / "registry" / "bad" / "00000001.bundle").write_bytes(b"garbage")
    async with running(backbone, settings) as client:
        ready = (await client.get("/readyz")).json()
        assert ready["tasks"] == 1 and "bad" in ready["failed_tasks"]
        assert (await classify(client, "good", [png()])).status_code == 200
        metrics = (await client.get("/metrics")).text
        assert 'promptserve_failed_tasks{reason="bundle"} 1.0' in metrics
        assert 'promptserve_failed_tasks{reason="waiting"} 0.0' in metrics
        assert "promptserve_registry_reachable 1.0" in metrics
        assert "promptserve_registry_last_sync_timestamp_seconds 1." in metrics  # a unix time, 1.7e9


async def test_demo_tasks_are_seeded_only_into_a_registry_that_never_held_a_task(backbone, tmp_path):
    settings = settings_for(tmp_path, demo=True)
    async with running(backbone, settings) as client:
        for name in ("shapes", "colours"):
            demo = (await client.get(f"/v1/tasks/{name}")).json()
            assert demo["method"] == "zeroshot" and demo["num_classes"] == 16
            assert (await client.delete(f"/v1/tasks/{name}", headers=ADMIN)).status_code == 204
    async with running(backbone, settings) as client:  # every task deleted: still not a fresh registry
        assert (await client.get("/v1/tasks")).json()["tasks"] == []
        await upload(client, "mine", coop_for(backbone))
    async with running(backbone, settings) as client:
        assert [t["name"] for t in (await client.get("/v1/tasks")).json()["tasks"]] == ["mine"]


def coop_for(backbone) -> bytes:
    manifest = Manifest("coop", backbone.ref(), ("a", "b"), PromptLayout(2, backbone.text.width))
    return encode_bundle(manifest, {"ctx": torch.zeros(2, backbone.text.width)})


async def test_metrics_count_requests_errors_and_tasks(client, backbone, make_coop_bundle):
    await upload(client, "t", make_coop_bundle(backbone, ["a", "b"]))
    await classify(client, "t", [png(), png()])
    await classify(client, "t", [b"nope"])
    text = (await client.get("/metrics")).text
    assert 'promptserve_requests_total{method="POST",route="/v1/tasks/{task}/classify",status="200"} 1.0' in text
    assert 'promptserve_errors_total{route="/v1/tasks/{task}/classify",status="415"} 1.0' in text
    assert 'promptserve_images_classified_total{task="t"} 2.0' in text
    assert "promptserve_cached_tasks 1.0" in text
    assert 'promptserve_active_version{task="t"} 1.0' in text
    assert "promptserve_request_seconds_bucket" in text
    assert 'promptserve_batch_rows_bucket{le="2.0"} 1.0' in text and "promptserve_batch_rows_count 1.0" in text
    assert "promptserve_batch_queue_seconds_count 1.0" in text
    assert 'promptserve_batch_queue_depth_bucket{le="0.0"} 1.0' in text


async def test_metrics_include_process_and_platform_series(client):
    text = (await client.get("/metrics")).text
    assert "process_resident_memory_bytes " in text and "process_cpu_seconds_total " in text
    assert "python_info{" in text


async def test_openapi_documents_every_route(client):
    spec = (await client.get("/openapi.json")).json()
    assert {"/healthz", "/readyz", "/metrics", "/v1/tasks", "/v1/tasks/{task}", "/v1/tasks/{task}/versions",
            "/v1/tasks/{task}/classify"} <= set(spec["paths"])
    upload_body = spec["paths"]["/v1/tasks/{task}/versions"]["post"]["requestBody"]["content"]
    assert "application/octet-stream" in upload_body
    assert (await client.get("/healthz")).json() == {"status": "ok"}


async def test_many_tasks_are_answered_from_one_image_forward(backbone, tmp_path, make_coop_bundle):
    async with running(backbone, settings_for(tmp_path)) as client:
        for i in range(3):
            await upload(client, f"task{i}", make_coop_bundle(backbone, [f"c{i}a", f"c{i}b", f"c{i}c"], seed=i))
        forwards = client._transport.app.state.promptserve.runtime.forwards
        before = len(forwards)
        files = [("images", (f"i{k}.png", png((40 * k, 0, 0)), "image/png")) for k in range(2)]
        response = await client.post("/v1/classify", params=[("tasks", f"task{i}") for i in range(3)] + [("top_k", 2)],
                                     files=files)
        assert response.status_code == 200, response.text
        assert list(forwards)[before:] == [Forward(ImageForward.PLAIN, 2)], "expected one forward for all tasks"
        results = response.json()["results"]
        singles = [(await classify(client, f"task{i}", [png((0, 0, 0)), png((40, 0, 0))], top_k=2)).json()
                   for i in range(3)]
    for k, result in enumerate(results):
        assert [a["task"] for a in result["answers"]] == ["task0", "task1", "task2"]
        for i, answer in enumerate(result["answers"]):
            assert_same_predictions(answer["predictions"], singles[i]["results"][k]["predictions"])


async def test_many_task_classify_names_an_unknown_task(client):
    response = await client.post("/v1/classify", params={"tasks": "nope"}, files=[("images", ("a", png()))])
    assert response.status_code == 404 and "nope" in response.json()["detail"]


async def test_concurrent_requests_get_the_same_answers_as_single_ones(client, backbone, make_coop_bundle):
    await upload(client, "t", make_coop_bundle(backbone, ["a", "b", "c"]))
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (90, 90, 90), (250, 250, 0)]
    alone = [(await classify(client, "t", [png(c)], top_k=3)).json()["results"][0] for c in colours]
    together = await asyncio.gather(*(classify(client, "t", [png(c)], top_k=3) for c in colours))
    for single, concurrent in zip(alone, together, strict=True):
        assert_same_predictions(concurrent.json()["results"][0]["predictions"], single["predictions"])


async def test_a_request_larger_than_the_whole_queue_is_413_not_a_retry_forever_503(backbone, tmp_path,
                                                                                    make_coop_bundle):
    async with running(backbone, settings_for(tmp_path, batch_max_queued_images=2)) as client:
        await upload(client, "t", make_coop_bundle(backbone, ["a", "b"]))
        with anyio.fail_after(10):
            response = await classify(client, "t", [png()] * 3)
        assert response.status_code == 413 and "retry-after" not in response.headers
        assert response.json()["code"] == "too_many_forwards"
        assert (await classify(client, "t", [png()])).status_code == 200


async def test_classify_pins_each_task_to_an_alias_or_a_version(client, backbone, make_coop_bundle):
    await upload(client, "pinned", make_coop_bundle(backbone, ["a", "b"], seed=1))
    await upload(client, "pinned", make_coop_bundle(backbone, ["a", "b", "c"], seed=2))
    await upload(client, "other", make_coop_bundle(backbone, ["x", "y"]))
    await client.put("/v1/tasks/pinned/aliases/canary", json={"version": 1}, headers=ADMIN)
    files = [("images", ("one.png", png(), "image/png"))]
    answer = await client.post("/v1/classify", files=files, params={
        "tasks": ["pinned@canary", "pinned:2", "pinned", "other:1", "pinned@1"], "top_k": 5})
    assert answer.status_code == 200, answer.text
    got = [(a["task"], a["version"], len(a["predictions"])) for a in answer.json()["results"][0]["answers"]]
    assert got == [("pinned", 1, 2), ("pinned", 2, 3), ("pinned", 2, 3), ("other", 1, 2), ("pinned", 1, 2)]
    unknown = await client.post("/v1/classify", files=files, params={"tasks": ["pinned@nightly"]})
    missing = await client.post("/v1/classify", files=files, params={"tasks": ["pinned:9"]})
    malformed = await client.post("/v1/classify", files=files, params={"tasks": ["pinned@@x"]})
    assert (unknown.status_code, unknown.json()["code"]) == (404, "unknown_task") and "nightly" in unknown.text
    assert missing.status_code == 404 and "no version 9" in missing.json()["detail"]
    assert malformed.status_code == 422, malformed.text
    assert malformed.json()["field"].startswith("query.tasks")


@pytest.mark.parametrize(("method", "path", "param"), [
    ("POST", "/v1/classify?tasks=t&version=canary", "version"),  # pins belong in `tasks` here
    ("GET", "/v1/tasks?limt=2", "limt"),
    ("GET", "/healthz?verbose=1", "verbose"),
    ("POST", "/v2/models/t/infer?top_k=2", "top_k"),
])
async def test_an_unknown_query_parameter_is_a_422_naming_it(client, backbone, make_coop_bundle, method, path, param):
    await upload(client, "t", make_coop_bundle(backbone, ["a", "b"]))
    response = await client.request(method, path, files=[("images", ("a.png", png(), "image/png"))]
                                    if method == "POST" else None)
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["code"] == "unknown_query_parameter" and param in body["detail"]
    assert body["error"] if path.startswith("/v2") else body["field"] == f"query.{param}"  # V2's protocol body


async def test_the_task_list_pages_with_limit_and_cursor(client, backbone, make_coop_bundle):
    names = [f"task-{i:02d}" for i in range(5)]
    for i, name in enumerate(names):
        await upload(client, name, make_coop_bundle(backbone, ["a", "b"], seed=i))
    seen, cursor, pages = [], None, 0
    while True:
        page = (await client.get("/v1/tasks", params={"limit": 2} | ({"cursor": cursor} if cursor else {}))).json()
        seen += [t["name"] for t in page["tasks"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == names and pages == 3
    everything = (await client.get("/v1/tasks")).json()
    assert [t["name"] for t in everything["tasks"]] == names and everything["next_cursor"] is None
    assert (await client.get("/v1/tasks", params={"limit": 0})).status_code == 422


async def test_a_405_lists_every_method_the_path_takes(client):
    response = await client.patch("/v1/tasks/anything")
    assert response.status_code == 405 and response.json()["code"] == "method_not_allowed"
    assert response.headers["allow"] == "DELETE, GET, PUT"  # three routes share the path
    assert response.json()["detail"] == "PATCH is not allowed here; allowed: DELETE, GET, PUT"
