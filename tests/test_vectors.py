"""keel.vectors on a table of its own (no RAG): what a semantic cache or an extraction app would build on."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from keel.errors import InputError
from keel.vectors import (
    AnnIndex,
    KeywordIndex,
    SyncState,
    catch_up,
    filtered_search,
    pgvector_text,
    vector_blob,
    vectors_from_blobs,
)


class Entries:
    """A cache-like table (id, prompt, vector) with the counters a derived index follows."""

    def __init__(self, path: Path) -> None:
        self.db = sqlite3.connect(path)
        self.db.execute("CREATE TABLE entries (id INTEGER PRIMARY KEY AUTOINCREMENT, prompt TEXT, vector BLOB)")
        self.version, self.deletions = 0, 0

    def add(self, prompt: str, vector: Sequence[float]) -> int:
        cur = self.db.execute(
            "INSERT INTO entries (prompt, vector) VALUES (?, ?)", [prompt, vector_blob(np.array(vector))]
        )
        self.version += 1
        return int(cur.lastrowid or 0)

    def delete(self, entry_id: int) -> None:
        self.db.execute("DELETE FROM entries WHERE id = ?", [entry_id])
        self.version, self.deletions = self.version + 1, self.deletions + 1

    @property
    def target(self) -> SyncState:
        return SyncState(self.version, self.deletions)

    def source(self, columns: str) -> Rows:
        return Rows(self.db, columns)


class Rows:
    def __init__(self, db: sqlite3.Connection, columns: str) -> None:
        self.db, self.columns = db, columns
        self.read: list[int] = []

    def ids(self) -> np.ndarray:
        return np.array([r[0] for r in self.db.execute("SELECT id FROM entries")], dtype=np.int64)

    def ids_above(self, max_id: int) -> list[int]:
        return [int(r[0]) for r in self.db.execute("SELECT id FROM entries WHERE id > ?", [max_id])]

    def rows(self, ids: Sequence[int]) -> Iterator[Sequence[Sequence[Any]]]:
        self.read.extend(ids)
        marks = ", ".join("?" for _ in ids)
        if ids:
            yield self.db.execute(f"SELECT id, {self.columns} FROM entries WHERE id IN ({marks})", list(ids)).fetchall()


def test_ann_index_catches_up_with_inserts_then_deletions(tmp_path: Path) -> None:
    table = Entries(tmp_path / "cache.db")
    first = table.add("what is the capital of france", [1, 0, 0])
    table.add("how do I reset my password", [0, 1, 0])
    ann = AnnIndex(tmp_path / "cache.usearch", 3)
    catch_up(ann, table.target, table.source("vector"))
    assert ann.search(np.array([1.0, 0.1, 0], dtype=np.float32), 1)[0][0] == first
    assert ann.state == SyncState(2, 0, 2)

    third = table.add("capital city of france?", [0.9, 0.1, 0])
    rows = table.source("vector")
    catch_up(ann, table.target, rows)
    assert rows.read == [third]  # only the rows above max_id: no full scan without deletions

    table.delete(first)
    catch_up(ann, table.target, table.source("vector"))
    assert [i for i, _ in ann.search(np.array([1.0, 0, 0], dtype=np.float32), 3)] == [third, 2]
    ann.save()
    reopened = AnnIndex(tmp_path / "cache.usearch", 3)
    assert reopened.state == SyncState(4, 1, 3) and len(reopened) == 2
    catch_up(reopened, table.target, rows := table.source("vector"))
    assert rows.read == []  # up to date: nothing read


def test_keyword_index_over_its_own_rows(tmp_path: Path) -> None:
    table = Entries(tmp_path / "cache.db")
    table.add("what is the capital of france", [1, 0, 0])
    password = table.add("how do I reset my password", [0, 1, 0])
    keywords = KeywordIndex(tmp_path / "cache.tantivy")
    catch_up(keywords, table.target, table.source("'', prompt"))
    assert [i for i, _ in keywords.search("resetting passwords", 5)] == [password]
    assert keywords.search("resetting passwords", 5, allowed=np.array([1], dtype=np.int64)) == []


def test_filtered_search_is_exact_for_few_and_oversamples_for_many(monkeypatch: pytest.MonkeyPatch) -> None:
    import keel.vectors.filtered as filtered

    ranked = [(i, 1.0 - i / 100) for i in range(100)]
    calls: list[int] = []

    def search(n: int) -> list[tuple[int, float]]:
        calls.append(n)
        return ranked[:n]

    def exact() -> list[tuple[int, float]]:
        return [hit for hit in ranked if hit[0] in set(allowed.tolist())][:3]

    allowed = np.array([5, 50, 70, 90], dtype=np.int64)
    assert [i for i, _ in filtered_search(search, exact, allowed, 100, 3)] == [5, 50, 70]
    assert calls == []  # few pass: ranked exactly, the index not asked
    monkeypatch.setattr(filtered, "EXACT_LIMIT", 2)
    allowed = np.arange(0, 100, 2, dtype=np.int64)
    assert [i for i, _ in filtered_search(search, exact, allowed, 100, 3)] == [0, 2, 4]
    assert calls == [15]  # half pass: asked for 3 / 0.5 * 2 + 3 and kept those that pass


def test_vector_encodings_round_trip() -> None:
    vectors = np.array([[0.5, -1.25, 3.0], [1e-8, 2.0, 0.0]], dtype=np.float32)
    assert np.array_equal(vectors_from_blobs([vector_blob(v) for v in vectors]), vectors)
    assert pgvector_text(vectors[0]) == "[0.5,-1.25,3]"


def test_ann_index_names_bad_shapes_instead_of_a_bare_assertion() -> None:
    # an app's own vectors come from its own embedder: a mismatch must say what does not match
    with pytest.raises(InputError, match="dimensions must be at least 1"):
        AnnIndex(None, dimensions=0)
    ann = AnnIndex(None, dimensions=4)
    with pytest.raises(InputError, match="2 ids but 1 vectors"):
        ann.add(np.array([1, 2]), np.ones((1, 4)))
    with pytest.raises(InputError, match="3 dimensions; this index has 4"):
        ann.add(np.array([1]), np.ones((1, 3)))
    ann.add(np.array([1]), np.ones(4))  # one vector, one id: fine flat
    with pytest.raises(InputError, match="3 dimensions; this index has 4"):
        ann.search(np.ones(3), k=1)
    assert ann.search(np.ones(4), k=1)[0][0] == 1
