"""Indexes derived from the embedded store's chunk rows: how they say what they hold, and how they catch up.

The embedded backend keeps two indexes beside SQLite: the vector index (a
usearch HNSW file) and the keyword index (a tantivy folder). Neither is
written in SQLite's transaction; each records the collection `version` and
`deletions` counters it reflects and the highest chunk id it holds (a
`SyncState`). Since every write moves `version`, and chunk ids only grow,
catching up after another process (or a crash) is cheap: add the chunks above
`max_id`, and only when chunks were deleted since, compare ids with the store.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

__all__ = ["DerivedIndex", "IndexSession", "SyncState"]


@dataclass
class SyncState:
    version: int = -1  # -1: holds nothing known; rebuild by comparing with the store
    deletions: int = 0
    max_id: int = 0


class IndexSession(Protocol):
    """An exclusive change to a derived index; its `state` is saved with the change."""

    state: SyncState

    def keys(self) -> np.ndarray: ...

    def remove(self, ids: Sequence[int]) -> None: ...

    def add_rows(self, rows: Sequence[Sequence[Any]]) -> None:
        """Rows of (chunk id, *the index's `columns` of rag_chunks)."""
        ...

    def add_written(self, ids: Sequence[int], writes: Sequence[Any]) -> None:
        """The chunks of a write (`DocumentWrite`s), with the ids the store gave them."""
        ...


class DerivedIndex(Protocol):
    columns: str  # what it is built from: columns of rag_chunks

    @property
    def state(self) -> SyncState: ...

    def session(self) -> AbstractContextManager[IndexSession]: ...
