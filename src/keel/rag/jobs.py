"""`rag.ingest`: a large ingest as a durable job, one item per file, run by any number of workers.

`keel rag ingest PATH --collection C --job NAME` lists the files a plain
ingest would read, creates (or checks) the collection, and submits one item
per file, keyed by the file's source name ("docs/guide/setup.md"). Each item
carries the collection's settings as they were at submit time (embedding
model and its identity, chunking), so every worker chunks and embeds alike,
and a worker whose configuration or collection disagrees fails the item with
a message instead of mixing vectors of two models.

An item is idempotent: RAG's ingest skips a document whose content hash is
stored and commits each document whole, so an item DBOS runs again after a
kill writes nothing twice.

    keel rag ingest ./docs -c handbook --job handbook-2026-12 --detach
    keel worker          # on each machine; then `keel jobs show handbook-2026-12`
"""

from __future__ import annotations

import atexit
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from keel import jobs
from keel.errors import InputError, SettingsMismatch
from keel.gateway import Gateway
from keel.rag.collection import CollectionSettings, check_name
from keel.rag.engine import RAG
from keel.rag.index import CollectionInfo
from keel.rag.ingest import IngestReport, file_source
from keel.text.chunking import ChunkSettings
from keel.text.documents import iter_files

__all__ = ["KIND", "IngestPlan", "close", "ingest_file", "plan_ingest", "shared_rag"]

KIND = "rag.ingest"
#: Warnings kept in an item's result (a .jsonl file may give one per line).
MAX_WARNINGS = 20

_lock = threading.Lock()
_shared: RAG | None = None


def shared_rag() -> RAG:
    """This process's RAG over one gateway (keel.toml's), opened at the first item and closed at exit."""
    global _shared
    with _lock:
        if _shared is None:
            _shared = RAG(Gateway())
            atexit.register(close)
        return _shared


def close() -> None:
    """Close the shared RAG and its gateway (their spans reach the store first)."""
    global _shared
    with _lock:
        rag, _shared = _shared, None
    if rag is not None:
        rag.close()
        rag.gateway.close()


@dataclass(frozen=True)
class IngestPlan:
    """What a job ingests: the collection's settings, fixed now, and one item input per file."""

    collection: str
    settings: CollectionSettings
    embedding_id: str
    items: dict[str, dict[str, Any]]  # source name -> the item's input


def plan_ingest(
    rag: RAG,
    path: Path,
    collection: str,
    *,
    settings: CollectionSettings | None = None,
    metadata: dict[str, str] | None = None,
) -> IngestPlan:
    """List the files under `path` (as a plain ingest does) and fix the collection's settings: the given ones,
    else the existing collection's, else `[rag]`'s; the collection is created now if it is new."""
    check_name(collection)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    files = list(iter_files(path))
    if not files:
        raise InputError(f"{path}: no supported files in this folder (.txt .md .html .pdf .docx .jsonl)")
    existing = rag.index.collection(collection)
    if settings is None:
        settings = CollectionSettings.from_stored(existing.settings) if existing is not None else rag.settings()
    info: CollectionInfo = rag.gateway._loop().run(rag.ensure_collection(collection, settings))
    common = {
        "collection": collection, "embedding_model": settings.embedding_model, "embedding_id": info.embedding_id,
        "chunking": settings.chunking.model_dump(), "metadata": dict(metadata or {}),
    }  # fmt: skip
    items = {source: {**common, "file": str(file.resolve()), "source": source} for file, source in files}
    return IngestPlan(collection, settings, info.embedding_id, items)


def _field(item: dict[str, Any], name: str, kind: type) -> Any:
    value = item.get(name)
    if not isinstance(value, kind):
        raise InputError(f"a {KIND} item needs {name!r} ({kind.__name__}), got {type(value).__name__}")
    return value


@jobs.kind(KIND, attempts=2)
def ingest_file(item: dict[str, Any], ctx: jobs.ItemContext) -> dict[str, Any]:
    """Ingest one file of a job into its collection; what it added, updated and kept (its cost to the job)."""
    if not isinstance(item, dict):
        raise InputError(f"a {KIND} item is an object, not {type(item).__name__}")
    collection = _field(item, "collection", str)
    settings = CollectionSettings(
        embedding_model=_field(item, "embedding_model", str), chunking=ChunkSettings(**_field(item, "chunking", dict))
    )
    rag = shared_rag()
    # re-created with the job's settings if it was dropped meanwhile
    info: CollectionInfo = rag.gateway._loop().run(rag.ensure_collection(collection, settings))
    if info.embedding_id != item.get("embedding_id"):
        raise SettingsMismatch(
            f"collection {collection!r} holds vectors of {info.embedding_id}, but the job was submitted for"
            f" {item.get('embedding_id')}: this worker's {settings.embedding_model!r} is another model; give every"
            " worker the same keel.toml"
        )
    source = file_source(
        Path(_field(item, "file", str)), _field(item, "source", str), max_bytes=rag.config.max_file_bytes,
        metadata=_field(item, "metadata", dict),
    )  # fmt: skip
    report = rag.ingest_sync(source, collection, settings=settings)
    ctx.add_cost(report.cost_usd)
    rag.gateway.flush()  # the item's trace (its ingest and embedding spans) in the store as it ends
    if report.documents == 0 and report.skipped:
        raise InputError("; ".join(p.reason for p in report.problems if p.skipped))
    return _result(report)


def _result(report: IngestReport) -> dict[str, Any]:
    warnings = [str(p) for p in report.problems]
    return {
        "added": report.added, "updated": report.updated, "unchanged": report.unchanged, "deleted": report.deleted,
        "chunks": report.chunks, "embedded": report.embedded, "cached": report.cached,
        "cost_usd": round(report.cost_usd, 8), "warnings": warnings[:MAX_WARNINGS],
        "more_warnings": max(0, len(warnings) - MAX_WARNINGS), "trace_id": report.trace_id,
    }  # fmt: skip
