"""Search blocks shared by every app: an ANN index (usearch HNSW) and a keyword index (tantivy BM25).

Both are indexes derived from rows kept elsewhere (SQLite is the truth, the index a copy that catches up
after another process or a crash: keel.vectors.derived). RAG keeps one of each per collection; the semantic
cache will keep its cached prompts' vectors the same way, without importing `keel.rag`. What is RAG's own
stays in keel.rag.index: the collection, document and chunk tables, metadata filters on chunks, and
PostgreSQL's BM25 and pgvector queries over those tables. Imports point down only (tests/test_layers.py).
"""

from keel.vectors.ann import AnnIndex
from keel.vectors.derived import DerivedIndex, IndexSession, SyncState
from keel.vectors.keywords import KeywordIndex

__all__ = ["AnnIndex", "DerivedIndex", "IndexSession", "KeywordIndex", "SyncState"]
