"""Ingestion: files (or documents) in, chunks with vectors and a keyword index out.

Three stages run concurrently, joined by small queues, so the embedding
model is never idle waiting for files to be read or rows to be written:

    read + chunk (a worker thread)  ->  embed (the gateway)  ->  write (a worker thread)

Incremental: a document whose content hash matches the stored one is
skipped without being chunked or embedded; a changed one is replaced; when
a folder or file was ingested whole, documents that came from it before but
are gone now are removed (only after every file was read, so a killed run
never deletes anything).

Resumable: each write commits whole documents, so after a kill or a lost
database the same command skips what is stored and does the rest, without
duplicates. A write that fails because the store went away is retried with
backoff before the run gives up with a clear error.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np

from keel.errors import InputError, StoreUnavailable
from keel.rag.embedder import Embedder
from keel.rag.index.base import CollectionInfo, DocumentWrite, RagIndex
from keel.text.chunking import Chunk, ChunkSettings, chunk_document
from keel.text.documents import (
    DEFAULT_MAX_FILE_BYTES,
    Document,
    Problem,
    iter_files,
    load_file,
    storable,
    storable_value,
)
from keel.text.tokenize import TokenCounter

__all__ = [
    "IngestProgress", "IngestReport", "count_documents", "file_source", "run_ingest", "store_call_with_retries",
]  # fmt: skip

T = TypeVar("T")

log = logging.getLogger("keel.rag")

WRITE_RETRIES = (0.5, 1.0, 2.0, 4.0, 8.0, 15.0)  # seconds between attempts of a failed write
CHUNKING_REPORT_CHARS = 256_000  # a document at least this long reports its chunking, about this often


class IngestProgress(Protocol):
    """What an ingest reports as it goes. It may also have `embedded(chunks)`, called after each embedding batch,
    so that a large document (thousands of chunks) shows progress before it is written whole, and
    `chunking(source, done, total)`, called from the reading thread with the characters of a large document cut
    so far (chunking a 3 MB text takes seconds, most of them in sentence splitting)."""

    def started(self, total: int | None) -> None: ...

    def advanced(self, documents: int, chunks: int) -> None: ...


@dataclass
class IngestReport:
    collection: str
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    deleted: int = 0
    chunks: int = 0
    embedded: int = 0  # chunk texts the model embedded
    cached: int = 0  # chunk texts whose vector came from the cache
    cost_usd: float = 0.0  # what the embedding calls cost (0 for a local model)
    problems: list[Problem] = field(default_factory=list)
    seconds: float = 0.0
    read_s: float = 0.0  # time spent reading and chunking (in a worker thread)
    embed_s: float = 0.0  # time waiting for embeddings
    write_s: float = 0.0  # time spent writing (in a worker thread)
    trace_id: str = ""

    @property
    def documents(self) -> int:
        return self.added + self.updated + self.unchanged

    @property
    def skipped(self) -> int:
        """Files (or lines) left out; the other problems are warnings about files that were ingested."""
        return sum(p.skipped for p in self.problems)

    def to_json(self) -> dict[str, Any]:
        return {
            "collection": self.collection, "added": self.added, "updated": self.updated,
            "unchanged": self.unchanged, "deleted": self.deleted, "chunks": self.chunks, "embedded": self.embedded,
            "cached": self.cached, "cost_usd": round(self.cost_usd, 8),
            "problems": [{"source": p.source, "line": p.line, "reason": p.reason, "skipped": p.skipped}
                         for p in self.problems],
            "seconds": round(self.seconds, 3), "read_s": round(self.read_s, 3), "embed_s": round(self.embed_s, 3),
            "write_s": round(self.write_s, 3), "trace_id": self.trace_id,
        }  # fmt: skip


# --- what to ingest ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """Documents to ingest, and the scope whose missing documents are removed afterwards (None: no removal)."""

    documents: Callable[[], Iterator[Document | Problem]]
    scope: str | None
    total: int | None


def path_source(
    path: Path, *, max_bytes: int = DEFAULT_MAX_FILE_BYTES, metadata: dict[str, Any] | None = None
) -> Source:
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    files = list(iter_files(path))
    if path.is_dir() and not files:
        raise InputError(f"{path}: no supported files in this folder (.txt .md .html .pdf .docx .jsonl)")

    def documents() -> Iterator[Document | Problem]:
        for file, source in files:
            yield from load_file(file, source, max_bytes=max_bytes, metadata=metadata)

    scope = f"{path.resolve().name}/" if path.is_dir() else path.name
    return Source(documents, scope, sum(count_documents(f) for f, _ in files))


def count_documents(file: Path) -> int:
    """Documents a file will give: its lines for .jsonl, else one (for the progress bar)."""
    if file.suffix.lower() != ".jsonl":
        return 1
    try:
        with file.open("rb") as handle:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: handle.read(1 << 20), b"")) or 1
    except OSError:
        return 1


def file_source(
    file: Path, source: str, *, max_bytes: int = DEFAULT_MAX_FILE_BYTES, metadata: dict[str, Any] | None = None
) -> Source:
    """One file of a folder, named as a whole-folder ingest names it (`source`, e.g. "docs/guide/setup.md"):
    a job ingests a folder file by file, and its documents must be the ones a plain ingest would write.
    Its scope is the file, so a .jsonl line removed since the last run is removed from the collection."""
    if not file.is_file():
        raise InputError(f"{file}: no such file")
    return Source(lambda: load_file(file, source, max_bytes=max_bytes, metadata=metadata), source,
                  count_documents(file))  # fmt: skip


def documents_source(documents: Iterable[Document], *, scope: str | None = None) -> Source:
    items = list(documents)
    return Source(lambda: iter(items), scope, len(items))


# --- the pipeline ------------------------------------------------------------------------------------


@dataclass
class _Prepared:
    documents: list[tuple[Document, list[Chunk]]]
    problems: list[Problem]
    unchanged: int


def _clean(document: Document) -> Document | Problem:
    """Text every store takes (see `storable`), fixed before chunking so that offsets hold."""
    from dataclasses import replace

    if storable(document.doc_id) != document.doc_id or not document.doc_id.strip():
        return Problem(document.source or "documents", f"document id {document.doc_id!r} is not valid text")
    return replace(
        document, text=storable(document.text), title=storable(document.title), source=storable(document.source),
        metadata=storable_value(dict(document.metadata)),
    )  # fmt: skip


class _Reader:
    """Pulls documents from a source and chunks the new or changed ones (runs in a worker thread)."""

    def __init__(
        self,
        source: Source,
        hashes: dict[str, str],
        settings: ChunkSettings,
        tokens: TokenCounter,
        batch: int,
        progress: IngestProgress | None = None,
    ) -> None:
        self.iterator = source.documents()
        self.report_chunking: Callable[[str, int, int], None] | None = getattr(progress, "chunking", None)
        self.hashes = hashes
        self.settings = settings
        self.tokens = tokens
        self.batch = batch
        self.seen: set[str] = set()
        self.problem_sources: set[str] = set()
        self.done = False

    def next_batch(self) -> _Prepared:
        prepared = _Prepared([], [], 0)
        chunks = 0
        for item in self.iterator:
            if isinstance(item, Problem):
                prepared.problems.append(item)
                if item.skipped:  # a warning about a file that was read keeps it in the scope
                    self.problem_sources.add(item.source)
                continue
            document = _clean(item)
            if isinstance(document, Problem):
                prepared.problems.append(document)
                continue
            if document.doc_id in self.seen:
                prepared.problems.append(
                    Problem(document.source, f"duplicate document id {document.doc_id!r}; kept the first")
                )
                continue
            self.seen.add(document.doc_id)
            if self.hashes.get(document.doc_id) == document.content_hash:
                prepared.unchanged += 1
                if prepared.unchanged >= 4 * self.batch:
                    return prepared
                continue
            pieces = chunk_document(document, self.settings, self.tokens, self._chunking_progress(document))
            if not pieces:
                prepared.problems.append(Problem(document.source, f"document {document.doc_id!r} has no text to index"))
                continue
            prepared.documents.append((document, pieces))
            chunks += len(pieces)
            if chunks >= self.batch:
                return prepared
        self.done = True
        return prepared

    def _chunking_progress(self, document: Document) -> Callable[[int], None] | None:
        """What reports a large document's chunking, every CHUNKING_REPORT_CHARS characters and at its end."""
        report, total = self.report_chunking, len(document.text)
        if report is None or total < CHUNKING_REPORT_CHARS:
            return None
        name = document.source or document.doc_id
        last = 0

        def reached(done: int) -> None:
            nonlocal last
            if done - last >= CHUNKING_REPORT_CHARS or (done == total and last < total):
                last = done
                report(name, done, total)

        return reached


async def run_ingest(
    index: RagIndex,
    info: CollectionInfo,
    embedder: Embedder,
    source: Source,
    *,
    settings: ChunkSettings,
    tokens: TokenCounter,
    batch: int = 128,
    progress: IngestProgress | None = None,
    key: str | None = None,
    report: IngestReport | None = None,
) -> IngestReport:
    """Ingest `source` into the collection; see the module docstring for the guarantees."""
    report = report or IngestReport(info.name)
    started = time.perf_counter()
    embedder = embedder.with_store_call(partial(store_call_with_retries, index))
    hashes = await store_call_with_retries(index, index.document_hashes, info.collection_id)
    reader = _Reader(source, hashes, settings, tokens, batch, progress)
    if progress is not None:
        progress.started(source.total)
    to_embed: asyncio.Queue[_Prepared | None] = asyncio.Queue(maxsize=2)
    to_write: asyncio.Queue[tuple[_Prepared, list[DocumentWrite]] | None] = asyncio.Queue(maxsize=2)

    # A stage ends the next one with None only when it finishes: when one fails, _gather_or_cancel cancels
    # the others (a sentinel sent from a `finally` would wait forever on a full queue nobody reads).
    async def read() -> None:
        while not reader.done:
            t0 = time.perf_counter()
            prepared = await asyncio.to_thread(reader.next_batch)
            report.read_s += time.perf_counter() - t0
            await to_embed.put(prepared)
        await to_embed.put(None)

    async def embed() -> None:
        while (prepared := await to_embed.get()) is not None:
            texts = [c.indexed_text for _, pieces in prepared.documents for c in pieces]
            t0 = time.perf_counter()
            computed, cached, cost = embedder.computed, embedder.cached, embedder.cost_usd
            vectors = await _embed_in_batches(embedder, texts, batch, key, progress)
            report.embed_s += time.perf_counter() - t0
            report.embedded += embedder.computed - computed
            report.cached += embedder.cached - cached
            report.cost_usd += embedder.cost_usd - cost
            writes, row = [], 0
            for document, pieces in prepared.documents:
                writes.append(DocumentWrite(document, pieces, vectors[row : row + len(pieces)]))
                row += len(pieces)
            await to_write.put((prepared, writes))
        await to_write.put(None)

    async def write() -> None:
        while (item := await to_write.get()) is not None:
            prepared, writes = item
            t0 = time.perf_counter()
            if writes:
                await _write_with_retries(index, info, writes, ())
            report.write_s += time.perf_counter() - t0
            for document, pieces in prepared.documents:
                if document.doc_id in hashes:
                    report.updated += 1
                else:
                    report.added += 1
                report.chunks += len(pieces)
            report.unchanged += prepared.unchanged
            report.problems.extend(prepared.problems)
            if progress is not None:
                count = len(prepared.documents) + prepared.unchanged + len(prepared.problems)
                progress.advanced(count, sum(len(p) for _, p in prepared.documents))

    await _gather_or_cancel(read(), embed(), write())
    if source.scope is not None:
        under = await store_call_with_retries(
            index, index.documents_under, info.collection_id, source.scope.rstrip("/")
        )
        # a file that could not be read this time keeps what it gave before: it may be fixed, not deleted
        gone = {d for d, src in under.items() if d not in reader.seen and src not in reader.problem_sources}
        if gone:
            await _write_with_retries(index, info, [], sorted(gone))
            report.deleted += len(gone)
    await store_call_with_retries(index, index.flush, info)
    report.seconds += time.perf_counter() - started
    return report


async def _embed_in_batches(
    embedder: Embedder, texts: list[str], batch: int, key: str | None, progress: IngestProgress | None
) -> np.ndarray:
    """Vectors of `texts`, `batch` at a time: each batch is cached as soon as it is embedded, so an interrupted
    run over a large document resumes from the cache, and the progress shows the chunks embedded so far."""
    if not texts:
        return np.zeros((0, 0), np.float32)
    report_embedded = getattr(progress, "embedded", None)
    parts = []
    for start in range(0, len(texts), batch):
        parts.append(await embedder.documents(texts[start : start + batch], key=key))
        if report_embedded is not None:
            report_embedded(len(parts[-1]))
    return np.vstack(parts)


async def _gather_or_cancel(*coroutines: Any) -> None:
    """Run the stages together; the first failure cancels the others and is raised."""
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def _write_with_retries(
    index: RagIndex, info: CollectionInfo, writes: Sequence[DocumentWrite], deletes: Sequence[str]
) -> None:
    await store_call_with_retries(index, index.write, info, writes, deletes)


async def store_call_with_retries(index: RagIndex, call: Callable[..., T], *args: Any) -> T:
    """A store call in a thread, retried while the store does not answer (a PostgreSQL restart or failover);
    after the last retry, StoreUnavailable. Every call of an ingest is idempotent, so a retry is safe."""
    transient = _transient_errors(index)
    for attempt, pause in enumerate((*WRITE_RETRIES, None)):
        try:
            return await asyncio.to_thread(call, *args)
        except transient as exc:
            if pause is None:
                raise StoreUnavailable(
                    f"the store stopped answering ({type(exc).__name__}: {str(exc).strip()[:200]}); what was written"
                    " is kept: run the same command again to resume"
                ) from exc
            log.warning("the store did not answer (attempt %d): %s; retrying in %.1f s", attempt + 1, exc, pause)
            await asyncio.sleep(pause)
    raise AssertionError("unreachable")


def _transient_errors(index: RagIndex) -> tuple[type[BaseException], ...]:
    if index.store.dialect == "postgres":
        import psycopg

        return (psycopg.OperationalError, TimeoutError)
    return (TimeoutError,)
