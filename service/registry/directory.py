"""The default registry: a directory on local disk.

Every write is atomic (temp file, fsync, rename), so a crash leaves either the old state or the new one, and a
restart finds every task with its active version. Writers are serialized across threads and processes by an
flock on `<root>/.lock`.

Layout: <root>/<task>/<version:08d>.bundle and <root>/<task>/ACTIVE (the active version number); <version:08d>.json
beside each bundle holds its sha256, size, created time and method, and <task>/ALIASES maps alias names to versions
(JSON); <task>/artefacts/<sha256>.<key> holds what replicas computed from the version with that content (its class
text features), pruned and deleted with it. <root>/.high-water/<task> holds the last version number issued to a
task; it outlives the task's deletion, so a number once issued is never issued again (a replica that cached the old
bundle under that number could not tell). A registry that ever held a task has one, which is also how demo tasks are
seeded only into a registry that never held any.

Every side file is read through a typed model with a size bound, so whatever a disk or an operator left there
is either the record the registry wrote or `RegistryDamage` naming the file: a damaged ACTIVE keeps that task
out of `active_versions`, damaged ALIASES or version metadata leave the task serving, and each is reported by
`damaged_tasks`. A writer that meets a damaged file sets it aside (`.damaged-*`) and writes a good one.
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
from typing import Annotated, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, TypeAdapter, ValidationError

from service.core.fsio import atomic_write, make_dirs
from service.registry.base import (
    ALIAS_PATTERN,
    MAX_ARTEFACT_BYTES,
    TASK_NAME,
    Registry,
    RegistryDamage,
    Stored,
    TaskState,
    UnknownTask,
    VersionInfo,
    bundle_sha256,
    check_alias,
    check_artefact_ref,
    check_task_name,
    prunable,
)

log = logging.getLogger(__name__)
_VERSION_FILE = re.compile(r"^(\d{8})\.bundle$")
HIGH_WATER = ".high-water"
ARTEFACTS = "artefacts"
T = TypeVar("T")

# The side files as the registry writes them; anything else is damage. Sizes bound what a read may cost.
MAX_ACTIVE_BYTES = 32
MAX_ALIASES_BYTES = 1024 * 1024
MAX_INFO_BYTES = 4096
ActiveRecord = TypeAdapter(Annotated[int, Field(strict=True, ge=1, le=99_999_999)])  # "7\n" is JSON too
AliasesRecord = TypeAdapter(dict[Annotated[str, StringConstraints(pattern=ALIAS_PATTERN)],
                                 Annotated[int, Field(strict=True, ge=1)]])


class VersionRecord(BaseModel):
    """<version:08d>.json: what `store` writes beside each bundle."""

    model_config = ConfigDict(strict=True)
    version: int = Field(ge=1)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)
    created: float = Field(allow_inf_nan=False)
    method: str = Field(max_length=64)


InfoRecord = TypeAdapter(VersionRecord)


class DirectoryRegistry(Registry):
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        make_dirs(self.root)
        self._thread_lock = threading.Lock()
        self._remove_stale_temp_files()

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialize writers across threads and across processes sharing the directory."""
        with self._thread_lock, open(self.root / ".lock", "w") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock_file, fcntl.LOCK_UN)

    def _remove_stale_temp_files(self) -> None:
        """Temp files a crashed writer left (`atomic_write`'s `.<name>.*.tmp`); writers hold the lock while theirs
        exist, so under the lock every one found is stale."""
        with self._locked():
            for path in [*self.root.glob(".*.tmp"), *self.root.glob("*/.*.tmp")]:
                if path.is_file() and not path.is_symlink():
                    path.unlink(missing_ok=True)
                    log.warning("removed %s, left by an interrupted write", path.relative_to(self.root))

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
        self._set_aside_damaged_bundles(task)
        known = self.find_version(task, sha256)
        if known is not None:
            self._repair_info(task, known, data, method)
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
        """Move a wrong kind of file out of the way, so a new write can succeed."""
        if path.is_symlink() or (path.exists() and path.is_dir() != expect_dir):
            self._set_aside(path)

    def _set_aside_damaged_bundles(self, task: str) -> None:
        """Bundle "files" that are not regular files can never be served: out of the way, with their metadata."""
        for version in self._versions(task):
            bundle = self._bundle_path(task, version)
            if bundle.is_symlink() or not bundle.is_file():
                self._set_aside(bundle)
                self._set_aside(self._info_path(task, version))

    @staticmethod
    def _set_aside(path: Path) -> None:
        """Keep a damaged file for a person to look at (dot-named, so the registry ignores it)."""
        if os.path.lexists(path):
            path.rename(path.parent / f".damaged-{path.name}-{uuid.uuid4().hex}")


    def load(self, task: str, version: int) -> bytes:
        path = self._bundle_path(task, version)
        if not path.exists():
            raise UnknownTask(f"task {task!r} has no version {version}")
        if not path.is_file():
            raise RegistryDamage(f"{path.name} is not a regular file")
        return path.read_bytes()

    def active_versions(self) -> dict[str, int]:
        """Every task directory's ACTIVE record (a damaged one leaves its task out; `index` says why)."""
        active = {}
        for entry in self._task_dirs():
            try:
                version = self._read_active(entry)
            except RegistryDamage:
                continue
            if version is not None:
                active[entry.name] = version
        return active

    def damaged_tasks(self) -> dict[str, str]:
        return self.index()[1]

    def snapshot(self) -> dict[str, TaskState]:
        return self.index()[0]

    def task_state(self, task: str) -> TaskState | None:
        return self._read_task(self._task_dir(task))[0] if self._task_dir(task).is_dir() else None

    def index(self) -> tuple[dict[str, TaskState], dict[str, str]]:
        """Every task's state and what is damaged in each, in one pass over the directory: per task, ACTIVE,
        ALIASES and each version's metadata are read once. Anything else in the root (dot-files, stray names)
        is ignored."""
        states, damaged = {}, {}
        for entry in self._task_dirs():
            state, problems = self._read_task(entry)
            if state is not None:
                states[entry.name] = state
            if problems:
                shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
                damaged[entry.name] = f"registry entry is damaged: {shown}"
        return states, damaged

    def _task_dirs(self) -> list[Path]:
        # a stray file, even one named like a task, holds no task (a new upload sets it aside)
        return [entry for entry in sorted(self.root.iterdir()) if TASK_NAME.match(entry.name) and entry.is_dir()]

    def _read_task(self, task_dir: Path) -> tuple[TaskState | None, list[str]]:
        """A task's state (None without a readable active version), and what is damaged among its ACTIVE, ALIASES
        and version files (each still read around the damage)."""
        task, problems = task_dir.name, []
        try:
            aliases = self._read_aliases(task)
        except RegistryDamage as exc:
            problems.append(str(exc))
            aliases = {}
        infos = []
        for version in self._versions(task):
            bundle = self._bundle_path(task, version)
            if bundle.is_symlink() or not bundle.is_file():
                problems.append(f"{bundle.name} is not a regular file")
            try:
                info = self._read_info(task, version)
            except RegistryDamage as exc:
                problems.append(str(exc))
                info = None
            try:
                infos.append(info or self._derived_info(task, version))
            except FileNotFoundError:  # pruned, or the task deleted, while read
                continue
        try:
            active = self._read_active(task_dir)
            changed_at: float | None = (task_dir / "ACTIVE").stat().st_mtime if active is not None else None
        except RegistryDamage as exc:
            problems.insert(0, str(exc))
            active = None
        except OSError:  # deleted meanwhile
            return None, problems
        if active is None:
            return None, problems
        method = next((info.method for info in infos if info.version == active), "")
        return TaskState(active, aliases, {info.version: info.sha256 for info in infos}, changed_at, method), problems

    def _read_active(self, task_dir: Path) -> int | None:
        """The active version recorded in `task_dir`, None when it has none yet (stored, never activated)."""
        marker = task_dir / "ACTIVE"
        if not os.path.lexists(marker):
            return None
        version = _read_record(marker, ActiveRecord, MAX_ACTIVE_BYTES)
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

    def _info_path(self, task: str, version: int) -> Path:
        return self._task_dir(task) / f"{version:08d}.json"

    def _read_info(self, task: str, version: int) -> VersionInfo | None:
        """The version's metadata, None if it has none (stored before versions carried it); damage raises."""
        path = self._info_path(task, version)
        if not os.path.lexists(path):
            return None
        record = _read_record(path, InfoRecord, MAX_INFO_BYTES)
        if record.version != version:
            raise RegistryDamage(f"{path.name} describes version {record.version}")
        return VersionInfo(**record.model_dump())

    def _version_info(self, task: str, version: int) -> VersionInfo:
        try:
            info = self._read_info(task, version)
        except RegistryDamage:
            info = None  # reported by damaged_tasks; the bundle file itself tells everything but the method
        return info or self._derived_info(task, version)

    def _derived_info(self, task: str, version: int) -> VersionInfo:
        """What the bundle file itself tells (a damaged one: what little is known); FileNotFoundError when the
        version's files went away while they were read (a prune or delete), which `versions` leaves out."""
        path = self._bundle_path(task, version)
        try:
            data, stat = path.read_bytes(), path.stat()
        except FileNotFoundError:
            raise
        except OSError:
            return VersionInfo(version, "", 0, 0.0, "")
        return VersionInfo(version, bundle_sha256(data), stat.st_size, stat.st_mtime, "")

    def _repair_info(self, task: str, version: int, data: bytes, method: str) -> None:
        """Rewrite a stored version's damaged metadata from the same bytes uploaded again."""
        try:
            self._read_info(task, version)
            return
        except RegistryDamage as exc:
            log.warning("task %s: rewriting the metadata of version %d (%s)", task, version, exc)
        path = self._info_path(task, version)
        self._set_aside(path)
        created = self._derived_info(task, version).created or time.time()
        info = VersionInfo(version, bundle_sha256(data), len(data), created, method)
        atomic_write(path, json.dumps(vars(info)).encode())

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
        """The task's aliases; none when the file is damaged (`damaged_tasks` says why)."""
        try:
            return self._read_aliases(task)
        except RegistryDamage:
            return {}

    def _read_aliases(self, task: str) -> dict[str, int]:
        path = self._task_dir(task) / "ALIASES"
        if not os.path.lexists(path):
            return {}
        return _read_record(path, AliasesRecord, MAX_ALIASES_BYTES)

    def _write_aliases(self, task: str, aliases: dict[str, int]) -> None:
        atomic_write(self._task_dir(task) / "ALIASES", json.dumps(aliases, sort_keys=True).encode())

    def set_alias(self, task: str, alias: str, version: int) -> None:
        check_alias(alias)
        with self._locked():
            if not self._bundle_path(task, version).is_file():
                raise UnknownTask(f"task {task!r} has no version {version}")
            try:
                aliases = self._read_aliases(task)
            except RegistryDamage as exc:  # unreadable aliases are lost already: start a good file
                log.warning("task %s: setting aside damaged aliases (%s)", task, exc)
                self._set_aside(self._task_dir(task) / "ALIASES")
                aliases = {}
            self._write_aliases(task, aliases | {alias: version})

    def delete_alias(self, task: str, alias: str) -> None:
        with self._locked():
            aliases = self.aliases(task)
            if aliases.pop(alias, None) is None:
                raise UnknownTask(f"task {task!r} has no alias {alias!r}")
            self._write_aliases(task, aliases)

    def prune(self, task: str, keep: int) -> list[int]:
        with self._locked():
            try:
                protected = set(self._read_aliases(task).values())
            except RegistryDamage as exc:  # which versions the aliases hold is unknown: keep them all
                log.warning("task %s: not pruning, %s", task, exc)
                return []
            active = self.active_versions().get(task)
            if active is not None:
                protected.add(active)
            doomed = prunable(self._versions(task), keep, protected)
            for version in doomed:
                for path in (self._info_path(task, version), self._bundle_path(task, version)):
                    if path.is_dir() and not path.is_symlink():
                        self._set_aside(path)  # damage in the way: kept, never deleted blindly
                    path.unlink(missing_ok=True)
            if doomed:
                self._drop_orphan_artefacts(task)
            return doomed

    def _artefact_path(self, task: str, sha256: str, key: str) -> Path:
        check_artefact_ref(sha256, key)
        return self._task_dir(task) / ARTEFACTS / f"{sha256}.{key}"

    def store_artefact(self, task: str, sha256: str, key: str, data: bytes) -> bool:
        if len(data) > MAX_ARTEFACT_BYTES:
            raise ValueError(f"an artefact of {len(data)} bytes exceeds {MAX_ARTEFACT_BYTES}")
        path = self._artefact_path(task, sha256, key)
        with self._locked():
            if self.find_version(task, sha256) is None:
                return False
            self._set_aside_if_damaged(path.parent, expect_dir=True)
            self._set_aside_if_damaged(path, expect_dir=False)
            atomic_write(path, data)
            return True

    def load_artefact(self, task: str, sha256: str, key: str) -> bytes | None:
        path = self._artefact_path(task, sha256, key)
        try:
            if path.is_symlink() or not path.is_file():
                return None
            with open(path, "rb") as f:
                return f.read(MAX_ARTEFACT_BYTES + 1)  # a larger one fails verification, unread beyond this
        except OSError:  # gone meanwhile, or unreadable: recomputed by the caller
            return None

    def _drop_orphan_artefacts(self, task: str) -> None:
        """Artefacts of contents no stored version has any more (under the writers' lock)."""
        folder = self._task_dir(task) / ARTEFACTS
        if not folder.is_dir() or folder.is_symlink():
            return
        kept = {info.sha256 for info in self.versions(task)}
        for path in folder.iterdir():
            if path.name.split(".")[0] not in kept and path.is_file() and not path.is_symlink():
                path.unlink(missing_ok=True)


def _read_record(path: Path, record: TypeAdapter[T], max_bytes: int) -> T:
    """A side file read through its typed model: a regular file of at most `max_bytes` holding what the registry
    writes, else RegistryDamage naming the file and the first fault."""
    if path.is_symlink() or not path.is_file():
        raise RegistryDamage(f"{path.name} is not a regular file")
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as exc:
        raise RegistryDamage(f"{path.name} cannot be read ({exc.strerror})") from exc
    if len(data) > max_bytes:
        raise RegistryDamage(f"{path.name} holds more than the {max_bytes} bytes the registry writes")
    try:
        return record.validate_json(data)
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_input=False)[0]
        where = ".".join(str(p) for p in first["loc"]) or "the file"
        raise RegistryDamage(f"{path.name} is damaged ({where}: {first['msg']})") from None
