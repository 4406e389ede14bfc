"""`[rag]` of keel.toml: the RAG app's own section of the configuration.

Registered with keel.config at import (keel.config imports this module when
a file has `[rag]` or `config.rag` is read), so the core does not define it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from keel.config import Config, FieldProblem, register_section

__all__ = ["RagConfig"]


class RagConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    """Defaults of `keel rag`: new collections take the first group, every query the second."""

    embedding_model: str = "bge-small"  # a model of kind "embedding" (or an alias)
    chunk_strategy: Literal["tokens", "structure", "sentences"] = "structure"
    # tokens of the embedding model's tokenizer; None: fill its window less room for the heading path, at most 512
    chunk_size: int | None = Field(default=None, ge=16, le=8192)
    chunk_overlap: int = Field(default=32, ge=0)
    max_file_bytes: int = Field(default=50 * 1024 * 1024, gt=0)  # larger files are skipped and reported
    embed_batch: int = Field(default=128, gt=0)  # chunks per embedding call during ingest

    retriever: Literal["bm25", "dense", "hybrid"] = "hybrid"
    fusion: Literal["rrf", "weighted"] = "rrf"
    rrf_k: float = Field(default=60.0, gt=0)
    dense_weight: float = Field(default=0.5, ge=0, le=1)  # weighted fusion: share of the dense score
    candidates: int = Field(default=100, gt=0, le=10_000)  # per retriever, before fusion
    top_k: int = Field(default=8, gt=0, le=1000)  # chunks that may go into the answer
    reranker: str | None = None  # "llm:MODEL" (a chat model through the gateway) or None
    rerank_candidates: int = Field(default=30, gt=0, le=1000)
    context_tokens: int = Field(default=3000, ge=64)  # the most context tokens sent with a question
    answer_model: str | None = None  # default: default_model
    answer_max_tokens: int = Field(default=400, gt=0)
    answer_mode: Literal["auto", "generate", "extractive"] = "auto"
    min_support: float = Field(default=0.55, ge=0, le=1)  # below: abstain ("not in the documents")
    grounding_threshold: float = Field(default=0.6, ge=0, le=1)  # a sentence below it is unsupported


def _check_references(config: Config, rag: RagConfig) -> None:
    if config.resolve_name(rag.embedding_model) is None:
        message = f"rag.embedding_model names unknown model {rag.embedding_model!r}"
        raise FieldProblem(("rag", "embedding_model"), message)


register_section("rag", RagConfig, check=_check_references)
