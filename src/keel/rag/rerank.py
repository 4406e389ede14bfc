"""Reranking the fused candidates: a second opinion on the first stage's best few.

No cross-encoder reranker can be installed offline here: none ships inside a
PyPI package (the packages that wrap one, such as flashrank, download the
model from a hub at run time, which fails with no network). keel has two
rerankers instead, both through the gateway, so every judgement is a traced,
priced, rate-limited call like any other:

- `llm:MODEL`, the issue's stated fallback: each candidate judged on its own
  (pointwise) by a chat model asked for a relevance grade 0-3 as JSON. With a
  capable model (gpt-4o-mini, Claude Haiku) a strong reranker; with the
  bundled SmolLM2-135M it is not (measured in docs/benchmarks.md), and keel
  does not pretend otherwise. The reranked order sorts by grade, and within a
  grade keeps the retrieval order, so a reranker that cannot tell candidates
  apart changes nothing.
- `embed:MODEL`: a second embedding model (another architecture and
  training set than the collection's) scores query and candidate, and its
  ranking is fused with the retrieval ranking by reciprocal rank. Measured on
  SciFact with all-MiniLM-L6-v2 over bge-small hybrid it does not help: 0.720
  against hybrid's 0.736 nDCG@10 on 200 queries (docs/benchmarks.md), since
  the second model is weaker than the first. It is there for a second model
  that is stronger or different in kind (a hosted embedding model over a
  local index); measure before switching it on. Candidate vectors are cached
  by content hash like every other embedding.
- `sentences:MODEL`: the candidate's best sentence rather than its whole
  text. Each sentence (with the chunk's heading context in front) is
  embedded by MODEL, usually the collection's own, and a candidate scores
  the cosine of its sentence closest to the query; that ranking is fused
  with the retrieval ranking by reciprocal rank. A chunk embedding averages
  everything the chunk says, while a question is often answered by one
  sentence of it. Sentence vectors are cached by content hash. Measured on
  SciFact with bge-small over bge-small hybrid: 0.739 against hybrid's 0.736
  nDCG@10 on 200 queries, within noise, for seconds per query on a cold
  cache (docs/benchmarks.md): the strongest of the three offline, and still
  no substitute for a cross-encoder.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from keel.errors import ConfigError, KeelError
from keel.gateway import Gateway
from keel.rag.embedder import Embedder, EmbeddingSpace
from keel.rag.index.base import RagIndex
from keel.rag.retrieve import Hit, fuse_rrf
from keel.text.sentences import sentence_spans

__all__ = ["EmbeddingReranker", "LLMReranker", "Reranker", "SentenceReranker", "make_reranker"]

GRADES = 3
_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"relevance": {"type": "integer", "minimum": 0, "maximum": GRADES}},
    "required": ["relevance"],
    "additionalProperties": False,
}
_PROMPT = (
    "Grade how well the passage answers or supports the query.\n"
    "3 = answers it directly, 2 = clearly relevant, 1 = related topic only, 0 = unrelated.\n\n"
    "Query: {query}\n\nPassage ({title}):\n{text}\n\n"
    'Reply with JSON: {{"relevance": 0-3}}'
)


class Reranker(ABC):
    name: str

    @abstractmethod
    async def scores(self, query: str, hits: Sequence[Hit], *, key: str | None = None) -> list[float]:
        """One score in [0, 1] per hit."""

    async def rerank(self, query: str, hits: Sequence[Hit], *, key: str | None = None) -> list[Hit]:
        scores = await self.scores(query, hits, key=key)
        graded = [replace(h, rerank=s) for h, s in zip(hits, scores, strict=True)]
        order = sorted(range(len(graded)), key=lambda i: (-(graded[i].rerank or 0.0), i))
        return [replace(graded[i], score=float(graded[i].rerank or 0.0)) for i in order]


class LLMReranker(Reranker):
    """Pointwise relevance grades from a chat model through the gateway."""

    def __init__(self, gateway: Gateway, model: str, *, concurrency: int = 4, max_chars: int = 2000) -> None:
        self.gateway = gateway
        self.model = gateway.resolve(model)
        self.name = f"llm:{self.model}"
        self.concurrency = concurrency
        self.max_chars = max_chars

    async def scores(self, query: str, hits: Sequence[Hit], *, key: str | None = None) -> list[float]:
        gate = asyncio.Semaphore(self.concurrency)

        async def grade(hit: Hit) -> float:
            prompt = _PROMPT.format(
                query=query, title=hit.chunk.context or hit.chunk.title, text=hit.chunk.text[: self.max_chars]
            )
            async with gate:
                try:
                    result = await self.gateway.chat(
                        prompt, self.model, response_model=_SCHEMA, temperature=0.0, max_tokens=16, max_reasks=0,
                        key=key, metadata={"purpose": "rerank"},
                    )  # fmt: skip
                except KeelError:
                    return 0.0  # a failed judgement ranks the hit last among the graded, it does not fail the query
            relevance = result.parsed.get("relevance", 0) if isinstance(result.parsed, dict) else 0
            return max(0, min(GRADES, int(relevance))) / GRADES

        return list(await asyncio.gather(*(grade(h) for h in hits)))


class EmbeddingReranker(Reranker):
    """A second embedding model's ranking of the candidates, fused with the retrieval ranking (RRF)."""

    def __init__(self, gateway: Gateway, index: RagIndex, model: str, *, rrf_k: float = 60.0) -> None:
        self.embedder = Embedder(gateway, EmbeddingSpace.of(gateway, model), index)
        self.name = f"embed:{self.embedder.space.name}"
        self.rrf_k = rrf_k

    async def scores(self, query: str, hits: Sequence[Hit], *, key: str | None = None) -> list[float]:
        if not hits:
            return []
        vectors = await self.embedder.documents([h.chunk.indexed_text for h in hits], key=key)
        return _fused_with_retrieval(vectors @ await self.embedder.query(query, key=key), self.rrf_k)


def _fused_with_retrieval(similarity: np.ndarray, rrf_k: float) -> list[float]:
    """RRF of the retrieval order (the hits as given) and the order by `similarity`, scaled to [0, 1]."""
    first = [(i, 0.0) for i in range(len(similarity))]
    second = [(int(i), 0.0) for i in np.argsort(-similarity, kind="stable")]
    fused = fuse_rrf([(first, 1.0), (second, 1.0)], rrf_k)
    best = 2.0 / (rrf_k + 1)  # first in both rankings
    return [fused[i] / best for i in range(len(similarity))]


class SentenceReranker(Reranker):
    """Each candidate's best sentence by an embedding model, fused with the retrieval ranking (RRF)."""

    def __init__(self, gateway: Gateway, index: RagIndex, model: str, *, rrf_k: float = 60.0) -> None:
        self.embedder = Embedder(gateway, EmbeddingSpace.of(gateway, model), index)
        self.name = f"sentences:{self.embedder.space.name}"
        self.rrf_k = rrf_k

    async def scores(self, query: str, hits: Sequence[Hit], *, key: str | None = None) -> list[float]:
        if not hits:
            return []
        texts: list[str] = []
        owner: list[int] = []
        for i, hit in enumerate(hits):
            text = hit.chunk.text
            context = hit.chunk.context or hit.chunk.title
            for start, end in sentence_spans(text) or [(0, len(text))]:
                texts.append(f"{context}\n{text[start:end]}" if context else text[start:end])
                owner.append(i)
        vectors = await self.embedder.documents(texts, key=key)
        similarity = vectors @ await self.embedder.query(query, key=key)
        best = np.full(len(hits), -np.inf)
        np.maximum.at(best, np.asarray(owner), similarity)
        return _fused_with_retrieval(best, self.rrf_k)


def make_reranker(gateway: Gateway, spec: str | None, index: RagIndex | None = None) -> Reranker | None:
    """A reranker from its name: "llm:MODEL", "embed:MODEL" (needs the index, for the vector cache), or None."""
    if not spec or spec == "none":
        return None
    kind, _, model = spec.partition(":")
    if kind == "llm" and model:
        return LLMReranker(gateway, model)
    if kind == "embed" and model and index is not None:
        return EmbeddingReranker(gateway, index, model)
    if kind == "sentences" and model and index is not None:
        return SentenceReranker(gateway, index, model)
    raise ConfigError(
        f"reranker {spec!r} is not known: use llm:MODEL (a chat model grades relevance), embed:MODEL (a second"
        " embedding model's opinion) or sentences:MODEL (each candidate's best sentence); no cross-encoder can be"
        " installed offline"
    )
