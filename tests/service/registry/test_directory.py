import threading

import pytest

from service.registry.base import UnknownTask
from service.registry.directory import DirectoryRegistry


def test_versions_increase_and_only_activated_ones_are_active(tmp_path):
    registry = DirectoryRegistry(tmp_path)
    v1 = registry.store("birds", b"one")
    v2 = registry.store("birds", b"two")
    assert (v1, v2) == (1, 2)
    assert registry.active_versions() == {}
    registry.activate("birds", v1)
    assert registry.active_versions() == {"birds": 1}
    assert registry.load("birds", 2) == b"two"


def test_a_new_instance_sees_every_task_and_active_version(tmp_path):
    first = DirectoryRegistry(tmp_path)
    for task in ("birds", "cars"):
        first.activate(task, first.store(task, task.encode()))
    first.activate("cars", first.store("cars", b"cars v2"))
    reopened = DirectoryRegistry(tmp_path)
    assert reopened.active_versions() == {"birds": 1, "cars": 2}
    assert reopened.load("cars", 2) == b"cars v2"


def test_delete_removes_the_task_entirely(tmp_path):
    registry = DirectoryRegistry(tmp_path)
    registry.activate("birds", registry.store("birds", b"x"))
    registry.delete("birds")
    assert registry.active_versions() == {}
    assert sorted(p.name for p in tmp_path.iterdir()) == [".high-water", ".lock"]
    with pytest.raises(UnknownTask):
        registry.delete("birds")


def test_writes_leave_no_temporary_files(tmp_path):
    registry = DirectoryRegistry(tmp_path)
    registry.activate("birds", registry.store("birds", b"x" * 10_000))
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]


@pytest.mark.parametrize("name", ["../escape", ".hidden", "", "a/b", "x" * 65])
def test_unsafe_task_names_are_refused(tmp_path, name):
    with pytest.raises(ValueError, match="task name"):
        DirectoryRegistry(tmp_path).store(name, b"x")


def test_activating_a_missing_version_fails(tmp_path):
    with pytest.raises(UnknownTask):
        DirectoryRegistry(tmp_path).activate("birds", 3)


def test_listing_versions_while_the_task_is_deleted_and_stored_again_never_fails(tmp_path):
    """The listing reads without the writers' lock; files a delete takes away meanwhile are left out."""
    registry, stop, errors = DirectoryRegistry(tmp_path), threading.Event(), []

    def churn() -> None:
        for i in range(80):
            registry.store("t", b"bundle %d" % i)
            registry.delete("t")
        stop.set()

    def read() -> None:
        while not stop.is_set():
            try:
                assert all(v.size > 0 for v in registry.versions("t"))
            except Exception as exc:  # noqa: BLE001  # any error is the finding
                errors.append(repr(exc))

    threads = [threading.Thread(target=churn), threading.Thread(target=read)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
