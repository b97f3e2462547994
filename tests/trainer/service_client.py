"""Drive the real service app in-process: upload bundles, classify image files, return top-1 labels."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx

from service.app import create_app
from service.backbone import Backbone
from service.config import Settings

TOKEN = "trainer-test-token"


def service_top1(backbone: Backbone, registry: Path, bundles: dict[str, bytes], images: list[Path]) -> dict[str, list]:
    """For each task name → bundle bytes: upload it, classify `images`, return the top-1 label per image."""
    return asyncio.run(_run(backbone, registry, bundles, images))


async def _run(backbone: Backbone, registry: Path, bundles: dict[str, bytes], images: list[Path]) -> dict[str, list]:
    settings = Settings(registry=str(registry), admin_token=TOKEN, demo=False, model=backbone.spec.model)
    app = create_app(settings, backbone=backbone)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    out = {}
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test") as client:
            for task, data in bundles.items():
                upload = await client.post(f"/v1/tasks/{task}/versions", content=data,
                                           headers={**auth, "Content-Type": "application/octet-stream"})
                assert upload.status_code == 201, upload.text
                out[task] = []
                for start in range(0, len(images), settings.max_images_per_request):
                    out[task] += await _classify(client, task, images[start : start + settings.max_images_per_request])
    return out


async def _classify(client: httpx.AsyncClient, task: str, images: list[Path]) -> list[str]:
    files = [("images", (p.name, p.read_bytes(), "image/png")) for p in images]
    response = await client.post(f"/v1/tasks/{task}/classify?top_k=1", files=files)
    assert response.status_code == 200, response.text
    return [r["predictions"][0]["label"] for r in response.json()["results"]]
