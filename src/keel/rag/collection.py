"""A collection's settings, and the rule that keeps its vectors of one model.

The embedding model and the chunking are chosen when a collection is created
and stored with it. Asking for other ones later is refused (vectors of two
models are never mixed in one index) unless a rebuild is asked for, which
re-chunks and re-embeds the stored documents into a new collection and swaps
it in at the end, so searches keep working meanwhile.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict

from keel.errors import InputError
from keel.rag.settings import RagConfig
from keel.text.chunking import ChunkSettings

__all__ = ["CollectionSettings", "auto_chunk_size", "check_name", "settings_from_config"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
REBUILD_PREFIX = "~rebuild~"


class CollectionSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    embedding_model: str
    chunking: ChunkSettings = ChunkSettings()

    def stored(self, embedding_id: str, tokenizer: str) -> dict[str, Any]:
        return {"embedding_model": self.embedding_model, "embedding_id": embedding_id, "tokenizer": tokenizer,
                "chunking": self.chunking.model_dump()}  # fmt: skip

    @classmethod
    def from_stored(cls, stored: dict[str, Any]) -> CollectionSettings:
        return cls(embedding_model=stored["embedding_model"], chunking=ChunkSettings(**stored["chunking"]))


#: Tokens left in the embedding model's window for the context line (title and heading path) of a chunk.
CONTEXT_ROOM = 64
MAX_AUTO_SIZE = 512


def auto_chunk_size(window: int | None) -> int:
    """Chunks that fill the embedding model's window, less room for their context line, at most 512 tokens:
    448 for bge-small (512), 192 for all-MiniLM-L6-v2 (256), 512 for hosted models."""
    if window is None:
        return MAX_AUTO_SIZE
    return max(16, min(MAX_AUTO_SIZE, window - CONTEXT_ROOM))


def settings_from_config(
    rag: RagConfig,
    *,
    window: int | None,
    embedding_model: str | None = None,
    strategy: str | None = None,
    size: int | None = None,
    overlap: int | None = None,
) -> CollectionSettings:
    """Settings for a new collection: what was asked, else `[rag]` of the configuration, else automatic sizes
    from the embedding model's window."""
    size = size if size is not None else rag.chunk_size or auto_chunk_size(window)
    try:
        chunking = ChunkSettings(
            strategy=strategy or rag.chunk_strategy,  # type: ignore[arg-type]
            size=size,
            overlap=overlap if overlap is not None else min(rag.chunk_overlap, size // 4),
        )
    except ValueError as exc:
        raise InputError(f"chunking: {_first_error(exc)}") from None
    return CollectionSettings(embedding_model=embedding_model or rag.embedding_model, chunking=chunking)


def _first_error(exc: ValueError) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        first = errors()[0]
        field = ".".join(str(p) for p in first.get("loc", ()))
        return f"{field}: {first.get('msg')}" if field else str(first.get("msg"))
    return str(exc)


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise InputError(
            f"collection name {name!r} is not valid: 1 to 64 letters, digits, '_', '.' or '-', starting with a"
            " letter or digit"
        )
    return name
