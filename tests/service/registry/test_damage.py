"""A registry with damaged files restarts: each damaged task is reported in readiness, the rest serve,
and uploading a good version clears the report."""

import json
import os
import shutil

import anyio
import pytest

from service.registry.base import bundle_sha256
from service.registry.directory import DirectoryRegistry
from tests.helpers import ADMIN, classify, png, running, settings_for, upload

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


# Side files damaged while the task's active pointer is good: the task keeps serving, the damage is reported, and
# no route answers 500 because of it.
ALIASES_DAMAGE = {
    "garbage": b"\xff\x00 not json",
    "a JSON list": b"[1, 2]",
    "a string for a number": b'{"prod": "1"}',
    "a boolean for a number": b'{"prod": true}',
    "a float for a number": b'{"prod": 1.0}',
    "a bad alias name": b'{"Not An Alias": 1}',
    "deep nesting": b"[" * 100_000 + b"]" * 100_000,
    "more than the registry writes": b'{"prod": 1' + b" " * (2 * 1024 * 1024) + b"}",
}
INFO_DAMAGE = {
    "garbage": b"\x00\x01",
    "a JSON list": b"[]",
    "size as a string": None,  # filled in from the real record below
    "created as a string": None,
    "sha256 as a number": None,
    "another version's record": None,
}


def _info_damage(name: str, record: dict) -> bytes:
    changes = {"size as a string": {"size": "abc"}, "created as a string": {"created": "yesterday"},
               "sha256 as a number": {"sha256": 12}, "another version's record": {"version": 9}}
    return INFO_DAMAGE[name] or json.dumps(record | changes[name]).encode()


async def _two_versions(registry, backbone, make_coop_bundle, task):
    first = registry.store(task, make_coop_bundle(backbone, [f"{task} a", f"{task} b"]), "coop")
    registry.activate(task, registry.store(task, make_coop_bundle(backbone, [f"{task} c", f"{task} d"]), "coop"))
    registry.set_alias(task, "prod", first)


async def _no_500_anywhere(client, task):
    """Every read and write route for the task answers, none with a 5xx."""
    answers = {
        "versions": await client.get(f"/v1/tasks/{task}/versions"),
        "aliases": await client.get(f"/v1/tasks/{task}/aliases"),
        "activate by alias": await client.post(f"/v1/tasks/{task}/versions/prod/activate", headers=ADMIN),
        "delete alias": await client.delete(f"/v1/tasks/{task}/aliases/prod", headers=ADMIN),
        "pin by number": await client.post(f"/v1/tasks/{task}/classify?version=1",
                                           files=[("images", ("a.png", png(), "image/png"))]),
    }
    assert all(a.status_code < 500 for a in answers.values()), {k: a.text for k, a in answers.items()}
    return answers


@pytest.mark.parametrize("damage", list(ALIASES_DAMAGE))
async def test_damaged_aliases_leave_the_task_serving_and_are_reported(backbone, tmp_path, make_coop_bundle, damage):
    root = tmp_path / "registry"
    registry = DirectoryRegistry(root)
    for task in ("good", "hurt"):
        await _two_versions(registry, backbone, make_coop_bundle, task)
    (root / "hurt" / "ALIASES").write_bytes(ALIASES_DAMAGE[damage])

    async with running(backbone, settings_for(tmp_path)) as client:  # the damage no longer stops the start
        ready = (await client.get("/readyz", params={"require_tasks": "false"})).json()
        assert list(ready["failed_tasks"]) == ["hurt"] and "ALIASES" in ready["failed_tasks"]["hurt"]
        assert len(ready["failed_tasks"]["hurt"]) < 500
        for task in ("good", "hurt"):
            answer = await classify(client, task, [png()])
            assert answer.status_code == 200 and answer.json()["version"] == 2
        answers = await _no_500_anywhere(client, "hurt")
        assert answers["versions"].status_code == 200 and answers["aliases"].json()["aliases"] == {}
        assert answers["activate by alias"].status_code == 404 and answers["delete alias"].status_code == 404
        assert answers["pin by number"].json()["version"] == 1

        repaired = await client.put("/v1/tasks/hurt/aliases/canary", json={"version": 1}, headers=ADMIN)
        assert repaired.status_code == 200 and repaired.json()["aliases"] == {"canary": 1}
        assert list(root.joinpath("hurt").glob(".damaged-ALIASES-*"))  # kept for a person to look at
        await anyio.to_thread.run_sync(_state(client).propagation.resync)
        assert (await client.get("/readyz")).json()["failed_tasks"] == {}
    assert registry.aliases("good") == {"prod": 1}


@pytest.mark.parametrize("damage", list(INFO_DAMAGE))
async def test_damaged_version_metadata_is_reported_and_the_versions_list_answers(
        backbone, tmp_path, make_coop_bundle, damage):
    root = tmp_path / "registry"
    registry = DirectoryRegistry(root)
    await _two_versions(registry, backbone, make_coop_bundle, "hurt")
    info = root / "hurt" / "00000001.json"
    info.write_bytes(_info_damage(damage, json.loads(info.read_bytes())))

    async with running(backbone, settings_for(tmp_path)) as client:
        ready = (await client.get("/readyz")).json()
        assert "00000001.json" in ready["failed_tasks"]["hurt"], ready
        listed = await client.get("/v1/tasks/hurt/versions")
        assert listed.status_code == 200, listed.text
        first = listed.json()["versions"][0]
        assert first["version"] == 1 and first["sha256"] == bundle_sha256(registry.load("hurt", 1))
        await _no_500_anywhere(client, "hurt")
        # uploading the same bytes again rewrites the record
        again = await upload(client, "hurt", registry.load("hurt", 1))
        assert again.status_code == 200 and again.json()["version"] == 1
        await anyio.to_thread.run_sync(_state(client).propagation.resync)
        assert (await client.get("/readyz")).json()["failed_tasks"] == {}
        assert (await client.get("/v1/tasks/hurt/versions")).json()["versions"][0]["method"] == "coop"


async def test_a_damaged_bundle_of_an_inactive_version_is_reported_and_refused_as_422(
        backbone, tmp_path, make_coop_bundle):
    root = tmp_path / "registry"
    registry = DirectoryRegistry(root)
    await _two_versions(registry, backbone, make_coop_bundle, "hurt")
    _bundle_is_a_directory(root / "hurt")
    async with running(backbone, settings_for(tmp_path)) as client:
        assert "00000001.bundle" in (await client.get("/readyz")).json()["failed_tasks"]["hurt"]
        answers = await _no_500_anywhere(client, "hurt")
        assert answers["versions"].status_code == 200
        assert answers["pin by number"].status_code == 422
        assert (await classify(client, "hurt", [png()])).json()["version"] == 2


def test_temp_files_a_crash_left_are_removed_at_start(tmp_path):
    registry = DirectoryRegistry(tmp_path)
    registry.activate("birds", registry.store("birds", b"x"))
    stale = [tmp_path / "birds" / ".ACTIVE.k2j3h4.tmp", tmp_path / "birds" / ".00000002.bundle.x8.tmp",
             tmp_path / ".birds.tmp"]
    for path in stale:
        path.write_bytes(b"half written")
    kept = tmp_path / "birds" / "notes.tmp"
    kept.write_bytes(b"not ours")
    DirectoryRegistry(tmp_path)
    assert [p for p in stale if p.exists()] == [] and kept.exists()
    assert registry.active_versions() == {"birds": 1}


def _state(client):
    return client._transport.app.state.promptserve
