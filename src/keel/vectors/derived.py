"""Indexes derived from rows of a table: how they say what they hold, and how they catch up.

An embedded index beside SQLite (the vector index, a usearch HNSW file; the
keyword index, a tantivy folder) is not written in SQLite's transaction. The
rows are the truth, the index a copy that may lag: after another process
wrote, or after a crash between a commit and a save. So each index records
a `SyncState`: the `version` and `deletions` counters of the rows it
reflects (the owner of the table moves `version` on every write and
`deletions` on every delete) and the highest row id it holds. Since row ids
only grow, catching up (`catch_up`) is cheap: add the rows above `max_id`,
and only when rows were deleted since, compare all ids with the table.

This holds for any table whose ids only grow: RAG's chunks today, a semantic
cache's entries tomorrow. What a row is made of is the index's business
(`add_rows`); where the rows live is the caller's (`RowSource`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

__all__ = ["DerivedIndex", "IndexSession", "RowSource", "SyncState", "catch_up"]


@dataclass
class SyncState:
    version: int = -1  # -1: holds nothing known; rebuild by comparing with the rows
    deletions: int = 0
    max_id: int = 0


class IndexSession(Protocol):
    """An exclusive change to a derived index; its `state` is saved with the change."""

    state: SyncState

    def keys(self) -> np.ndarray: ...

    def remove(self, ids: Sequence[int]) -> None: ...

    def add_rows(self, rows: Sequence[Sequence[Any]]) -> None:
        """Rows of (id, *the fields the index is built from); an id already held is replaced."""
        ...


class DerivedIndex(Protocol):
    @property
    def state(self) -> SyncState: ...

    def session(self) -> AbstractContextManager[IndexSession]: ...


class RowSource(Protocol):
    """The table an index is derived from, as the index needs to read it."""

    def ids(self) -> np.ndarray:
        """Every id in the table (int64)."""
        ...

    def ids_above(self, max_id: int) -> list[int]: ...

    def rows(self, ids: Sequence[int]) -> Iterator[Sequence[Sequence[Any]]]:
        """Batches of rows (id, *fields) for these ids, in the shape the index's `add_rows` takes."""
        ...


def catch_up(index: DerivedIndex, target: SyncState, source: RowSource) -> None:
    """Bring `index` to the table's `target` counters (a no-op when it is there already)."""
    with index.session() as session:
        state = session.state
        if state.version == target.version:
            return
        if state.version < 0 or state.deletions != target.deletions:
            stored = source.ids().astype(np.int64)
            held = session.keys().astype(np.int64)
            session.remove(np.setdiff1d(held, stored, assume_unique=True).tolist())
            missing = np.setdiff1d(stored, held, assume_unique=True).tolist()
            newest = int(stored.max()) if len(stored) else 0
        else:
            missing = source.ids_above(state.max_id)
            newest = max(missing, default=0)
        for rows in source.rows(missing):
            session.add_rows(rows)
        session.state = SyncState(target.version, target.deletions, max(state.max_id, newest))
