"""RAG: ingestion, chunking, local embeddings, hybrid search, reranking and cited answers.

    from keel import Gateway
    from keel.rag import RAG

    with Gateway() as gw:
        rag = RAG(gw)
        rag.ingest_sync("docs/", collection="handbook")
        print(rag.ask_sync("How do I rotate a key?", collection="handbook").text)

The backend follows the gateway's store: SQLite (with a tantivy BM25 folder and a usearch HNSW file)
or PostgreSQL (full-text search and pgvector). See docs/rag.md.
"""

from keel.rag.answer import Answer, CheckedSentence, Citation, Quote
from keel.rag.chunking import Chunk, ChunkSettings
from keel.rag.collection import CollectionSettings, SettingsMismatch
from keel.rag.documents import Document, Problem, Section
from keel.rag.engine import RAG, QueryTooLong
from keel.rag.filters import InvalidFilter
from keel.rag.index import CollectionExists, CollectionInfo, UnknownCollection
from keel.rag.ingest import IngestReport, StoreUnavailable
from keel.rag.retrieve import Hit, Retrieval, RetrievalOptions

__all__ = [
    "RAG", "Answer", "CheckedSentence", "Chunk", "ChunkSettings", "Citation", "CollectionExists", "CollectionInfo",
    "CollectionSettings", "Document", "Hit", "IngestReport", "InvalidFilter", "Problem", "QueryTooLong", "Quote",
    "Retrieval", "RetrievalOptions", "Section", "SettingsMismatch", "StoreUnavailable", "UnknownCollection",
]  # fmt: skip
