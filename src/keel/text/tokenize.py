"""Token offsets for chunking: where each token of a text starts and ends.

Chunk sizes are counted in the embedding model's own tokens when keel has its
tokenizer (the local ONNX models: WordPiece, so a 256-token chunk is exactly
what all-MiniLM-L6-v2 reads before it truncates), else in OpenAI's o200k_base
tokens from `bpe-openai`, close to what hosted embedding models count.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

__all__ = ["BpeTokens", "TokenCounter", "WordPieceTokens", "token_counter"]


class TokenCounter(Protocol):
    name: str

    def offsets(self, text: str) -> list[tuple[int, int]]:
        """(start, end) character offsets of every token of `text`, special tokens excluded."""
        ...

    def count(self, text: str) -> int: ...


class WordPieceTokens:
    """A Hugging Face `tokenizers` tokenizer.json, without truncation or padding."""

    def __init__(self, path: Path, name: str) -> None:
        from tokenizers import Tokenizer

        self._tokenizer = Tokenizer.from_file(str(path))
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        self.name = name

    def offsets(self, text: str) -> list[tuple[int, int]]:
        encoding = self._tokenizer.encode(text, add_special_tokens=False)
        return [(int(a), int(b)) for a, b in encoding.offsets]

    def count(self, text: str) -> int:
        return len(self._tokenizer.encode(text, add_special_tokens=False).ids)


class BpeTokens:
    """An OpenAI encoding from bpe-openai (offline, tiktoken-compatible)."""

    def __init__(self, encoding: str = "o200k_base") -> None:
        import bpe_openai

        self._encoding: Any = bpe_openai.get_encoding(encoding)
        self.name = encoding

    def offsets(self, text: str) -> list[tuple[int, int]]:
        tokens = self._encoding.encode(text, disallowed_special=())
        _, starts = self._encoding.decode_with_offsets(tokens)
        # A character split across two tokens gives both the same start; keep strictly increasing spans.
        spans: list[tuple[int, int]] = []
        bounds = [*starts, len(text)]
        for i in range(len(starts)):
            start, end = bounds[i], bounds[i + 1]
            if end > start:
                spans.append((start, end))
            elif spans:
                continue
        return spans

    def count(self, text: str) -> int:
        return len(self._encoding.encode(text, disallowed_special=()))


@lru_cache(maxsize=8)
def token_counter(tokenizer_path: str | None = None) -> TokenCounter:
    """The counter for a tokenizer.json path, or o200k_base when there is none."""
    if tokenizer_path:
        return WordPieceTokens(Path(tokenizer_path), Path(tokenizer_path).parent.name or "wordpiece")
    return BpeTokens()
