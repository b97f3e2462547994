"""The registry contract: where bundles live, versioned per task, with one active version and aliases each.

`Registry` is the small interface the service needs; `service.registry.directory.DirectoryRegistry` (the
default, a directory on local disk) and `service.registry.postgres.PostgresRegistry` (shared by replicas)
implement it, and one contract test runs over both.
"""

from __future__ import annotations

import abc
import hashlib
import re
import time
from collections.abc import Generator, Iterable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

TASK_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
TASK_NAME = re.compile(TASK_NAME_PATTERN)
# Aliases start with a letter, so a version reference is unambiguous: digits are a number, anything else an alias.
ALIAS_PATTERN = r"^[a-z][a-z0-9_-]{0,31}$"
_ALIAS = re.compile(ALIAS_PATTERN)
VERSION_REF_PATTERN = r"^([0-9]{1,9}|[a-z][a-z0-9_-]{0,31})$"
SHA256 = re.compile(r"^[0-9a-f]{64}$")
# What a version's artefact is keyed by beside its content (service.serving.artefacts: a hash of the backbone's
# fingerprints and the precision the artefact was computed in).
ARTEFACT_KEY = re.compile(r"^[0-9a-f]{16,64}$")
MAX_ARTEFACT_BYTES = 64 * 1024 * 1024  # larger than any a bundle within the format's limits can have


class UnknownTask(KeyError):
    pass


class RegistryDamage(ValueError):
    """A file in the registry is not what the registry wrote (empty, garbage, wrong kind of file)."""


class RegistryUnavailable(RuntimeError):
    """The registry's storage cannot be reached right now, or did not answer in time (e.g. PostgreSQL is down,
    paused, or a lock is held): a transient condition, retried, never a verdict on the task.

    The message is safe to show to any client (no host, port or user); `detail` holds the driver's own words
    for the logs."""

    def __init__(self, message: str, detail: str = ""):
        super().__init__(message)
        self.detail = detail or message


def check_task_name(task: str) -> str:
    if not TASK_NAME.match(task):
        raise ValueError(f"task name {task!r} must match {TASK_NAME_PATTERN}")
    return task


def check_alias(alias: str) -> str:
    if not _ALIAS.match(alias):
        raise ValueError(f"alias {alias!r} must match {ALIAS_PATTERN}")
    return alias


def bundle_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class VersionInfo:
    version: int
    sha256: str
    size: int
    created: float = field(metadata={"help": "unix time the version was stored"})
    method: str


@dataclass(frozen=True)
class TaskState:
    """What a replica needs to serve a task: its active version and its aliases, the sha256 of every stored
    version (so a replica drops what was pruned, deleted or replaced, by content, not by number) and when the
    active pointer last moved (unix time, when the registry records it)."""

    active: int
    aliases: dict[str, int]
    stored: dict[int, str] = field(default_factory=dict)
    changed_at: float | None = None
    method: str = ""  # of the active version, when the registry recorded it

    @property
    def active_sha256(self) -> str:
        return self.stored.get(self.active, "")


class Stored(NamedTuple):
    version: int
    created: bool  # False: identical bytes were already stored as `version`


def check_artefact_ref(sha256: str, key: str) -> None:
    if not SHA256.match(sha256) or not ARTEFACT_KEY.match(key):
        raise ValueError(f"artefact reference {sha256!r}/{key!r} is not a sha256 and a hex key")


def prunable(versions: Iterable[int], keep: int, protected: set[int]) -> list[int]:
    """Versions older than the `keep` newest that neither the active pointer nor an alias holds."""
    ordered = sorted(versions, reverse=True)
    return sorted(v for v in ordered[keep:] if v not in protected)


class Registry(abc.ABC):
    @abc.abstractmethod
    def store(self, task: str, data: bytes, method: str = "") -> int:
        """Durably store a new version of `task` (not yet active); returns its version number.

        Bytes identical (same sha256) to a stored version of the task return that version instead."""

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

    @abc.abstractmethod
    def versions(self, task: str) -> list[VersionInfo]:
        """Every stored version of `task`, oldest first (empty if none)."""

    @abc.abstractmethod
    def aliases(self, task: str) -> dict[str, int]: ...

    @abc.abstractmethod
    def set_alias(self, task: str, alias: str, version: int) -> None:
        """Point `alias` at a stored version (raises UnknownTask if it is not stored)."""

    @abc.abstractmethod
    def delete_alias(self, task: str, alias: str) -> None:
        """Remove an alias; raises UnknownTask if the task has no such alias."""

    @abc.abstractmethod
    def prune(self, task: str, keep: int) -> list[int]:
        """Delete versions older than the `keep` newest, except the active one and alias targets; returns them."""

    @abc.abstractmethod
    def store_and_activate(self, task: str, data: bytes, method: str = "") -> Stored:
        """`store` then `activate`, atomically; says whether the bytes were new, so of several identical uploads
        racing (on any replica) exactly one is told it created the version."""

    @abc.abstractmethod
    def seed(self, bundles: Mapping[str, tuple[bytes, str]]) -> bool:
        """Store and activate `bundles` (task → (bytes, method)) only if this registry never held any task, as one
        step no other writer can interleave with; False (nothing written) otherwise. Deleting every task later
        does not make a registry fresh again."""

    @abc.abstractmethod
    def store_artefact(self, task: str, sha256: str, key: str, data: bytes) -> bool:
        """Keep `data` (at most MAX_ARTEFACT_BYTES), computed from the stored version whose bundle has `sha256`,
        under `key`, replacing one stored before; it goes when that version is pruned or the task deleted. False
        (nothing kept) if no stored version of the task has that content."""

    @abc.abstractmethod
    def load_artefact(self, task: str, sha256: str, key: str) -> bytes | None:
        """What `store_artefact` kept for that version content and key, None if nothing. The bytes are whatever
        the storage holds: callers verify them."""

    def close(self) -> None:
        """Release connections (a no-op for registries that hold none)."""
        return None

    def find_version(self, task: str, sha256: str) -> int | None:
        return next((v.version for v in self.versions(task) if v.sha256 == sha256), None)

    def resolve(self, task: str, ref: str | int) -> int:
        """A version number or alias name → a stored version number; raises UnknownTask if there is none."""
        if isinstance(ref, int) or ref.isdigit():
            version = int(ref)
            if version not in {v.version for v in self.versions(task)}:
                raise UnknownTask(f"task {task!r} has no version {version}")
            return version
        aliases = self.aliases(task)
        if ref not in aliases:
            raise UnknownTask(f"task {task!r} has no alias {ref!r}")
        return aliases[ref]

    def task_state(self, task: str) -> TaskState | None:
        """The task's active version, aliases and stored versions, or None if it has no active version."""
        active = self.active_versions().get(task)
        return None if active is None else self._state(task, active)

    def snapshot(self) -> dict[str, TaskState]:
        return {task: self._state(task, active) for task, active in self.active_versions().items()}

    def index(self) -> tuple[dict[str, TaskState], dict[str, str]]:
        """`snapshot` and `damaged_tasks` together: what a replica reads to follow the registry, in as few reads
        as the storage allows (one query, one directory pass), however many tasks."""
        return self.snapshot(), self.damaged_tasks()

    def _state(self, task: str, active: int) -> TaskState:
        versions = self.versions(task)
        method = next((v.method for v in versions if v.version == active), "")
        return TaskState(active, self.aliases(task), {v.version: v.sha256 for v in versions}, method=method)

    def changes(self, poll_s: float) -> Generator[str | None, None, None]:
        """Names of tasks that other writers change, as they commit, and None at least every `poll_s`.

        A plain directory cannot tell: it only ticks, so readers rely on periodic resync."""
        while True:
            time.sleep(poll_s)
            yield None
