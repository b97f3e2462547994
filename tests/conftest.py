"""Shared fixtures: tiny open_clip models built from the configs in tests/model_configs (random weights), a
fresh PostgreSQL database per test on the local server, and a throwaway cluster for tests that pause, stop or
lock the server."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import open_clip
import pytest

from service.core.backbone import Backbone, BackboneSpec, load_backbone
from tests.helpers import PG_SERVER, ThrowawayPostgres, coop_bundle, pg_admin_connection, pg_is_up

open_clip.add_model_config(Path(__file__).parent / "model_configs")

MICRO = BackboneSpec("test-micro", device="cpu", seed=0)


@pytest.fixture(scope="session")
def backbone() -> Backbone:
    """A 77-token-context micro CLIP (random weights, seed 0), shared by every test in the session."""
    return load_backbone(MICRO)


@pytest.fixture(scope="session")
def deep_backbone() -> Backbone:
    """A micro CLIP with 3 blocks in both towers (class-token pooling), so deep prompts have depth to go."""
    return load_backbone(BackboneSpec("test-micro-deep", device="cpu", seed=0))


@pytest.fixture(scope="session")
def tiny_backbone() -> Backbone:
    """The embedded tiny CLIP (average pooling over image tokens, text context 32, embed width = text width 128:
    what TGP-T runs on)."""
    return load_backbone(BackboneSpec("promptserve-tiny", "world-v1", device="cpu"))


@pytest.fixture(scope="session")
def other_backbone() -> Backbone:
    """Same architecture, different weights: bundles made for `backbone` must be refused by it."""
    return load_backbone(BackboneSpec("test-micro", device="cpu", seed=1))


@pytest.fixture
def make_coop_bundle():
    return coop_bundle


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A database of its own on the local server (127.0.0.1:5432, trust auth), dropped after the test, so tests never
    see each other's data or notifications. Without a reachable server the test is skipped locally and fails in CI."""
    pytest.importorskip("psycopg")
    if not pg_is_up():
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL is not reachable at {PG_SERVER}")
        pytest.skip(f"PostgreSQL is not reachable at {PG_SERVER}")
    name = f"promptserve_test_{uuid.uuid4().hex[:12]}"
    with pg_admin_connection() as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{PG_SERVER}/{name}"
    finally:
        with pg_admin_connection() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def throwaway_cluster() -> Iterator[ThrowawayPostgres]:
    """One PostgreSQL cluster of the session's own (initdb, its own port), for tests that pause, stop or lock it."""
    pytest.importorskip("psycopg")
    if not list(Path("/usr/lib/postgresql").glob("*/bin/initdb")):
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL's server binaries (/usr/lib/postgresql/*/bin) are not installed")
        pytest.skip("PostgreSQL's server binaries (/usr/lib/postgresql/*/bin) are not installed")
    cluster = ThrowawayPostgres()
    yield cluster
    cluster.destroy()


@pytest.fixture
def throwaway_url(throwaway_cluster: ThrowawayPostgres) -> Iterator[str]:
    """A fresh database on the throwaway cluster; the cluster is resumed and running again after the test."""
    yield throwaway_cluster.create_database()
    throwaway_cluster.resume()
    if not throwaway_cluster.running:
        throwaway_cluster.start()
