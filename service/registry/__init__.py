"""Where bundles are stored: the contract (`base`), a local directory (`directory`) and PostgreSQL (`postgres`)."""

from __future__ import annotations

from service.registry.base import Registry
from service.registry.directory import DirectoryRegistry


def open_registry(location: str) -> Registry:
    """A registry from a settings string: a postgresql:// URL, or else a directory path."""
    if location.startswith(("postgresql://", "postgres://")):
        from service.registry.postgres import PostgresRegistry  # psycopg is only needed for this registry

        return PostgresRegistry(location)
    return DirectoryRegistry(location)
