"""Vision-side and image-conditioned tasks over HTTP (in process): refused bundles change nothing."""

import pytest
import torch

from service.core.backbone import BackboneSpec, load_backbone
from tests.helpers import classify, maple_bytes, png, running, settings_for, upload

pytestmark = pytest.mark.anyio


async def test_a_maple_bundle_for_another_image_tower_gets_422_and_the_old_version_keeps_serving(
        deep_backbone, tmp_path):
    other = load_backbone(BackboneSpec("test-micro-deep", device="cpu", seed=0))
    with torch.no_grad():
        other.model.visual.proj.add_(1e-3)  # the same text tower, another image tower
    async with running(deep_backbone, settings_for(tmp_path)) as client:
        assert (await upload(client, "m", maple_bytes(deep_backbone, ("cat", "dog"), seed=1))).status_code == 201
        refused = await upload(client, "m", maple_bytes(other, ("cat", "dog", "fox"), seed=2))
        assert refused.status_code == 422, refused.text
        assert refused.json()["code"] == "invalid_bundle" and refused.json()["field"] == "backbone.image_fingerprint"
        answer = await classify(client, "m", [png()], top_k=2)
        assert answer.status_code == 200 and answer.json()["version"] == 1
        assert {p["label"] for p in answer.json()["results"][0]["predictions"]} == {"cat", "dog"}
    assert sorted(p.name for p in (tmp_path / "registry" / "m").glob("*.bundle")) == ["00000001.bundle"]
