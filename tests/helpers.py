"""Helpers the tests share: bundles made for a backbone, the app in-process and the service as a process, small
on-disk datasets, hostile-input probes and the local PostgreSQL cluster. Fixtures live in the conftest files."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import os
import random
import re
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from PIL import Image, ImageDraw

from bench.process import ServiceProcess
from service.bundle.codec import Bundle, decode_bundle, encode_bundle
from service.bundle.header import MANIFEST_KEY
from service.bundle.manifest import Manifest, build_manifest
from service.config import Settings
from service.core.backbone import Backbone
from service.core.bonder import TGPTDims, TGPTModel
from service.core.records import BackboneRef, PromptLayout
from service.http.app import create_app
from service.methods import BundleError
from service.serving.text_features import text_features
from trainer.methods import build_learner, make_config

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "service" / "assets" / "samples"
TOKEN = "test-admin-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
OCTET = {"Content-Type": "application/octet-stream"}

# --- bundles ---------------------------------------------------------------------------------------------


def coop_bundle(backbone: Backbone, classnames: list[str], *, n_ctx: int = 4, seed: int = 0, **overrides: Any) -> bytes:
    """A valid CoOp bundle for `backbone` with random context (tests only need it to be well-formed)."""
    ctx = torch.randn(n_ctx, backbone.text.width, generator=torch.Generator().manual_seed(seed)) * 0.02
    manifest = Manifest(method="coop", backbone=backbone.ref(), classnames=tuple(classnames),
                        prompt=PromptLayout(n_ctx=n_ctx, ctx_dim=backbone.text.width), **overrides)
    return encode_bundle(manifest, {"ctx": ctx})


def coop_bundle_for(backbone: dict[str, Any], classes: list[str], seed: int) -> bytes:
    """A CoOp bundle for a running service's backbone, as /readyz describes it."""
    ctx = torch.randn(4, backbone["text_width"], generator=torch.Generator().manual_seed(seed)) * 0.02
    ref = BackboneRef(backbone["model"], backbone["pretrained"], backbone["fingerprint"])
    manifest = Manifest("coop", ref, tuple(classes), PromptLayout(4, backbone["text_width"]))
    return encode_bundle(manifest, {"ctx": ctx})


def maple_bytes(backbone: Backbone, classes: tuple[str, ...], seed: int, depth: int = 9) -> bytes:
    """A MaPLe bundle with trained-looking prompts and couplings, different per seed."""
    learner = build_learner("maple", make_config("maple", export_dtype="float32", depth=depth), backbone, classes)
    with torch.no_grad():
        for p in learner.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)) * 0.05)
    return encode_bundle(*learner.export())


def tgpt_dims(backbone: Backbone, category: int = 8, content: int = 24) -> TGPTDims:
    return TGPTDims(category, content, backbone.text.width, backbone.sizes.embed_dim)


def tgpt_bundle(backbone: Backbone, n_classes: int, seed: int = 0, dtype: torch.dtype = torch.float32,
                **dims: int) -> bytes:
    """A valid TGP-T bundle for `backbone` with random weights (queries at the reference's N(0, 0.02) scale)."""
    torch.manual_seed(seed)
    d = tgpt_dims(backbone, **dims)
    model = TGPTModel(d, n_classes)
    with torch.no_grad():
        model.category_queries.normal_(0, 0.02)
        model.content_queries.normal_(0, 0.02)
        model.head.weight.normal_(0, 0.1)
    manifest = build_manifest("tgpt", backbone, (f"class {i}" for i in range(n_classes)),
                              options=dataclasses.asdict(d))
    return encode_bundle(manifest, {k: v.to(dtype) for k, v in model.state_dict().items()})


def predict_from_features(bundle: Bundle, backbone: Backbone, image_features: torch.Tensor) -> torch.Tensor:
    """Top-1 class per normalized image feature for a text-side bundle, ranked as the service ranks."""
    return (backbone.logit_scale * image_features @ text_features(bundle, backbone).T).argmax(dim=-1)


def count_calls(monkeypatch: pytest.MonkeyPatch, encoder: Any) -> list[int]:
    """Wrap the real encoder's one entry into the text tower; each call records its batch size."""
    calls, real = [], encoder.encode_embeddings

    def counted(x: torch.Tensor, eot: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(x.shape[0])
        return real(x, eot, *args, **kwargs)

    monkeypatch.setattr(encoder, "encode_embeddings", counted)
    return calls


# A bundle manifest for a ViT-B-16 that is never loaded: for format tests that stop before any backbone.
REF = BackboneRef("ViT-B-16", "openai", "sha256:" + "ab" * 32)
CLASSES = ("cat", "dog", "golden retriever")
LAYOUT = PromptLayout(n_ctx=4, ctx_dim=512)


def manifest(method: str = "coop", **kw: Any) -> Manifest:
    kw.setdefault("prompt", LAYOUT)
    return Manifest(method=method, backbone=REF, classnames=CLASSES, **kw)


def raw_manifest(**changes: Any) -> dict[str, Any]:
    raw = json.loads(manifest().to_json())
    raw.update(changes)
    return raw


def with_manifest(raw: dict[str, Any], tensors: dict[str, torch.Tensor] | None = None) -> bytes:
    import safetensors.torch

    return safetensors.torch.save(tensors if tensors is not None else {"ctx": torch.zeros(4, 512)},
                                  metadata={MANIFEST_KEY: json.dumps(raw)})


def expect_field(data: bytes, field: str) -> None:
    with pytest.raises(BundleError) as err:
        decode_bundle(data)
    assert err.value.field == field, str(err.value)
    assert field in str(err.value)


# --- the app in-process ----------------------------------------------------------------------------------


def break_int8_model(path: Path) -> None:
    """Scramble every int8 weight of a quantized ONNX model in place: it still loads and runs, with wrong answers."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    for i, tensor in enumerate(model.graph.initializer):
        if tensor.data_type == onnx.TensorProto.INT8 and len(tensor.dims) == 2:
            scrambled = np.ascontiguousarray(numpy_helper.to_array(tensor)[::-1])
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(scrambled, tensor.name))
    onnx.save(model, str(path))


def png(color: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (40, 40)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def settings_for(tmp_path: Path, **overrides: Any) -> Settings:
    values = dict(model="test-micro", registry=str(tmp_path / "registry"), admin_token=TOKEN, demo=False)
    return Settings(**(values | overrides))


@asynccontextmanager
async def running(backbone: Backbone, settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings, backbone=backbone)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client


async def upload(client: httpx.AsyncClient, task: str, data: bytes,
                 headers: dict[str, str] | None = None) -> httpx.Response:
    return await client.post(f"/v1/tasks/{task}/versions", content=data, headers={**ADMIN, **OCTET, **(headers or {})})


async def classify(client: httpx.AsyncClient, task: str, images: list[bytes], top_k: int = 2) -> httpx.Response:
    files = [("images", (f"img{i}.png", data, "image/png")) for i, data in enumerate(images)]
    return await client.post(f"/v1/tasks/{task}/classify", params={"top_k": top_k}, files=files)


def assert_same_predictions(got: list[dict[str, Any]], expected: list[dict[str, Any]]) -> None:
    assert [p["label"] for p in got] == [p["label"] for p in expected]
    assert [p["probability"] for p in got] == pytest.approx([p["probability"] for p in expected], abs=1e-5)


def service_top1(backbone: Backbone, registry: Path, bundles: dict[str, bytes], images: list[Path]) -> dict[str, list]:
    """For each task name → bundle bytes: upload it, classify `images`, return the top-1 label per image."""
    import asyncio

    return asyncio.run(_service_top1(backbone, registry, bundles, images))


async def _service_top1(backbone: Backbone, registry: Path, bundles: dict[str, bytes],
                        images: list[Path]) -> dict[str, list]:
    settings = Settings(registry=str(registry), admin_token=TOKEN, demo=False, model=backbone.spec.model)
    out: dict[str, list] = {}
    async with running(backbone, settings) as client:
        for task, data in bundles.items():
            assert (await upload(client, task, data)).status_code == 201
            out[task] = []
            for start in range(0, len(images), settings.max_images_per_request):
                batch = images[start : start + settings.max_images_per_request]
                files = [("images", (p.name, p.read_bytes(), "image/png")) for p in batch]
                response = await client.post(f"/v1/tasks/{task}/classify?top_k=1", files=files)
                assert response.status_code == 200, response.text
                out[task] += [r["predictions"][0]["label"] for r in response.json()["results"]]
    return out


# --- the service as a process ----------------------------------------------------------------------------


def classify_sample(url: str, task: str) -> httpx.Response:
    files = [("images", (p.name, p.read_bytes(), "image/png")) for p in sorted(SAMPLES.glob("*.png"))]
    return httpx.post(f"{url}/v1/tasks/{task}/classify", files=files, params={"top_k": 2}, timeout=60)


# A fixed mmap threshold makes glibc map every large buffer afresh (and unmap it on free) instead of reusing
# freed heap, so a request's big allocations always show in the peak-RSS mark.
PROBE_ENV = {"PROMPTSERVE_ADMIN_TOKEN": TOKEN, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}


def hostile_server(registry: Path, **settings: str) -> ServiceProcess:
    """The service process the hostile-input suite attacks."""
    return ServiceProcess(registry, env=PROBE_ENV, **settings)


def documented_errors() -> set[tuple[int, str]]:
    """The (status, code) pairs docs/errors.md lists in its table."""
    text = (ROOT / "docs" / "errors.md").read_text()
    rows = re.findall(r"^\| (\d{3}) \| (.+?) \|", text, re.MULTILINE)
    return {(int(status), code) for status, codes in rows for code in re.findall(r"`([a-z0-9_]+)`", codes)}


def registry_snapshot(root: Path) -> dict[str, str]:
    """Every path under the registry with a hash of its bytes (the lock file excluded)."""
    snapshot = {}
    for path in sorted(root.rglob("*")):
        relative = str(path.relative_to(root))
        if relative == ".lock":
            continue
        snapshot[relative] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return snapshot


# --- small on-disk datasets: coloured squares a micro CLIP can tell apart from cached features ---------------

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 200, 40),
    "blue": (30, 40, 220),
    "yellow": (230, 220, 30),
}


def draw(colour: tuple[int, int, int], rng: random.Random, size: int = 32) -> Image.Image:
    """A jittered square of `colour` at a random place on a grey background."""
    image = Image.new("RGB", (size, size), tuple(rng.randint(100, 150) for _ in range(3)))
    side = rng.randint(size // 2, size - 4)
    x, y = rng.randint(0, size - side), rng.randint(0, size - side)
    fill = tuple(min(255, max(0, c + rng.randint(-25, 25))) for c in colour)
    ImageDraw.Draw(image).rectangle([x, y, x + side, y + side], fill=fill)
    return image


def write_images(folder: Path, per_class: int, seed: int, classes: list[str] | None = None) -> list[tuple[str, str]]:
    """`folder/<class>/<i>.png`; returns (relative path, class) pairs."""
    rng = random.Random(seed)
    out = []
    for name in classes or list(COLOURS):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            draw(COLOURS[name], rng).save(folder / name / f"{i}.png")
            out.append((f"{name}/{i}.png", name))
    return out


def make_coop(root: Path, train: int = 8, test: int = 6, classes: list[str] | None = None) -> Path:
    """CoOp layout: root/split_zhou_colours.json with images under root/images/."""
    classes = classes or list(COLOURS)
    label = {c: i for i, c in enumerate(classes)}
    doc = {}
    for split, count, seed in (("train", train, 0), ("val", 2, 1), ("test", test, 2)):
        items = write_images(root / "images" / split, count, seed, classes)
        doc[split] = [[f"{split}/{rel}", label[c], c] for rel, c in items]
    (root / "split_zhou_colours.json").write_text(json.dumps(doc))
    return root


def make_imagefolder(root: Path, per_class: int = 6) -> Path:
    write_images(root / "train", per_class, 0)
    write_images(root / "test", 3, 1)
    return root


def make_csv(root: Path, per_class: int = 6) -> Path:
    items = write_images(root / "img", per_class, 0)
    path = root / "data.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "split"])
        for i, (rel, c) in enumerate(items):
            writer.writerow([f"img/{rel}", c, "test" if i % 3 == 0 else "train"])
    return path


# --- the local PostgreSQL cluster ------------------------------------------------------------------------

PG_SERVER = os.environ.get("PROMPTSERVE_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432")


def pg_admin_connection() -> Any:
    import psycopg

    return psycopg.connect(f"{PG_SERVER}/postgres", autocommit=True, connect_timeout=3)


def pg_is_up() -> bool:
    import psycopg

    try:
        with pg_admin_connection():
            return True
    except psycopg.OperationalError:
        return False


class ThrowawayPostgres:
    """A PostgreSQL cluster of its own (initdb in a temporary directory, its own port, trust auth), for tests
    that pause, stop or lock the server: the shared cluster is never touched. Run as root, the server runs as
    the `postgres` user (PostgreSQL refuses root)."""

    def __init__(self) -> None:
        import pwd
        import tempfile

        from bench.process import free_port

        self.bin = sorted(Path("/usr/lib/postgresql").glob("*/bin"))[-1]
        self.root = Path(tempfile.mkdtemp(prefix="promptserve-pg-"))
        self.data, self.port = self.root / "data", free_port()
        self._as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self._as:
            account = pwd.getpwnam("postgres")
            os.chown(self.root, account.pw_uid, account.pw_gid)
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        self.start()

    def _run(self, tool: str, *args: str) -> None:
        subprocess.run([*self._as, str(self.bin / tool), *args], check=True, capture_output=True, timeout=120)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.root / "log"), "-w", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    @property
    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def pids(self) -> list[int]:
        """The postmaster and every process it forked (backends, checkpointer, ...); none when stopped."""
        if not self.running:
            return []
        postmaster = int((self.data / "postmaster.pid").read_text().split()[0])
        children = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _parent(p) == postmaster]
        return [postmaster, *children]

    def pause(self) -> None:
        """SIGSTOP every server process: connections stay open, nothing answers (a hung server)."""
        import signal

        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        import signal

        self._signal(signal.SIGCONT)

    def _signal(self, number: int) -> None:
        for pid in self.pids():
            try:
                os.kill(pid, number)
            except ProcessLookupError:
                pass  # a backend that just ended

    def create_database(self) -> str:
        import uuid

        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url(), autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def destroy(self) -> None:
        import shutil

        try:
            self.resume()
            self.stop()
        except (OSError, subprocess.SubprocessError):
            pass  # already gone
        shutil.rmtree(self.root, ignore_errors=True)


def _parent(proc: Path) -> int | None:
    try:
        return int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None
