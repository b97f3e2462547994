"""Replicas in one process: task managers on one registry, each followed by its own Propagator. Tests that
pause the server or hold its locks use a throwaway cluster of their own."""

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import anyio
import psycopg
import pytest

from service.bundle.codec import encode_bundle
from service.bundle.manifest import build_manifest
from service.registry import open_registry
from service.registry.base import UnknownTask, bundle_sha256
from service.registry.postgres import PostgresRegistry
from service.serving.activation import BundleLimits
from service.serving.demo import DEMO_TASKS, seed_demo_tasks
from service.serving.propagation import Propagator
from service.serving.tasks import TaskManager
from tests.helpers import ADMIN, OCTET, running, settings_for

UNREACHABLE = "postgresql://postgres@127.0.0.1:1/nowhere"


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


@pytest.fixture
def replica_pair(backbone, postgres_url):
    """Two task managers on one registry; the second serves at most 3 classes, so it cannot take some bundles."""
    writer = TaskManager(backbone, PostgresRegistry(postgres_url), BundleLimits(max_classes=100))
    reader = TaskManager(backbone, PostgresRegistry(postgres_url), BundleLimits(max_classes=3))
    follower = Propagator(reader, resync_interval_s=30, poll_s=0.1)
    follower.start()
    wait_for(lambda: follower.health.restored)
    yield writer, reader, follower
    follower.stop()


def test_a_replica_that_cannot_prepare_a_version_keeps_the_old_one_and_says_why(replica_pair, make_coop_bundle,
                                                                                   backbone):
    writer, reader, follower = replica_pair
    writer.publish("t", make_coop_bundle(backbone, ["a", "b"]))
    wait_for(lambda: serves(reader, "t", 1))  # listed, then activated by its first use: warm
    writer.publish("t", make_coop_bundle(backbone, ["a", "b", "c", "d"]))
    wait_for(lambda: "t" in reader.restore_failures)
    assert reader.get("t").version == 1 and "version 2" in reader.restore_failures["t"]
    assert "classnames" in reader.restore_failures["t"]
    assert follower.health.problem() is None  # the registry is fine; the failure is reported per task
    writer.activate("t", 1)
    wait_for(lambda: "t" not in reader.restore_failures)
    assert reader.get("t").version == 1


def test_the_lag_from_commit_to_serving_is_observed_for_changes_from_elsewhere(backbone, postgres_url,
                                                                              make_coop_bundle):
    writer = TaskManager(backbone, PostgresRegistry(postgres_url), BundleLimits())
    reader = TaskManager(backbone, PostgresRegistry(postgres_url), BundleLimits())
    lags: list[float] = []
    follower = Propagator(reader, resync_interval_s=30, poll_s=0.05, observe_lag=lags.append)
    follower.start()
    wait_for(lambda: follower.health.restored)
    writer.publish("t", make_coop_bundle(backbone, ["a", "b"]))
    wait_for(lambda: serves(reader, "t", 1))
    follower.stop()
    assert len(lags) == 1 and 0 <= lags[0] < 5


def test_a_deleted_task_disappears_from_the_other_replica(replica_pair, make_coop_bundle, backbone):
    writer, reader, _ = replica_pair
    writer.publish("t", make_coop_bundle(backbone, ["a", "b"]))
    wait_for(lambda: serves(reader, "t", 1))
    writer.delete("t")
    wait_for(lambda: reader.all() == [] and reader.names() == [])


def test_an_unreachable_registry_is_reported_and_nothing_is_restored(backbone):
    propagator = Propagator(TaskManager(backbone, PostgresRegistry(UNREACHABLE, timeout_s=1), 100), 10)
    assert propagator.resync() is False
    assert not propagator.health.restored and "registry unreachable" in propagator.health.problem()


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_readiness_is_503_and_writes_refused_while_the_registry_is_unreachable(backbone, tmp_path,
                                                                                       make_coop_bundle):
    async with running(backbone, settings_for(tmp_path, registry=UNREACHABLE, registry_timeout_s=0.5)) as client:
        ready = await client.get("/readyz")
        assert ready.status_code == 503 and "registry unreachable" in ready.json()["reason"]
        assert ready.json()["registry"]["restored"] is False
        assert (await client.get("/readyz", params={"require_registry": "false"})).status_code == 503
        upload = await client.post("/v1/tasks/t/versions", content=make_coop_bundle(backbone, ["a", "b"]),
                                   headers={**ADMIN, **OCTET})
        assert upload.status_code == 503 and upload.json()["code"] == "registry_unavailable"
        assert (await client.get("/healthz")).status_code == 200


def serves(manager: TaskManager, name: str, version: int) -> bool:
    """Whether `manager` answers `name` with `version` (a cold task is activated, as a request would)."""
    try:
        return manager.active_version(name) == version and manager.get(name).version == version
    except UnknownTask:
        return False


def test_a_version_the_registry_could_not_deliver_is_retried_not_recorded_as_damage(backbone, throwaway_cluster,
                                                                                       throwaway_url,
                                                                                       make_coop_bundle):
    """The state is read while the server answers; loading the version then hits a paused server (4 s)."""
    writer = TaskManager(backbone, PostgresRegistry(throwaway_url), BundleLimits())
    reader = TaskManager(backbone, PostgresRegistry(throwaway_url, timeout_s=0.5), BundleLimits())
    follower = Propagator(reader, resync_interval_s=30)
    writer.publish("t", make_coop_bundle(backbone, ["a", "b"]))
    assert follower.resync() and serves(reader, "t", 1)
    writer.publish("t", make_coop_bundle(backbone, ["c", "d"]))
    [(name, state, generation)] = reader.out_of_step()
    throwaway_cluster.pause()
    try:
        follower.syncer.submit(name, (state, generation))
        wait_for(lambda: "t" in reader.waiting)
        assert reader.restore_failures == {} and reader.failure_counts() == {"bundle": 0, "damaged": 0, "waiting": 1}
        assert serves(reader, "t", 1)  # the old version keeps serving meanwhile
        time.sleep(4)
    finally:
        throwaway_cluster.resume()
    start = time.monotonic()
    wait_for(lambda: serves(reader, "t", 2), timeout=20)  # backoff: the next try comes, and succeeds
    print(f"healed {time.monotonic() - start:.2f} s after the server resumed")
    assert reader.waiting == {} and reader.restore_failures == {}
    follower.stop()


@pytest.mark.slow
def test_one_large_task_being_prepared_never_delays_another_tasks_change(backbone, postgres_url):
    writer = TaskManager(backbone, PostgresRegistry(postgres_url), BundleLimits())
    reader = TaskManager(backbone, PostgresRegistry(postgres_url), BundleLimits())
    follower = Propagator(reader, resync_interval_s=30, poll_s=0.05)
    follower.start()
    wait_for(lambda: follower.health.restored)
    templates = [f"a photo {i} of a {{}}." for i in range(10)]  # 20,000 prompts to encode
    large = encode_bundle(build_manifest("zeroshot", backbone, [f"class {i}" for i in range(2000)],
                                         options={"templates": templates}), {})
    small = encode_bundle(build_manifest("zeroshot", backbone, ["x", "y"], options={"templates": ["a {}."]}), {})
    for name in ("large", "small"):  # both warm on the reader, so it prepares their changes as they come
        writer.publish(name, encode_bundle(build_manifest("zeroshot", backbone, ["p", "q"],
                                                          options={"templates": ["{}"]}), {}))
        wait_for(lambda n=name: serves(reader, n, 1))
    writer.registry.store_and_activate("large", large, "zeroshot")
    time.sleep(0.2)  # the reader is preparing the large task now
    start = time.monotonic()
    writer.registry.store_and_activate("small", small, "zeroshot")
    wait_for(lambda: serves(reader, "small", 2), timeout=30)
    small_lag = time.monotonic() - start
    wait_for(lambda: serves(reader, "large", 2), timeout=120)
    large_lag = time.monotonic() - start + 0.2
    print(f"unrelated small task served {small_lag * 1000:.0f} ms after its commit; large task {large_lag:.1f} s")
    assert small_lag < large_lag / 2, (small_lag, large_lag)
    follower.stop()


def settle(follower: Propagator) -> bool:
    """A full resync, and every sync it started finished."""
    return follower.resync() and follower.syncer.wait(timeout=30)


@pytest.fixture(params=["directory", "postgres"])
def replicas_on(request, backbone, tmp_path):
    """Two task managers on one registry of each kind; the second follows by resync only (no listener)."""
    location = str(tmp_path / "registry") if request.param == "directory" else request.getfixturevalue("postgres_url")
    writer = TaskManager(backbone, open_registry(location), BundleLimits())
    reader = TaskManager(backbone, open_registry(location), BundleLimits())
    return writer, reader, Propagator(reader, resync_interval_s=30)


def test_pruned_deleted_and_recreated_versions_stop_answering_on_the_other_replica(replicas_on, backbone,
                                                                                    make_coop_bundle):
    writer, reader, follower = replicas_on
    old = [make_coop_bundle(backbone, [f"v{i} a", f"v{i} b"], seed=i) for i in range(3)]
    for data in old:
        writer.publish("t", data)
    assert settle(follower) and serves(reader, "t", 3)
    assert reader.pinned("t", "1").sha256 == bundle_sha256(old[0])  # prepared and cached on the reader

    assert writer.prune("t", keep=1) == [1, 2]
    assert settle(follower)
    with pytest.raises(UnknownTask):
        reader.pinned("t", "1")

    writer.delete("t")
    new = make_coop_bundle(backbone, ["new a", "new b"], seed=9)
    assert writer.publish("t", new).version == 4  # a number once issued is never issued again
    assert settle(follower) and serves(reader, "t", 4)
    assert reader.get("t").sha256 == bundle_sha256(new)
    for gone in ("1", "3"):
        with pytest.raises(UnknownTask):
            reader.pinned("t", gone)


def test_identical_uploads_racing_on_two_replicas_are_new_exactly_once(replicas_on, backbone, make_coop_bundle):
    writer, reader, _ = replicas_on
    data = make_coop_bundle(backbone, ["a", "b"])
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda manager: manager.upload("t", data), [writer, reader] * 3))
    assert sorted(created for _, created in answers) == [False] * 5 + [True]
    assert {task.version for task, _ in answers} == {1}


def test_seeding_happens_once_however_many_replicas_race_and_never_after_every_task_was_deleted(replicas_on):
    writer, reader, _ = replicas_on
    with ThreadPoolExecutor(4) as pool:
        seeded = list(pool.map(seed_demo_tasks, [writer, reader] * 2))
    assert seeded.count(True) == 1
    assert writer.registry.active_versions() == dict.fromkeys(DEMO_TASKS, 1)
    for name in DEMO_TASKS:
        writer.delete(name)
    assert seed_demo_tasks(reader) is False and writer.registry.active_versions() == {}


@pytest.mark.anyio
async def test_readiness_says_unreachable_within_the_timeout_when_the_server_hangs_and_writes_answer_503(
        backbone, throwaway_cluster, throwaway_url, make_coop_bundle, caplog):
    settings = settings_for(Path(), registry=throwaway_url, registry_timeout_s=0.5)
    async with running(backbone, settings) as client:
        assert (await client.post("/v1/tasks/t/versions", content=make_coop_bundle(backbone, ["a", "b"]),
                                  headers={**ADMIN, **OCTET})).status_code == 201
        assert (await client.get("/readyz")).status_code == 200
        throwaway_cluster.pause()
        try:
            start = time.monotonic()
            while (ready := await client.get("/readyz")).status_code == 200:
                assert time.monotonic() - start < 5, "readiness still says the hung registry is reachable"
                await anyio.sleep(0.05)
            print(f"readiness 503 {time.monotonic() - start:.2f} s after the server was paused")
            assert "registry unreachable" in ready.json()["reason"]
            assert str(throwaway_cluster.port) not in ready.text and "127.0.0.1" not in ready.text
            upload = await client.post("/v1/tasks/t/versions", content=make_coop_bundle(backbone, ["c", "d"]),
                                       headers={**ADMIN, **OCTET})
            assert upload.status_code == 503 and upload.headers["Retry-After"]
            assert upload.json()["code"] == "registry_unavailable"
            metrics = (await client.get("/metrics")).text
            assert "promptserve_registry_reachable 0.0" in metrics
        finally:
            throwaway_cluster.resume()
        start = time.monotonic()
        while (await client.get("/readyz")).status_code != 200:
            assert time.monotonic() - start < 10
            await anyio.sleep(0.05)
        print(f"readiness 200 {time.monotonic() - start:.2f} s after it resumed")
        assert "promptserve_registry_reachable 1.0" in (await client.get("/metrics")).text
    logged = [r.getMessage() for r in caplog.records if r.name == "service.serving.propagation"]
    assert any(m.startswith("registry unreachable:") for m in logged)  # once, when it was lost
    assert any(m.startswith("registry reachable again after") for m in logged)


@pytest.mark.anyio
async def test_a_row_lock_held_elsewhere_fails_that_tasks_upload_fast_and_others_proceed(
        backbone, throwaway_url, make_coop_bundle):
    settings = settings_for(Path(), registry=throwaway_url, registry_timeout_s=0.5)
    async with running(backbone, settings) as client:
        for task in ("t", "u"):
            assert (await client.post(f"/v1/tasks/{task}/versions", content=make_coop_bundle(backbone, ["a", "b"]),
                                      headers={**ADMIN, **OCTET})).status_code == 201
        with psycopg.connect(throwaway_url) as other:
            other.execute("SELECT 1 FROM tasks WHERE name = 't' FOR UPDATE")
            start = time.monotonic()
            locked = await client.post("/v1/tasks/t/versions", content=make_coop_bundle(backbone, ["c", "d"]),
                                       headers={**ADMIN, **OCTET})
            assert locked.status_code == 503 and "lock" in locked.json()["detail"]
            assert time.monotonic() - start < 3
            print(f"upload of the locked task: 503 in {time.monotonic() - start:.2f} s")
            start = time.monotonic()
            other_task = await client.post("/v1/tasks/u/versions", content=make_coop_bundle(backbone, ["c", "d"]),
                                           headers={**ADMIN, **OCTET})
            assert other_task.status_code == 201 and time.monotonic() - start < 3
            print(f"upload of another task meanwhile: 201 in {time.monotonic() - start:.2f} s")
            assert (await client.get("/readyz")).status_code == 200
