"""Stores: SQLite (embedded default) and PostgreSQL, behind one interface."""

from __future__ import annotations

from keel.errors import ConfigError
from keel.store.base import Cursor, SpanFilter, StatsRow, Store
from keel.store.migrations import Migration

__all__ = ["Cursor", "Migration", "SpanFilter", "StatsRow", "Store", "open_store"]


def open_store(url: str, *, migrate: bool = True) -> Store:
    """A store for `url`: a file path (SQLite) or a postgresql:// URL."""
    if url.startswith(("postgresql://", "postgres://")):
        from keel.store.postgres import PostgresStore

        store: Store = PostgresStore(url)
    elif "://" in url:
        raise ConfigError(f"store URL {url!r} is neither a file path nor postgresql://", field="store.url")
    else:
        from keel.store.sqlite import SQLiteStore

        store = SQLiteStore(url)
    if migrate:
        store.migrate()
    return store
