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

from service.bundle import atomic_write, make_dirs

TASK_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
_TASK_NAME = re.compile(TASK_NAME_PATTERN)
_VERSION_FILE = re.compile(r"^(\d{8})\.bundle$")
MAX_ACTIVE_BYTES = 32


class UnknownTask(KeyError):
    pass


class RegistryDamage(ValueError):
    """A file in the registry is not what the registry wrote (empty, garbage, wrong kind of file)."""


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

    def damaged_tasks(self) -> dict[str, str]:
        """Tasks whose active-version record cannot be read, and why (they are left out of active_versions)."""
        return {}


class DirectoryRegistry(Registry):
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        make_dirs(self.root)
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
        # Every name that looks like a version counts, even a damaged one, so a new version never reuses it.
        return sorted(int(m.group(1)) for p in task_dir.iterdir() if (m := _VERSION_FILE.match(p.name)))

    def store(self, task: str, data: bytes) -> int:
        with self._locked():
            self._set_aside_if_damaged(self._task_dir(task), expect_dir=True)
            version = max(self._versions(task), default=0) + 1
            atomic_write(self._bundle_path(task, version), data)
            return version

    def activate(self, task: str, version: int) -> None:
        with self._locked():
            if not self._bundle_path(task, version).is_file():
                raise UnknownTask(f"task {task!r} has no version {version}")
            marker = self._task_dir(task) / "ACTIVE"
            self._set_aside_if_damaged(marker, expect_dir=False)
            atomic_write(marker, f"{version}\n".encode())

    def _set_aside_if_damaged(self, path: Path, *, expect_dir: bool) -> None:
        """Move a wrong kind of file out of the way (kept, dot-named, ignored), so a new write can succeed."""
        if path.is_symlink() or (path.exists() and path.is_dir() != expect_dir):
            path.rename(path.parent / f".damaged-{path.name}-{uuid.uuid4().hex}")

    def load(self, task: str, version: int) -> bytes:
        path = self._bundle_path(task, version)
        if not path.exists():
            raise UnknownTask(f"task {task!r} has no version {version}")
        if not path.is_file():
            raise RegistryDamage(f"{path.name} is not a regular file")
        return path.read_bytes()

    def active_versions(self) -> dict[str, int]:
        return self._scan()[0]

    def damaged_tasks(self) -> dict[str, str]:
        return self._scan()[1]

    def _scan(self) -> tuple[dict[str, int], dict[str, str]]:
        """Every task directory's ACTIVE record; anything else in the root (dot-files, stray names) is ignored."""
        active, damaged = {}, {}
        for entry in sorted(self.root.iterdir()):
            if not _TASK_NAME.match(entry.name) or not entry.is_dir():
                continue  # a stray file, even one named like a task, holds no task (a new upload sets it aside)
            try:
                version = self._read_active(entry)
            except (RegistryDamage, OSError) as exc:
                damaged[entry.name] = f"registry entry is damaged: {exc}"
                continue
            if version is not None:
                active[entry.name] = version
        return active, damaged

    def _read_active(self, task_dir: Path) -> int | None:
        """The active version recorded in `task_dir`, None when it has none yet (stored, never activated)."""
        marker = task_dir / "ACTIVE"
        if not marker.exists():
            return None
        if not marker.is_file():
            raise RegistryDamage("ACTIVE is not a regular file")
        with open(marker, "rb") as f:
            text = f.read(MAX_ACTIVE_BYTES + 1)
        if len(text) > MAX_ACTIVE_BYTES or not re.fullmatch(rb"[0-9]{1,8}\n?", text):
            raise RegistryDamage(f"ACTIVE should hold a version number, holds {text[:MAX_ACTIVE_BYTES]!r}")
        version = int(text)
        if not (task_dir / f"{version:08d}.bundle").is_file():
            raise RegistryDamage(f"ACTIVE names version {version}, which has no bundle file")
        return version

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
