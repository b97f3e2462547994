"""A registry with damaged files restarts: each damaged task is reported in readiness, the rest serve,
and uploading a good version clears the report."""

import os
import shutil

import pytest

from service.registry.directory import DirectoryRegistry
from tests.helpers import classify, png, running, settings_for, upload

pytestmark = pytest.mark.anyio


def _garbage(task_dir):
    (task_dir / "00000001.bundle").write_bytes(b"\x07" * 300)


def _truncated(task_dir):
    path = task_dir / "00000001.bundle"
    path.write_bytes(path.read_bytes()[:-30])


def _bundle_is_a_directory(task_dir):
    (task_dir / "00000001.bundle").unlink()
    (task_dir / "00000001.bundle").mkdir()


def _active_is_a_directory(task_dir):
    (task_dir / "ACTIVE").unlink()
    (task_dir / "ACTIVE").mkdir()


def _task_is_a_file(task_dir):
    shutil.rmtree(task_dir)
    task_dir.write_bytes(b"not a directory")


def _dangling_bundle_link(task_dir):
    (task_dir / "00000001.bundle").unlink()
    os.symlink(task_dir / "nowhere", task_dir / "00000001.bundle")


DAMAGE = {
    "empty-active": lambda d: (d / "ACTIVE").write_bytes(b""),
    "garbage-active": lambda d: (d / "ACTIVE").write_bytes(b"\xff\xfe seven\n"),
    "huge-active": lambda d: (d / "ACTIVE").write_bytes(b"1" * 100_000),
    "active-names-missing-version": lambda d: (d / "ACTIVE").write_bytes(b"7\n"),
    "active-is-a-directory": _active_is_a_directory,
    "bundle-is-a-directory": _bundle_is_a_directory,
    "bundle-is-a-dangling-link": _dangling_bundle_link,
    "garbage-bundle": _garbage,
    "truncated-bundle": _truncated,
    "empty-bundle": lambda d: (d / "00000001.bundle").write_bytes(b""),
}


async def test_each_kind_of_damaged_file_is_reported_and_the_rest_serve(backbone, tmp_path, make_coop_bundle):
    root = tmp_path / "registry"
    registry = DirectoryRegistry(root)
    for task in ["good", *DAMAGE]:
        registry.activate(task, registry.store(task, make_coop_bundle(backbone, [f"{task} a", f"{task} b"])))
    for task, damage in DAMAGE.items():
        damage(root / task)
    (root / "stray-file.txt").write_bytes(b"left by an operator")
    registry.activate("now-a-file", registry.store("now-a-file", make_coop_bundle(backbone, ["x", "y"])))
    _task_is_a_file(root / "now-a-file")
    (root / ".half-written.tmp").write_bytes(b"\0" * 10)
    (root / "good" / "notes.txt").write_bytes(b"stray")
    (root / "good" / "00000009.bundle.tmp").write_bytes(b"stray")

    async with running(backbone, settings_for(tmp_path)) as client:
        ready = (await client.get("/readyz")).json()
        assert set(ready["failed_tasks"]) == set(DAMAGE), ready["failed_tasks"]
        assert ready["tasks"] == 1
        answer = await classify(client, "good", [png()])
        assert answer.status_code == 200 and answer.json()["results"][0]["predictions"][0]["label"].startswith("good")
        for task in DAMAGE:
            missing = await client.get(f"/v1/tasks/{task}")
            assert missing.status_code == 404 and missing.json()["code"] == "unknown_task"

        for task in [*DAMAGE, "now-a-file"]:  # a good upload repairs every kind of damage
            response = await upload(client, task, make_coop_bundle(backbone, [f"{task} new", "other"]))
            assert response.status_code == 201, (task, response.text)
            assert (await classify(client, task, [png()])).status_code == 200
        assert (await client.get("/readyz")).json()["failed_tasks"] == {}

    async with running(backbone, settings_for(tmp_path)) as client:  # and the repair survives a restart
        ready = (await client.get("/readyz")).json()
        assert ready["failed_tasks"] == {} and ready["tasks"] == 2 + len(DAMAGE)


async def test_deleting_a_damaged_task_clears_its_report(backbone, tmp_path, make_coop_bundle):
    root = tmp_path / "registry"
    registry = DirectoryRegistry(root)
    registry.activate("bad", registry.store("bad", make_coop_bundle(backbone, ["a", "b"])))
    (root / "bad" / "ACTIVE").write_bytes(b"garbage")
    async with running(backbone, settings_for(tmp_path)) as client:
        assert "bad" in (await client.get("/readyz")).json()["failed_tasks"]
        deleted = await client.delete("/v1/tasks/bad", headers={"Authorization": "Bearer test-admin-token"})
        assert deleted.status_code == 204
        assert (await client.get("/readyz")).json()["failed_tasks"] == {}


def test_new_directories_are_fsynced_into_their_parent(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    registry = DirectoryRegistry(tmp_path / "a" / "registry")
    registry.store("birds", b"x")
    assert str(tmp_path) in synced and str(tmp_path / "a") in synced  # parents of the new root dirs
    assert str(tmp_path / "a" / "registry") in synced  # parent of the new task dir


async def test_a_task_that_failed_to_restore_makes_the_replica_unready_unless_asked_not_to(
        backbone, tmp_path, make_coop_bundle):
    root = tmp_path / "registry"
    registry = DirectoryRegistry(root)
    registry.activate("good", registry.store("good", make_coop_bundle(backbone, ["a", "b"])))
    registry.activate("bad", registry.store("bad", make_coop_bundle(backbone, ["a", "b"])))
    (root / "bad" / "ACTIVE").write_bytes(b"garbage")
    async with running(backbone, settings_for(tmp_path)) as client:
        strict = await client.get("/readyz")
        assert strict.status_code == 503 and "bad" in strict.json()["reason"], strict.text
        assert (await client.get("/v2/health/ready")).status_code == 503
        lenient = await client.get("/readyz", params={"require_tasks": "false"})  # what the probes ask
        assert lenient.status_code == 200 and "bad" in lenient.json()["failed_tasks"]
        assert (await classify(client, "good", [png()])).status_code == 200
        await client.delete("/v1/tasks/bad", headers={"Authorization": "Bearer test-admin-token"})
        assert (await client.get("/readyz")).status_code == 200
        assert (await client.get("/v2/health/ready")).json() == {"ready": True}
