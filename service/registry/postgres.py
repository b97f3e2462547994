"""A registry in PostgreSQL, shared by every replica (psycopg 3, connections from a psycopg_pool pool).

Tables: `tasks` (one row per task name, holding the next version number, kept after a delete so numbers are never
reused, and so a registry that ever held a task is never seeded again), `versions` (the bundle bytes with sha256,
size, method and created time), `active` (the active pointer and when it moved) and `aliases`, and `artefacts` (what
replicas computed from a version, deleted with it). Every change runs in one transaction that ends with a NOTIFY on
`promptserve_changes` carrying the task name, so listening replicas apply it as it commits. The schema is created or
migrated on start under an advisory lock (table `schema_version`), so replicas may start together.

Nothing waits on the database without a bound: connections carry a connect timeout, TCP keepalives, an
`application_name`, and server-side statement, lock and idle-in-transaction timeouts; and since a server that
is paused (or a network that swallows packets) enforces no timeout of its own, every transaction also has a
client-side deadline after which its socket is shut down. Whatever fails that way is RegistryUnavailable:
retried by readers, a 503 with Retry-After for writers, never a verdict on a task.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Generator, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import psycopg
import psycopg.errors
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import ConnectionPool, PoolTimeout

from service.registry.base import (
    MAX_ARTEFACT_BYTES,
    Registry,
    RegistryUnavailable,
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

CHANNEL = "promptserve_changes"
MIGRATION_LOCK = 0x70726F6D  # any constant shared by every replica: serializes schema migrations
MIGRATIONS = [
    # 1: the first schema
    """
    CREATE TABLE tasks (
        name text PRIMARY KEY,
        next_version integer NOT NULL DEFAULT 1
    );
    CREATE TABLE versions (
        task text NOT NULL REFERENCES tasks (name),
        version integer NOT NULL,
        sha256 text NOT NULL,
        size integer NOT NULL,
        method text NOT NULL DEFAULT '',
        created timestamptz NOT NULL DEFAULT now(),
        data bytea NOT NULL,
        PRIMARY KEY (task, version),
        UNIQUE (task, sha256)
    );
    CREATE TABLE active (
        task text PRIMARY KEY,
        version integer NOT NULL,
        FOREIGN KEY (task, version) REFERENCES versions (task, version)
    );
    CREATE TABLE aliases (
        task text NOT NULL,
        alias text NOT NULL,
        version integer NOT NULL,
        PRIMARY KEY (task, alias),
        FOREIGN KEY (task, version) REFERENCES versions (task, version)
    );
    """,
    # 2: when the active pointer last moved (replicas measure propagation lag from it)
    "ALTER TABLE active ADD COLUMN changed_at timestamptz NOT NULL DEFAULT clock_timestamp();",
    # 3: what replicas computed from a version (its class text features), by content and key; goes with it
    """
    CREATE TABLE artefacts (
        task text NOT NULL,
        sha256 text NOT NULL,
        key text NOT NULL,
        data bytea NOT NULL,
        created timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (task, sha256, key),
        FOREIGN KEY (task, sha256) REFERENCES versions (task, sha256) ON DELETE CASCADE
    );
    """,
]
# The driver errors that mean "not now" rather than "no": the server is down, paused, restarting, too slow,
# or a lock is held too long. Their messages name the host, so they go to the log, not to clients.
UNAVAILABLE = (psycopg.OperationalError, psycopg.InterfaceError, psycopg.errors.IdleInTransactionSessionTimeout)


class Watchdog:
    """Shuts down a connection's socket when its deadline passes, so a call blocked on a server that no longer
    answers (paused, or packets dropped: no server-side timeout can fire) fails at once. One thread for every
    connection; a deadline is cancelled under the same lock that fires it, so a connection already handed back
    to the pool is never touched."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int]] = []
        self._armed: dict[int, tuple[int, list[bool]]] = {}  # token → (socket fd, fired flag)
        self._tokens = itertools.count()
        self._thread: threading.Thread | None = None

    @contextmanager
    def guard(self, conn: psycopg.Connection, seconds: float) -> Iterator[list[bool]]:
        """Arm a deadline for `conn`; the yielded flag's first item turns True if it fired."""
        fired = [False]
        with self._cond:
            token = next(self._tokens)
            self._armed[token] = (conn.pgconn.socket, fired)
            heapq.heappush(self._heap, (time.monotonic() + seconds, token))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="registry-watchdog", daemon=True)
                self._thread.start()
            self._cond.notify()
        try:
            yield fired
        finally:
            with self._cond:
                self._armed.pop(token, None)

    def _run(self) -> None:
        with self._cond:
            while True:
                while self._heap and self._heap[0][1] not in self._armed:
                    heapq.heappop(self._heap)  # cancelled
                if not self._heap:
                    self._cond.wait()
                    continue
                due, token = self._heap[0]
                if due > time.monotonic():
                    self._cond.wait(due - time.monotonic())
                    continue
                heapq.heappop(self._heap)
                fd, fired = self._armed.pop(token)
                fired[0] = True
                _shutdown(fd)


def _shutdown(fd: int) -> None:
    """Shut the socket down for both directions: a blocked read returns at once and the connection is broken."""
    try:
        with socket.socket(fileno=os.dup(fd)) as sock:
            sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed


_WATCHDOG = Watchdog()


class PostgresRegistry(Registry):
    def __init__(self, url: str, timeout_s: float = 5.0, pool_size: int = 4, application_name: str = "promptserve"):
        """`timeout_s` bounds connecting, waiting for a pooled connection and each lock wait; a statement gets
        twice that, and a whole transaction twice that plus a second before its socket is shut down."""
        self.url = url
        self.timeout_s = timeout_s
        self._connect_kwargs = _connect_kwargs(url, timeout_s, application_name)
        self._pool = ConnectionPool(url, kwargs=self._connect_kwargs, min_size=0, max_size=pool_size, open=False,
                                    timeout=timeout_s, check=self._check, name="promptserve-registry")
        self._pool_lock = threading.Lock()
        self._schema_ready = False  # migrated on first use: a replica may start while PostgreSQL is down

    @property
    def _deadline_s(self) -> float:
        return 2 * self.timeout_s + 1

    def close(self) -> None:
        self._pool.close()

    def _check(self, conn: psycopg.Connection) -> None:
        """Before a pooled connection is handed out: it still answers (a server restart broke it otherwise)."""
        with _WATCHDOG.guard(conn, self.timeout_s):
            ConnectionPool.check_connection(conn)

    @contextmanager
    def _transaction(self) -> Iterator[psycopg.Cursor]:
        if not self._schema_ready:
            self.migrate()
        with self._connection() as cur:
            yield cur

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Cursor]:
        """One pooled connection and transaction: committed when the block ends, rolled back on any error."""
        with self._pool_lock:
            if self._pool.closed:
                self._pool.open(wait=False)
        fired = [False]
        try:
            with self._pool.connection() as conn, _WATCHDOG.guard(conn, self._deadline_s) as fired:
                with conn.cursor() as cur:
                    yield cur
        except UNAVAILABLE as exc:
            raise _unavailable(exc, self.timeout_s, fired[0]) from exc

    def migrate(self) -> int:
        """Create or upgrade the schema; returns the schema version now in force."""
        with self._connection() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            cur.execute("CREATE TABLE IF NOT EXISTS schema_version (version integer NOT NULL)")
            cur.execute("SELECT max(version) FROM schema_version")
            current = _single_value(cur) or 0
            for number, sql in enumerate(MIGRATIONS[current:], start=current + 1):
                cur.execute(sql)
                cur.execute("INSERT INTO schema_version (version) VALUES (%s)", (number,))
                log.info("registry schema migrated to version %d", number)
        self._schema_ready = True
        return len(MIGRATIONS)

    @staticmethod
    def _notify(cur: psycopg.Cursor, task: str) -> None:
        cur.execute("SELECT pg_notify(%s, %s)", (CHANNEL, task))

    @staticmethod
    def _lock_task(cur: psycopg.Cursor, task: str) -> int:
        """Create the task row if new and lock it, so writers of one task go one at a time; its next version."""
        cur.execute("INSERT INTO tasks (name) VALUES (%s) ON CONFLICT (name) DO NOTHING", (check_task_name(task),))
        cur.execute("SELECT next_version FROM tasks WHERE name = %s FOR UPDATE", (task,))
        return _single_value(cur)

    def _store(self, cur: psycopg.Cursor, task: str, data: bytes, method: str) -> Stored:
        next_version = self._lock_task(cur, task)
        sha256 = bundle_sha256(data)
        cur.execute("SELECT version FROM versions WHERE task = %s AND sha256 = %s", (task, sha256))
        known = cur.fetchone()
        if known:
            return Stored(known[0], False)
        cur.execute("INSERT INTO versions (task, version, sha256, size, method, data) VALUES (%s, %s, %s, %s, %s, %s)",
                    (task, next_version, sha256, len(data), method, data))
        cur.execute("UPDATE tasks SET next_version = %s WHERE name = %s", (next_version + 1, task))
        return Stored(next_version, True)

    def _activate(self, cur: psycopg.Cursor, task: str, version: int) -> None:
        cur.execute("SELECT 1 FROM versions WHERE task = %s AND version = %s", (task, version))
        if cur.fetchone() is None:
            raise UnknownTask(f"task {task!r} has no version {version}")
        cur.execute("INSERT INTO active (task, version) VALUES (%s, %s) ON CONFLICT (task) DO UPDATE "
                    "SET version = EXCLUDED.version, changed_at = clock_timestamp()", (task, version))
        self._notify(cur, task)

    def store(self, task: str, data: bytes, method: str = "") -> int:
        with self._transaction() as cur:
            return self._store(cur, task, data, method).version

    def store_and_activate(self, task: str, data: bytes, method: str = "") -> Stored:
        # One transaction under the task's row lock: the active version only ever moves to the newest upload.
        with self._transaction() as cur:
            stored = self._store(cur, task, data, method)
            self._activate(cur, task, stored.version)
            return stored

    def seed(self, bundles: Mapping[str, tuple[bytes, str]]) -> bool:
        with self._transaction() as cur:
            # Blocks every other writer that would add a task until this commits; `tasks` keeps deleted tasks.
            cur.execute("LOCK TABLE tasks IN SHARE ROW EXCLUSIVE MODE")
            cur.execute("SELECT EXISTS (SELECT 1 FROM tasks)")
            if _single_value(cur):
                return False
            for task, (data, method) in bundles.items():
                self._activate(cur, task, self._store(cur, task, data, method).version)
            return True

    def activate(self, task: str, version: int) -> None:
        with self._transaction() as cur:
            self._lock_task(cur, task)
            self._activate(cur, task, version)
    def load(self, task: str, version: int) -> bytes:
        with self._transaction() as cur:
            cur.execute("SELECT data FROM versions WHERE task = %s AND version = %s", (check_task_name(task), version))
            row = cur.fetchone()
        if row is None:
            raise UnknownTask(f"task {task!r} has no version {version}")
        return bytes(row[0])

    def active_versions(self) -> dict[str, int]:
        with self._transaction() as cur:
            cur.execute("SELECT task, version FROM active ORDER BY task")
            return dict(cur.fetchall())

    def delete(self, task: str) -> None:
        with self._transaction() as cur:
            self._lock_task(cur, task)
            for table in ("aliases", "active"):
                cur.execute(f"DELETE FROM {table} WHERE task = %s", (task,))
            cur.execute("DELETE FROM versions WHERE task = %s", (task,))
            if cur.rowcount == 0:
                raise UnknownTask(f"no task named {task!r}")  # rolls back the row the lock created
            self._notify(cur, task)

    def versions(self, task: str) -> list[VersionInfo]:
        with self._transaction() as cur:
            cur.execute("SELECT version, sha256, size, extract(epoch FROM created)::float8, method FROM versions "
                        "WHERE task = %s ORDER BY version", (check_task_name(task),))
            return [VersionInfo(*row) for row in cur.fetchall()]

    def find_version(self, task: str, sha256: str) -> int | None:
        with self._transaction() as cur:
            cur.execute("SELECT version FROM versions WHERE task = %s AND sha256 = %s", (check_task_name(task), sha256))
            row = cur.fetchone()
        return row[0] if row else None

    def aliases(self, task: str) -> dict[str, int]:
        with self._transaction() as cur:
            cur.execute("SELECT alias, version FROM aliases WHERE task = %s ORDER BY alias", (check_task_name(task),))
            return dict(cur.fetchall())

    def set_alias(self, task: str, alias: str, version: int) -> None:
        check_alias(alias)
        with self._transaction() as cur:
            self._lock_task(cur, task)
            cur.execute("SELECT 1 FROM versions WHERE task = %s AND version = %s", (task, version))
            if cur.fetchone() is None:
                raise UnknownTask(f"task {task!r} has no version {version}")
            cur.execute("INSERT INTO aliases (task, alias, version) VALUES (%s, %s, %s) "
                        "ON CONFLICT (task, alias) DO UPDATE SET version = EXCLUDED.version", (task, alias, version))
            self._notify(cur, task)

    def delete_alias(self, task: str, alias: str) -> None:
        with self._transaction() as cur:
            self._lock_task(cur, task)
            cur.execute("DELETE FROM aliases WHERE task = %s AND alias = %s", (task, alias))
            if cur.rowcount == 0:
                raise UnknownTask(f"task {task!r} has no alias {alias!r}")
            self._notify(cur, task)

    def prune(self, task: str, keep: int) -> list[int]:
        with self._transaction() as cur:
            self._lock_task(cur, task)  # no alias or activation can pick a version while it is being removed
            cur.execute("SELECT version FROM versions WHERE task = %s", (task,))
            stored = [row[0] for row in cur.fetchall()]
            cur.execute("SELECT version FROM active WHERE task = %s UNION SELECT version FROM aliases WHERE task = %s",
                        (task, task))
            doomed = prunable(stored, keep, {row[0] for row in cur.fetchall()})
            if doomed:
                cur.execute("DELETE FROM versions WHERE task = %s AND version = ANY(%s)", (task, doomed))
                self._notify(cur, task)  # replicas drop what they prepared of these versions
            return doomed

    def store_artefact(self, task: str, sha256: str, key: str, data: bytes) -> bool:
        check_artefact_ref(sha256, key)
        if len(data) > MAX_ARTEFACT_BYTES:
            raise ValueError(f"an artefact of {len(data)} bytes exceeds {MAX_ARTEFACT_BYTES}")
        try:
            with self._transaction() as cur:
                cur.execute("INSERT INTO artefacts (task, sha256, key, data) VALUES (%s, %s, %s, %s) "
                            "ON CONFLICT (task, sha256, key) DO UPDATE SET data = EXCLUDED.data, created = now()",
                            (check_task_name(task), sha256, key, data))
        except psycopg.errors.ForeignKeyViolation:  # no stored version has that content (pruned meanwhile)
            return False
        return True

    def load_artefact(self, task: str, sha256: str, key: str) -> bytes | None:
        check_artefact_ref(sha256, key)
        with self._transaction() as cur:
            cur.execute("SELECT data FROM artefacts WHERE task = %s AND sha256 = %s AND key = %s",
                        (check_task_name(task), sha256, key))
            row = cur.fetchone()
        return None if row is None else bytes(row[0])

    def task_state(self, task: str) -> TaskState | None:
        return self.snapshot(task).get(task)

    def snapshot(self, task: str | None = None) -> dict[str, TaskState]:
        """Every task's state (or one task's), read in one statement."""
        with self._transaction() as cur:
            cur.execute("SELECT a.task, a.version, extract(epoch FROM a.changed_at)::float8, "
                        "coalesce((SELECT jsonb_object_agg(l.alias, l.version) FROM aliases l WHERE l.task = a.task),"
                        " '{}'), (SELECT jsonb_object_agg(v.version, v.sha256) FROM versions v WHERE v.task = a.task), "
                        "(SELECT v.method FROM versions v WHERE v.task = a.task AND v.version = a.version) "
                        "FROM active a WHERE %s::text IS NULL OR a.task = %s", (task, task))
            return {name: TaskState(version, dict(aliases), {int(v): sha for v, sha in stored.items()}, changed_at,
                                    method or "")
                    for name, version, changed_at, aliases, stored, method in cur.fetchall()}

    def changes(self, poll_s: float) -> Generator[str | None, None, None]:
        """LISTEN on its own connection: yields None once listening (then every `poll_s`), task names as
        changes commit; raises RegistryUnavailable when the connection is lost or the server stops answering."""
        fired = [False]
        try:
            with psycopg.connect(**self._connect_kwargs, autocommit=True) as conn:
                conn.execute(f"LISTEN {CHANNEL}")
                while True:
                    yield None
                    for notice in conn.notifies(timeout=poll_s):
                        yield notice.payload
                    with _WATCHDOG.guard(conn, self.timeout_s) as fired:
                        conn.execute("SELECT 1")  # a dead or paused server is noticed within one poll
        except UNAVAILABLE as exc:
            raise _unavailable(exc, self.timeout_s, fired[0]) from exc


def _connect_kwargs(url: str, timeout_s: float, application_name: str) -> dict[str, Any]:
    """The URL's parameters plus the timeouts, keepalives and application name (the URL's own win, except that
    its `options` are kept and ours appended)."""
    params: dict[str, Any] = conninfo_to_dict(url)
    ms = max(1, round(timeout_s * 1000))  # a lock wait fails first, and says so, before the statement would
    ours = f"-c lock_timeout={ms} -c statement_timeout={2 * ms} -c idle_in_transaction_session_timeout={4 * ms}"
    params["options"] = f"{params['options']} {ours}" if params.get("options") else ours
    defaults = {"connect_timeout": max(1, math.ceil(timeout_s)), "application_name": application_name,
                "keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3}
    return defaults | params


def _unavailable(exc: Exception, timeout_s: float, deadline_passed: bool) -> RegistryUnavailable:
    """A RegistryUnavailable whose message names the kind of failure but not the server (that goes to `detail`)."""
    if deadline_passed:
        why = f"no answer within {2 * timeout_s + 1:g} s"
    elif isinstance(exc, PoolTimeout):
        why = f"no connection within {timeout_s:g} s"
    elif isinstance(exc, psycopg.errors.LockNotAvailable):
        why = f"a lock held by another client for over {timeout_s:g} s"
    elif isinstance(exc, psycopg.errors.QueryCanceled):
        why = f"a statement ran over {2 * timeout_s:g} s"
    else:
        why = "connection failed or lost"
    return RegistryUnavailable(f"PostgreSQL registry unreachable: {why}", f"{why}: {exc}".strip())


def _single_value(cur: psycopg.Cursor) -> Any:
    """The one value of a query that always returns a row (an aggregate, or the row just upserted)."""
    row = cur.fetchone()
    if row is None:
        raise RuntimeError("the query returned no row")
    return row[0]
