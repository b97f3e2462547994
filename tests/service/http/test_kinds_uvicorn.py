"""Vision-side (MaPLe) and image-conditioned (TGP-T) bundles trained with the CLI on world images, uploaded to
the real service (uvicorn, embedded tiny CLIP) and answering next to a text-side demo task."""

from pathlib import Path

import httpx
import pytest

from tests.helpers import SAMPLES, TOKEN
from trainer.cli import main as train
from trainer.world.dataset import write_imagefolder

pytestmark = pytest.mark.slow
TINY = ["--model", "promptserve-tiny", "--pretrained", "world-v1", "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("world")
    write_imagefolder(root / "train", "shape", 2, seed=1, size=48, descriptions=True)
    return root


def trained(world: Path, out: Path, method: str, *extra: str) -> bytes:
    code = train(["train", "--method", method, "--layout", "imagefolder", "--data", str(world), "--shots", "2",
                  "--epochs", "1", "--warmup-epochs", "0", "--batch-size", "16", "--output", str(out), *TINY, *extra])
    assert code == 0
    return out.read_bytes()


def test_cli_trained_maple_and_tgpt_bundles_answer_beside_a_demo_task(live_service, world, tmp_path):
    bundles = {
        "cli-maple": trained(world, tmp_path / "maple.bundle", "maple", "--depth", "2"),
        "cli-tgpt": trained(world, tmp_path / "tgpt.bundle", "tgpt", "--category-queries", "8",
                            "--content-queries", "16", "--descriptions", str(world / "train" / "descriptions.tsv")),
    }
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/octet-stream"}
    for task, data in bundles.items():
        created = httpx.post(f"{live_service.url}/v1/tasks/{task}/versions", content=data, headers=headers, timeout=120)
        assert created.status_code == 201, created.text
    files = [("images", (p.name, p.read_bytes(), "image/png")) for p in sorted(SAMPLES.glob("*.png"))]
    response = httpx.post(f"{live_service.url}/v1/classify", files=files, timeout=120,
                          params=[("tasks", "shapes"), ("tasks", "cli-maple"), ("tasks", "cli-tgpt"), ("top_k", 3)])
    assert response.status_code == 200, response.text
    classes = {t: set(httpx.get(f"{live_service.url}/v1/tasks/{t}").json()["classnames"]) for t in bundles}
    for result in response.json()["results"]:
        answers = {a["task"]: a for a in result["answers"]}
        assert list(answers) == ["shapes", "cli-maple", "cli-tgpt"]
        for task in bundles:
            assert answers[task]["version"] == 1
            assert {p["label"] for p in answers[task]["predictions"]} <= classes[task]
            assert sum(p["probability"] for p in answers[task]["predictions"]) <= 1 + 1e-6
    for task in bundles:
        assert httpx.delete(f"{live_service.url}/v1/tasks/{task}", headers=headers).status_code == 204
