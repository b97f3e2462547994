"""The default registry: a directory on local disk.

Every write is atomic (temp file, fsync, rename), so a crash leaves either the old state or the new one, and a
restart finds every task with its active version. Writers are serialized across threads and processes by an
flock on `<root>/.lock`.

Layout: <root>/<task>/<version:08d>.bundle and <root>/<task>/ACTIVE (the active version number);
<version:08d>.json beside each bundle holds its sha256, size, created time and method, and <task>/ALIASES
maps alias names to versions (JSON). <root>/.high-water/<task> holds the last version number issued to a task;
it outlives the task's deletion, so a number once issued is never issued again (a replica that cached the old
bundle under that number could not tell). A registry that ever held a task has one, which is also how demo
tasks are seeded only into a registry that never held any.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from service.core.fsio import atomic_write, make_dirs
from service.registry.base import (
    TASK_NAME,
    Registry,
    RegistryDamage,
    Stored,
    TaskState,
    UnknownTask,
    VersionInfo,
    bundle_sha256,
    check_alias,
    check_task_name,
    prunable,
)

log = logging.getLogger(__name__)
_VERSION_FILE = re.compile(r"^(\d{8})\.bundle$")
MAX_ACTIVE_BYTES = 32
HIGH_WATER = ".high-water"


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
        try:
            return sorted(int(m.group(1)) for p in task_dir.iterdir() if (m := _VERSION_FILE.match(p.name)))
        except FileNotFoundError:  # deleted meanwhile (a reader without the lock)
            return []

    def store(self, task: str, data: bytes, method: str = "") -> int:
        with self._locked():
            return self._store(task, data, method).version

    def store_and_activate(self, task: str, data: bytes, method: str = "") -> Stored:
        with self._locked():
            stored = self._store(task, data, method)
            self._activate(task, stored.version)
            return stored

    def activate(self, task: str, version: int) -> None:
        with self._locked():
            self._activate(task, version)

    def seed(self, bundles: Mapping[str, tuple[bytes, str]]) -> bool:
        with self._locked():
            if self._ever_held_a_task():
                return False
            for task, (data, method) in bundles.items():
                self._activate(task, self._store(task, data, method).version)
            return True

    def _ever_held_a_task(self) -> bool:
        marks = self.root / HIGH_WATER
        if marks.is_dir() and any(marks.iterdir()):
            return True
        return any(TASK_NAME.match(entry.name) and entry.is_dir() for entry in self.root.iterdir())

    def _store(self, task: str, data: bytes, method: str) -> Stored:
        sha256 = bundle_sha256(data)
        self._set_aside_if_damaged(self._task_dir(task), expect_dir=True)
        known = self.find_version(task, sha256)
        if known is not None:
            return Stored(known, False)
        version = max(max(self._versions(task), default=0), self._high_water(task)) + 1
        make_dirs(self.root / HIGH_WATER)
        atomic_write(self.root / HIGH_WATER / task, f"{version}\n".encode())  # before the bundle: never reissued
        atomic_write(self._bundle_path(task, version), data)
        info = VersionInfo(version, sha256, len(data), time.time(), method)
        atomic_write(self._info_path(task, version), json.dumps(vars(info)).encode())
        return Stored(version, True)

    def _high_water(self, task: str) -> int:
        """The last number issued to `task`; 0 if none was, or if the mark is unreadable (then the stored
        versions alone decide, and the next store writes a good mark)."""
        path = self.root / HIGH_WATER / task
        try:
            with open(path, "rb") as f:
                text = f.read(MAX_ACTIVE_BYTES + 1)
        except FileNotFoundError:
            return 0
        except OSError as exc:
            log.warning("high-water mark of task %s cannot be read (%s); using the stored versions", task, exc)
            return 0
        if not re.fullmatch(rb"[0-9]{1,8}\n?", text):
            log.warning("high-water mark of task %s is damaged (%r); using the stored versions", task, text[:32])
            return 0
        return int(text)

    def _activate(self, task: str, version: int) -> None:
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
            if not TASK_NAME.match(entry.name) or not entry.is_dir():
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

    def _state(self, task: str, active: int) -> TaskState:
        state = super()._state(task, active)
        try:
            changed_at: float | None = (self._task_dir(task) / "ACTIVE").stat().st_mtime
        except OSError:
            changed_at = None
        return TaskState(state.active, state.aliases, state.stored, changed_at)

    def delete(self, task: str) -> None:
        with self._locked():
            task_dir = self._task_dir(task)
            if not task_dir.is_dir():
                raise UnknownTask(f"no task named {task!r}")
            # Rename first: the task vanishes in one step, then the files go at leisure.
            trash = self.root / f".deleted-{task}-{uuid.uuid4().hex}"
            task_dir.rename(trash)
            shutil.rmtree(trash, ignore_errors=True)

    def _info_path(self, task: str, version: int) -> Path:
        return self._task_dir(task) / f"{version:08d}.json"

    def _version_info(self, task: str, version: int) -> VersionInfo:
        """Raises FileNotFoundError when the version's files go away while they are read."""
        info_path = self._info_path(task, version)
        if info_path.is_file():
            try:
                return VersionInfo(**json.loads(info_path.read_text()))
            except (ValueError, TypeError):
                pass  # damaged metadata: the bundle file itself still tells everything but the method
        # A version stored before versions carried metadata: derive what the file itself tells.
        path = self._bundle_path(task, version)
        return VersionInfo(version, bundle_sha256(path.read_bytes()), path.stat().st_size, path.stat().st_mtime, "")

    def versions(self, task: str) -> list[VersionInfo]:
        """Read without the writers' lock: a version whose files a delete or prune takes away meanwhile is left
        out (a deleted task lists none), never an error."""
        infos = []
        for version in self._versions(task):
            try:
                infos.append(self._version_info(task, version))
            except FileNotFoundError:  # pruned, or the task deleted, while listed
                continue
        return infos

    def aliases(self, task: str) -> dict[str, int]:
        path = self._task_dir(task) / "ALIASES"
        if not path.exists():
            return {}
        try:
            aliases = json.loads(path.read_bytes()) if path.is_file() else None
        except (ValueError, OSError) as exc:
            raise RegistryDamage(f"ALIASES of task {task!r} cannot be read ({exc})") from exc
        if not isinstance(aliases, dict) or not all(isinstance(v, int) for v in aliases.values()):
            raise RegistryDamage(f"ALIASES of task {task!r} is not a JSON object of version numbers")
        return aliases

    def _write_aliases(self, task: str, aliases: dict[str, int]) -> None:
        atomic_write(self._task_dir(task) / "ALIASES", json.dumps(aliases, sort_keys=True).encode())

    def set_alias(self, task: str, alias: str, version: int) -> None:
        check_alias(alias)
        with self._locked():
            if not self._bundle_path(task, version).is_file():
                raise UnknownTask(f"task {task!r} has no version {version}")
            self._write_aliases(task, self.aliases(task) | {alias: version})

    def delete_alias(self, task: str, alias: str) -> None:
        with self._locked():
            aliases = self.aliases(task)
            if aliases.pop(alias, None) is None:
                raise UnknownTask(f"task {task!r} has no alias {alias!r}")
            self._write_aliases(task, aliases)

    def prune(self, task: str, keep: int) -> list[int]:
        with self._locked():
            protected = set(self.aliases(task).values())
            active = self.active_versions().get(task)
            if active is not None:
                protected.add(active)
            doomed = prunable(self._versions(task), keep, protected)
            for version in doomed:
                self._info_path(task, version).unlink(missing_ok=True)
                self._bundle_path(task, version).unlink()
            return doomed
