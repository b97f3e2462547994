"""The task manager: every task's active version, swapped atomically, kept in step with the registry.

Versions are prepared (`service.serving.activation.prepare`) *before* anything is stored or swapped, so a bundle
that fails anywhere leaves the previous version serving. Besides the active versions it keeps this replica's
view of each task's aliases and an LRU of prepared inactive versions (pinned requests, instant rollback),
both matched to the registry by content (sha256), so nothing pruned, deleted or replaced keeps answering. A
version the registry could not deliver is retried by the caller (`service.serving.propagation`), never
recorded as damage; only one that cannot be served is.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from service.core.backbone import Backbone
from service.methods import BundleError
from service.registry.base import (
    Registry,
    RegistryUnavailable,
    TaskState,
    UnknownTask,
    VersionInfo,
    bundle_sha256,
    check_task_name,
)
from service.serving.activation import ActiveTask, BundleLimits, prepare

log = logging.getLogger(__name__)
# Why a task is not serving what the registry says, in a few fixed classes (metric labels stay bounded):
# its bundle cannot be served here, the registry's files for it are damaged, or the registry did not answer
# (then it is retried, and it is not a failure of the task).
FAILURE_KINDS = ("bundle", "damaged", "waiting")


class TaskManager:
    """Holds the active task of every name; swaps are single dict assignments, so readers see one version."""

    def __init__(self, backbone: Backbone, registry: Registry, limits: BundleLimits):
        self.backbone = backbone
        self.registry = registry
        self.limits = limits
        self._active: dict[str, ActiveTask] = {}
        self._task_locks: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)
        # Tasks not serving what the registry holds: `restore_failures` for a version that cannot be served
        # (not retried until the registry moves on; `failure_kinds` says "bundle" or "damaged"), `waiting` for
        # one the registry could not deliver just now (retried: unavailability is never recorded as damage).
        self.restore_failures: dict[str, str] = {}
        self.failure_kinds: dict[str, str] = {}
        self.waiting: dict[str, str] = {}
        self.registry_damage: dict[str, str] = {}  # serving tasks with a damaged side file (aliases, metadata)
        # Versions, aliases and remote changes: this replica's view of the aliases, the version (by number and
        # content) it could not prepare per task, a generation per task that every local write bumps (so a
        # state read before the write is never applied after it), and an LRU of prepared versions (pinned
        # requests, and the versions most recently swapped out, so a rollback is instant).
        self._aliases: dict[str, dict[str, int]] = {}
        self._stored: dict[str, dict[int, str]] = {}  # this replica's view: every stored version's sha256, per task
        self._failed_versions: dict[str, tuple[int, str]] = {}
        self._generation: defaultdict[str, int] = defaultdict(int)
        self.prepared_cache_size = 4
        self._prepared: OrderedDict[tuple[str, int], ActiveTask] = OrderedDict()
        self._prepared_lock = threading.Lock()
        self._prepare_locks: dict[tuple[str, int], tuple[threading.Lock, int]] = {}

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
        self._clear_failure(name)
        self.registry_damage.pop(name, None)

    def prepare(self, name: str, version: int, data: bytes) -> ActiveTask:
        """Decode, check and build the head; touches no shared state."""
        return prepare(name, version, data, self.backbone, self.limits)

    def publish(self, name: str, data: bytes) -> ActiveTask:
        """Make `data` the new active version of `name`, or raise and leave the old one serving."""
        return self._publish(name, data)[0]

    def _publish(self, name: str, data: bytes) -> tuple[ActiveTask, bool]:
        check_task_name(name)
        with self._task_locks[name]:
            candidate = self.prepare(name, 0, data)
            stored = self.registry.store_and_activate(name, data, candidate.manifest.method)
            self._generation[name] += 1
            task = dataclasses.replace(candidate, version=stored.version, activated_at=time.time())
            self._stored.setdefault(name, {})[stored.version] = task.sha256
            self._swap(task)
        log.info("task %s: version %d active (%d classes)", name, stored.version, len(task.manifest.classnames))
        return task, stored.created

    def delete(self, name: str) -> None:
        with self._task_locks[name]:
            self.registry.delete(name)
            self._generation[name] += 1
            self._apply(name, None)

    # Versions, aliases, pinned versions and changes other replicas commit.

    def upload(self, name: str, data: bytes, retain: int = 0) -> tuple[ActiveTask, bool]:
        """`publish`, except that bytes identical to a stored version re-activate that version (False: not new;
        the registry decides, so of identical uploads racing on several replicas exactly one is new).
        With `retain`, versions beyond the newest `retain` are pruned (never the active one or an alias target)."""
        check_task_name(name)
        known = self.registry.find_version(name, bundle_sha256(data))
        if known is None:
            task, created = self._publish(name, data)
        else:
            task, created = self.activate(name, known), False
            self.registry.store(name, data, task.manifest.method)  # the stored version again: repairs its record
        if retain:
            self.prune(name, retain)
        return task, created

    def activate(self, name: str, version: int) -> ActiveTask:
        """Make a stored version active (rollback): prepared before the swap, so a failure leaves the old one."""
        with self._task_locks[name]:
            candidate = self._active[name] if self._serves(name, version) else self._prepared_version(name, version)
            self.registry.activate(name, version)
            self._generation[name] += 1
            task = dataclasses.replace(candidate, activated_at=time.time())
            self._swap(task)
        log.info("task %s: version %d activated", name, version)
        return task

    def resolve(self, name: str, ref: str) -> int:
        """A version number or alias → a stored version, from this replica's view (so it answers while the
        registry is down, and a pin of a version that was never stored costs nothing to refuse)."""
        if ref.isdigit():
            version = int(ref)
            if version not in self._stored.get(name, {}) and not self._serves(name, version):
                raise UnknownTask(f"task {name!r} has no version {version}")
            return version
        aliases = self._aliases.get(name, {})
        if ref not in aliases:
            raise UnknownTask(f"task {name!r} has no alias {ref!r}")
        return aliases[ref]

    def ready(self, name: str, version: int) -> ActiveTask | None:
        """The task at `version` if it costs nothing to answer with (active or prepared), else None."""
        return self._active[name] if self._serves(name, version) else self._cached(name, version)

    def pinned(self, name: str, ref: str) -> ActiveTask:
        """The task at a given version or alias, prepared on demand (and kept prepared), without touching the
        active one."""
        version = self.resolve(name, ref)
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
            self._generation[name] += 1
            self._aliases[name] = self.aliases(name) | {alias: version}
        return self.aliases(name)

    def delete_alias(self, name: str, alias: str) -> dict[str, int]:
        with self._task_locks[name]:
            self.registry.delete_alias(name, alias)
            self._generation[name] += 1
            self._aliases[name] = {k: v for k, v in self.aliases(name).items() if k != alias}
        return self.aliases(name)

    def prune(self, name: str, keep: int) -> list[int]:
        with self._task_locks[name]:
            doomed = self.registry.prune(name, keep)
            self._generation[name] += 1
            for version in doomed:
                self._stored.get(name, {}).pop(version, None)
        self._forget_prepared(name, lambda version, _sha: version in doomed)
        if doomed:
            log.info("task %s: pruned versions %s", name, doomed)
        return doomed

    def sync(self, name: str, known: tuple[TaskState | None, int] | None = None) -> TaskState | None:
        """Apply the registry's committed state of `name`: `known` is a state and the task's generation when it
        was read (a snapshot), used unless a local write came after it; else it is read now, under the task's
        lock, so a local write in flight is never undone. Returns the state if it swapped in a new active
        version. A version that cannot be prepared leaves the old one serving; RegistryUnavailable (and
        UnknownTask, when the state moved on while loading) propagate, for the caller to retry."""
        with self._task_locks[name]:
            if known is None or known[1] != self._generation[name]:
                state = self.registry.task_state(name)
            else:
                state = known[0]
            return state if self._apply(name, state) else None

    def out_of_step(self) -> list[tuple[str, TaskState | None, int]]:
        """Every task whose state here differs from the registry's, with the registry's state (None: deleted)
        and the generation it was read at: one snapshot read, however many tasks (a restore after a start
        starts from nothing). Tasks whose registry entry is damaged are recorded as failures."""
        generations = dict(self._generation)  # before the read: a write after it makes the state stale
        snapshot = self.registry.snapshot()
        damage = self.registry.damaged_tasks()
        for name, reason in damage.items():
            if name not in snapshot and self.restore_failures.get(name) != reason:
                self._record_failure(name, "damaged", reason)
                log.error("task %s could not be restored: %s", name, reason)
            elif name in snapshot and self.registry_damage.get(name) != reason:
                log.error("task %s keeps serving, but %s", name, reason)
        self.registry_damage = {name: reason for name, reason in damage.items() if name in snapshot}
        for name in [n for n in self.restore_failures if n not in damage and n not in snapshot and n not in
                     self._active]:
            self._clear_failure(name)  # the registry no longer holds it (removed by hand)
        names = set(snapshot) | set(self._active) | set(self._aliases) | set(self.waiting)
        return [(name, snapshot.get(name), generations.get(name, 0)) for name in sorted(names)
                if not self._matches(name, snapshot.get(name))]

    def _matches(self, name: str, state: TaskState | None) -> bool:
        if state is None:
            return name not in self._active and name not in self._aliases and name not in self.waiting
        return (self._settled(name, state) and self._aliases.get(name) == state.aliases
                and not self._stale_prepared(name, state))

    def _settled(self, name: str, state: TaskState) -> bool:
        """Serving the active version with no failure left to clear, or already failed to prepare it."""
        sha256 = state.stored.get(state.active, "")
        if self._failed_versions.get(name) == (state.active, sha256):
            return True
        return self._serves(name, state.active, sha256) and name not in self.restore_failures

    def _serves(self, name: str, version: int, sha256: str = "") -> bool:
        current = self._active.get(name)
        return current is not None and current.version == version and (not sha256 or current.sha256 == sha256)

    def _stale_prepared(self, name: str, state: TaskState) -> bool:
        with self._prepared_lock:
            return any(key[0] == name and state.stored.get(key[1]) != task.sha256
                       for key, task in self._prepared.items())

    def _apply(self, name: str, state: TaskState | None) -> bool:
        """Make this replica match `state`; True if it swapped in a new active version."""
        if state is None:
            self._active.pop(name, None)
            self._aliases.pop(name, None)
            self._stored.pop(name, None)
            self._clear_failure(name)
            self._forget_prepared(name, lambda _version, _sha: True)
            return False
        self._aliases[name] = dict(state.aliases)
        self._stored[name] = dict(state.stored)
        # Whatever was pruned, deleted or replaced (same number, other bytes) is no longer answerable here.
        def stale(version: int, sha256: str) -> bool:
            return state.stored.get(version) != sha256

        self._forget_prepared(name, stale)
        sha256 = state.stored.get(state.active, "")
        if self._serves(name, state.active, sha256):  # e.g. the registry moved back to the version kept here
            self._clear_failure(name)
            return False
        if self._failed_versions.get(name) == (state.active, sha256):
            return False
        current = self._active.get(name)
        try:
            task = self._prepared_version(name, state.active, sha256)
        except (RegistryUnavailable, UnknownTask) as exc:  # not now: retried, never recorded as damage
            self._record_failure(name, "waiting", f"version {state.active} could not be loaded yet: {exc}")
            log.warning("task %s: version %d could not be loaded, will retry: %s", name, state.active, exc)
            raise
        except Exception as exc:  # noqa: BLE001  # whatever one task's files hold, the others still serve
            self._failed_versions[name] = (state.active, sha256)
            kind = "bundle" if isinstance(exc, BundleError) else "damaged"
            self._record_failure(name, kind, f"version {state.active} could not be prepared: {exc}")
            log.error("task %s: version %d could not be prepared, keeping %s: %s", name, state.active,
                      current.version if current else "none", exc)
            return False
        recovered = name in self.waiting
        self._swap(task)
        self._forget_prepared(name, stale)  # the version swapped out may be gone from the registry too
        log.info("task %s: version %d applied from the registry%s", name, state.active,
                 " (recovered)" if recovered else "")
        return True

    def _record_failure(self, name: str, kind: str, reason: str) -> None:
        self._clear_failure(name, keep_failed_version=True)
        if kind == "waiting":
            self.waiting[name] = reason
        else:
            self.restore_failures[name] = reason
            self.failure_kinds[name] = kind

    def _clear_failure(self, name: str, keep_failed_version: bool = False) -> None:
        self.restore_failures.pop(name, None)
        self.failure_kinds.pop(name, None)
        self.waiting.pop(name, None)
        if not keep_failed_version:
            self._failed_versions.pop(name, None)

    def failure_counts(self) -> dict[str, int]:
        """Tasks not serving what the registry holds, per kind (FAILURE_KINDS)."""
        counts = dict.fromkeys(FAILURE_KINDS, 0)
        for kind in self.failure_kinds.values():
            counts[kind] += 1
        counts["damaged"] += len(set(self.registry_damage) - set(self.failure_kinds))  # serving, files damaged
        counts["waiting"] = len(self.waiting)
        return counts

    def _swap(self, task: ActiveTask) -> None:
        """Make `task` active; the one it replaces stays prepared, so rolling back costs nothing."""
        previous = self._active.get(task.name)
        self._active[task.name] = task
        self._clear_failure(task.name)
        if previous is not None:
            self._remember(previous)

    def _prepared_version(self, name: str, version: int, sha256: str = "") -> ActiveTask:
        """Version `version` of `name` prepared (from the cache if its content matches `sha256`, when given).
        Concurrent requests for one version share one preparation; other versions and tasks never wait for it."""
        task = self._cached(name, version, sha256)
        if task is not None:
            return task
        with self._preparing((name, version)):
            task = self._cached(name, version, sha256)
            if task is None:
                task = self.prepare(name, version, self.registry.load(name, version))
                self._remember(task)
            return task

    @contextmanager
    def _preparing(self, key: tuple[str, int]) -> Iterator[None]:
        """A lock per (task, version) being prepared, dropped when nobody holds or waits for it."""
        with self._prepared_lock:
            lock, users = self._prepare_locks.get(key, (threading.Lock(), 0))
            self._prepare_locks[key] = (lock, users + 1)
        try:
            with lock:
                yield
        finally:
            with self._prepared_lock:
                lock, users = self._prepare_locks[key]
                if users == 1:
                    del self._prepare_locks[key]
                else:
                    self._prepare_locks[key] = (lock, users - 1)

    def _cached(self, name: str, version: int, sha256: str = "") -> ActiveTask | None:
        with self._prepared_lock:
            task = self._prepared.get((name, version))
            if task is None or (sha256 and task.sha256 != sha256):
                return None
            self._prepared.move_to_end((name, version))
            return task

    def _forget_prepared(self, name: str, doomed: Callable[[int, str], bool]) -> None:
        with self._prepared_lock:
            for key in [key for key, task in self._prepared.items() if key[0] == name and doomed(key[1], task.sha256)]:
                del self._prepared[key]

    def _remember(self, task: ActiveTask) -> None:
        with self._prepared_lock:
            self._prepared[(task.name, task.version)] = task
            self._prepared.move_to_end((task.name, task.version))
            while len(self._prepared) > self.prepared_cache_size:
                self._prepared.popitem(last=False)
