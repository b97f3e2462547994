"""The PostgreSQL registry against a server that stops answering: a throwaway cluster of the test's own is
paused (SIGSTOP) or has a row locked by another client; every call ends within its deadline as
RegistryUnavailable, names no server, and the registry works again once the server does."""

import threading
import time

import psycopg
import pytest

from service.registry.base import RegistryUnavailable
from service.registry.postgres import PostgresRegistry

TIMEOUT_S = 0.5
DEADLINE_S = 2 * TIMEOUT_S + 1  # a whole transaction's bound


@pytest.fixture
def registry(throwaway_url):
    registry = PostgresRegistry(throwaway_url, timeout_s=TIMEOUT_S)
    registry.activate("t", registry.store("t", b"one"))
    yield registry
    registry.close()


def timed_failure(call) -> tuple[float, RegistryUnavailable]:
    start = time.monotonic()
    with pytest.raises(RegistryUnavailable) as err:
        call()
    return time.monotonic() - start, err.value


def test_a_paused_server_is_unavailable_within_the_deadline_and_serves_again_once_resumed(registry,
                                                                                             throwaway_cluster):
    throwaway_cluster.pause()
    try:
        for call in (registry.snapshot, lambda: registry.load("t", 1), lambda: registry.store("t", b"two")):
            elapsed, error = timed_failure(call)
            assert elapsed < DEADLINE_S + 1.5, elapsed
            assert "127.0.0.1" not in str(error) and str(throwaway_cluster.port) not in str(error)
            assert str(error).startswith("PostgreSQL registry unreachable")
    finally:
        throwaway_cluster.resume()
    assert registry.load("t", 1) == b"one" and registry.store("t", b"two") == 2


def test_listening_notices_a_paused_server_within_the_timeout(registry, throwaway_cluster):
    changes = registry.changes(poll_s=0.1)
    assert next(changes) is None
    throwaway_cluster.pause()
    try:
        elapsed, _ = timed_failure(lambda: [None for _ in changes])
        assert elapsed < TIMEOUT_S + 0.1 + 1.5, elapsed
    finally:
        throwaway_cluster.resume()


def test_a_row_lock_held_by_another_client_fails_fast_and_leaves_other_tasks_alone(registry, throwaway_url):
    registry.activate("u", registry.store("u", b"u1"))
    with psycopg.connect(throwaway_url) as other:  # holds the task's row lock until it rolls back
        other.execute("SELECT 1 FROM tasks WHERE name = 't' FOR UPDATE")
        elapsed, error = timed_failure(lambda: registry.store_and_activate("t", b"two"))
        assert elapsed < TIMEOUT_S + 1.5 and "lock" in str(error), (elapsed, error)
        start = time.monotonic()
        assert registry.store_and_activate("u", b"u2") == (2, True)
        assert registry.load("t", 1) == b"one"  # reading never waits for a writer's lock
        assert time.monotonic() - start < 1.0
        other.rollback()
    assert registry.store_and_activate("t", b"two") == (2, True)


def test_connections_carry_timeouts_keepalives_and_an_application_name(postgres_url):
    registry = PostgresRegistry(f"{postgres_url}?options=-c%20work_mem%3D8MB", timeout_s=2)
    try:
        with registry._connection() as cur:
            settings = {name: cur.execute(f"SHOW {name}").fetchone()[0] for name in (
                "statement_timeout", "lock_timeout", "idle_in_transaction_session_timeout", "application_name",
                "work_mem")}
            keepalives = cur.connection.info.get_parameters()
        assert settings == {"statement_timeout": "4s", "lock_timeout": "2s",
                            "idle_in_transaction_session_timeout": "8s", "application_name": "promptserve",
                            "work_mem": "8MB"}  # the URL's own options are kept
        assert keepalives.get("keepalives") == "1" and keepalives.get("connect_timeout") == "2"
    finally:
        registry.close()


def test_many_calls_from_many_threads_share_a_few_pooled_connections(postgres_url):
    registry = PostgresRegistry(postgres_url, pool_size=3)
    try:
        for i in range(20):
            registry.activate(f"t{i}", registry.store(f"t{i}", f"bundle {i}".encode()))
        threads = [threading.Thread(target=lambda: [registry.snapshot() for _ in range(10)]) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert registry._pool.get_stats()["connections_num"] <= 3
    finally:
        registry.close()
