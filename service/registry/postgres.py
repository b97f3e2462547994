"""A registry in PostgreSQL, shared by every replica (psycopg 3).

Tables: `tasks` (one row per task name, holding the next version number, kept after a delete so numbers
are never reused), `versions` (the bundle bytes with sha256, size, method and created time), `active` (the
active pointer) and `aliases`. Every change runs in one transaction that ends with a NOTIFY on
`promptserve_changes` carrying the task name, so listening replicas apply it as it commits. The schema is
created or migrated on start under an advisory lock (table `schema_version`), so replicas may start together.

Each call opens a short-lived connection: nothing is left half-open when PostgreSQL restarts, and a call
made while it is down fails fast with RegistryUnavailable.
"""

from __future__ import annotations

import logging
from collections.abc import Generator, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg

from service.registry.base import (
    Registry,
    RegistryUnavailable,
    TaskState,
    UnknownTask,
    VersionInfo,
    bundle_sha256,
    check_alias,
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
]


class PostgresRegistry(Registry):
    def __init__(self, url: str, connect_timeout_s: float = 3.0):
        self.url = url
        self.connect_timeout_s = connect_timeout_s
        self._schema_ready = False  # migrated on first use: a replica may start while PostgreSQL is down

    @contextmanager
    def _transaction(self) -> Iterator[psycopg.Cursor]:
        if not self._schema_ready:
            self.migrate()
        with self._connection() as cur:
            yield cur

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Cursor]:
        """One connection and transaction: committed when the block ends, rolled back on any error."""
        try:
            with psycopg.connect(self.url, connect_timeout=max(1, round(self.connect_timeout_s))) as conn:
                with conn.cursor() as cur:
                    yield cur
        except psycopg.OperationalError as exc:
            raise RegistryUnavailable(f"PostgreSQL registry unreachable: {exc}".strip()) from exc

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

    def _store(self, cur: psycopg.Cursor, task: str, data: bytes, method: str) -> int:
        next_version = self._lock_task(cur, task)
        sha256 = bundle_sha256(data)
        cur.execute("SELECT version FROM versions WHERE task = %s AND sha256 = %s", (task, sha256))
        known = cur.fetchone()
        if known:
            return known[0]
        cur.execute("INSERT INTO versions (task, version, sha256, size, method, data) VALUES (%s, %s, %s, %s, %s, %s)",
                    (task, next_version, sha256, len(data), method, data))
        cur.execute("UPDATE tasks SET next_version = %s WHERE name = %s", (next_version + 1, task))
        return next_version

    def _activate(self, cur: psycopg.Cursor, task: str, version: int) -> None:
        cur.execute("SELECT 1 FROM versions WHERE task = %s AND version = %s", (task, version))
        if cur.fetchone() is None:
            raise UnknownTask(f"task {task!r} has no version {version}")
        cur.execute("INSERT INTO active (task, version) VALUES (%s, %s) "
                    "ON CONFLICT (task) DO UPDATE SET version = EXCLUDED.version", (task, version))
        self._notify(cur, task)

    def store(self, task: str, data: bytes, method: str = "") -> int:
        with self._transaction() as cur:
            return self._store(cur, task, data, method)

    def store_and_activate(self, task: str, data: bytes, method: str = "") -> int:
        # One transaction under the task's row lock: the active version only ever moves to the newest upload.
        with self._transaction() as cur:
            version = self._store(cur, task, data, method)
            self._activate(cur, task, version)
            return version

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
            return doomed

    def task_state(self, task: str) -> TaskState | None:
        return self.snapshot(task).get(task)

    def snapshot(self, task: str | None = None) -> dict[str, TaskState]:
        """Every task's active version and aliases (or one task's), read in one transaction."""
        with self._transaction() as cur:
            cur.execute("SELECT a.task, a.version, coalesce(jsonb_object_agg(l.alias, l.version) "
                        "FILTER (WHERE l.alias IS NOT NULL), '{}') FROM active a "
                        "LEFT JOIN aliases l ON l.task = a.task WHERE %s::text IS NULL OR a.task = %s "
                        "GROUP BY a.task, a.version", (task, task))
            return {name: TaskState(version, dict(aliases)) for name, version, aliases in cur.fetchall()}

    def changes(self, poll_s: float) -> Generator[str | None, None, None]:
        """LISTEN on its own connection: yields None once listening (then every `poll_s`), task names as
        changes commit; raises RegistryUnavailable when the connection is lost."""
        try:
            with psycopg.connect(self.url, autocommit=True,
                                 connect_timeout=max(1, round(self.connect_timeout_s))) as conn:
                conn.execute(f"LISTEN {CHANNEL}")
                while True:
                    yield None
                    for notice in conn.notifies(timeout=poll_s):
                        yield notice.payload
                    conn.execute("SELECT 1")  # a dead server is noticed within one poll, not at the next NOTIFY
        except psycopg.OperationalError as exc:
            raise RegistryUnavailable(f"PostgreSQL registry unreachable: {exc}".strip()) from exc


def _single_value(cur: psycopg.Cursor) -> Any:
    """The one value of a query that always returns a row (an aggregate, or the row just upserted)."""
    row = cur.fetchone()
    if row is None:
        raise RuntimeError("the query returned no row")
    return row[0]
