"""Tasks at scale: features computed once per fleet (stored artefacts), tasks listed from the registry's index
and activated on first use, warm tasks held within a memory budget."""

from __future__ import annotations

import threading

import anyio
import httpx
import pytest
import torch

from service.core.backbone import BackboneSpec, load_backbone
from service.registry import open_registry
from service.registry.directory import DirectoryRegistry
from service.serving.activation import BundleLimits
from service.serving.artefacts import ArtefactKey, ArtefactRejected, decode_features, encode_features
from service.serving.propagation import Propagator
from service.serving.tasks import TaskManager
from tests.helpers import classify, maple_bytes, png, running, settings_for, tgpt_bundle, upload


@pytest.fixture(params=["directory", "postgres"])
def location(request, tmp_path) -> str:
    return str(tmp_path / "registry") if request.param == "directory" else request.getfixturevalue("postgres_url")


def replica(backbone, location: str, **options) -> TaskManager:
    """A replica that just started: the registry's index read, no task activated."""
    tasks = TaskManager(backbone, open_registry(location), BundleLimits(), **options)
    assert Propagator(tasks, resync_interval_s=30).resync()
    return tasks


def test_features_one_replica_computed_are_loaded_by_the_next_not_recomputed(backbone, location, make_coop_bundle):
    writer = TaskManager(backbone, open_registry(location), BundleLimits())
    published = writer.publish("t", make_coop_bundle(backbone, ["a", "b", "c"]))
    assert (writer.counts["features_computed"], writer.counts["artefacts_stored"]) == (1, 1)
    reader = replica(backbone, location)
    assert reader.names() == ["t"] and reader.all() == []  # listed from the index, not activated
    served = reader.get("t")
    assert reader.counts["features_artefact"] == 1 and reader.counts["features_computed"] == 0
    assert torch.equal(served.head.text_features, published.head.text_features)


def test_deep_prompted_features_are_stored_and_image_conditioned_heads_store_nothing(deep_backbone, tmp_path):
    location = str(tmp_path / "registry")
    writer = TaskManager(deep_backbone, open_registry(location), BundleLimits())
    maple = writer.publish("maple", maple_bytes(deep_backbone, ("cat", "dog"), seed=1))
    writer.publish("tgpt", tgpt_bundle(deep_backbone, 3))
    assert writer.counts["artefacts_stored"] == 1  # TGP-T keeps nothing per class: nothing to store
    reader = replica(deep_backbone, location)
    assert torch.equal(reader.get("maple").head.text_features, maple.head.text_features)
    reader.get("tgpt")
    assert (reader.counts["features_artefact"], reader.counts["features_computed"]) == (1, 0)


def artefact_file(root, task: str):
    [path] = (root / task / "artefacts").iterdir()
    return path


DAMAGE = {
    "truncated": lambda data, other: data[: len(data) // 2],
    "garbage": lambda data, other: b"\x00garbage" * 100,
    "empty": lambda data, other: b"",
    "a flipped feature byte": lambda data, other: data[:-3] + bytes([data[-3] ^ 0x40]) + data[-2:],
    "another version's features": lambda data, other: other,
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_artefact_is_recomputed_and_stored_again_never_trusted(backbone, tmp_path, make_coop_bundle,
                                                                        damage, caplog):
    location = str(tmp_path / "registry")
    writer = TaskManager(backbone, open_registry(location), BundleLimits())
    published = writer.publish("t", make_coop_bundle(backbone, ["a", "b"]))
    writer.publish("u", make_coop_bundle(backbone, ["p", "q"], seed=5))
    path = artefact_file(tmp_path / "registry", "t")
    path.write_bytes(DAMAGE[damage](path.read_bytes(), artefact_file(tmp_path / "registry", "u").read_bytes()))
    reader = replica(backbone, location)
    assert torch.equal(reader.get("t").head.text_features, published.head.text_features)
    assert (reader.counts["features_computed"], reader.counts["artefacts_stored"]) == (1, 1)
    assert "stored features are not used" in caplog.text
    third = replica(backbone, location)
    third.get("t")
    assert third.counts["features_artefact"] == 1  # the repaired artefact


def test_another_backbone_or_precision_never_reuses_features(backbone, tmp_path, make_coop_bundle):
    location = str(tmp_path / "registry")
    writer = TaskManager(backbone, open_registry(location), BundleLimits())
    published = writer.publish("t", make_coop_bundle(backbone, ["a", "b"]))
    key = ArtefactKey.of(backbone)
    other_weights = ArtefactKey.of(load_backbone(BackboneSpec("test-micro", device="cpu", seed=1)))
    other_precision = ArtefactKey(key.fingerprint, "cpu-bfloat16")
    assert len({key.id, other_weights.id, other_precision.id}) == 3  # never even looked up under the same key

    reader = replica(backbone, location)
    reader.artefact_key = other_precision  # as a replica computing in bf16 would
    reader.get("t")
    assert (reader.counts["features_artefact"], reader.counts["features_computed"]) == (0, 1)

    # Bytes of one key placed under another's are refused by what they say they are.
    data = encode_features(published.head.text_features, published.sha256, key)
    shape = tuple(published.head.text_features.shape)
    for stale, named in [(other_precision, "precision"), (other_weights, "fingerprint")]:
        with pytest.raises(ArtefactRejected, match=named):
            decode_features(data, published.sha256, stale, shape)
    with pytest.raises(ArtefactRejected, match="bundle"):
        decode_features(data, "0" * 64, key, shape)


def test_beyond_the_memory_budget_the_least_recently_used_are_evicted_and_reload_from_artefacts(
        backbone, tmp_path, make_coop_bundle):
    location = str(tmp_path / "registry")
    writer = TaskManager(backbone, open_registry(location), BundleLimits())
    names = [f"t{i}" for i in range(4)]
    for i, name in enumerate(names):
        writer.publish(name, make_coop_bundle(backbone, [f"{name} a", f"{name} b"], seed=i))
    size = writer.get("t0").held_bytes
    reader = replica(backbone, location, feature_memory_bytes=int(2.5 * size))
    for name in names:
        reader.get(name)
    assert [t.name for t in reader.all()] == ["t2", "t3"] and reader.warm_bytes <= reader.feature_memory_bytes
    assert reader.counts["evictions"] == 2
    reader.get("t2")  # used: t3 is now the least recently used
    reload = reader.get("t0")
    assert [t.name for t in reader.all()] == ["t0", "t2"]
    assert torch.equal(reload.head.text_features, writer.get("t0").head.text_features)
    assert (reader.counts["features_artefact"], reader.counts["features_computed"]) == (5, 0)
    assert reader.names() == names  # evicted tasks stay listed: cold, not gone


def test_the_warm_up_fills_the_budget_most_used_first_and_stops(backbone, tmp_path, make_coop_bundle):
    location = str(tmp_path / "registry")
    writer = TaskManager(backbone, open_registry(location), BundleLimits())
    for i in range(5):
        writer.publish(f"t{i}", make_coop_bundle(backbone, ["a", "b"], seed=i))
    size = writer.get("t0").held_bytes
    reader = replica(backbone, location, feature_memory_bytes=3 * size)
    reader.get("t3")
    reader.get("t3")
    reader.get("t1")
    for name in ("t1", "t3"):
        reader._evict(name)  # as a budget eviction would: cold again, its uses remembered
    assert reader.cold_names()[:2] == ["t3", "t1"]
    assert reader.warm_up() == 3 and {t.name for t in reader.all()} == {"t3", "t1", "t4"}
    assert reader.counts["evictions"] == 0  # the warm-up never evicts


@pytest.mark.anyio
async def test_a_request_arriving_during_a_cold_activation_waits_for_it(backbone, tmp_path, make_coop_bundle,
                                                                       monkeypatch):
    settings = settings_for(tmp_path, startup_warmup_s=0, background_warmup=False)
    async with running(backbone, settings) as client:
        for name in ("t", "u"):
            uploaded = await upload(client, name, make_coop_bundle(backbone, [f"{name} a", f"{name} b"]))
            assert uploaded.status_code == 201
    loading, release = threading.Event(), threading.Event()
    real_load = DirectoryRegistry.load

    def slow_load(self, task, version):
        loading.set()
        release.wait(10)
        return real_load(self, task, version)

    monkeypatch.setattr(DirectoryRegistry, "load", slow_load)
    async with running(backbone, settings) as client:
        ready = (await client.get("/readyz")).json()
        assert ready["ready"] and (ready["tasks"], ready["warm_tasks"]) == (2, 0)  # ready before any activation
        listed = (await client.get("/v1/tasks")).json()["tasks"]
        assert [(t["name"], t["method"], t["num_classes"], t["warm"]) for t in listed] == [
            ("t", "coop", None, False), ("u", "coop", None, False)]
        answers: list[httpx.Response] = []

        async def ask() -> None:
            answers.append(await classify(client, "t", [png()]))

        async with anyio.create_task_group() as group:
            group.start_soon(ask)
            group.start_soon(ask)
            assert await anyio.to_thread.run_sync(loading.wait, 10)
            await anyio.sleep(0.3)
            assert answers == []  # both wait for the one activation in progress
            release.set()
        assert [a.status_code for a in answers] == [200, 200]
        assert answers[0].json()["results"][0]["predictions"][0]["label"].startswith("t ")
        metrics = (await client.get("/metrics")).text
        assert "promptserve_cold_load_seconds_count 1.0" in metrics and "promptserve_cached_tasks 1.0" in metrics
        assert 'promptserve_task_features_total{source="artefact"} 1.0' in metrics
        assert (await client.get("/readyz")).json()["warm_tasks"] == 1


@pytest.mark.anyio
async def test_a_cold_activation_past_the_timeout_answers_503_and_the_retry_finds_it_warm(
        backbone, tmp_path, make_coop_bundle, monkeypatch):
    settings = settings_for(tmp_path, startup_warmup_s=0, background_warmup=False, cold_start_timeout_s=0.3)
    async with running(backbone, settings) as client:
        assert (await upload(client, "t", make_coop_bundle(backbone, ["a", "b"]))).status_code == 201
    release = threading.Event()
    real_load = DirectoryRegistry.load
    monkeypatch.setattr(DirectoryRegistry, "load", lambda self, *ref: (release.wait(10), real_load(self, *ref))[1])
    async with running(backbone, settings) as client:
        waited = await classify(client, "t", [png()])
        assert waited.status_code == 503 and waited.json()["code"] == "task_warming"
        assert int(waited.headers["Retry-After"]) >= 1
        release.set()
        with anyio.fail_after(10):
            while (await client.get("/readyz")).json()["warm_tasks"] != 1:  # the activation went on
                await anyio.sleep(0.05)
        assert (await classify(client, "t", [png()])).status_code == 200


@pytest.mark.anyio
async def test_pinning_a_cold_tasks_active_version_is_a_cold_start_not_a_pin(backbone, tmp_path, make_coop_bundle):
    settings = settings_for(tmp_path, startup_warmup_s=0, background_warmup=False, pin_preparations_per_minute=0)
    async with running(backbone, settings) as client:
        assert (await upload(client, "t", make_coop_bundle(backbone, ["a", "b"]))).status_code == 201
    async with running(backbone, settings) as client:
        pinned = await client.post("/v1/tasks/t/classify", params={"version": "1"},
                                   files=[("images", ("a.png", png(), "image/png"))])
        assert pinned.status_code == 200 and pinned.json()["version"] == 1  # no pin budget spent or needed
