"""The task manager: every task's active version, swapped atomically, kept in step with the registry.

Versions are prepared (`service.serving.activation.prepare`) *before* anything is stored or swapped, so a bundle
that fails anywhere leaves the previous version serving. Besides the active versions it keeps this replica's
view of each task's aliases and an LRU of prepared inactive versions (pinned requests, instant rollback),
both matched to the registry by content (sha256), so nothing pruned, deleted or replaced keeps answering. A
version the registry could not deliver is retried by the caller (`service.serving.propagation`), never
recorded as damage; only one that cannot be served is.

Tasks at scale: the manager lists every task the registry holds (`_index`, from one snapshot read) but holds
only some in memory (*warm*). A *cold* task is activated on first use (`get`, or `warm_up` in the background),
from its stored artefact when one verifies (`service.serving.artefacts`: features computed once per fleet);
what a replica computes it stores for the others. Warm tasks' memory is capped by `feature_memory_bytes`: the
least recently used are evicted (cold again) when an activation goes over it. A registry change to a cold task
only updates the listing; a warm one is prepared and swapped as before.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import Counter, OrderedDict, defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

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
from service.serving.artefacts import ArtefactKey

log = logging.getLogger(__name__)
# Why a task is not serving what the registry says, in a few fixed classes (metric labels stay bounded):
# its bundle cannot be served here, the registry's files for it are damaged, or the registry did not answer
# (then it is retried, and it is not a failure of the task).
FAILURE_KINDS = ("bundle", "damaged", "waiting")


@dataclass(frozen=True)
class Listing:
    """What a replica knows of a task's active version without preparing it (the registry's index, or its own
    write): enough to list the task, activate it later, and tell whether the registry has moved on."""

    version: int
    sha256: str
    method: str
    changed_at: float | None

    @classmethod
    def of(cls, state: TaskState) -> Listing:
        return cls(state.active, state.active_sha256, state.method, state.changed_at)


class TaskManager:
    """Holds the active task of every name; swaps are single dict assignments, so readers see one version."""

    def __init__(self, backbone: Backbone, registry: Registry, limits: BundleLimits, feature_memory_bytes: int = 0,
                 on_cold_load: Callable[[float], None] = lambda seconds: None):
        self.backbone = backbone
        self.registry = registry
        self.limits = limits
        self.artefact_key = ArtefactKey.of(backbone)
        # Warm tasks (the active version prepared, in memory), least recently used first, and what they hold; the
        # registry's state of every task this replica serves, warm or cold.
        self._active: OrderedDict[str, ActiveTask] = OrderedDict()
        self._index: dict[str, Listing] = {}
        self._warm_lock = threading.Lock()
        self.warm_bytes = 0
        self.feature_memory_bytes = feature_memory_bytes  # 0: no budget
        self.on_cold_load = on_cold_load  # seconds a request (or the warm-up) waited for a cold task
        self.counts: Counter[str] = Counter()  # evictions, cold loads, features from artefacts / computed / stored
        self._uses: Counter[str] = Counter()  # requests per task since start: the warm-up goes most-used first
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
        """The active version of `name`, activated first if the task is cold (this may take a while: the HTTP
        layer calls `warm` and activates cold tasks off the event loop)."""
        task = self.warm(name)
        return task if task is not None else self.activate_cold(name)

    def warm(self, name: str) -> ActiveTask | None:
        """The active version of `name` if it is in memory (marked as just used), None if the task is cold;
        UnknownTask if this replica serves no such task."""
        task = self._active.get(name)
        if task is None:
            self.listed(name)
        with self._warm_lock:
            self._uses[name] += 1
            if task is not None and name in self._active:
                self._active.move_to_end(name)
        return task

    def listed(self, name: str) -> Listing:
        """The active version of a task this replica serves (warm or cold), else UnknownTask."""
        listing = self._index.get(name)
        if listing is None:
            raise UnknownTask(f"no task named {name!r}")
        return listing

    def active_version(self, name: str) -> int | None:
        """The version this replica answers `name` with: the warm one's (which keeps serving while a newer one
        cannot be prepared), else the registry's; None for a task it does not serve."""
        warm, listing = self._active.get(name), self._index.get(name)
        return warm.version if warm is not None else None if listing is None else listing.version

    def in_memory(self, name: str) -> ActiveTask | None:
        """The task's active version if it is warm (not marked as used: for listings)."""
        return self._active.get(name)

    def names(self) -> list[str]:
        """Every task this replica serves, warm or cold, in name order (not those whose active version failed to
        activate: `failed_tasks` lists them)."""
        return sorted(n for n in list(self._index) if n in self._active or n not in self.restore_failures)

    def all(self) -> list[ActiveTask]:
        """The warm tasks, in name order."""
        with self._warm_lock:  # other threads swap and evict meanwhile
            warm = list(self._active.values())
        return sorted(warm, key=lambda t: t.name)

    def activate_cold(self, name: str) -> ActiveTask:
        """Bring a cold task's active version into memory (from its stored artefact when it verifies), evicting
        the least recently used ones beyond the memory budget. Concurrent calls for one task share one load."""
        start = time.perf_counter()
        with self._task_locks[name]:
            task = self._active.get(name)
            if task is not None:
                return task
            listing = self.listed(name)
            if self._failed_versions.get(name) == (listing.version, listing.sha256):
                raise UnknownTask(f"task {name!r} cannot be served here: {self.restore_failures.get(name, '')}")
            self._load_active(name, listing.version, listing.sha256)
            task = self._active.get(name)
            if task is None:
                raise UnknownTask(f"task {name!r} cannot be served here: {self.restore_failures.get(name, '')}")
        self.counts["cold_loads"] += 1
        self.on_cold_load(time.perf_counter() - start)
        return task

    def cold_names(self) -> list[str]:
        """Cold tasks, in the order a warm-up takes them: most used here first, then most recently changed."""
        cold = [(name, listing) for name, listing in list(self._index.items())
                if name not in self._active and name not in self.restore_failures]
        return [name for name, _ in sorted(cold, key=lambda c: (-self._uses[c[0]], -(c[1].changed_at or 0), c[0]))]

    def warm_up(self, deadline: float | None = None, stop: threading.Event | None = None) -> int:
        """Activate cold tasks (`cold_names` order) while the memory budget has room for another of the average
        warm size, until `deadline` (time.monotonic) or `stop`; returns how many it activated."""
        warmed = 0
        for name in self.cold_names() if self._room_for_another() else []:
            if (deadline is not None and time.monotonic() >= deadline) or (stop is not None and stop.is_set()):
                break
            if not self._room_for_another():
                break
            try:
                self.activate_cold(name)
                warmed += 1
            except UnknownTask:  # deleted meanwhile, or cannot be served (recorded)
                continue
            except RegistryUnavailable:  # not now: the next warm-up tries again
                break
        return warmed

    def _room_for_another(self) -> bool:
        if not self.feature_memory_bytes:
            return True
        with self._warm_lock:
            average = self.warm_bytes / len(self._active) if self._active else 0
            return self.warm_bytes + average <= self.feature_memory_bytes

    def failed_tasks(self) -> dict[str, str]:
        """Every task something is wrong with, and what: not restored, or a damaged registry entry."""
        return {**self.registry_damage, **self.restore_failures}

    def forget_failure(self, name: str) -> None:
        self._clear_failure(name)
        self.registry_damage.pop(name, None)

    def prepare(self, name: str, version: int, data: bytes, artefact: bytes | None = None) -> ActiveTask:
        """Decode, check and build the head (with the features `artefact` holds if it verifies); touches no
        shared state."""
        task = prepare(name, version, data, self.backbone, self.limits, artefact)
        if task.features_from:
            self.counts[f"features_{task.features_from}"] += 1
        return task

    def _stored_artefact(self, name: str, sha256: str) -> bytes | None:
        """The artefact the registry holds for this content and backbone; None (computed instead) if it has
        none or cannot give it now."""
        try:
            return self.registry.load_artefact(name, sha256, self.artefact_key.id)
        except (RegistryUnavailable, OSError) as exc:
            log.warning("task %s: stored features could not be read (%s); computing them", name, exc)
            return None

    def _store_artefact(self, task: ActiveTask) -> None:
        """Store the features this replica computed for a stored version, for the other replicas and restarts;
        a failure costs them a recomputation, never the version."""
        payload = task.artefact(self.artefact_key)
        if payload is None:
            return
        try:
            if self.registry.store_artefact(task.name, task.sha256, self.artefact_key.id, payload):
                self.counts["artefacts_stored"] += 1
        except (RegistryUnavailable, OSError, ValueError) as exc:
            log.warning("task %s: computed features not stored (%s); other replicas will compute them", task.name,
                        exc)

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
            self._store_artefact(task)
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
            current = self._active.get(name)
            candidate = current if current and self._serves(name, version) else self._prepared_version(name, version)
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
        current = self._active.get(name)
        return current if current and self._serves(name, version) else self._cached(name, version)

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
        snapshot, damage = self.registry.index()
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
        names = set(snapshot) | set(self._index) | set(self._active) | set(self._aliases) | set(self.waiting)
        return [(name, snapshot.get(name), generations.get(name, 0)) for name in sorted(names)
                if not self._matches(name, snapshot.get(name))]

    def _matches(self, name: str, state: TaskState | None) -> bool:
        if state is None:
            return not any(name in known for known in (self._index, self._active, self._aliases, self.waiting))
        return (self._settled(name, state) and self._aliases.get(name) == state.aliases
                and not self._stale_prepared(name, state))

    def _settled(self, name: str, state: TaskState) -> bool:
        """Serving the active version with no failure left to clear, or already failed to prepare it."""
        sha256 = state.active_sha256
        if self._failed_versions.get(name) == (state.active, sha256):
            return True
        if name not in self._active:  # cold: listed at this version, nothing to retry
            listing = self._index.get(name)
            return (listing is not None and (listing.version, listing.sha256, listing.method) ==
                    (state.active, sha256, state.method) and name not in self.restore_failures
                    and name not in self.waiting)
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
            self._index.pop(name, None)
            self._uses.pop(name, None)
            self._evict(name)
            self._aliases.pop(name, None)
            self._stored.pop(name, None)
            self._clear_failure(name)
            self._forget_prepared(name, lambda _version, _sha: True)
            return False
        self._index[name] = Listing.of(state)
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
        if name not in self._active:  # cold: it activates this version when it is next used
            self._clear_failure(name)
            return True
        return self._load_active(name, state.active, sha256)

    def _load_active(self, name: str, version: int, sha256: str) -> bool:
        """Prepare the registry's active version of `name` and swap it in; False (recorded) if it cannot serve."""
        current = self._active.get(name)
        try:
            task = self._prepared_version(name, version, sha256, keep=False)
        except (RegistryUnavailable, UnknownTask) as exc:  # not now: retried, never recorded as damage
            self._record_failure(name, "waiting", f"version {version} could not be loaded yet: {exc}")
            log.warning("task %s: version %d could not be loaded, will retry: %s", name, version, exc)
            raise
        except Exception as exc:  # noqa: BLE001  # whatever one task's files hold, the others still serve
            self._failed_versions[name] = (version, sha256)
            kind = "bundle" if isinstance(exc, BundleError) else "damaged"
            self._record_failure(name, kind, f"version {version} could not be prepared: {exc}")
            log.error("task %s: version %d could not be prepared, keeping %s: %s", name, version,
                      current.version if current else "none", exc)
            return False
        recovered = name in self.waiting
        self._swap(task)
        stored = self._stored.get(name, {})
        self._forget_prepared(name, lambda number, sha: stored.get(number) != sha)  # e.g. the one swapped out
        if current is None:  # a cold task's first use: routine at scale
            log.debug("task %s: version %d activated", name, version)
        else:
            log.info("task %s: version %d applied from the registry%s", name, version,
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
        """Make `task` active (and warm, most recently used); the one it replaces stays prepared, so rolling back
        costs nothing. Beyond the memory budget, the least recently used other tasks are evicted."""
        with self._warm_lock:
            previous = self._active.pop(task.name, None)
            self._active[task.name] = task
            self.warm_bytes += task.held_bytes - (previous.held_bytes if previous else 0)
            evicted = []
            while self.feature_memory_bytes and self.warm_bytes > self.feature_memory_bytes and len(self._active) > 1:
                _, coldest = self._active.popitem(last=False)
                self.warm_bytes -= coldest.held_bytes
                evicted.append(coldest.name)
        listing = self._index.get(task.name)
        if listing is None or (listing.version, listing.sha256) != (task.version, task.sha256):
            # a local write (upload, rollback): the listing follows it at once
            self._index[task.name] = Listing(task.version, task.sha256, task.manifest.method, time.time())
        self._clear_failure(task.name)
        if previous is not None:
            self._remember(previous)
        if evicted:
            self.counts["evictions"] += len(evicted)
            log.info("evicted %d task(s) beyond the feature memory budget (%d bytes): %s", len(evicted),
                     self.feature_memory_bytes, ", ".join(evicted[:5]))

    def _evict(self, name: str) -> None:
        with self._warm_lock:
            task = self._active.pop(name, None)
            if task is not None:
                self.warm_bytes -= task.held_bytes

    def _prepared_version(self, name: str, version: int, sha256: str = "", keep: bool = True) -> ActiveTask:
        """Version `version` of `name` prepared (from the cache if its content matches `sha256`, when given), and
        kept prepared unless `keep` is False (a version about to be active: its memory counts there).
        Concurrent requests for one version share one preparation; other versions and tasks never wait for it."""
        task = self._cached(name, version, sha256)
        if task is not None:
            return task
        with self._preparing((name, version)):
            task = self._cached(name, version, sha256)
            if task is None:
                data = self.registry.load(name, version)
                task = self.prepare(name, version, data, self._stored_artefact(name, sha256 or bundle_sha256(data)))
                self._store_artefact(task)
                if keep:
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
