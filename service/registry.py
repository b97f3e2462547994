"""Where bundles live: versioned per task, with one active version each.

`Registry` is the small interface the service needs; `DirectoryRegistry` is the default, a directory
on local disk. Every write is atomic (temp file, fsync, rename), so a crash leaves either the old state
or the new one, and a restart finds every task with its active version.

Layout: <root>/<task>/<version:08d>.bundle and <root>/<task>/ACTIVE (the active version number).
"""

from __future__ import annotations

import abc
import fcntl
import os
import re
import shutil
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from service.bundle import atomic_write

TASK_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
_TASK_NAME = re.compile(TASK_NAME_PATTERN)


class UnknownTask(KeyError):
    pass


def check_task_name(task: str) -> str:
    if not _TASK_NAME.match(task):
        raise ValueError(f"task name {task!r} must match {TASK_NAME_PATTERN}")
    return task


class Registry(abc.ABC):
    @abc.abstractmethod
    def store(self, task: str, data: bytes) -> int:
        """Durably store a new version of `task` (not yet active); returns its version number."""

    @abc.abstractmethod
    def activate(self, task: str, version: int) -> None:
        """Make a stored version the task's active one."""

    @abc.abstractmethod
    def load(self, task: str, version: int) -> bytes: ...

    @abc.abstractmethod
    def active_versions(self) -> dict[str, int]:
        """Every task that has an active version, mapped to that version."""

    @abc.abstractmethod
    def delete(self, task: str) -> None:
        """Remove a task and all its versions; raises UnknownTask if it has none."""


class DirectoryRegistry(Registry):
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._thread_lock = threading.Lock()

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialize writers across threads and across processes sharing the directory."""
        with self._thread_lock, open(self.root / ".lock", "w") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock_file, fcntl.LOCK_UN)

    def _task_dir(self, task: str) -> Path:
        return self.root / check_task_name(task)

    def _bundle_path(self, task: str, version: int) -> Path:
        return self._task_dir(task) / f"{version:08d}.bundle"

    def _versions(self, task: str) -> list[int]:
        task_dir = self._task_dir(task)
        if not task_dir.is_dir():
            return []
        return sorted(int(p.stem) for p in task_dir.glob("*.bundle") if p.stem.isdigit())

    def store(self, task: str, data: bytes) -> int:
        with self._locked():
            version = max(self._versions(task), default=0) + 1
            atomic_write(self._bundle_path(task, version), data)
            return version

    def activate(self, task: str, version: int) -> None:
        with self._locked():
            if not self._bundle_path(task, version).is_file():
                raise UnknownTask(f"task {task!r} has no version {version}")
            atomic_write(self._task_dir(task) / "ACTIVE", f"{version}\n".encode())

    def load(self, task: str, version: int) -> bytes:
        path = self._bundle_path(task, version)
        if not path.is_file():
            raise UnknownTask(f"task {task!r} has no version {version}")
        return path.read_bytes()

    def active_versions(self) -> dict[str, int]:
        active = {}
        for marker in sorted(self.root.glob("*/ACTIVE")):
            if _TASK_NAME.match(marker.parent.name):
                active[marker.parent.name] = int(marker.read_text().strip())
        return active

    def delete(self, task: str) -> None:
        with self._locked():
            task_dir = self._task_dir(task)
            if not task_dir.is_dir():
                raise UnknownTask(f"no task named {task!r}")
            # Rename first: the task vanishes in one step, then the files go at leisure.
            trash = self.root / f".deleted-{task}-{uuid.uuid4().hex}"
            task_dir.rename(trash)
            shutil.rmtree(trash, ignore_errors=True)


def open_registry(location: str) -> Registry:
    """A registry from a settings string: for now a directory path."""
    return DirectoryRegistry(location)
