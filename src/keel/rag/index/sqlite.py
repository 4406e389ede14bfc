"""The embedded RAG backend: SQLite for the rows, a tantivy folder for BM25, a usearch HNSW file for vectors.

SQLite holds the truth: documents, chunks (text, offsets, metadata) and their
float32 vectors, written a batch of whole documents per transaction. Beside
it, in `<store file>.rag/`, two indexes derived from those rows, each brought
up to date from the store whenever it is behind (keel.vectors.derived):

- Keyword search: a tantivy index per collection (`<collection id>.tantivy/`),
  BM25 over each chunk's context and text (keel.vectors.keywords). It
  replaced SQLite's FTS5, whose `bm25()` ranking scores every posting of every
  query term: 568 ms at p95 at a million chunks, where tantivy skips what
  cannot reach the top k.
- Vector search: an `AnnIndex` per collection (keel.vectors.ann), kept in
  memory and saved to `<collection id>.usearch`.

The indexes themselves are shared blocks; what stays here is RAG's own: which
rows of `rag_chunks` feed them, one pair per collection, and chunk metadata
filters. A filtered search first finds the chunks that pass the filter in
SQL, then ranks them (keel.vectors.filtered). Finding them is a scan of the collection's rows until a field has
been filtered on in a collection of `FIELD_INDEX_MIN_CHUNKS` or more: then
that field gets an expression index (`json_extract(metadata, '$."field"')`,
built once, kept by every later write), and the same filter at a million
chunks takes milliseconds instead of seconds.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from keel.rag.filters import Condition, sql_filter
from keel.rag.index.base import CollectionInfo, DocumentWrite, RagIndex
from keel.store.sqlite import SQLiteStore
from keel.vectors.ann import AnnIndex
from keel.vectors.derived import DerivedIndex, SyncState, catch_up
from keel.vectors.encoding import vector_blob
from keel.vectors.filtered import filtered_search
from keel.vectors.keywords import KeywordIndex

__all__ = ["SQLiteRagIndex"]

log = logging.getLogger("keel.rag")

#: A metadata field filtered on in a collection this large gets an index.
FIELD_INDEX_MIN_CHUNKS = 10_000
#: The operators an index on a field serves (not $ne / $nin, which match nearly everything).
_INDEXED_OPS = frozenset({"$eq", "$in", "$gt", "$gte", "$lt", "$lte", "$exists"})

WrittenRows = Callable[[Sequence[int], Sequence[DocumentWrite]], list[tuple[Any, ...]]]


@dataclass(frozen=True)
class _Feed:
    """Which rows of rag_chunks a derived index is built from, read from the store or taken from a write."""

    columns: str  # after chunk_id, in the order the index's `add_rows` takes them
    written: WrittenRows  # the same rows from a write's chunks in memory, given the ids the store assigned


def _chunks(writes: Sequence[DocumentWrite]) -> list[tuple[Any, np.ndarray]]:
    return [(c, v) for w in writes for c, v in zip(w.chunks, w.vectors, strict=True)]


_VECTORS = _Feed("embedding", lambda ids, ws: [(i, vector_blob(v)) for i, (_, v) in zip(ids, _chunks(ws), strict=True)])
_KEYWORDS = _Feed(
    "context, text", lambda ids, ws: [(i, c.context, c.text) for i, (c, _) in zip(ids, _chunks(ws), strict=True)]
)


class _ChunkRows:
    """One collection's rows of rag_chunks, as a derived index catches up from them (keel.vectors.derived)."""

    def __init__(self, index: SQLiteRagIndex, info: CollectionInfo, columns: str, batch: int = 20_000) -> None:
        self.store, self.collection_id, self.columns, self.batch = index.store, info.collection_id, columns, batch

    def ids(self) -> np.ndarray:
        with self.store.transaction() as cur:
            cur.execute("SELECT chunk_id FROM rag_chunks WHERE collection_id = ?", [self.collection_id])
            return np.fromiter((r[0] for r in cur.fetchall()), dtype=np.int64)

    def ids_above(self, max_id: int) -> list[int]:
        with self.store.transaction() as cur:
            cur.execute(  # `+collection_id`: walk the primary key from max_id (see RagIndex.chunks)
                "SELECT chunk_id FROM rag_chunks WHERE +collection_id = ? AND chunk_id > ?",
                [self.collection_id, max_id],
            )
            return [int(r[0]) for r in cur.fetchall()]

    def rows(self, ids: Sequence[int]) -> Iterator[Sequence[Sequence[Any]]]:
        for start in range(0, len(ids), self.batch):
            part = ids[start : start + self.batch]
            with self.store.transaction() as cur:
                cur.execute(
                    f"SELECT chunk_id, {self.columns} FROM rag_chunks WHERE +collection_id = ? AND chunk_id IN"
                    " (SELECT value FROM json_each(?))",
                    [self.collection_id, "[" + ",".join(str(int(i)) for i in part) + "]"],
                )
                rows = cur.fetchall()
            yield rows


class SQLiteRagIndex(RagIndex):
    def __init__(self, store: SQLiteStore, *, context_weight: float = 1.0) -> None:
        super().__init__(store)
        self.sqlite = store
        self.context_weight = context_weight
        self._anns: dict[int, AnnIndex] = {}
        self._keywords: dict[int, KeywordIndex] = {}
        self._lock = threading.Lock()
        self._indexed_fields: set[str] = set()
        self._field_lock = threading.Lock()
        self._drop_fts_tables()

    @property
    def folder(self) -> Path | None:
        if str(self.sqlite.path) == ":memory:":
            return None
        return self.sqlite.path.with_name(self.sqlite.path.name + ".rag")

    def _path(self, collection_id: int, suffix: str) -> Path | None:
        folder = self.folder
        return folder / f"{collection_id}{suffix}" if folder is not None else None

    def _drop_fts_tables(self) -> None:
        """Stores made before the tantivy keyword index kept an FTS5 table per collection: stale now."""
        with self.store.transaction() as cur:
            cur.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name GLOB 'rag_fts_[0-9]*'")
            tables = [r[0] for r in cur.fetchall() if r[0][len("rag_fts_") :].isdigit()]
            for table in tables:
                cur.execute(f"DROP TABLE IF EXISTS {table}")

    # --- collection objects -------------------------------------------------------------

    def _create_objects(self, cur: Any, collection_id: int, dimensions: int) -> None:
        """Nothing in SQLite: the derived indexes are made on first use (and a leftover folder goes)."""
        self._forget(collection_id)

    def _drop_objects(self, cur: Any, collection_id: int) -> None:
        self._forget(collection_id)

    def _forget(self, collection_id: int) -> None:
        with self._lock:
            ann = self._anns.pop(collection_id, None)
            keywords = self._keywords.pop(collection_id, None)
        if ann is not None:
            ann.drop_files()
        elif (path := self._path(collection_id, ".usearch")) is not None:
            AnnIndex(path, 1).drop_files()
        if keywords is not None:
            keywords.drop_files()
        elif (path := self._path(collection_id, ".tantivy")) is not None and path.exists():
            KeywordIndex(path).drop_files()

    # --- writes ------------------------------------------------------------------------

    def _delete_chunks(self, cur: Any, info: CollectionInfo, doc_ids: Sequence[str]) -> list[int]:
        removed: list[int] = []
        for start in range(0, len(doc_ids), 500):
            part = list(doc_ids[start : start + 500])
            marks = ", ".join("?" for _ in part)
            cur.execute(
                f"DELETE FROM rag_chunks WHERE collection_id = ? AND doc_id IN ({marks}) RETURNING chunk_id",
                [info.collection_id, *part],
            )
            removed.extend(int(r[0]) for r in cur.fetchall())
        return removed

    def _insert_chunks(self, cur: Any, info: CollectionInfo, writes: Sequence[DocumentWrite]) -> tuple[list[int], int]:
        from keel.trace import dumps

        insert = (
            "INSERT INTO rag_chunks (collection_id, doc_id, ordinal, start_char, end_char, context, text, metadata,"
            " n_tokens, embedding) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        )
        ids: list[int] = []
        for w in writes:
            for chunk, vector in zip(w.chunks, w.vectors, strict=True):
                metadata = {**w.document.metadata, **chunk.metadata}
                cur.execute(
                    insert,
                    [info.collection_id, w.document.doc_id, chunk.ordinal, chunk.start, chunk.end, chunk.context,
                     chunk.text, dumps(metadata), chunk.n_tokens, vector_blob(vector)],
                )  # fmt: skip
                ids.append(int(cur.raw.lastrowid))
        return ids, 0

    def _written(
        self,
        info: CollectionInfo,
        writes: Sequence[DocumentWrite],
        added: list[int],
        removed: list[int],
        version: int,
        deletions: int,
    ) -> None:
        """Bring the derived indexes along: this write's rows directly to one that held exactly what the
        write started from, else a sync from the store (which has them too)."""
        fresh: CollectionInfo | None = None
        derived: tuple[tuple[DerivedIndex, _Feed], ...] = (
            (self._get_ann(info), _VECTORS), (self._get_keywords(info), _KEYWORDS)
        )  # fmt: skip
        for index, feed in derived:
            with index.session() as session:
                if session.state.version == version - 1:
                    session.remove(removed)
                    session.add_rows(feed.written(added, writes))
                    session.state = SyncState(version, deletions, max([session.state.max_id, *added]))
                    continue
            fresh = fresh or self.collection(info.name)
            if fresh is not None:
                self._sync(index, feed, fresh)

    def flush(self, info: CollectionInfo) -> None:
        with self._lock:
            ann = self._anns.get(info.collection_id)
        if ann is not None:
            ann.save()

    def close(self) -> None:
        with self._lock:
            anns = list(self._anns.values())
        for ann in anns:
            ann.save()

    # --- derived indexes --------------------------------------------------------------------

    def _get_ann(self, info: CollectionInfo) -> AnnIndex:
        with self._lock:
            ann = self._anns.get(info.collection_id)
            if ann is None:
                path = self._path(info.collection_id, ".usearch")
                ann = self._anns[info.collection_id] = AnnIndex(path, info.dimensions)
            return ann

    def _get_keywords(self, info: CollectionInfo) -> KeywordIndex:
        with self._lock:
            keywords = self._keywords.get(info.collection_id)
            if keywords is None:
                path = self._path(info.collection_id, ".tantivy")
                keywords = KeywordIndex(path, context_weight=self.context_weight)
                self._keywords[info.collection_id] = keywords
            return keywords

    def ann(self, info: CollectionInfo) -> AnnIndex:
        """The collection's vector index, brought up to date with the store."""
        ann = self._get_ann(info)
        if ann.state.version != info.version:
            self._sync(ann, _VECTORS, info)
        return ann

    def keywords(self, info: CollectionInfo) -> KeywordIndex:
        """The collection's keyword index, brought up to date with the store."""
        keywords = self._get_keywords(info)
        if keywords.state.version != info.version:
            self._sync(keywords, _KEYWORDS, info)
        return keywords

    def _sync(self, index: DerivedIndex, feed: _Feed, info: CollectionInfo) -> None:
        catch_up(index, SyncState(info.version, info.deletions), _ChunkRows(self, info, feed.columns))

    # --- search ----------------------------------------------------------------------------

    def _index_fields(self, info: CollectionInfo, conditions: tuple[Condition, ...]) -> None:
        """An expression index for each metadata field filtered on in a large collection (once per store)."""
        if info.n_chunks < FIELD_INDEX_MIN_CHUNKS:
            return
        keys = {c.key for c in conditions if c.op in _INDEXED_OPS and c.key != "doc_id"}
        if not keys - self._indexed_fields:
            return
        # One builder at a time: a hybrid search filters its keyword and vector halves in two threads at once, and
        # at 1M chunks the build takes seconds. The CREATE takes the write lock at BEGIN, so it waits out another
        # process's build under the busy timeout (a read upgraded to a write fails at once: "database is locked").
        with self._field_lock:
            for key in sorted(keys - self._indexed_fields):  # checked names (filters._KEY): no quote reaches the SQL
                name = "rag_meta_" + hashlib.sha1(key.encode()).hexdigest()[:16]
                with self.store.transaction() as cur:
                    cur.execute("SELECT 1 FROM sqlite_master WHERE type = 'index' AND name = ?", [name])
                    exists = cur.fetchone() is not None
                if not exists:
                    log.info("indexing metadata field %r for filters (once; later writes keep it)", key)
                    with self.sqlite.transaction(immediate=True) as cur:
                        cur.execute(
                            f"CREATE INDEX IF NOT EXISTS {name} ON rag_chunks (collection_id,"
                            f" json_extract(metadata, '$.\"{key}\"'))"
                        )
                self._indexed_fields.add(key)

    def _allowed(self, info: CollectionInfo, conditions: tuple[Condition, ...]) -> np.ndarray:
        self._index_fields(info, conditions)
        where, params = sql_filter(conditions, "sqlite")
        with self.store.transaction() as cur:
            cur.execute(
                f"SELECT c.chunk_id FROM rag_chunks c WHERE c.collection_id = ?{where}", [info.collection_id, *params]
            )
            return np.sort(np.fromiter((r[0] for r in cur.fetchall()), dtype=np.int64))

    def keyword(
        self, info: CollectionInfo, query: str, k: int, conditions: tuple[Condition, ...] = ()
    ) -> list[tuple[int, float]]:
        if k <= 0:
            return []
        keywords = self.keywords(info)
        if not keywords.terms(query):
            return []
        if not conditions:
            return keywords.search(query, k)
        allowed = self._allowed(info, conditions)
        return filtered_search(
            lambda n: keywords.search(query, n), lambda: keywords.search(query, k, allowed), allowed,
            info.n_chunks, k,
        )  # fmt: skip

    def vector(
        self, info: CollectionInfo, vector: np.ndarray, k: int, conditions: tuple[Condition, ...] = ()
    ) -> list[tuple[int, float]]:
        ann = self.ann(info)
        query = np.asarray(vector, dtype=np.float32)
        if not conditions:
            return ann.search(query, k)
        allowed = self._allowed(info, conditions)
        return filtered_search(
            lambda n: ann.search(query, n), lambda: ann.exact(query, allowed, k), allowed, len(ann), k
        )
