"""Fresh PostgreSQL databases for tests, on the local server (127.0.0.1:5432, trust auth, user postgres).

Every test that asks for `postgres_url` gets a database of its own, dropped after it, so tests never see
each other's data or notifications. Without a reachable server the tests are skipped locally and fail in CI.
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

psycopg = pytest.importorskip("psycopg")

SERVER = os.environ.get("PROMPTSERVE_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432")


def _admin_connection():
    return psycopg.connect(f"{SERVER}/postgres", autocommit=True, connect_timeout=3)


def server_is_up() -> bool:
    try:
        with _admin_connection():
            return True
    except psycopg.OperationalError:
        return False


def pg_cluster(action: str) -> None:
    """Stop or start the local cluster (Debian's pg_ctlcluster), waiting until it answers after a start."""
    version = sorted(p.name for p in Path("/etc/postgresql").iterdir())[-1]
    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", action], check=True,
                   capture_output=True, timeout=60)
    deadline = time.monotonic() + 30
    while action == "start" and not server_is_up():
        if time.monotonic() > deadline:
            raise AssertionError("PostgreSQL did not come back")
        time.sleep(0.2)


@pytest.fixture
def postgres_url() -> Iterator[str]:
    if not server_is_up():
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL is not reachable at {SERVER}")
        pytest.skip(f"PostgreSQL is not reachable at {SERVER}")
    name = f"promptserve_test_{uuid.uuid4().hex[:12]}"
    with _admin_connection() as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{SERVER}/{name}"
    finally:
        if not server_is_up():  # a test that stopped the server restarts it; be sure before dropping
            pg_cluster("start")
        with _admin_connection() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
