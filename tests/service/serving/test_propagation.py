"""Replicas in one process: task managers on one PostgreSQL registry, each followed by its own Propagator."""

import time

import pytest

from service.registry.postgres import PostgresRegistry
from service.serving.activation import BundleLimits
from service.serving.propagation import Propagator
from service.serving.tasks import TaskManager
from tests.helpers import ADMIN, OCTET, running, settings_for

UNREACHABLE = "postgresql://postgres@127.0.0.1:1/nowhere"


def wait_for(condition, timeout: float = 5.0) -> None:
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
    wait_for(lambda: "t" in {t.name for t in reader.all()})
    writer.publish("t", make_coop_bundle(backbone, ["a", "b", "c", "d"]))
    wait_for(lambda: "t" in reader.restore_failures)
    assert reader.get("t").version == 1 and "version 2" in reader.restore_failures["t"]
    assert "classnames" in reader.restore_failures["t"]
    assert follower.health.problem() is None  # the registry is fine; the failure is reported per task
    writer.activate("t", 1)
    wait_for(lambda: "t" not in reader.restore_failures)
    assert reader.get("t").version == 1


def test_a_deleted_task_disappears_from_the_other_replica(replica_pair, make_coop_bundle, backbone):
    writer, reader, _ = replica_pair
    writer.publish("t", make_coop_bundle(backbone, ["a", "b"]))
    wait_for(lambda: "t" in {t.name for t in reader.all()})
    writer.delete("t")
    wait_for(lambda: reader.all() == [])


def test_an_unreachable_registry_is_reported_and_nothing_is_restored(backbone):
    propagator = Propagator(TaskManager(backbone, PostgresRegistry(UNREACHABLE, timeout_s=1), 100), 10)
    assert propagator.resync() is False
    assert not propagator.health.restored and "registry unreachable" in propagator.health.problem()


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_readiness_is_503_and_writes_refused_while_the_registry_is_unreachable(backbone, tmp_path,
                                                                                       make_coop_bundle):
    async with running(backbone, settings_for(tmp_path, registry=UNREACHABLE)) as client:
        ready = await client.get("/readyz")
        assert ready.status_code == 503 and "registry unreachable" in ready.json()["reason"]
        assert ready.json()["registry"]["restored"] is False
        assert (await client.get("/readyz", params={"require_registry": "false"})).status_code == 503
        upload = await client.post("/v1/tasks/t/versions", content=make_coop_bundle(backbone, ["a", "b"]),
                                   headers={**ADMIN, **OCTET})
        assert upload.status_code == 503 and upload.json()["code"] == "registry_unavailable"
        assert (await client.get("/healthz")).status_code == 200
