"""Limits and error bodies of the HTTP API, in process (real app, real backbone, real registry directory)."""

import errno
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import httpx
import pytest
import torch

import service.bundle.codec
import service.registry.directory
from service.bundle.codec import encode_bundle
from service.bundle.manifest import Manifest
from service.core.records import PromptLayout
from tests.helpers import ADMIN, OCTET, classify, png, running, settings_for, upload

MIB = 1024 * 1024

pytestmark = pytest.mark.anyio


async def test_finite_values_that_overflow_the_encoder_are_refused(backbone, tmp_path, monkeypatch):
    monkeypatch.setattr(service.bundle.codec, "MAX_ABS_VALUE", 3.4e38)  # let the values past the format's bound
    manifest = Manifest("coop", backbone.ref(), ("a", "b"), PromptLayout(4, backbone.text.width))
    data = encode_bundle(manifest, {"ctx": torch.full((4, backbone.text.width), 3e38)})
    async with running(backbone, settings_for(tmp_path)) as client:
        response = await upload(client, "t", data)
        assert response.status_code == 422, response.text
        assert response.json()["field"] == "tensors" and "not finite" in response.json()["detail"]
        assert (await client.get("/v1/tasks/t")).status_code == 404
    assert not (tmp_path / "registry" / "t").exists()


@pytest.mark.parametrize(("error", "status", "code"), [(errno.ENOSPC, 507, "storage_full"),
                                                        (errno.EIO, 503, "storage_unavailable")])
async def test_a_failed_registry_write_says_why_and_keeps_the_old_version(
        backbone, tmp_path, make_coop_bundle, monkeypatch, error, status, code):
    async with running(backbone, settings_for(tmp_path)) as client:
        assert (await upload(client, "t", make_coop_bundle(backbone, ["old a", "old b"]))).status_code == 201

        def failing_write(path, data):  # the disk as it fails: the error the OS raises
            raise OSError(error, "simulated")

        monkeypatch.setattr(service.registry.directory, "atomic_write", failing_write)
        response = await upload(client, "t", make_coop_bundle(backbone, ["new a", "new b"]))
        assert response.status_code == status and response.json()["code"] == code
        answer = (await classify(client, "t", [png()])).json()
        assert answer["version"] == 1 and answer["results"][0]["predictions"][0]["label"].startswith("old")


async def test_class_names_with_braces_are_filled_in_literally(backbone, tmp_path):
    manifest = Manifest("zeroshot", backbone.ref(), ("{0}", "{}", "x{!r}"), options={"templates": ["a {} photo"]})
    async with running(backbone, settings_for(tmp_path)) as client:
        response = await upload(client, "t", encode_bundle(manifest, {}))
        assert response.status_code == 201, response.text


@asynccontextmanager
async def an_upload_in_progress(client, bundle: bytes):
    """An upload whose body (chunked, no Content-Length) arrives only when the block ends; it must then succeed."""
    release, answers = anyio.Event(), []

    async def slow_body():
        await release.wait()
        yield bundle

    async def send():
        answers.append(await client.post("/v1/tasks/t/versions", content=slow_body(), headers=ADMIN | OCTET))

    async with anyio.create_task_group() as group:
        group.start_soon(send)
        await anyio.sleep(0.2)
        yield
        release.set()
    assert answers[0].status_code == 201


def counted(size: int, read: list) -> AsyncIterator[bytes]:
    async def body():
        read.append(True)
        yield b"x" * size

    return body()


async def test_requests_beyond_the_in_flight_cap_get_503_before_their_body_is_read(backbone, tmp_path,
                                                                                 make_coop_bundle):
    body_read: list = []
    async with running(backbone, settings_for(tmp_path, max_inflight_requests=1)) as client:
        async with an_upload_in_progress(client, make_coop_bundle(backbone, ["a", "b"])):
            shed = await client.post("/v1/tasks/u/versions", content=counted(1, body_read), headers=ADMIN | OCTET)
            assert shed.status_code == 503 and shed.json()["code"] == "overloaded"
            assert shed.headers["retry-after"] == "1" and not body_read
            assert (await client.get("/v1/tasks")).status_code == 200  # cheap routes are not capped


async def test_unexpected_errors_answer_json_500_and_are_logged(backbone, tmp_path, monkeypatch, caplog):
    async with running(backbone, settings_for(tmp_path)) as client:
        state = client._transport.app.state.promptserve

        def broken() -> list:
            raise RuntimeError("a bug, not a client's fault")

        monkeypatch.setattr(state.tasks, "names", broken)
        transport = httpx.ASGITransport(app=client._transport.app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as raw:
            response = await raw.get("/v1/tasks")
        assert response.status_code == 500 and response.json()["code"] == "internal_error"
        assert "a bug" not in response.text and "a bug" in caplog.text


async def test_bodies_beyond_the_in_flight_body_budget_get_503_before_they_are_read(backbone, tmp_path,
                                                                                  make_coop_bundle):
    body_read: list = []
    settings = settings_for(tmp_path, max_bundle_bytes=MIB, max_image_bytes=64 * 1024, max_images_per_request=4,
                            max_inflight_body_bytes=2 * MIB)
    async with running(backbone, settings) as client:
        async with an_upload_in_progress(client, make_coop_bundle(backbone, ["a", "b"])):  # reserves 1 MiB
            shed = await client.post("/v1/tasks/u/classify", content=counted(MIB + 1000, body_read),
                                     headers={"Content-Type": "application/json", "Content-Length": str(MIB + 1000)})
            assert shed.status_code == 503 and shed.json()["code"] == "overloaded" and not body_read, shed.text
            small = await client.post("/v1/tasks/t/classify", json={"images": []})  # fits beside the upload
            assert small.json()["code"] != "overloaded"
