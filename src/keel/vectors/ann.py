"""An embedded vector index: a usearch HNSW file (cosine), keyed by integer id, beside the SQLite store.

The float32 vectors in the store are the truth; this file is a derived index
that can always be brought up to date from them (keel.vectors.derived). Next
to `<name>.usearch` a small JSON file records what the index holds: the
`version` and `deletions` counters of the rows it was synced at and the
highest id it has. A missing, damaged or mismatched file is rebuilt from the
store, so a crash between a commit and a save loses nothing. RAG keeps one
per collection (ids are chunk ids); a semantic cache would key its entries
the same way.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from keel.errors import ConfigError, InputError
from keel.vectors.derived import SyncState
from keel.vectors.encoding import vectors_from_blobs

__all__ = ["AnnIndex"]

log = logging.getLogger("keel.vectors")


def _usearch() -> Any:
    try:
        from usearch.index import Index
    except ImportError as exc:
        raise ConfigError("the embedded vector index needs usearch: pip install 'keel[vectors]'") from exc
    return Index


class AnnIndex:
    """An HNSW index (cosine) of vectors keyed by integer id (RAG: one collection's chunks, by chunk id)."""

    def __init__(self, path: Path | None, dimensions: int, *, connectivity: int = 16, expansion_search: int = 128):
        if dimensions < 1:
            raise InputError(f"dimensions must be at least 1, not {dimensions}")
        self.path = path
        self.dimensions = dimensions
        self.connectivity = connectivity
        self.expansion_search = expansion_search
        self.lock = threading.RLock()
        self.state = SyncState()
        self.dirty = False
        self._index = self._load()

    # --- file -----------------------------------------------------------------

    def _new(self) -> Any:
        return _usearch()(
            ndim=self.dimensions, metric="cos", dtype="f32", connectivity=self.connectivity,
            expansion_add=128, expansion_search=self.expansion_search,
        )  # fmt: skip

    @property
    def _meta_path(self) -> Path | None:
        return self.path.with_suffix(".json") if self.path is not None else None

    def _load(self) -> Any:
        if self.path is None or self._meta_path is None or not self.path.exists() or not self._meta_path.exists():
            return self._new()
        try:
            meta = json.loads(self._meta_path.read_text())
            index = _usearch().restore(str(self.path), view=False)
            if index is None or index.ndim != self.dimensions:
                raise ValueError("dimensions differ")
            index.expansion_search = self.expansion_search
            self.state = SyncState(int(meta["version"]), int(meta["deletions"]), int(meta["max_id"]))
            return index
        except Exception as exc:  # a damaged or foreign file is rebuilt from the store, never trusted
            log.warning("vector index %s unusable (%s); rebuilding it from the store", self.path, exc)
            self.state = SyncState()
            return self._new()

    def save(self) -> None:
        """Write the index, then its state, each atomically (a crash between leaves a stale state: a resync)."""
        if self.path is None or self._meta_path is None:
            return
        with self.lock:
            if not self.dirty:
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".usearch.tmp")
            self._index.save(str(tmp))
            os.replace(tmp, self.path)
            meta_tmp = self._meta_path.with_suffix(".json.tmp")
            meta_tmp.write_text(json.dumps(self.state.__dict__))
            os.replace(meta_tmp, self._meta_path)
            self.dirty = False

    def drop_files(self) -> None:
        for path in (self.path, self._meta_path):
            if path is not None:
                path.unlink(missing_ok=True)

    # --- contents -----------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._index)

    def reset(self) -> None:
        with self.lock:
            self._index = self._new()
            self.state = SyncState()
            self.dirty = True

    def _matrix(self, vectors: np.ndarray, rows: int) -> np.ndarray:
        """`vectors` as `rows` float32 rows of this index's dimensions, or an InputError naming the mismatch."""
        matrix = np.asarray(vectors, dtype=np.float32)
        matrix = matrix.reshape(1, -1) if matrix.ndim == 1 else matrix
        if matrix.ndim != 2 or matrix.shape[0] != rows:
            raise InputError(f"{rows} ids but {matrix.shape[0] if matrix.ndim else 0} vectors: give one row per id")
        if matrix.shape[1] != self.dimensions:
            raise InputError(f"vectors of {matrix.shape[1]} dimensions; this index has {self.dimensions}")
        return matrix

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add (or replace) the vectors of these ids: one row per id, of the index's dimensions, any norm."""
        if len(ids) == 0:
            return
        vectors = self._matrix(vectors, len(ids))
        with self.lock:
            keys = ids.astype(np.uint64)
            present = self._index.contains(keys) if len(self._index) else np.zeros(len(keys), dtype=bool)
            if np.any(present):  # re-adding an id (a resync) replaces its vector
                self._index.remove(keys[present])
            self._index.add(keys, vectors.astype(np.float32, copy=False), threads=2)
            self.dirty = True  # state.max_id is the caller's to move: only when it knows nothing below is missing

    def remove(self, ids: Iterable[int]) -> None:
        keys = np.fromiter(ids, dtype=np.uint64)
        if len(keys) == 0:
            return
        with self.lock:
            present = self._index.contains(keys)
            if np.any(present):
                self._index.remove(keys[present])
                self.dirty = True

    @contextmanager
    def session(self) -> Iterator[AnnIndex]:
        """A change under the lock (in memory: `save` writes the file)."""
        with self.lock:
            before = SyncState(**self.state.__dict__)
            yield self
            if self.state != before:
                self.dirty = True

    def add_rows(self, rows: Sequence[Sequence[Any]]) -> None:
        """Rows of (id, little-endian float32 blob), as `vector_blob` writes them."""
        if rows:
            self.add(np.array([r[0] for r in rows], dtype=np.int64), vectors_from_blobs([r[1] for r in rows]))

    def keys(self) -> np.ndarray:
        with self.lock:
            return np.fromiter(iter(self._index.keys), dtype=np.uint64, count=len(self._index))

    # --- search ---------------------------------------------------------------------

    def search(self, vector: np.ndarray, k: int) -> list[tuple[int, float]]:
        """(id, cosine similarity) of the k nearest vectors."""
        vector = self._matrix(vector, 1)[0]
        with self.lock:
            if len(self._index) == 0 or k <= 0:
                return []
            matches = self._index.search(vector.astype(np.float32, copy=False), min(k, len(self._index)))
        return [
            (int(key), 1.0 - float(distance)) for key, distance in zip(matches.keys, matches.distances, strict=True)
        ]

    def exact(self, vector: np.ndarray, ids: np.ndarray, k: int) -> list[tuple[int, float]]:
        """Exact cosine search over the given ids (the filtered case: no approximation, no misses)."""
        with self.lock:
            keys = ids.astype(np.uint64)
            keys = keys[self._index.contains(keys)] if len(keys) else keys
            if len(keys) == 0:
                return []
            found = self._index.get(keys)
        matrix = np.vstack(found) if isinstance(found, tuple) else np.asarray(found).reshape(len(keys), -1)
        norms = np.linalg.norm(matrix, axis=1) * max(float(np.linalg.norm(vector)), 1e-12)
        scores = (matrix @ vector) / np.clip(norms, 1e-12, None)
        top = np.argsort(-scores)[:k]
        return [(int(keys[i]), float(scores[i])) for i in top]
