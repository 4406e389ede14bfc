"""The shared RAG backend: PostgreSQL full-text search scored as BM25, and pgvector HNSW.

Keyword search: `to_tsvector('english', ...)` (a generated column with a GIN
index) finds the chunks holding any query lexeme; they are scored with
BM25 (k1 = 1.2, b = 0.75, as the embedded backend's tantivy index) from the lexemes' term
frequencies in the tsvector, each chunk's length (`n_terms`), the
collection's chunk count and average length, and document frequencies kept
per collection in `rag_terms`. PostgreSQL's own `ts_rank` is not BM25 (it
knows nothing of how rare a word is), and ranking quality would show it.

Vector search: embeddings are stored as `vector` without a fixed size, and
every collection gets a partial HNSW index on `embedding::vector(d)` for its
own rows, so collections with models of different sizes share the table.
pgvector filters after the HNSW walk; a filtered search that comes back
short is re-run exactly (no index), so a filter never hides a match.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from keel.rag.filters import Condition, sql_filter
from keel.rag.index.base import CollectionInfo, DocumentWrite, RagIndex
from keel.store.postgres import PostgresStore
from keel.vectors.encoding import pgvector_text

__all__ = ["PostgresRagIndex"]

K1, B = 1.2, 0.75
MAX_QUERY_LEXEMES = 64


class PostgresRagIndex(RagIndex):
    def __init__(self, store: PostgresStore, *, ef_search: int = 100) -> None:
        super().__init__(store)
        self.ef_search = ef_search

    # --- collection objects -------------------------------------------------------------

    def _create_objects(self, cur: Any, collection_id: int, dimensions: int) -> None:
        cur = cur.raw  # psycopg's own cursor: this backend's SQL is PostgreSQL's (%s, executemany returning)
        cid, dims = int(collection_id), int(dimensions)
        cur.execute(
            f"CREATE INDEX rag_chunks_hnsw_{cid} ON rag_chunks USING hnsw ((embedding::vector({dims}))"
            f" vector_cosine_ops) WHERE collection_id = {cid}"
        )

    def _drop_objects(self, cur: Any, collection_id: int) -> None:
        cur = cur.raw
        cid = int(collection_id)
        cur.execute(f"DROP INDEX IF EXISTS rag_chunks_hnsw_{cid}")
        cur.execute("DELETE FROM rag_terms WHERE collection_id = %s", [cid])

    # --- writes ------------------------------------------------------------------------

    def _delete_chunks(self, cur: Any, info: CollectionInfo, doc_ids: Sequence[str]) -> list[int]:
        cur = cur.raw
        if not doc_ids:
            return []
        cid = info.collection_id
        cur.execute(
            "SELECT chunk_id, n_terms FROM rag_chunks WHERE collection_id = %s AND doc_id = ANY(%s)",
            [cid, list(doc_ids)],
        )
        rows = cur.fetchall()
        if not rows:
            return []
        ids = [int(r[0]) for r in rows]
        cur.execute(
            """
            UPDATE rag_terms t SET df = t.df - d.n
            FROM (SELECT u.lexeme, COUNT(*) AS n FROM rag_chunks c, unnest(c.tsv) u
                  WHERE c.chunk_id = ANY(%s) GROUP BY u.lexeme) d
            WHERE t.collection_id = %s AND t.lexeme = d.lexeme
            """,
            [ids, cid],
        )
        cur.execute("DELETE FROM rag_terms WHERE collection_id = %s AND df <= 0", [cid])
        cur.execute("DELETE FROM rag_chunks WHERE chunk_id = ANY(%s)", [ids])
        cur.execute(
            "UPDATE rag_collections SET n_terms = n_terms - %s WHERE collection_id = %s",
            [sum(int(r[1]) for r in rows), cid],
        )
        return ids

    def _insert_chunks(self, cur: Any, info: CollectionInfo, writes: Sequence[DocumentWrite]) -> tuple[list[int], int]:
        cur = cur.raw
        from keel.trace import dumps

        rows = [
            (info.collection_id, w.document.doc_id, chunk.ordinal, chunk.start, chunk.end, chunk.context,
             chunk.text, self.store.json_param(dumps({**w.document.metadata, **chunk.metadata})),
             chunk.n_tokens, pgvector_text(vector))
            for w in writes
            for chunk, vector in zip(w.chunks, w.vectors, strict=True)
        ]  # fmt: skip
        if not rows:
            return [], 0
        ids: list[int] = []
        insert = (
            "INSERT INTO rag_chunks (collection_id, doc_id, ordinal, start_char, end_char, context, text, metadata,"
            " n_tokens, embedding) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s::vector) RETURNING chunk_id"
        )
        cur.executemany(insert, rows, returning=True)
        while True:
            ids.append(int(cur.fetchone()[0]))
            if not cur.nextset():
                break
        cur.execute(
            """
            UPDATE rag_chunks c SET n_terms = COALESCE(
                (SELECT SUM(COALESCE(array_length(u.positions, 1), 1)) FROM unnest(c.tsv) u), 0)
            WHERE c.chunk_id = ANY(%s) RETURNING n_terms
            """,
            [ids],
        )
        terms = sum(int(r[0]) for r in cur.fetchall())
        cur.execute(
            """
            INSERT INTO rag_terms (collection_id, lexeme, df)
            SELECT %s, u.lexeme, COUNT(*) FROM rag_chunks c, unnest(c.tsv) u WHERE c.chunk_id = ANY(%s)
            GROUP BY u.lexeme
            ON CONFLICT (collection_id, lexeme) DO UPDATE SET df = rag_terms.df + EXCLUDED.df
            """,
            [info.collection_id, ids],
        )
        return ids, terms

    # --- search ----------------------------------------------------------------------------

    def keyword(
        self, info: CollectionInfo, query: str, k: int, conditions: tuple[Condition, ...] = ()
    ) -> list[tuple[int, float]]:
        if k <= 0 or not query.strip():
            return []
        cid = info.collection_id
        with self.store.transaction() as tx:
            cur = tx.raw
            cur.execute("SELECT tsvector_to_array(to_tsvector('english', %s))", [query])
            lexemes = list(dict.fromkeys(cur.fetchone()[0] or []))[:MAX_QUERY_LEXEMES]
            if not lexemes:
                return []
            cur.execute("SELECT n_chunks, n_terms FROM rag_collections WHERE collection_id = %s", [cid])
            n_chunks, n_terms = cur.fetchone()
            cur.execute(
                "SELECT lexeme, df FROM rag_terms WHERE collection_id = %s AND lexeme = ANY(%s)", [cid, lexemes]
            )
            df = {r[0]: int(r[1]) for r in cur.fetchall()}
            present = [lex for lex in lexemes if df.get(lex)]
            if not present or not n_chunks:
                return []
            idf = [math.log(1 + (n_chunks - df[lex] + 0.5) / (df[lex] + 0.5)) for lex in present]
            average = max(1.0, n_terms / n_chunks)
            tsquery = " | ".join("'" + lex.replace("'", "''").replace("\\", "\\\\") + "'" for lex in present)
            where, params = sql_filter(conditions, "postgres")
            sql = f"""
                SELECT c.chunk_id,
                       SUM(q.idf * (m.tf * {K1 + 1}) / (m.tf + {K1} * (1 - {B} + {B} * c.n_terms / %s))) AS score
                FROM rag_chunks c
                CROSS JOIN LATERAL (
                    SELECT u.lexeme, COALESCE(array_length(u.positions, 1), 1) AS tf FROM unnest(c.tsv) u
                ) m
                JOIN unnest(%s::text[], %s::float8[]) AS q(lexeme, idf) ON q.lexeme = m.lexeme
                WHERE c.collection_id = {int(cid)} AND c.tsv @@ %s::tsquery{where.replace("?", "%s")}
                GROUP BY c.chunk_id ORDER BY score DESC, c.chunk_id LIMIT %s
            """
            cur.execute(sql, [average, present, idf, tsquery, *params, k])
            return [(int(r[0]), float(r[1])) for r in cur.fetchall()]

    def vector(
        self, info: CollectionInfo, vector: np.ndarray, k: int, conditions: tuple[Condition, ...] = ()
    ) -> list[tuple[int, float]]:
        if k <= 0:
            return []
        cid, dims = int(info.collection_id), int(info.dimensions)
        where, params = sql_filter(conditions, "postgres")
        distance = f"c.embedding::vector({dims}) <=> %s::vector({dims})"
        sql = (
            f"SELECT c.chunk_id, 1 - ({distance}) FROM rag_chunks c WHERE c.collection_id = {cid}"
            f"{where.replace('?', '%s')} ORDER BY {distance} LIMIT %s"
        )
        text = pgvector_text(vector)
        with self.store.transaction() as tx:
            cur = tx.raw
            cur.execute(f"SET LOCAL hnsw.ef_search = {max(self.ef_search, 2 * k) if not conditions else 400}")
            cur.execute(sql, [text, *params, text, k])
            rows = cur.fetchall()
            if conditions and len(rows) < k:  # the HNSW walk ran out before k rows passed the filter
                cur.execute("SET LOCAL enable_indexscan = off")
                cur.execute(sql, [text, *params, text, k])
                rows = cur.fetchall()
        return [(int(r[0]), float(r[1])) for r in rows]
