"""RAG's storage: the embedded backend (SQLite + usearch) or PostgreSQL (full-text + pgvector).

The backend follows the store: one store holds traces, keys and collections.
"""

from __future__ import annotations

from keel.rag.index.base import CollectionInfo, DocumentWrite, RagIndex, StoredChunk, StoredDocument
from keel.store import Store

__all__ = [
    "CollectionInfo", "DocumentWrite", "RagIndex", "StoredChunk", "StoredDocument", "open_index",
]  # fmt: skip


def open_index(store: Store) -> RagIndex:
    """The RAG backend of a store (its tables are created on first use)."""
    if store.dialect == "postgres":
        from keel.rag.index.postgres import PostgresRagIndex
        from keel.store.postgres import PostgresStore

        assert isinstance(store, PostgresStore)
        return PostgresRagIndex(store)
    from keel.rag.index.sqlite import SQLiteRagIndex
    from keel.store.sqlite import SQLiteStore

    assert isinstance(store, SQLiteStore)
    return SQLiteRagIndex(store)
