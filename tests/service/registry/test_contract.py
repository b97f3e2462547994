"""One contract for every Registry: the directory registry and the PostgreSQL one must behave alike."""

from concurrent.futures import ThreadPoolExecutor

import pytest

from service.registry import open_registry
from service.registry.base import Registry, UnknownTask, bundle_sha256
from service.registry.directory import DirectoryRegistry


@pytest.fixture(params=["directory", "postgres"])
def location(request, tmp_path) -> str:
    return str(tmp_path / "registry") if request.param == "directory" else request.getfixturevalue("postgres_url")


@pytest.fixture
def registry(location) -> Registry:
    return open_registry(location)


def test_the_setting_selects_the_registry_kind(location):
    kind = type(open_registry(location)).__name__
    assert kind == ("PostgresRegistry" if location.startswith("postgresql://") else "DirectoryRegistry")


def test_versions_increase_and_only_activated_ones_are_active(registry):
    assert (registry.store("birds", b"one"), registry.store("birds", b"two")) == (1, 2)
    assert registry.active_versions() == {}
    registry.activate("birds", 1)
    assert registry.active_versions() == {"birds": 1}
    assert registry.load("birds", 2) == b"two"


def test_identical_bytes_return_the_stored_version(registry):
    assert registry.store("birds", b"one", "coop") == 1
    assert registry.store("birds", b"one", "coop") == 1
    assert registry.store("cars", b"one") == 1  # dedupe is per task
    assert [v.version for v in registry.versions("birds")] == [1]
    assert registry.find_version("birds", bundle_sha256(b"one")) == 1
    assert registry.find_version("birds", bundle_sha256(b"other")) is None


def test_versions_list_carries_sha256_size_created_and_method(registry):
    registry.store("birds", b"one", "coop")
    registry.store("birds", b"second", "qprompt")
    listed = registry.versions("birds")
    assert [(v.version, v.sha256, v.size, v.method) for v in listed] == [
        (1, bundle_sha256(b"one"), 3, "coop"), (2, bundle_sha256(b"second"), 6, "qprompt")]
    assert 0 < listed[0].created <= listed[1].created
    assert registry.versions("nobody") == []


def test_a_new_instance_sees_every_task_active_version_and_alias(location):
    first = open_registry(location)
    for task in ("birds", "cars"):
        first.activate(task, first.store(task, task.encode()))
    first.activate("cars", first.store("cars", b"cars v2"))
    first.set_alias("cars", "prod", 1)
    reopened = open_registry(location)
    assert reopened.active_versions() == {"birds": 1, "cars": 2}
    assert reopened.load("cars", 2) == b"cars v2"
    assert reopened.snapshot()["cars"].aliases == {"prod": 1}
    assert reopened.task_state("birds").active == 1 and reopened.task_state("nobody") is None


def test_aliases_move_resolve_and_refuse_missing_versions(registry):
    registry.store("birds", b"one")
    registry.store("birds", b"two")
    registry.set_alias("birds", "prod", 1)
    registry.set_alias("birds", "canary", 2)
    registry.set_alias("birds", "prod", 2)
    assert registry.aliases("birds") == {"canary": 2, "prod": 2}
    assert registry.resolve("birds", "prod") == 2 and registry.resolve("birds", "1") == 1
    with pytest.raises(UnknownTask):
        registry.set_alias("birds", "prod", 9)
    with pytest.raises(UnknownTask):
        registry.resolve("birds", "stable")
    with pytest.raises(UnknownTask):
        registry.resolve("birds", "7")
    registry.delete_alias("birds", "canary")
    assert registry.aliases("birds") == {"prod": 2}
    with pytest.raises(UnknownTask):
        registry.delete_alias("birds", "canary")


@pytest.mark.parametrize("alias", ["Prod", "1x", "", "a" * 33, "a b", "../x"])
def test_bad_alias_names_are_refused(registry, alias):
    registry.store("birds", b"one")
    with pytest.raises(ValueError, match="alias"):
        registry.set_alias("birds", alias, 1)


def test_prune_keeps_the_newest_the_active_version_and_alias_targets(registry):
    for i in range(1, 7):
        registry.store("birds", f"v{i}".encode())
    registry.activate("birds", 2)
    registry.set_alias("birds", "prod", 1)
    assert registry.prune("birds", keep=2) == [3, 4]
    assert [v.version for v in registry.versions("birds")] == [1, 2, 5, 6]
    assert registry.prune("birds", keep=2) == []
    assert registry.store("birds", b"v7") == 7  # numbers are never reused


def test_store_and_activate_makes_the_new_version_active(registry):
    registry.activate("birds", registry.store("birds", b"one"))
    assert registry.store_and_activate("birds", b"two", "coop") == (2, True)
    assert registry.store_and_activate("birds", b"one", "coop") == (1, False)
    assert registry.active_versions() == {"birds": 1}


def test_concurrent_stores_get_distinct_increasing_versions(location):
    def store(i: int) -> int:
        return open_registry(location).store_and_activate("birds", f"bundle {i}".encode()).version

    with ThreadPoolExecutor(8) as pool:
        versions = list(pool.map(store, range(24)))
    assert sorted(versions) == list(range(1, 25))
    registry = open_registry(location)
    assert {registry.load("birds", v) for v in versions} == {f"bundle {i}".encode() for i in range(24)}


def test_delete_removes_the_task_entirely(registry):
    registry.activate("birds", registry.store("birds", b"x"))
    registry.set_alias("birds", "prod", 1)
    registry.delete("birds")
    assert registry.active_versions() == {} and registry.versions("birds") == []
    assert registry.aliases("birds") == {}
    with pytest.raises(UnknownTask):
        registry.delete("birds")
    with pytest.raises(UnknownTask):
        registry.load("birds", 1)


@pytest.mark.parametrize("name", ["../escape", ".hidden", "", "a/b", "x" * 65])
def test_unsafe_task_names_are_refused(registry, name):
    with pytest.raises(ValueError, match="task name"):
        registry.store(name, b"x")


def test_activating_a_missing_version_fails(registry):
    with pytest.raises(UnknownTask):
        registry.activate("birds", 3)


def test_directory_versions_stored_before_metadata_still_list(tmp_path):
    registry = DirectoryRegistry(tmp_path)
    registry.store("birds", b"old")
    (tmp_path / "birds" / "00000001.json").unlink()
    [info] = registry.versions("birds")
    assert (info.version, info.sha256, info.size, info.method) == (1, bundle_sha256(b"old"), 3, "")


KEY = "0123456789abcdef0123456789abcdef"


def test_artefacts_are_kept_per_version_content_and_key_and_go_with_their_version(registry):
    for data in (b"one", b"two", b"three"):
        registry.activate("birds", registry.store("birds", data))
    one, three = bundle_sha256(b"one"), bundle_sha256(b"three")
    assert registry.load_artefact("birds", one, KEY) is None
    assert registry.store_artefact("birds", one, KEY, b"features of one")
    assert registry.store_artefact("birds", three, KEY, b"features of three")
    assert registry.store_artefact("birds", one, KEY, b"replaced")  # a damaged one is rewritten in place
    assert registry.load_artefact("birds", one, KEY) == b"replaced"
    assert registry.load_artefact("birds", one, "f" * 32) is None  # another backbone or precision: another key
    assert registry.load_artefact("cars", one, KEY) is None  # per task
    assert not registry.store_artefact("birds", bundle_sha256(b"never stored"), KEY, b"x")  # of no stored version
    assert registry.prune("birds", keep=1) == [1, 2]
    assert registry.load_artefact("birds", one, KEY) is None  # pruned with its version
    assert registry.load_artefact("birds", three, KEY) == b"features of three"
    registry.delete("birds")
    registry.activate("birds", registry.store("birds", b"three"))
    assert registry.load_artefact("birds", three, KEY) is None  # deleted with the task


def test_artefact_references_are_checked_before_any_storage_is_touched(registry):
    registry.activate("birds", registry.store("birds", b"one"))
    for sha256, key in [("../../etc", KEY), (bundle_sha256(b"one"), "../x"), (bundle_sha256(b"one"), "KEY")]:
        with pytest.raises(ValueError):
            registry.load_artefact("birds", sha256, key)
        with pytest.raises(ValueError):
            registry.store_artefact("birds", sha256, key, b"x")


def test_the_snapshot_carries_each_active_versions_method(registry):
    registry.activate("birds", registry.store("birds", b"one", "coop"))
    registry.activate("cars", registry.store("cars", b"one", "maple"))
    assert {name: state.method for name, state in registry.snapshot().items()} == {"birds": "coop", "cars": "maple"}
