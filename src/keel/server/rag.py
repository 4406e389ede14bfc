"""RAG over HTTP: `POST /v1/rag/{collection}/ask` and `/search`, the collections, and JSON ingestion.

Asking and searching take a virtual key like any model call: the answer's
chat call, the query embedding and any reranking are charged to it (so the
key must allow the collection's embedding model and the answer model).
A key's collection scopes decide the rest: it lists, searches and asks only
the collections it may read (`collections`, all by default), and adds
documents to or drops only those it may write (`collections_write`, none by
default: writing is the admin key's). The RAG engine
(and its tables) is created on the first RAG request, so a gateway-only
deployment never needs them.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from fastapi import Path as PathParam
from pydantic import BaseModel, ConfigDict, Field

from keel.config import KeyConfig
from keel.errors import Forbidden
from keel.rag import RAG, Document
from keel.server.auth import caller, require_admin
from keel.server.bodies import JSONBodyRoute
from keel.server.calls import attribution, guarded

__all__ = ["rag_router"]

CollectionName = Annotated[str, PathParam(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")]
NO_NUL = r"^[^\x00]*$"


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # "10" is not a number, as in the chat API


class SearchRequest(_Body):
    query: str = Field(min_length=1, max_length=20_000, pattern=NO_NUL)
    retriever: Literal["bm25", "dense", "hybrid"] | None = None
    fusion: Literal["rrf", "weighted"] | None = None
    rrf_k: float | None = Field(default=None, gt=0, le=10_000)
    dense_weight: float | None = Field(default=None, ge=0, le=1)
    candidates: int | None = Field(default=None, ge=1, le=10_000)
    top_k: int | None = Field(default=None, ge=1, le=1000)
    filter: dict[str, Any] | None = None
    rerank: bool | str | None = None

    def options(self) -> dict[str, Any]:
        return {
            "retriever": self.retriever, "fusion": self.fusion, "rrf_k": self.rrf_k, "dense_weight": self.dense_weight,
            "candidates": self.candidates, "top_k": self.top_k, "filter": self.filter,
        }  # fmt: skip


class AskRequest(SearchRequest):
    query: str | None = None  # type: ignore[assignment]  # ask takes "question"
    question: str = Field(min_length=1, max_length=20_000, pattern=NO_NUL)
    mode: Literal["auto", "generate", "extractive"] | None = None
    model: str | None = Field(default=None, min_length=1, max_length=200)
    max_tokens: int | None = Field(default=None, ge=1, le=100_000)
    context_tokens: int | None = Field(default=None, ge=64, le=2_000_000)
    user: str | None = Field(default=None, max_length=256)
    metadata: dict[str, str] | None = None


class DocumentIn(_Body):
    id: str = Field(min_length=1, max_length=1000, pattern=NO_NUL)
    text: str = Field(min_length=1)
    title: str = ""
    metadata: dict[str, Any] = {}


class DocumentsRequest(_Body):
    documents: list[DocumentIn] = Field(min_length=1, max_length=10_000)
    embedding_model: str | None = None  # for a new collection
    chunker: Literal["tokens", "structure", "sentences"] | None = None
    chunk_size: int | None = Field(default=None, ge=16, le=8192)
    overlap: int | None = Field(default=None, ge=0)


def _rag(request: Request) -> RAG:
    state = request.app.state
    if getattr(state, "rag", None) is None:
        state.rag = RAG(state.gateway)
    rag: RAG = state.rag
    return rag


def _scope(request: Request) -> KeyConfig | None:
    """The virtual key's limits, collection scopes included; None for the admin key and the open mode."""
    key = caller(request).key
    if key is None:
        return None
    scope: KeyConfig = request.app.state.gateway.keys.get(key, KeyConfig(collections=()))  # unknown: no collection
    return scope


def may_read(scope: KeyConfig | None, collection: str) -> bool:
    return scope is None or scope.collections is None or collection in scope.collections


def may_write(scope: KeyConfig | None, collection: str) -> bool:
    return scope is not None and scope.collections_write is not None and collection in scope.collections_write


def _check_read(request: Request, collection: str) -> None:
    """Refuse a key outside its read scope with 403, whether the collection exists or not (no probing)."""
    if not may_read(_scope(request), collection):
        raise Forbidden(f"key {caller(request).key!r} may not read collection {collection!r}")


async def _check_write(request: Request, collection: str) -> None:
    """The admin key, or a key whose write scope names the collection (the open mode may not write)."""
    who = caller(request)
    if who.admin:
        return
    if who.key is None:
        await require_admin(request)  # the open mode: refused, saying how to set the admin key
    if not may_write(_scope(request), collection):
        raise Forbidden(f"key {who.key!r} may not write collection {collection!r}")


def rag_router() -> APIRouter:
    router = APIRouter(prefix="/v1/rag", tags=["rag"], route_class=JSONBodyRoute)

    @router.get("/collections")
    async def collections(request: Request) -> dict[str, Any]:
        """Collections: documents, chunks, embedding model, chunking."""
        rag = await asyncio.to_thread(_rag, request)
        rows = await asyncio.to_thread(rag.collections)
        scope = _scope(request)
        rows = [c for c in rows if may_read(scope, c.name) or may_write(scope, c.name)]
        return {"object": "list", "data": [{
            "name": c.name, "documents": c.n_documents, "chunks": c.n_chunks, "embedding_model": c.embedding_model,
            "dimensions": c.dimensions, "chunking": c.settings.get("chunking"), "updated_at": c.updated_at,
        } for c in rows]}  # fmt: skip

    @router.post("/{collection}/search")
    async def search(collection: CollectionName, body: SearchRequest, request: Request) -> dict[str, Any]:
        """Raw retrieval: every hit with its BM25, dense, fused and reranked scores."""
        _check_read(request, collection)
        rag = await asyncio.to_thread(_rag, request)
        call = rag.search(body.query, collection, rerank=body.rerank, key=caller(request).key, **body.options())
        retrieval = await guarded(request, call, request.app.state.settings.request_timeout_s)
        return {"object": "rag.search", "collection": collection, "retriever": retrieval.mode,
                "timings_ms": retrieval.timings_ms, "hits": [h.to_json() for h in retrieval.hits]}  # fmt: skip

    @router.post("/{collection}/ask")
    async def ask(collection: CollectionName, body: AskRequest, request: Request) -> dict[str, Any]:
        """An answer with [n] citations mapped to document, chunk and character span, each sentence checked."""
        _check_read(request, collection)
        rag = await asyncio.to_thread(_rag, request)
        call = rag.ask(
            body.question, collection, mode=body.mode, model=body.model, rerank=body.rerank,
            context_tokens=body.context_tokens, max_tokens=body.max_tokens, key=caller(request).key,
            context=attribution(request, caller(request).key, body.user, body.metadata), **body.options(),
        )  # fmt: skip
        answer = await guarded(request, call, request.app.state.settings.request_timeout_s)
        return {"object": "rag.answer", "collection": collection, **answer.to_json()}

    @router.post("/{collection}/documents")
    async def add_documents(collection: CollectionName, body: DocumentsRequest, request: Request) -> dict[str, Any]:
        """Add or replace documents (admin, or a key that may write the collection). Unchanged ones are
        skipped; the collection is created on first use."""
        await _check_write(request, collection)
        rag = await asyncio.to_thread(_rag, request)
        custom = any(v is not None for v in (body.embedding_model, body.chunker, body.chunk_size, body.overlap))
        settings = rag.settings(
            embedding_model=body.embedding_model, strategy=body.chunker, size=body.chunk_size, overlap=body.overlap
        ) if custom else None  # fmt: skip
        documents = [
            Document(d.id, d.text, title=d.title, source="api", metadata={"source": "api", **d.metadata})
            for d in body.documents
        ]
        # embedded under the caller's key: its model scope, limits and attribution (None for the admin key)
        report = await rag.ingest(documents, collection, settings=settings, key=caller(request).key)
        return {"object": "rag.ingest", **report.to_json()}

    @router.delete("/{collection}")
    async def drop(collection: CollectionName, request: Request) -> dict[str, Any]:
        """Delete a collection (admin, or a key that may write it)."""
        await _check_write(request, collection)
        rag = await asyncio.to_thread(_rag, request)
        await asyncio.to_thread(rag.drop, collection)
        return {"object": "rag.collection", "name": collection, "deleted": True}

    return router
