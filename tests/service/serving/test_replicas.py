"""Two real service processes sharing one PostgreSQL registry (a database of their own per test; the outage
test stops a throwaway cluster of its own, never the shared one)."""

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from bench.process import ServiceProcess
from service.registry.postgres import PostgresRegistry
from tests.helpers import SAMPLES, TOKEN, classify_sample, coop_bundle_for

pytestmark = pytest.mark.slow
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
UPLOAD = ADMIN | {"Content-Type": "application/octet-stream"}


def start_replicas(url: str, count: int = 2, **settings: str) -> list[ServiceProcess]:
    replicas = [ServiceProcess(url, admin_token=TOKEN, demo="false", resync_interval_s="2", **settings)
                for _ in range(count)]
    try:
        with ThreadPoolExecutor(count) as pool:
            list(pool.map(ServiceProcess.wait_ready, replicas))
    except BaseException:
        stop(replicas)
        raise
    return replicas


def stop(replicas: list[ServiceProcess]) -> None:
    for replica in replicas:
        replica.stop()


def active_version(replica: ServiceProcess, task: str) -> int | None:
    answer = httpx.get(f"{replica.url}/v1/tasks/{task}", timeout=5)
    return answer.json()["version"] if answer.status_code == 200 else None


def seconds_until(condition: Callable[[], bool], timeout: float = 10.0) -> float:
    """How long until `condition` holds (polled every 10 ms); fails after `timeout`."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not reached within {timeout} s")
        time.sleep(0.01)
    return time.monotonic() - start


def backbone_of(replica: ServiceProcess) -> dict:
    return httpx.get(f"{replica.url}/readyz", timeout=5).json()["backbone"]


def upload(replica: ServiceProcess, backbone: dict, classes: list[str], seed: int, task: str = "things"
           ) -> httpx.Response:
    data = coop_bundle_for(backbone, classes, seed)
    return httpx.post(f"{replica.url}/v1/tasks/{task}/versions", content=data, headers=UPLOAD, timeout=60)


def concurrent_uploads_agree(replicas: list[ServiceProcess], backbone: dict) -> None:
    """Four uploads to each replica at once for one task: distinct versions, increasing per replica, none lost,
    and both replicas end on the newest."""
    def upload_series(replica: ServiceProcess, name: str) -> list[int]:
        answers = [upload(replica, backbone, [f"{name}{i} x", f"{name}{i} y"], i, task="race") for i in range(4)]
        assert all(r.status_code == 201 for r in answers), [r.text for r in answers]
        return [r.json()["version"] for r in answers]

    with ThreadPoolExecutor(2) as pool:
        from_a, from_b = pool.map(upload_series, replicas, ["a", "b"])
    assert from_a == sorted(from_a) and from_b == sorted(from_b)
    assert sorted(from_a + from_b) == list(range(1, 9))
    stored = httpx.get(f"{replicas[0].url}/v1/tasks/race/versions").json()["versions"]
    assert [v["version"] for v in stored] == list(range(1, 9)) and len({v["sha256"] for v in stored}) == 8
    seconds_until(lambda: {active_version(r, "race") for r in replicas} == {8}, timeout=5)


def test_changes_on_one_replica_reach_the_other_within_a_second_concurrent_uploads_agree_and_a_restart_restores(
        postgres_url):
    a, b = replicas = start_replicas(postgres_url)
    try:
        backbone = backbone_of(a)
        lags = {}
        for version in (1, 2):
            assert upload(a, backbone, [f"v{version} {c}" for c in "xyz"], version).status_code == 201
            lags[f"upload v{version}"] = seconds_until(lambda v=version: active_version(b, "things") == v)
        assert {p["label"] for r in classify_sample(b.url, "things").json()["results"] for p in r["predictions"]} \
            <= {"v2 x", "v2 y", "v2 z"}

        assert httpx.post(f"{a.url}/v1/tasks/things/versions/1/activate", headers=ADMIN).status_code == 200
        lags["rollback"] = seconds_until(lambda: active_version(b, "things") == 1)
        alias = httpx.put(f"{b.url}/v1/tasks/things/aliases/prod", json={"version": 2}, headers=ADMIN)
        assert alias.status_code == 200
        lags["alias"] = seconds_until(lambda: httpx.get(f"{a.url}/v1/tasks/things/aliases").json()["aliases"]
                                      == {"prod": 2})
        assert classify_sample(a.url, "things").json()["version"] == 1
        sample = sorted(SAMPLES.glob("*.png"))[0]
        pinned = httpx.post(f"{a.url}/v1/tasks/things/classify", params={"version": "prod"},
                            files=[("images", (sample.name, sample.read_bytes(), "image/png"))], timeout=60)
        assert pinned.json()["version"] == 2 and active_version(a, "things") == 1
        print("propagation lag A→B:", {k: f"{v * 1000:.0f} ms" for k, v in lags.items()})
        assert max(lags.values()) < 1.0, lags
        before = classify_sample(b.url, "things").json()
        concurrent_uploads_agree(replicas, backbone)
    finally:
        stop(replicas)

    restarted = start_replicas(postgres_url, count=1)[0]
    try:
        assert active_version(restarted, "things") == 1
        assert httpx.get(f"{restarted.url}/v1/tasks/things/aliases").json()["aliases"] == {"prod": 2}
        assert classify_sample(restarted.url, "things").json() == before
        assert active_version(restarted, "race") == 8
        assert httpx.delete(f"{restarted.url}/v1/tasks/things", headers=ADMIN).status_code == 204
    finally:
        restarted.stop()


def test_replicas_keep_serving_through_a_postgres_outage_and_resync_after(throwaway_cluster, throwaway_url):
    postgres_url = throwaway_url
    a, b = replicas = start_replicas(postgres_url)
    try:
        backbone = backbone_of(a)
        assert upload(a, backbone, ["p", "q"], 1).status_code == 201
        seconds_until(lambda: active_version(b, "things") == 1)
        try:
            throwaway_cluster.stop()
            for replica in replicas:
                seconds_until(lambda r=replica: httpx.get(f"{r.url}/readyz").status_code == 503)
                ready = httpx.get(f"{replica.url}/readyz").json()
                assert not ready["ready"] and "registry unreachable" in ready["reason"], ready
                assert httpx.get(f"{replica.url}/readyz", params={"require_registry": "false"}).status_code == 200
                assert classify_sample(replica.url, "things").json()["version"] == 1
            refused = upload(a, backbone, ["p2", "q2"], 2)
            assert refused.status_code == 503 and refused.json()["code"] == "registry_unavailable"
        finally:
            throwaway_cluster.start()
        for replica in replicas:
            seconds_until(lambda r=replica: httpx.get(f"{r.url}/readyz").status_code == 200)
        # A change committed without a notification (as if it were missed) reaches both by periodic resync.
        registry = PostgresRegistry(postgres_url)
        registry.store("things", coop_bundle_for(backbone, ["r", "s"], 3), "coop")
        with registry._connection() as cur:
            cur.execute("UPDATE active SET version = 2 WHERE task = 'things'")
        for replica in replicas:
            seconds_until(lambda r=replica: active_version(r, "things") == 2, timeout=8)
    finally:
        stop(replicas)
