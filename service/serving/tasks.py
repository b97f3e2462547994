"""The task manager: every task's active version, swapped atomically, kept in step with the registry.

Versions are prepared (`service.serving.activation.prepare`) *before* anything is stored or swapped, so a bundle
that fails anywhere leaves the previous version serving. Besides the active versions it keeps this replica's
view of each task's aliases and an LRU of prepared inactive versions (pinned requests, instant rollback).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import OrderedDict, defaultdict

from service.core.backbone import Backbone
from service.methods import BundleError
from service.registry.base import (
    Registry,
    RegistryDamage,
    TaskState,
    UnknownTask,
    VersionInfo,
    bundle_sha256,
    check_task_name,
)
from service.serving.activation import ActiveTask, BundleLimits, prepare

log = logging.getLogger(__name__)


class TaskManager:
    """Holds the active task of every name; swaps are single dict assignments, so readers see one version."""

    def __init__(self, backbone: Backbone, registry: Registry, limits: BundleLimits):
        self.backbone = backbone
        self.registry = registry
        self.limits = limits
        self._active: dict[str, ActiveTask] = {}
        self._task_locks: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)
        self.restore_failures: dict[str, str] = {}  # tasks whose active version cannot be served, and why
        self.registry_damage: dict[str, str] = {}  # serving tasks with a damaged side file (aliases, metadata)
        # Versions, aliases and remote changes: this replica's view of the aliases, the last version it could
        # not prepare per task (not retried until the registry moves on), and an LRU of prepared versions
        # (pinned requests, and the versions most recently swapped out, so a rollback is instant).
        self._aliases: dict[str, dict[str, int]] = {}
        self._failed_versions: dict[str, int] = {}
        self.prepared_cache_size = 4
        self._prepared: OrderedDict[tuple[str, int], ActiveTask] = OrderedDict()
        self._prepared_lock = threading.Lock()
        self._prepare_lock = threading.Lock()

    def get(self, name: str) -> ActiveTask:
        try:
            return self._active[name]
        except KeyError:
            raise UnknownTask(f"no task named {name!r}") from None

    def all(self) -> list[ActiveTask]:
        return sorted(self._active.values(), key=lambda t: t.name)

    def failed_tasks(self) -> dict[str, str]:
        """Every task something is wrong with, and what: not restored, or a damaged registry entry."""
        return {**self.registry_damage, **self.restore_failures}

    def forget_failure(self, name: str) -> None:
        self.restore_failures.pop(name, None)
        self.registry_damage.pop(name, None)

    def prepare(self, name: str, version: int, data: bytes) -> ActiveTask:
        """Decode, check and build the head; touches no shared state."""
        return prepare(name, version, data, self.backbone, self.limits)

    def publish(self, name: str, data: bytes) -> ActiveTask:
        """Make `data` the new active version of `name`, or raise and leave the old one serving."""
        check_task_name(name)
        with self._task_locks[name]:
            candidate = self.prepare(name, 0, data)
            version = self.registry.store_and_activate(name, data, candidate.manifest.method)
            task = dataclasses.replace(candidate, version=version, activated_at=time.time())
            self._swap(task)
        log.info("task %s: version %d active (%d classes)", name, version, len(task.manifest.classnames))
        return task

    def delete(self, name: str) -> None:
        with self._task_locks[name]:
            self.registry.delete(name)
            self._apply(name, None)

    def restore(self) -> None:
        """Bring back every task's active version after a restart; a damaged one is reported, never fatal."""
        self.resync()
        log.info("restored %d task(s), %d failed", len(self._active), len(self.restore_failures))

    # Versions, aliases, pinned versions and changes other replicas commit.

    def upload(self, name: str, data: bytes, retain: int = 0) -> tuple[ActiveTask, bool]:
        """`publish`, except that bytes identical to a stored version re-activate that version (False: not new).
        With `retain`, versions beyond the newest `retain` are pruned (never the active one or an alias target)."""
        check_task_name(name)
        known = self.registry.find_version(name, bundle_sha256(data))
        if known is None:
            task = self.publish(name, data)
        else:
            task = self.activate(name, known)
            self.registry.store(name, data, task.manifest.method)  # the stored version again: repairs its record
        if retain:
            self.prune(name, retain)
        return task, known is None

    def activate(self, name: str, version: int) -> ActiveTask:
        """Make a stored version active (rollback): prepared before the swap, so a failure leaves the old one."""
        with self._task_locks[name]:
            candidate = self._active[name] if self._serves(name, version) else self._prepared_version(name, version)
            self.registry.activate(name, version)
            task = dataclasses.replace(candidate, activated_at=time.time())
            self._swap(task)
        log.info("task %s: version %d activated", name, version)
        return task

    def resolve(self, name: str, ref: str) -> int:
        """A version number or alias → a version, from this replica's view (so it answers while the registry
        is down); a number is checked when it is loaded."""
        if ref.isdigit():
            return int(ref)
        aliases = self._aliases.get(name, {})
        if ref not in aliases:
            raise UnknownTask(f"task {name!r} has no alias {ref!r}")
        return aliases[ref]

    def ready(self, name: str, version: int) -> ActiveTask | None:
        """The task at `version` if it costs nothing to answer with (active or prepared), else None."""
        return self._active[name] if self._serves(name, version) else self._cached(name, version)

    def pinned(self, name: str, version: int) -> ActiveTask:
        """The task at `version`, prepared on demand (and kept prepared), without touching the active one."""
        return self.ready(name, version) or self._prepared_version(name, version)

    def aliases(self, name: str) -> dict[str, int]:
        return dict(self._aliases.get(name, {}))

    def versions(self, name: str) -> list[VersionInfo]:
        versions = self.registry.versions(check_task_name(name))
        if not versions:
            raise UnknownTask(f"no task named {name!r}")
        return versions

    def set_alias(self, name: str, alias: str, ref: str) -> dict[str, int]:
        with self._task_locks[name]:
            version = self.registry.resolve(name, ref)
            self.registry.set_alias(name, alias, version)
            self._aliases[name] = self.aliases(name) | {alias: version}
        return self.aliases(name)

    def delete_alias(self, name: str, alias: str) -> dict[str, int]:
        with self._task_locks[name]:
            self.registry.delete_alias(name, alias)
            self._aliases[name] = {k: v for k, v in self.aliases(name).items() if k != alias}
        return self.aliases(name)

    def prune(self, name: str, keep: int) -> list[int]:
        doomed = self.registry.prune(name, keep)
        with self._prepared_lock:
            for version in doomed:
                self._prepared.pop((name, version), None)
        if doomed:
            log.info("task %s: pruned versions %s", name, doomed)
        return doomed

    def sync(self, name: str) -> None:
        """Apply the registry's committed state of `name` (read under the task's lock, so a local write in
        flight is never undone); a version that cannot be prepared leaves the old one serving."""
        with self._task_locks[name]:
            self._apply(name, self.registry.task_state(name))

    def resync(self) -> None:
        """Match the registry: every task's active version and aliases, deleted tasks dropped. Also the
        restore after a start, since it starts from nothing."""
        snapshot = self.registry.snapshot()
        damage = self.registry.damaged_tasks()
        for name, reason in damage.items():
            if name not in snapshot and self.restore_failures.get(name) != reason:
                self.restore_failures[name] = reason
                log.error("task %s could not be restored: %s", name, reason)
            elif name in snapshot and self.registry_damage.get(name) != reason:
                log.error("task %s keeps serving, but %s", name, reason)
        self.registry_damage = {name: reason for name, reason in damage.items() if name in snapshot}
        for name in [n for n in self.restore_failures if n not in damage and n not in snapshot]:
            del self.restore_failures[name]  # the registry no longer holds it (removed by hand)
        for name in sorted(set(snapshot) | set(self._active)):
            if not self._matches(name, snapshot.get(name)):
                self.sync(name)

    def _matches(self, name: str, state: TaskState | None) -> bool:
        if state is None:
            return name not in self._active and name not in self._aliases
        return self._settled(name, state.active) and self._aliases.get(name) == state.aliases

    def _settled(self, name: str, version: int) -> bool:
        """Serving `version` with no failure left to clear, or already failed to prepare it."""
        if self._failed_versions.get(name) == version:
            return True
        return self._serves(name, version) and name not in self.restore_failures

    def _serves(self, name: str, version: int) -> bool:
        current = self._active.get(name)
        return current is not None and current.version == version

    def _apply(self, name: str, state: TaskState | None) -> None:
        if state is None:
            self._active.pop(name, None)
            self._aliases.pop(name, None)
            self.restore_failures.pop(name, None)
            self._failed_versions.pop(name, None)
            with self._prepared_lock:  # a directory registry reuses the numbers of a deleted task
                for key in [key for key in self._prepared if key[0] == name]:
                    del self._prepared[key]
            return
        self._aliases[name] = dict(state.aliases)
        if self._serves(name, state.active):  # e.g. the registry moved back to the version this replica kept
            self.restore_failures.pop(name, None)
            self._failed_versions.pop(name, None)
            return
        if self._failed_versions.get(name) == state.active:
            return
        current = self._active.get(name)
        try:
            task = self._prepared_version(name, state.active)
        except Exception as exc:  # noqa: BLE001  # whatever one task's files hold, the others still serve
            self._failed_versions[name] = state.active
            self.restore_failures[name] = f"version {state.active} could not be prepared: {exc}"
            log.error("task %s: version %d could not be prepared, keeping %s: %s", name, state.active,
                      current.version if current else "none", exc)
            return
        self._swap(task)
        log.info("task %s: version %d applied from the registry", name, state.active)

    def _swap(self, task: ActiveTask) -> None:
        """Make `task` active; the one it replaces stays prepared, so rolling back costs nothing."""
        previous = self._active.get(task.name)
        self._active[task.name] = task
        self.restore_failures.pop(task.name, None)
        self._failed_versions.pop(task.name, None)
        if previous is not None:
            self._remember(previous)

    def _prepared_version(self, name: str, version: int) -> ActiveTask:
        task = self._cached(name, version)
        if task is not None:
            return task
        with self._prepare_lock:  # one on-demand preparation at a time: concurrent pins of one version share it
            task = self._cached(name, version) or self.prepare(name, version, self._load(name, version))
            self._remember(task)
            return task

    def _load(self, name: str, version: int) -> bytes:
        try:
            return self.registry.load(name, version)
        except RegistryDamage as exc:  # what is on disk cannot be served: the same answer as a bad bundle
            raise BundleError("file", str(exc)) from exc

    def _cached(self, name: str, version: int) -> ActiveTask | None:
        with self._prepared_lock:
            task = self._prepared.get((name, version))
            if task is not None:
                self._prepared.move_to_end((name, version))
            return task

    def _remember(self, task: ActiveTask) -> None:
        with self._prepared_lock:
            self._prepared[(task.name, task.version)] = task
            self._prepared.move_to_end((task.name, task.version))
            while len(self._prepared) > self.prepared_cache_size:
                self._prepared.popitem(last=False)
