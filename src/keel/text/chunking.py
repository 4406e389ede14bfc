"""Chunking strategies: token windows, structure-aware, and sentences.

Every chunk is a span of its document's text (`text == document.text[start:end]`),
so a citation can point at the exact characters. Every chunk also carries
its context: the document title and the heading path above it
("Guide > Install > Linux"), which is indexed and embedded with the chunk,
and the section and PDF page in its metadata.

- `tokens`: fixed windows of `size` tokens, each starting `size - overlap`
  tokens after the previous one. Blind to structure; the baseline.
- `structure` (default): never crosses a heading; packs whole paragraphs up
  to `size` tokens; a longer paragraph is packed sentence by sentence, and a
  sentence longer than `size` is cut into token windows.
- `sentences`: packs whole sentences up to `size` tokens, the next chunk
  repeating the last sentences of the previous one up to `overlap` tokens.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from keel.text.documents import Document, Section
from keel.text.sentences import Progress, sentence_spans
from keel.text.tokenize import TokenCounter, token_counter

__all__ = ["Chunk", "ChunkSettings", "chunk_document"]

Strategy = Literal["tokens", "structure", "sentences"]


class ChunkSettings(BaseModel):
    """How documents are cut. Whoever stores chunks keeps these with them: other settings mean other chunks."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    strategy: Strategy = "structure"
    size: int = Field(default=256, ge=16, le=8192, description="most tokens in a chunk")
    overlap: int = Field(default=32, ge=0, description="tokens repeated between neighbouring chunks")

    @model_validator(mode="after")
    def _overlap_smaller(self) -> ChunkSettings:
        if self.overlap >= self.size:
            raise ValueError(f"overlap ({self.overlap}) must be smaller than size ({self.size})")
        return self


@dataclass(frozen=True, slots=True)
class Chunk:
    ordinal: int
    start: int
    end: int
    text: str
    context: str  # title and heading path, indexed and embedded with the text
    n_tokens: int
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def indexed_text(self) -> str:
        """What is embedded: the context line, then the chunk."""
        return f"{self.context}\n{self.text}" if self.context else self.text


Span = tuple[int, int, int]  # (start, end, tokens)


def chunk_document(
    document: Document,
    settings: ChunkSettings | None = None,
    tokens: TokenCounter | None = None,
    progress: Progress | None = None,
) -> list[Chunk]:
    """The chunks of one document, in order (default: `ChunkSettings()`, sizes counted in o200k tokens).

    `progress`, if given, is called with increasing offsets of the text as it is cut (after each paragraph:
    sentence splitting takes most of the time of a large document), the last call with the text's length."""
    settings = ChunkSettings() if settings is None else settings
    tokens = token_counter(None) if tokens is None else tokens
    text = document.text
    if settings.strategy == "tokens":
        spans = _windows(text, 0, len(text), settings.size, settings.overlap, tokens)
    elif settings.strategy == "sentences":
        units = _sentence_units(text, 0, len(text), settings.size, tokens, progress)
        spans = _pack(units, settings.size, settings.overlap, _measure(text, tokens))
    else:
        spans = _structure(document, settings, tokens, progress)
    if progress is not None:
        progress(len(text))
    headings = _Headings(document)
    chunks: list[Chunk] = []
    for start, end, count in spans:
        start, end = _trim(text, start, end)
        if end <= start:
            continue
        metadata: dict[str, Any] = {}
        if (section := headings.section_at(start)) is not None:
            metadata["section"] = section
        if document.pages:
            metadata["page"] = document.page_at(start)
            metadata["page_end"] = document.page_at(max(start, end - 1))
        chunks.append(Chunk(len(chunks), start, end, text[start:end], headings.context_at(start), count, metadata))
    return chunks


def _trim(text: str, start: int, end: int) -> tuple[int, int]:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def _measure(text: str, tokens: TokenCounter) -> Callable[[int, int], int]:
    return lambda start, end: tokens.count(text[start:end])


# --- token windows ----------------------------------------------------------------------


def _windows(text: str, start: int, end: int, size: int, overlap: int, tokens: TokenCounter) -> list[Span]:
    offsets = [(a + start, b + start) for a, b in tokens.offsets(text[start:end])]
    if not offsets:
        return [(start, end, 0)] if text[start:end].strip() else []
    step = max(1, size - overlap)
    spans = []
    for first in range(0, len(offsets), step):
        last = min(first + size, len(offsets))
        spans.append((offsets[first][0], offsets[last - 1][1], last - first))
        if last == len(offsets):
            break
    return spans


# --- packing units ----------------------------------------------------------------------


def _pack(units: Sequence[Span], size: int, overlap: int, measure: Callable[[int, int], int]) -> list[Span]:
    """Consecutive units joined while they fit in `size` tokens; the next chunk starts with
    the previous chunk's last units that fit in `overlap` tokens.

    Unit counts add up only roughly (the text between units has tokens too, and BPE may merge
    across a boundary), so a join that comes near the limit is measured on the joined text.
    """
    chunks: list[Span] = []
    i = 0
    while i < len(units):
        j, total = i + 1, units[i][2]
        while j < len(units):
            estimate = total + units[j][2]
            if estimate + (j - i + 1) > size:  # near the limit: measure the joined span itself
                estimate = measure(units[i][0], units[j][1])
                if estimate > size:
                    break
            total = estimate
            j += 1
        chunks.append((units[i][0], units[j - 1][1], total))
        if j >= len(units):
            break
        back, carried = j, 0
        while overlap and back - 1 > i and carried + units[back - 1][2] <= overlap:
            back -= 1
            carried += units[back][2]
        i = back
    return chunks


def _sentence_units(
    text: str, start: int, end: int, size: int, tokens: TokenCounter, progress: Progress | None = None
) -> list[Span]:
    """Sentences as packing units; a sentence longer than `size` becomes token windows."""
    units: list[Span] = []
    for a, b in sentence_spans(text, start, end, progress):
        count = tokens.count(text[a:b])
        units.extend(_windows(text, a, b, size, 0, tokens) if count > size else [(a, b, count)])
    return units


# --- structure --------------------------------------------------------------------------

_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")


def _blocks(document: Document) -> list[tuple[int, int]]:
    """Section bodies: the text between one heading's start and the next."""
    starts = sorted({0, *(s.start for s in document.sections)})
    ends = [*starts[1:], len(document.text)]
    return [(a, b) for a, b in zip(starts, ends, strict=True) if document.text[a:b].strip()]


def _paragraphs(text: str, start: int, end: int) -> list[tuple[int, int]]:
    spans, cursor = [], start
    for match in _PARAGRAPH_BREAK.finditer(text, start, end):
        spans.append((cursor, match.start()))
        cursor = match.end()
    spans.append((cursor, end))
    return [(a, b) for a, b in spans if text[a:b].strip()]


def _structure(
    document: Document, settings: ChunkSettings, tokens: TokenCounter, progress: Progress | None
) -> list[Span]:
    text = document.text
    measure = _measure(text, tokens)
    spans: list[Span] = []
    for block_start, block_end in _blocks(document):
        units: list[Span] = []
        for a, b in _paragraphs(text, block_start, block_end):
            count = tokens.count(text[a:b])
            if count <= settings.size:
                units.append((a, b, count))
                continue
            # a long paragraph: its sentences, packed with overlap, become units of their own
            sentences = _sentence_units(text, a, b, settings.size, tokens)
            units.extend(_pack(sentences, settings.size, settings.overlap, measure))
            if progress is not None:
                progress(b)
        spans.extend(_pack(units, settings.size, 0, measure))
    return spans


class _Headings:
    """The heading path above any offset of a document."""

    def __init__(self, document: Document) -> None:
        self.title = document.title.strip()
        self.starts: list[int] = []
        self.paths: list[tuple[str, ...]] = []
        stack: list[Section] = []
        for section in sorted(document.sections, key=lambda s: s.start):
            while stack and stack[-1].level >= section.level:
                stack.pop()
            stack.append(section)
            self.starts.append(section.start)
            self.paths.append(tuple(s.title for s in stack if s.title))

    def _path(self, offset: int) -> tuple[str, ...]:
        index = bisect.bisect_right(self.starts, offset) - 1
        return self.paths[index] if index >= 0 else ()

    def section_at(self, offset: int) -> str | None:
        path = self._path(offset)
        return path[-1] if path else None

    def context_at(self, offset: int) -> str:
        path = list(self._path(offset))
        if path and self.title and path[0].casefold() == self.title.casefold():
            path = path[1:]
        return " > ".join(p for p in (self.title, *path) if p)
