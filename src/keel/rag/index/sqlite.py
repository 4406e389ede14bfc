"""The embedded RAG backend: SQLite FTS5 for BM25, a usearch HNSW file for vectors.

Keyword search: one FTS5 table per collection, an external-content index
over `rag_chunks` (context and text columns, Porter stemming), ranked by
FTS5's built-in `bm25()` (k1 = 1.2, b = 0.75). The query is the question's
words, stop words dropped, OR-ed: BM25 does the weighting.

Vector search: an `AnnIndex` per collection, kept in memory and saved to
`<store file>.rag/<collection id>.usearch`. A filtered search first finds the
chunks that pass the filter in SQL; when few do, it ranks them exactly, else
it asks the HNSW index for more neighbours than needed and keeps those that
pass, falling back to the exact ranking when too few survive.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from keel.rag.filters import Condition, sql_filter
from keel.rag.index.ann import AnnIndex
from keel.rag.index.base import CollectionInfo, DocumentWrite, RagIndex, vector_blob
from keel.rag.words import keyword_terms
from keel.store.sqlite import SQLiteStore

__all__ = ["SQLiteRagIndex"]

#: A filtered vector search ranks exactly when at most this many chunks pass the filter.
EXACT_LIMIT = 20_000


class SQLiteRagIndex(RagIndex):
    def __init__(self, store: SQLiteStore, *, context_weight: float = 1.0) -> None:
        super().__init__(store)
        self.sqlite = store
        self.context_weight = context_weight
        self._anns: dict[int, AnnIndex] = {}
        self._lock = threading.Lock()

    @property
    def folder(self) -> Path | None:
        if str(self.sqlite.path) == ":memory:":
            return None
        return self.sqlite.path.with_name(self.sqlite.path.name + ".rag")

    # --- collection objects -------------------------------------------------------------

    def _create_objects(self, cur: Any, collection_id: int, dimensions: int) -> None:
        cur.execute(
            f"CREATE VIRTUAL TABLE rag_fts_{collection_id} USING fts5(context, text, content='rag_chunks',"
            " content_rowid='chunk_id', tokenize='porter unicode61')"
        )

    def _drop_objects(self, cur: Any, collection_id: int) -> None:
        cur.execute(f"DROP TABLE IF EXISTS rag_fts_{collection_id}")
        with self._lock:
            ann = self._anns.pop(collection_id, None)
        if ann is not None:
            ann.drop_files()
        elif (folder := self.folder) is not None:
            AnnIndex(folder / f"{collection_id}.usearch", 1).drop_files()

    # --- writes ------------------------------------------------------------------------

    def _delete_chunks(self, cur: Any, info: CollectionInfo, doc_ids: Sequence[str]) -> list[int]:
        removed: list[int] = []
        fts = f"rag_fts_{info.collection_id}"
        for start in range(0, len(doc_ids), 500):
            part = list(doc_ids[start : start + 500])
            marks = ", ".join("?" for _ in part)
            where = f"collection_id = ? AND doc_id IN ({marks})"
            cur.execute(f"SELECT chunk_id, context, text FROM rag_chunks WHERE {where}", [info.collection_id, *part])
            rows = cur.fetchall()
            if not rows:
                continue
            cur.executemany(f"INSERT INTO {fts} ({fts}, rowid, context, text) VALUES ('delete', ?, ?, ?)", rows)
            cur.execute(f"DELETE FROM rag_chunks WHERE {where}", [info.collection_id, *part])
            removed.extend(int(r[0]) for r in rows)
        return removed

    def _insert_chunks(self, cur: Any, info: CollectionInfo, writes: Sequence[DocumentWrite]) -> tuple[list[int], int]:
        from keel.trace import dumps

        insert = (
            "INSERT INTO rag_chunks (collection_id, doc_id, ordinal, start_char, end_char, context, text, metadata,"
            " n_tokens, embedding) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        )
        fts = f"INSERT INTO rag_fts_{info.collection_id} (rowid, context, text) VALUES (?, ?, ?)"
        ids: list[int] = []
        for w in writes:
            for chunk, vector in zip(w.chunks, w.vectors, strict=True):
                metadata = {**w.document.metadata, **chunk.metadata}
                cur.execute(
                    insert,
                    [info.collection_id, w.document.doc_id, chunk.ordinal, chunk.start, chunk.end, chunk.context,
                     chunk.text, dumps(metadata), chunk.n_tokens, vector_blob(vector)],
                )  # fmt: skip
                chunk_id = int(cur.lastrowid)
                cur.execute(fts, [chunk_id, chunk.context, chunk.text])
                ids.append(chunk_id)
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
        """Bring the vector index along: this write's rows directly when it held exactly what the write
        started from, else a sync from the store (which has them too). After an ingest the file is complete."""
        ann = self._get_ann(info)
        with ann.lock:
            if ann.state.version == version - 1:
                ann.remove(removed)
                if added:
                    vectors = np.vstack([w.vectors for w in writes if len(w.chunks)])
                    ann.add(np.asarray(added, dtype=np.int64), vectors)
                ann.state.version, ann.state.deletions = version, deletions
                ann.state.max_id = max([ann.state.max_id, *added])
                return
        fresh = self.collection(info.name)
        if fresh is not None:
            self._sync(ann, fresh)

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

    # --- vector index ---------------------------------------------------------------------

    def _get_ann(self, info: CollectionInfo) -> AnnIndex:
        with self._lock:
            ann = self._anns.get(info.collection_id)
            if ann is None:
                folder = self.folder
                path = folder / f"{info.collection_id}.usearch" if folder is not None else None
                ann = self._anns[info.collection_id] = AnnIndex(path, info.dimensions)
            return ann

    def ann(self, info: CollectionInfo) -> AnnIndex:
        """The collection's vector index, brought up to date with the store."""
        ann = self._get_ann(info)
        if ann.state.version != info.version:
            self._sync(ann, info)
        return ann

    def _sync(self, ann: AnnIndex, info: CollectionInfo) -> None:
        with ann.lock:
            if ann.state.version == info.version:
                return
            if ann.state.version < 0 or ann.state.deletions != info.deletions:
                with self.store.transaction() as cur:
                    cur.execute("SELECT chunk_id FROM rag_chunks WHERE collection_id = ?", [info.collection_id])
                    stored = np.fromiter((r[0] for r in cur.fetchall()), dtype=np.int64)
                held = ann.keys().astype(np.int64)
                ann.remove(np.setdiff1d(held, stored, assume_unique=True).tolist())
                missing = np.setdiff1d(stored, held, assume_unique=True)
                self._add_from_store(ann, info, missing.tolist())
                newest = int(stored.max()) if len(stored) else 0
            else:
                with self.store.transaction() as cur:
                    cur.execute(  # `+collection_id`: walk the primary key from max_id (see RagIndex.chunks)
                        "SELECT chunk_id FROM rag_chunks WHERE +collection_id = ? AND chunk_id > ?",
                        [info.collection_id, ann.state.max_id],
                    )
                    ids = [int(r[0]) for r in cur.fetchall()]
                self._add_from_store(ann, info, ids)
                newest = max(ids, default=0)
            ann.state.version, ann.state.deletions = info.version, info.deletions
            ann.state.max_id = max(ann.state.max_id, newest)
            ann.dirty = True

    def _add_from_store(self, ann: AnnIndex, info: CollectionInfo, ids: list[int], batch: int = 20_000) -> None:
        for start in range(0, len(ids), batch):
            part = ids[start : start + batch]
            with self.store.transaction() as cur:
                cur.execute(
                    "SELECT chunk_id, embedding FROM rag_chunks WHERE +collection_id = ? AND chunk_id IN"
                    " (SELECT value FROM json_each(?))",
                    [info.collection_id, "[" + ",".join(str(int(i)) for i in part) + "]"],
                )
                rows = cur.fetchall()
            if rows:
                keys = np.array([r[0] for r in rows], dtype=np.int64)
                vectors = np.frombuffer(b"".join(bytes(r[1]) for r in rows), dtype="<f4").reshape(len(rows), -1)
                ann.add(keys, vectors)

    # --- search ----------------------------------------------------------------------------

    def keyword(
        self, info: CollectionInfo, query: str, k: int, conditions: tuple[Condition, ...] = ()
    ) -> list[tuple[int, float]]:
        terms = keyword_terms(query)
        if not terms or k <= 0:
            return []
        match = " OR ".join('"' + t.replace('"', '""') + '"' for t in terms)
        fts = f"rag_fts_{info.collection_id}"
        rank = f"bm25({fts}, {float(self.context_weight)}, 1.0)"
        where, params = sql_filter(conditions, "sqlite")
        if conditions:
            sql = (
                f"SELECT f.rowid, {rank} AS r FROM {fts} f JOIN rag_chunks c ON c.chunk_id = f.rowid"
                f" WHERE {fts} MATCH ?{where} ORDER BY r LIMIT ?"
            )
        else:
            sql = f"SELECT rowid, {rank} AS r FROM {fts} WHERE {fts} MATCH ? ORDER BY r LIMIT ?"
        with self.store.transaction() as cur:
            cur.execute(sql, [match, *params, k])
            return [(int(r[0]), -float(r[1])) for r in cur.fetchall()]

    def vector(
        self, info: CollectionInfo, vector: np.ndarray, k: int, conditions: tuple[Condition, ...] = ()
    ) -> list[tuple[int, float]]:
        ann = self.ann(info)
        query = np.asarray(vector, dtype=np.float32)
        if not conditions:
            return ann.search(query, k)
        where, params = sql_filter(conditions, "sqlite")
        with self.store.transaction() as cur:
            cur.execute(
                f"SELECT c.chunk_id FROM rag_chunks c WHERE c.collection_id = ?{where}", [info.collection_id, *params]
            )
            allowed = np.fromiter((r[0] for r in cur.fetchall()), dtype=np.int64)
        if len(allowed) <= EXACT_LIMIT:
            return ann.exact(query, allowed, k)
        fraction = len(allowed) / max(1, len(ann))
        wanted = min(len(ann), int(k / fraction * 2) + k)
        allowed_set = set(allowed.tolist())
        hits = [(i, s) for i, s in ann.search(query, wanted) if i in allowed_set][:k]
        return hits if len(hits) >= k else ann.exact(query, allowed, k)
