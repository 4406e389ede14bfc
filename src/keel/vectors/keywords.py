"""An embedded keyword index: a tantivy (BM25) folder beside the SQLite store, keyed by integer id.

Why tantivy and not SQLite's FTS5: FTS5 ranks an OR query by scoring every
posting of every query term, with no way to skip documents that cannot reach
the top k. At a million chunks a six-word question visits ~355,000 postings,
and BM25 took 568 ms at p95 (benchmarks/rag_scale.py). Tantivy, a Lucene-like
engine in Rust, skips whole blocks of postings whose best possible score
cannot enter the top k (block-max WAND): the same queries on the same corpus
answer in milliseconds.

Scoring is BM25 (k1 = 1.2, b = 0.75) over two fields, a context line (RAG:
a chunk's title and heading path) and the text, each with its own length
normalisation; a query term's score is the sum over both (the context's
scaled by `context_weight`).
Words are split on non-alphanumerics, lower-cased and Snowball-stemmed
(English), at indexing and at query time by the same analyzer.

Like the vector index this is derived data: the rows in SQLite are the
truth, and the folder can always be rebuilt from them. Unlike it, it lives on
disk and is shared by every process that opens the store: a change takes an
exclusive file lock, commits, then records in `keel-state.json` the
`version` and `deletions` counters of the rows it now reflects and its
highest id (see keel.vectors.derived). A crash between a commit and that
record leaves the record behind, which only makes the next change catch up
from the store.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from keel.errors import ConfigError
from keel.text.words import keyword_terms
from keel.vectors.derived import SyncState

__all__ = ["KeywordIndex"]

log = logging.getLogger("keel.vectors")

_ANALYZER = "keel_en"
_STATE = "keel-state.json"
_LOCK = "keel.lock"
#: A query uses at most this many distinct terms.
MAX_TERMS = 64


def _tantivy() -> Any:
    try:
        import tantivy
    except ImportError as exc:
        raise ConfigError("the embedded keyword index needs tantivy: pip install 'keel[vectors]'") from exc
    return tantivy


class KeywordIndex:
    """BM25 over texts (each with an optional context line) keyed by integer id (RAG: a collection's chunks)."""

    def __init__(self, path: Path | None, *, context_weight: float = 1.0) -> None:
        self.path = path
        self.context_weight = context_weight
        self.lock = threading.RLock()
        self._t = _tantivy()
        builder = self._t.SchemaBuilder()
        builder.add_unsigned_field("id", indexed=True, fast=True)
        builder.add_text_field("context", tokenizer_name=_ANALYZER, index_option="freq")
        builder.add_text_field("text", tokenizer_name=_ANALYZER, index_option="freq")
        self._schema = builder.build()
        t = self._t
        self._analyzer = (
            t.TextAnalyzerBuilder(t.Tokenizer.simple())
            .filter(t.Filter.remove_long(40))
            .filter(t.Filter.lowercase())
            .filter(t.Filter.stemmer("english"))
            .build()
        )
        self._memory_state = SyncState()  # the state of an in-memory index (a store with no folder)
        self._seen = SyncState()  # the state the open reader reflects
        self._index = self._open()

    # --- folder ---------------------------------------------------------------------------

    def _open(self) -> Any:
        t = self._t
        if self.path is None:
            index = t.Index(self._schema)
        else:
            self.path.mkdir(parents=True, exist_ok=True)
            try:
                index = t.Index(self._schema, path=str(self.path), reuse=True)  # refuses another schema
            except Exception as exc:  # a damaged or foreign folder is rebuilt from the store, never trusted
                log.warning("keyword index %s unusable (%s); rebuilding it from the store", self.path, exc)
                self._clear_folder()
                index = t.Index(self._schema, path=str(self.path), reuse=False)
        index.register_tokenizer(_ANALYZER, self._analyzer)
        index.config_reader(reload_policy="Manual")
        return index

    def _clear_folder(self) -> None:
        assert self.path is not None
        for entry in self.path.iterdir():
            if entry.name == _LOCK:
                continue
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)

    def drop_files(self) -> None:
        if self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)

    def _read_state(self) -> SyncState:
        if self.path is None:
            return SyncState(**self._memory_state.__dict__)
        try:
            raw = json.loads((self.path / _STATE).read_text())
            return SyncState(int(raw["version"]), int(raw["deletions"]), int(raw["max_id"]))
        except (OSError, ValueError, KeyError, TypeError):
            return SyncState()

    def _write_state(self, state: SyncState) -> None:
        if self.path is None:
            self._memory_state = SyncState(**state.__dict__)
            return
        tmp = self.path / (_STATE + ".tmp")
        tmp.write_text(json.dumps(state.__dict__))
        os.replace(tmp, self.path / _STATE)

    @property
    def state(self) -> SyncState:
        """What the folder reflects now (another process may have moved it); the reader follows."""
        with self.lock:
            state = self._read_state()
            if state != self._seen:
                self._index.reload()
                self._seen = state
            return state

    @contextmanager
    def _file_lock(self) -> Iterator[None]:
        if self.path is None:
            yield
            return
        with open(self.path / _LOCK, "a+b") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    @contextmanager
    def session(self) -> Iterator[KeywordSession]:
        """Exclusive change: committed (documents, then the state record) when the block ends without error."""
        with self.lock, self._file_lock():
            session = KeywordSession(self, self.state)
            try:
                yield session
            except BaseException:
                session.rollback()
                raise
            session.commit()

    # --- search ---------------------------------------------------------------------------

    def terms(self, query: str) -> list[str]:
        """The distinct index terms of a query's words, stop words dropped, in order (at most MAX_TERMS)."""
        tokens = self._analyzer.analyze(" ".join(keyword_terms(query)))
        return list(dict.fromkeys(tokens))[:MAX_TERMS]

    def search(self, query: str, k: int, allowed: np.ndarray | None = None) -> list[tuple[int, float]]:
        """(id, BM25 score) of the k best texts for the query's words, among the ids `allowed` when given."""
        terms = self.terms(query)
        if not terms or k <= 0 or (allowed is not None and len(allowed) == 0):
            return []
        q, should, must = self._t.Query, self._t.Occur.Should, self._t.Occur.Must
        clauses = []
        for term in terms:
            clauses.append((should, q.term_query(self._schema, "text", term, index_option="freq")))
            context = q.term_query(self._schema, "context", term, index_option="freq")
            if self.context_weight != 1.0:
                context = q.boost_query(context, float(self.context_weight))
            clauses.append((should, context))
        query_ = q.boolean_query(clauses)
        if allowed is not None:
            only = q.const_score_query(q.term_set_query(self._schema, "id", [int(i) for i in allowed]), 0.0)
            query_ = q.boolean_query([(must, query_), (must, only)])
        with self.lock:
            searcher = self._index.searcher()  # a snapshot: searching it needs no lock
        hits = searcher.search(query_, limit=int(k), count=False).hits
        ids = searcher.fast_field_values("id", [address for _, address in hits]) if hits else []
        return [(int(i), float(score)) for (score, _), i in zip(hits, ids, strict=True)]

    def __len__(self) -> int:
        with self.lock:
            return int(self._index.searcher().num_docs)

    def keys(self) -> np.ndarray:
        """Every id the index holds (a full scan: only for a resync after deletions)."""
        with self.lock:
            searcher = self._index.searcher()
            if searcher.num_docs == 0:
                return np.zeros(0, dtype=np.int64)
            hits = searcher.search(self._t.Query.all_query(), limit=searcher.num_docs, count=False).hits
            return np.asarray(searcher.fast_field_values("id", [a for _, a in hits]), dtype=np.int64)


class KeywordSession:
    """Changes to a keyword index under its lock; a writer is opened on the first change."""

    def __init__(self, index: KeywordIndex, state: SyncState) -> None:
        self.index = index
        self.state = state
        self._start = SyncState(**state.__dict__)
        self._writer: Any = None
        self._changed = False

    def _write(self) -> Any:
        self._changed = True
        if self._writer is None:
            self._writer = self.index._index.writer(heap_size=64_000_000, num_threads=1)
        return self._writer

    def keys(self) -> np.ndarray:
        return self.index.keys()

    def remove(self, ids: Sequence[int]) -> None:
        if len(ids):
            q = self.index._t.Query
            self._write().delete_documents_by_query(q.term_set_query(self.index._schema, "id", [int(i) for i in ids]))

    def add_rows(self, rows: Sequence[Sequence[Any]]) -> None:
        """Rows of (id, context, text); an id the index already holds is replaced."""
        if not rows:
            return
        self.remove([int(r[0]) for r in rows])
        writer, document, schema = self._write(), self.index._t.Document.from_dict, self.index._schema
        for row_id, context, text in rows:
            writer.add_document(document({"id": int(row_id), "context": context or "", "text": text or ""}, schema))

    def rollback(self) -> None:
        if self._writer is not None:
            self._writer.rollback()
            self._writer = None

    def commit(self) -> None:
        if self._writer is not None:
            writer, self._writer = self._writer, None
            writer.commit()
            writer.wait_merging_threads()  # merges run now, and the writer (and tantivy's own lock) goes
            del writer
        if self._changed or self.state != self._start:
            self.index._write_state(self.state)
            self.index._index.reload()
        self.index._seen = SyncState(**self.state.__dict__)
