"""Where bundles are stored: the contract (`base`), a local directory (`directory`) and PostgreSQL (`postgres`)."""

from __future__ import annotations

from service.registry.base import Registry
from service.registry.directory import DirectoryRegistry


def open_registry(location: str, timeout_s: float = 5.0, pool_size: int = 8) -> Registry:
    """A registry from a settings string: a postgresql:// URL (with its timeout and pool size), or else a
    directory path."""
    if location.startswith(("postgresql://", "postgres://")):
        from service.registry.postgres import PostgresRegistry  # psycopg is only needed for this registry

        return PostgresRegistry(location, timeout_s, pool_size)
    return DirectoryRegistry(location)
