"""Version management over HTTP: list, activate (rollback), pin, aliases, dedupe and retention."""

import threading

import anyio
import httpx
import pytest

from tests.helpers import ADMIN, OCTET, classify, png, running, settings_for, upload

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["directory", "postgres"])
def registry_location(request, tmp_path) -> str:
    return str(tmp_path / "registry") if request.param == "directory" else request.getfixturevalue("postgres_url")


@pytest.fixture
async def client(backbone, tmp_path, registry_location):
    async with running(backbone, settings_for(tmp_path, registry=registry_location, retain_versions=0)) as client:
        yield client


def labels(answer: httpx.Response) -> set[str]:
    assert answer.status_code == 200, answer.text
    return {p["label"] for r in answer.json()["results"] for p in r["predictions"]}


async def three_versions(client, backbone, make_coop_bundle) -> list[bytes]:
    bundles = [make_coop_bundle(backbone, [f"v{v} a", f"v{v} b"], seed=v) for v in (1, 2, 3)]
    for number, data in enumerate(bundles, start=1):
        assert (await upload(client, "t", data)).json()["version"] == number
    return bundles


async def test_versions_list_numbers_hashes_sizes_methods_and_the_active_one(client, backbone, make_coop_bundle):
    bundles = await three_versions(client, backbone, make_coop_bundle)
    listed = (await client.get("/v1/tasks/t/versions")).json()
    assert listed["active"] == 3 and listed["aliases"] == {}
    assert [(v["version"], v["size"], v["method"], v["active"]) for v in listed["versions"]] == [
        (1, len(bundles[0]), "coop", False), (2, len(bundles[1]), "coop", False), (3, len(bundles[2]), "coop", True)]
    assert len({v["sha256"] for v in listed["versions"]}) == 3
    assert (await client.get("/v1/tasks/nothing/versions")).status_code == 404


async def test_activate_rolls_back_and_forward(client, backbone, make_coop_bundle):
    await three_versions(client, backbone, make_coop_bundle)
    rolled = await client.post("/v1/tasks/t/versions/1/activate", headers=ADMIN)
    assert rolled.status_code == 200 and rolled.json()["version"] == 1
    assert labels(await classify(client, "t", [png()])) == {"v1 a", "v1 b"}
    assert (await client.get("/v1/tasks/t")).json()["version"] == 1
    assert (await client.post("/v1/tasks/t/versions/3/activate", headers=ADMIN)).json()["version"] == 3


@pytest.mark.parametrize(("path", "headers", "status"), [
    ("/v1/tasks/t/versions/9/activate", ADMIN, 404),
    ("/v1/tasks/t/versions/nope/activate", ADMIN, 404),
    ("/v1/tasks/t/versions/Bad!/activate", ADMIN, 422),
    ("/v1/tasks/t/versions/1/activate", {}, 401),
])
async def test_activate_refuses_bad_requests_and_changes_nothing(client, backbone, make_coop_bundle, path, headers,
                                                                 status):
    await three_versions(client, backbone, make_coop_bundle)
    answer = await client.post(path, headers=headers)
    assert answer.status_code == status and answer.json()["detail"]
    assert (await client.get("/v1/tasks/t")).json()["version"] == 3


async def test_a_pinned_version_answers_without_changing_the_active_one(client, backbone, make_coop_bundle):
    await three_versions(client, backbone, make_coop_bundle)
    files = [("images", ("a.png", png(), "image/png"))]
    pinned = await client.post("/v1/tasks/t/classify", params={"version": "2"}, files=files)
    assert pinned.json()["version"] == 2 and labels(pinned) == {"v2 a", "v2 b"}
    assert (await client.get("/v1/tasks/t")).json()["version"] == 3
    for ref, status in (("9", 404), ("nope", 404), ("x y", 422), ("-1", 422)):
        answer = await client.post("/v1/tasks/t/classify", params={"version": ref}, files=files)
        assert answer.status_code == status, (ref, answer.text)


async def test_aliases_move_resolve_for_pin_and_activate_and_are_validated(client, backbone, make_coop_bundle):
    await three_versions(client, backbone, make_coop_bundle)
    assert (await client.put("/v1/tasks/t/aliases/prod", json={"version": 1}, headers=ADMIN)).status_code == 200
    moved = await client.put("/v1/tasks/t/aliases/canary", json={"version": "prod"}, headers=ADMIN)
    assert moved.json()["aliases"] == {"canary": 1, "prod": 1}
    await client.put("/v1/tasks/t/aliases/canary", json={"version": 2}, headers=ADMIN)
    answer = await client.post("/v1/tasks/t/classify", params={"version": "canary"},
                               files=[("images", ("a.png", png(), "image/png"))])
    assert answer.json()["version"] == 2
    assert (await client.post("/v1/tasks/t/versions/prod/activate", headers=ADMIN)).json()["version"] == 1
    listed = (await client.get("/v1/tasks/t/versions")).json()
    assert [v["aliases"] for v in listed["versions"]] == [["prod"], ["canary"], []]
    assert (await client.delete("/v1/tasks/t/aliases/canary", headers=ADMIN)).json()["aliases"] == {"prod": 1}
    assert (await client.get("/v1/tasks/t/aliases")).json()["aliases"] == {"prod": 1}

    for alias, body, status in (("Prod", {"version": 1}, 422), ("9lives", {"version": 1}, 422),
                                ("beta", {"version": 7}, 404), ("beta", {"version": "ghost"}, 404),
                                ("beta", {"version": 0}, 422), ("beta", {"wrong": 1}, 422)):
        refused = await client.put(f"/v1/tasks/t/aliases/{alias}", json=body, headers=ADMIN)
        assert refused.status_code == status, (alias, body, refused.text)
    assert (await client.delete("/v1/tasks/t/aliases/canary", headers=ADMIN)).status_code == 404
    assert (await client.put("/v1/tasks/t/aliases/beta", json={"version": 1})).status_code == 401
    assert (await client.get("/v1/tasks/t/aliases")).json()["aliases"] == {"prod": 1}


async def test_an_identical_upload_returns_the_stored_version(client, backbone, make_coop_bundle):
    bundles = await three_versions(client, backbone, make_coop_bundle)
    again = await upload(client, "t", bundles[0])
    assert again.status_code == 200 and again.json()["version"] == 1  # and it is the active one again
    assert (await client.get("/v1/tasks/t")).json()["version"] == 1
    assert len((await client.get("/v1/tasks/t/versions")).json()["versions"]) == 3


async def test_retention_prunes_old_inactive_versions_but_not_alias_targets(backbone, tmp_path, registry_location,
                                                                            make_coop_bundle):
    settings = settings_for(tmp_path, registry=registry_location, retain_versions=2)
    async with running(backbone, settings) as client:
        await upload(client, "t", make_coop_bundle(backbone, ["a", "b"], seed=1))
        await client.put("/v1/tasks/t/aliases/prod", json={"version": 1}, headers=ADMIN)
        for seed in range(2, 6):
            await upload(client, "t", make_coop_bundle(backbone, ["a", "b"], seed=seed))
        kept = [v["version"] for v in (await client.get("/v1/tasks/t/versions")).json()["versions"]]
        assert kept == [1, 4, 5]
        assert (await client.post("/v1/tasks/t/versions/2/activate", headers=ADMIN)).status_code == 404


async def test_upload_body_must_be_a_bundle(client):
    answer = await client.post("/v1/tasks/t/versions", content=b"not a bundle", headers={**ADMIN, **OCTET})
    assert answer.status_code == 422
    assert (await client.get("/v1/tasks/t/versions")).status_code == 404


async def test_pins_of_unprepared_versions_are_budgeted_per_client_and_per_task(backbone, tmp_path, make_coop_bundle):
    settings = settings_for(tmp_path, prepared_versions=1, pin_preparations_per_minute=2)
    async with running(backbone, settings) as client:
        for v in (1, 2, 3, 4):
            assert (await upload(client, "t", make_coop_bundle(backbone, [f"v{v} a", f"v{v} b"], seed=v))).is_success

        async def pin(version, http=client):
            return await http.post(f"/v1/tasks/t/classify?version={version}", files=[("images", ("a.png", png()))])

        assert labels(await pin(1)) == {"v1 a", "v1 b"}  # prepared on demand: one of this client's two a minute
        assert labels(await pin(2)) == {"v2 a", "v2 b"}
        refused = await pin(3)
        assert refused.status_code == 429 and refused.json()["code"] == "too_many_pins", refused.text
        assert 1 <= int(refused.headers["retry-after"]) <= 30 and "a minute" in refused.json()["detail"]
        assert labels(await pin(2)) == {"v2 a", "v2 b"}  # prepared versions and the active one cost nothing
        assert labels(await pin(4)) == {"v4 a", "v4 b"}

        other = httpx.ASGITransport(app=client._transport.app, client=("10.0.0.2", 4321))
        async with httpx.AsyncClient(transport=other, base_url="http://test") as elsewhere:
            refused = await pin(1, elsewhere)  # a fresh client, but the task's own budget is spent
            assert refused.status_code == 429 and "task t" in refused.json()["detail"], refused.text
        assert (await upload(client, "t", make_coop_bundle(backbone, ["v5 a", "v5 b"], seed=5))).is_success


async def test_an_upload_never_waits_behind_a_pin_being_prepared(backbone, tmp_path, make_coop_bundle):
    async with running(backbone, settings_for(tmp_path, prepared_versions=0)) as client:
        for v in (1, 2):
            assert (await upload(client, "t", make_coop_bundle(backbone, [f"v{v} a", f"v{v} b"], seed=v))).is_success
        tasks, release, preparing = client._transport.app.state.promptserve.tasks, threading.Event(), threading.Event()
        real_prepare = tasks.prepare

        def slow_for_the_pin(name, version, data, artefact=None):
            if version == 1:  # the pinned version; an upload prepares its candidate as version 0
                preparing.set()
                release.wait(10)
            return real_prepare(name, version, data, artefact)

        tasks.prepare = slow_for_the_pin
        async with anyio.create_task_group() as group:
            pinned: list[httpx.Response] = []

            async def pin():
                pinned.append(await client.post("/v1/tasks/t/classify?version=1", files=[("images", ("a.png", png()))]))

            group.start_soon(pin)
            await anyio.to_thread.run_sync(preparing.wait, 10)
            with anyio.fail_after(10):  # the pin is still being prepared
                assert (await upload(client, "t", make_coop_bundle(backbone, ["v3 a", "v3 b"], seed=3))).is_success
            assert not pinned
            release.set()
        assert labels(pinned[0]) == {"v1 a", "v1 b"}
