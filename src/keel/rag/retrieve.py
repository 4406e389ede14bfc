"""Retrieval: BM25, dense, and their fusion; then optional reranking, then a token budget.

- `bm25`: the backend's keyword search.
- `dense`: the query's embedding against chunk vectors (cosine).
- `hybrid`: both, fused either by reciprocal rank fusion (each list gives a
  chunk weight / (k + rank); `rrf_k` tunes how fast credit falls with rank)
  or by weighted score fusion (each list's scores min-max scaled to [0, 1]
  over its candidates, then `dense_weight` of the dense score plus the rest of
  the BM25 score; a chunk missing from a list gets 0 from it).

Every hit keeps each retriever's score and rank next to the fused and
reranked ones, so `keel rag search` can show why a chunk ranks where it does,
and the `rag.retrieve` span records the ids and scores of what was returned.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import numpy as np

from keel.errors import InputError
from keel.rag.embedder import Embedder
from keel.rag.filters import Condition
from keel.rag.index.base import CollectionInfo, RagIndex, StoredChunk
from keel.trace import Tracer

__all__ = ["Hit", "Retrieval", "RetrievalOptions", "Retriever", "fuse_rrf", "fuse_weighted"]

Mode = Literal["bm25", "dense", "hybrid"]
Fusion = Literal["rrf", "weighted"]


@dataclass(frozen=True)
class RetrievalOptions:
    mode: Mode = "hybrid"
    fusion: Fusion = "rrf"
    rrf_k: float = 60.0
    dense_weight: float = 0.5
    candidates: int = 100
    top_k: int = 8
    conditions: tuple[Condition, ...] = ()

    def check(self) -> RetrievalOptions:
        if self.mode not in ("bm25", "dense", "hybrid"):
            raise InputError(f"retriever must be bm25, dense or hybrid, not {self.mode!r}")
        if self.fusion not in ("rrf", "weighted"):
            raise InputError(f"fusion must be rrf or weighted, not {self.fusion!r}")
        if not 0 <= self.dense_weight <= 1:
            raise InputError(f"dense_weight must be between 0 and 1, got {self.dense_weight}")
        if self.rrf_k <= 0:
            raise InputError(f"rrf_k must be positive, got {self.rrf_k}")
        if not 1 <= self.top_k <= 1000 or not 1 <= self.candidates <= 10_000:
            raise InputError("top_k must be 1 to 1000 and candidates 1 to 10000")
        return self


@dataclass(frozen=True)
class Hit:
    chunk: StoredChunk
    score: float  # the score the list is ordered by: fused, reranked, or the single retriever's
    bm25: float | None = None
    bm25_rank: int | None = None
    dense: float | None = None
    dense_rank: int | None = None
    fused: float | None = None
    rerank: float | None = None

    def to_json(self) -> dict[str, Any]:
        c = self.chunk
        return {
            "chunk_id": c.chunk_id, "doc_id": c.doc_id, "title": c.title, "source": c.source, "start": c.start,
            "end": c.end, "context": c.context, "text": c.text, "metadata": c.metadata, "score": self.score,
            "bm25": self.bm25, "bm25_rank": self.bm25_rank, "dense": self.dense, "dense_rank": self.dense_rank,
            "fused": self.fused, "rerank": self.rerank,
        }  # fmt: skip


@dataclass
class Retrieval:
    hits: list[Hit]
    mode: Mode
    timings_ms: dict[str, float] = field(default_factory=dict)
    cut: list[Hit] = field(default_factory=list)  # candidates the reranker placed below top_k, in its order


Ranked = Sequence[tuple[int, float]]


def fuse_rrf(lists: Sequence[tuple[Ranked, float]], k: float) -> dict[int, float]:
    """Reciprocal rank fusion: sum of weight / (k + rank) over the lists (ranks from 1)."""
    fused: dict[int, float] = {}
    for ranked, weight in lists:
        for rank, (chunk_id, _) in enumerate(ranked, start=1):
            fused[chunk_id] = fused.get(chunk_id, 0.0) + weight / (k + rank)
    return fused


def fuse_weighted(lists: Sequence[tuple[Ranked, float]]) -> dict[int, float]:
    """Min-max scaled scores, weighted and summed (absent from a list: 0 from it)."""
    fused: dict[int, float] = {}
    for ranked, weight in lists:
        if not ranked:
            continue
        scores = np.array([s for _, s in ranked], dtype=np.float64)
        low, span = float(scores.min()), float(scores.max() - scores.min())
        for chunk_id, score in ranked:
            scaled = (score - low) / span if span > 0 else 1.0
            fused[chunk_id] = fused.get(chunk_id, 0.0) + weight * scaled
    return fused


class Retriever:
    """Search one collection; each call is a `rag.retrieve` span."""

    def __init__(self, index: RagIndex, embedder: Embedder, info: CollectionInfo, tracer: Tracer) -> None:
        self.index = index
        self.embedder = embedder
        self.info = info
        self.tracer = tracer

    async def retrieve(
        self, query: str, options: RetrievalOptions, *, key: str | None = None, keep: int | None = None
    ) -> Retrieval:
        """The best `keep` (default: top_k) chunks for `query`."""
        options.check()
        keep = keep or options.top_k
        with self.tracer.span(f"rag.retrieve {self.info.name}") as span:
            span.set(gen_ai__operation__name="retrieval", keel__rag__collection=self.info.name)
            span.set(keel__rag__retriever=options.mode, keel__rag__candidates=options.candidates)
            span.input = {"query": query, "filter": [asdict(c) for c in options.conditions]}
            timings: dict[str, float] = {}
            bm25, dense = await self._candidates(query, options, timings, key)
            hits = self._rank(bm25, dense, options, keep)
            t0 = time.perf_counter()
            chunks = await asyncio.to_thread(self.index.chunks, self.info.collection_id, [h[0] for h in hits])
            timings["fetch_ms"] = round((time.perf_counter() - t0) * 1000, 3)
            found = [replace(h[1], chunk=chunks[h[0]]) for h in hits if h[0] in chunks]
            span.set(keel__rag__hits=len(found))
            span.output = {"chunks": [_hit_summary(h) for h in found], "timings_ms": timings}
            return Retrieval(found, options.mode, timings)

    async def _candidates(
        self, query: str, options: RetrievalOptions, timings: dict[str, float], key: str | None
    ) -> tuple[Ranked, Ranked]:
        async def keyword() -> Ranked:
            if options.mode == "dense":
                return []
            t0 = time.perf_counter()
            found = await asyncio.to_thread(
                self.index.keyword, self.info, query, options.candidates, options.conditions
            )
            timings["bm25_ms"] = round((time.perf_counter() - t0) * 1000, 3)
            return found

        async def vector() -> Ranked:
            if options.mode == "bm25":
                return []
            t0 = time.perf_counter()
            embedded = await self.embedder.query(query, key=key)
            timings["embed_ms"] = round((time.perf_counter() - t0) * 1000, 3)
            t1 = time.perf_counter()
            found = await asyncio.to_thread(
                self.index.vector, self.info, embedded, options.candidates, options.conditions
            )
            timings["dense_ms"] = round((time.perf_counter() - t1) * 1000, 3)
            return found

        bm25, dense = await asyncio.gather(keyword(), vector())
        return bm25, dense

    def _rank(self, bm25: Ranked, dense: Ranked, options: RetrievalOptions, keep: int) -> list[tuple[int, Hit]]:
        placeholder = StoredChunk(0, "", 0, 0, 0, "", "")
        b_scores = {cid: (s, r) for r, (cid, s) in enumerate(bm25, start=1)}
        d_scores = {cid: (s, r) for r, (cid, s) in enumerate(dense, start=1)}
        if options.mode == "bm25":
            order: dict[int, float] = {cid: s for cid, s in bm25}
        elif options.mode == "dense":
            order = {cid: s for cid, s in dense}
        else:
            lists = [(bm25, 1.0 - options.dense_weight), (dense, options.dense_weight)]
            if options.fusion == "rrf":
                order = fuse_rrf([(r, 2 * w) for r, w in lists], options.rrf_k)
            else:
                order = fuse_weighted(lists)
        ranked = sorted(order.items(), key=lambda item: (-item[1], item[0]))[:keep]
        out = []
        for cid, score in ranked:
            b, d = b_scores.get(cid), d_scores.get(cid)
            out.append((cid, Hit(
                placeholder, score, bm25=b[0] if b else None, bm25_rank=b[1] if b else None,
                dense=d[0] if d else None, dense_rank=d[1] if d else None,
                fused=score if options.mode == "hybrid" else None,
            )))  # fmt: skip
        return out


def _hit_summary(hit: Hit) -> dict[str, Any]:
    return {
        "chunk_id": hit.chunk.chunk_id, "doc_id": hit.chunk.doc_id, "score": round(hit.score, 6),
        "bm25": hit.bm25, "dense": hit.dense, "rerank": hit.rerank,
    }  # fmt: skip
