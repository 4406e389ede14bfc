"""Search blocks shared by every app: an ANN index (usearch HNSW) and a keyword index (tantivy BM25).

    from keel.vectors import AnnIndex, SyncState, catch_up

    ann = AnnIndex(Path("cache.usearch"), dimensions=384)  # loads the file and its state when they exist
    catch_up(ann, SyncState(version, deletions), my_rows)  # my_rows: a RowSource over your own table
    ann.save()  # the ANN index changes in memory: save writes it (a KeywordIndex commits in catch_up itself)
    ann.search(query_vector, k=5)  # [(id, cosine)]; vectors of any norm, one model's

`version` and `deletions` are your table's counters: move `version` on every write, `deletions` on every
delete (tests/test_vectors.py keeps them for a cache-like table). A RowSource's `rows` yields batches in
the shape the index's `add_rows` takes: `(id, vector_blob(v))` for AnnIndex, `(id, context, text)` for
KeywordIndex, so one table feeds each index through a RowSource of its own columns.

Both are indexes derived from rows kept elsewhere: SQLite is the truth, the index a copy that catches up
after another process or a crash (keel.vectors.derived). RAG keeps one of each per collection; the semantic
cache will keep its cached prompts' vectors the same way, without importing `keel.rag`. What is RAG's own
stays in keel.rag.index: the collection, document and chunk tables, metadata filters on chunks, and
PostgreSQL's BM25 and pgvector queries over those tables (their SQL is written for those tables; a new app's
tables get their own). Imports point down only (tests/test_layers.py).
"""

from keel.vectors.ann import AnnIndex
from keel.vectors.derived import DerivedIndex, IndexSession, RowSource, SyncState, catch_up
from keel.vectors.encoding import pgvector_text, vector_blob, vectors_from_blobs
from keel.vectors.filtered import EXACT_LIMIT, Hits, filtered_search
from keel.vectors.keywords import KeywordIndex

__all__ = [
    "EXACT_LIMIT", "AnnIndex", "DerivedIndex", "Hits", "IndexSession", "KeywordIndex", "RowSource", "SyncState",
    "catch_up", "filtered_search", "pgvector_text", "vector_blob", "vectors_from_blobs",
]  # fmt: skip
