"""Embedding for RAG: through the gateway (every call traced and priced), cached by content hash.

The cache key is the hash of the exact text sent (prefix included) under the
model's identity (`provider:model id`, not the configured name), so
re-ingesting unchanged text, rebuilding a collection, or a second collection
with the same model never pays for the same vector twice.

Which model a collection uses fixes its vector space. `EmbeddingSpace`
resolves a configured name to that identity, its dimensions, its token
counter (for chunk sizes) and its query and document prefixes.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from keel.errors import ConfigError, InputError
from keel.gateway import Gateway
from keel.rag.index.base import RagIndex
from keel.text.tokenize import TokenCounter, token_counter

__all__ = ["Embedder", "EmbeddingSpace", "StoreCall", "text_hash"]

#: Runs a blocking store call off the event loop: `await store_call(fn, *args)`.
StoreCall = Callable[..., Awaitable[Any]]


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True)
class EmbeddingSpace:
    name: str  # configured model name
    identity: str  # provider:model id
    window: int | None  # tokens the model reads (None: unknown)
    query_prefix: str
    document_prefix: str
    tokenizer_path: str | None  # the model's own tokenizer.json, when keel has it

    @classmethod
    def of(cls, gateway: Gateway, model: str) -> EmbeddingSpace:
        name = gateway.resolve(model, kind="embedding")
        config = gateway._model_config(name)
        if config.kind != "embedding":
            raise InputError(f"{name!r} is a chat model; a collection needs an embedding model (see `keel models`)")
        tokenizer = None
        window = config.context_window
        if config.provider == "onnx":
            from keel.models.onnx import OnnxEmbeddingModel

            local = OnnxEmbeddingModel(config.model)
            tokenizer = str(local.files()[1])
            window = local.max_length
        return cls(name, f"{config.provider}:{config.model}", window, config.query_prefix, config.document_prefix,
                   tokenizer)  # fmt: skip

    def tokens(self) -> TokenCounter:
        return token_counter(self.tokenizer_path)


class Embedder:
    """Vectors for chunks (cached) and queries, as float32 unit-length rows."""

    def __init__(self, gateway: Gateway, space: EmbeddingSpace, index: RagIndex) -> None:
        self.gateway = gateway
        self.space = space
        self.index = index
        self.computed = 0  # texts embedded by the model in this embedder's life
        self.cached = 0  # texts served from the cache
        self.cost_usd = 0.0  # what this embedder's model calls cost (a job item reports it)
        self._store_call: StoreCall = asyncio.to_thread

    def with_store_call(self, store_call: StoreCall) -> Embedder:
        """The same embedder with its cache reads and writes made through `store_call` (ingestion retries them)."""
        twin = Embedder(self.gateway, self.space, self.index)
        twin._store_call = store_call
        return twin

    async def documents(self, texts: Sequence[str], *, key: str | None = None) -> np.ndarray:
        sent = [self.space.document_prefix + t for t in texts]
        hashes = [text_hash(t) for t in sent]
        found = await self._store_call(self.index.cached_vectors, self.space.identity, hashes)
        missing = list(dict.fromkeys(h for h in hashes if h not in found))
        if missing:
            by_hash = {h: t for h, t in zip(hashes, sent, strict=True)}
            vectors = await self._embed([by_hash[h] for h in missing], key=key)
            fresh = dict(zip(missing, vectors, strict=True))
            await self._store_call(self.index.cache_vectors, self.space.identity, fresh)
            found.update(fresh)
        self.computed += len(missing)
        self.cached += len(hashes) - len(missing)
        if not hashes:
            return np.zeros((0, 0), dtype=np.float32)
        stacked: np.ndarray = np.vstack([found[h] for h in hashes]).astype(np.float32)
        return stacked

    async def query(self, text: str, *, key: str | None = None) -> np.ndarray:
        vector: np.ndarray = (await self._embed([self.space.query_prefix + text], key=key))[0]
        return vector

    async def _embed(self, texts: list[str], *, key: str | None) -> np.ndarray:
        result = await self.gateway.embed(texts, self.space.name, key=key, metadata={"purpose": "rag"})
        self.cost_usd += result.cost_usd or 0.0
        matrix = np.asarray(result.vectors, dtype=np.float32)
        if matrix.ndim != 2 or matrix.shape[0] != len(texts):
            raise ConfigError(f"embedding model {self.space.name!r} returned {matrix.shape} for {len(texts)} texts")
        norms = np.linalg.norm(matrix, axis=1, keepdims=True)
        unit: np.ndarray = matrix / np.clip(norms, 1e-12, None)
        return unit

    async def dimensions(self) -> int:
        """The model's vector size, from one probe embedding."""
        return int((await self._embed(["dimension probe"], key=None)).shape[1])
