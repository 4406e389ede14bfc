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

from keel.errors import (  # RAG's errors, from the one tree, re-exported where RAG's users look for them
    CollectionExists,
    InvalidFilter,
    QueryTooLong,
    SettingsMismatch,
    StoreUnavailable,
    UnknownCollection,
)
from keel.rag.answer import Answer, CheckedSentence, Citation, Quote
from keel.rag.collection import CollectionSettings
from keel.rag.engine import RAG
from keel.rag.index import CollectionInfo
from keel.rag.ingest import IngestReport
from keel.rag.retrieve import Hit, Retrieval, RetrievalOptions
from keel.text.chunking import Chunk, ChunkSettings
from keel.text.documents import Document, Problem, Section

__all__ = [
    "RAG", "Answer", "CheckedSentence", "Chunk", "ChunkSettings", "Citation", "CollectionExists", "CollectionInfo",
    "CollectionSettings", "Document", "Hit", "IngestReport", "InvalidFilter", "Problem", "QueryTooLong", "Quote",
    "Retrieval", "RetrievalOptions", "Section", "SettingsMismatch", "StoreUnavailable", "UnknownCollection",
]  # fmt: skip
