"""The RAG index contract, run identically on SQLite (tantivy + usearch) and PostgreSQL (full-text + pgvector)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np
import pytest

from keel.errors import CollectionExists, InvalidFilter
from keel.rag.filters import parse_filter
from keel.rag.index import CollectionInfo, DocumentWrite, RagIndex, open_index
from keel.store import Store, open_store
from keel.text.chunking import Chunk
from keel.text.documents import Document, Section

DIMS = 8


def unit(*values: float) -> np.ndarray:
    v = np.zeros(DIMS, dtype=np.float32)
    v[: len(values)] = values
    return v / np.linalg.norm(v)


def doc(doc_id: str, texts: list[str], **metadata: object) -> tuple[Document, list[Chunk]]:
    text = "\n\n".join(texts)
    chunks, offset = [], 0
    for i, piece in enumerate(texts):
        chunks.append(Chunk(i, offset, offset + len(piece), piece, doc_id.title(), len(piece.split()), {"n": i}))
        offset += len(piece) + 2
    document = Document(doc_id, text, title=doc_id.title(), source=f"docs/{doc_id}.md",
                        metadata={"source": f"docs/{doc_id}.md", **metadata},
                        sections=(Section(0, 1, doc_id.title()),))  # fmt: skip
    return document, chunks


def write(index: RagIndex, info: CollectionInfo, items: list[tuple[Document, list[Chunk], list[np.ndarray]]]) -> None:
    index.write(info, [DocumentWrite(d, c, np.vstack(v)) for d, c, v in items])


@pytest.fixture
def index(store: Store) -> Iterator[RagIndex]:
    opened = open_index(store)
    yield opened
    opened.close()


@pytest.fixture
def filled(index: RagIndex) -> CollectionInfo:
    info = index.create_collection("c", embedding_model="m", embedding_id="test:m", dimensions=DIMS, settings={"x": 1})
    cats = doc("cats", ["Cats purr when they are content.", "A cat sleeps most of the day."], lang="en", year=2020)
    dogs = doc("dogs", ["Dogs bark at strangers.", "A dog needs a daily walk."], lang="en", year=2022)
    quantum = doc("quantum", ["Quantum computers use qubits."], lang="fr", year=2024, draft=True)
    write(index, info, [
        (*cats, [unit(1, 0), unit(1, 0.2)]), (*dogs, [unit(0, 1), unit(0.2, 1)]), (*quantum, [unit(0, 0, 1)]),
    ])  # fmt: skip
    found = index.collection("c")
    assert found is not None
    return found


def texts(index: RagIndex, info: CollectionInfo, hits: list[tuple[int, float]]) -> list[str]:
    chunks = index.chunks(info.collection_id, [h[0] for h in hits])
    return [chunks[h[0]].text for h in hits]


def test_collections_are_created_listed_and_unique(index: RagIndex, filled: CollectionInfo) -> None:
    assert filled.n_chunks == 5 and filled.version == 1 and filled.settings == {"x": 1}
    (listed,) = index.collections()
    assert listed.name == "c" and listed.n_documents == 3
    with pytest.raises(CollectionExists):
        index.create_collection("c", embedding_model="m", embedding_id="test:m", dimensions=DIMS, settings={})


def test_keyword_search_is_bm25_with_stemming(index: RagIndex, filled: CollectionInfo) -> None:
    hits = index.keyword(filled, "sleeping cats", 10)
    assert texts(index, filled, hits)[0] == "A cat sleeps most of the day."  # stems: sleeping~sleeps, cats~cat
    assert all(a[1] >= b[1] for a, b in itertools.pairwise(hits))
    assert index.keyword(filled, "the of and", 10) == []  # stop words only
    assert index.keyword(filled, "", 10) == []
    rare, common = index.keyword(filled, "qubits", 10), index.keyword(filled, "dog", 10)
    assert texts(index, filled, rare) == ["Quantum computers use qubits."]
    assert len(common) == 2


def test_vector_search_is_cosine_nearest_first(index: RagIndex, filled: CollectionInfo) -> None:
    hits = index.vector(filled, unit(1, -0.1), 3)
    assert texts(index, filled, hits)[:2] == ["Cats purr when they are content.", "A cat sleeps most of the day."]
    assert hits[0][1] == pytest.approx(float(unit(1, 0) @ unit(1, -0.1)), abs=1e-4)


FILTER_CASES: list[tuple[dict[str, object], set[str]]] = [
    ({"lang": "fr"}, {"quantum"}),
    ({"year": {"$gte": 2022}}, {"dogs", "quantum"}),
    ({"year": {"$lt": 2022}}, {"cats"}),
    ({"lang": {"$in": ["fr", "de"]}}, {"quantum"}),
    ({"lang": {"$nin": ["fr"]}}, {"cats", "dogs"}),
    ({"draft": {"$ne": True}}, {"cats", "dogs"}),
    ({"draft": {"$exists": True}}, {"quantum"}),
    ({"source": "docs/dogs.md"}, {"dogs"}),
    ({"doc_id": "cats"}, {"cats"}),
    ({"n": 1, "lang": "en"}, {"cats", "dogs"}),
]


@pytest.mark.parametrize(("condition", "expected"), FILTER_CASES)
def test_metadata_filters_hold_for_both_retrievers(
    index: RagIndex, filled: CollectionInfo, condition: dict[str, object], expected: set[str]
) -> None:
    conditions = parse_filter(condition)
    dense = index.vector(filled, unit(1, 1, 1), 10, conditions)
    keyword = index.keyword(filled, "cat cats dog dogs qubits computers purr walk", 10, conditions)
    for hits in (dense, keyword):
        found = index.chunks(filled.collection_id, [h[0] for h in hits])
        assert {c.doc_id for c in found.values()} == expected
    if "n" in condition:
        assert all(c.metadata["n"] == 1 for c in index.chunks(filled.collection_id, [h[0] for h in dense]).values())


def test_sqlite_indexes_filtered_fields_of_large_collections(tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the size threshold a filtered field gets an expression index the filter's SQL uses; same answers."""
    from pathlib import Path

    import keel.rag.index.sqlite as embedded

    monkeypatch.setattr(embedded, "FIELD_INDEX_MIN_CHUNKS", 1)
    store = open_store(str(Path(str(tmp_path)) / "k.db"))
    index = open_index(store)
    info = index.create_collection("c", embedding_model="m", embedding_id="test:m", dimensions=DIMS, settings={})
    write(index, info, [
        (*doc("cats", ["Cats purr.", "A cat sleeps."], lang="en", year=2020), [unit(1, 0), unit(1, 0.2)]),
        (*doc("dogs", ["Dogs bark.", "A dog walks."], lang="en", year=2022), [unit(0, 1), unit(0.2, 1)]),
        (*doc("quantum", ["Quantum qubits."], lang="fr", year=2024, draft=True), [unit(0, 0, 1)]),
    ])  # fmt: skip
    info = index.collection("c")
    assert info is not None
    for condition, expected in FILTER_CASES:
        conditions = parse_filter(condition)
        for hits in (index.vector(info, unit(1, 1, 1), 10, conditions),
                     index.keyword(info, "cat cats dog dogs qubits purr walk", 10, conditions)):  # fmt: skip
            found = index.chunks(info.collection_id, [h[0] for h in hits])
            assert {c.doc_id for c in found.values()} == expected, condition
    with store.transaction() as cur:
        cur.execute("SELECT COUNT(*) FROM sqlite_master WHERE type = 'index' AND name LIKE 'rag_meta_%'")
        assert cur.fetchone()[0] == 5  # lang, year, draft, source, n (doc_id has its own index)
        cur.execute(
            "EXPLAIN QUERY PLAN SELECT c.chunk_id FROM rag_chunks c WHERE c.collection_id = ?"
            " AND json_extract(c.metadata, '$.\"year\"') >= ?", [info.collection_id, 2022],
        )  # fmt: skip
        assert "rag_meta_" in " ".join(str(r) for r in cur.fetchall())
    index.close()
    store.close()


def test_sqlite_field_index_waits_for_another_writer(tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    """Filters from two threads while another connection writes: both wait, answer right, one index exists."""
    import sqlite3
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor
    from pathlib import Path

    import keel.rag.index.sqlite as embedded

    monkeypatch.setattr(embedded, "FIELD_INDEX_MIN_CHUNKS", 1)
    path = Path(str(tmp_path)) / "k.db"
    store = open_store(str(path))
    index = open_index(store)
    info = index.create_collection("c", embedding_model="m", embedding_id="test:m", dimensions=DIMS, settings={})
    write(index, info, [(*doc("cats", ["Cats purr."], year=2020), [unit(1, 0)]),
                        (*doc("dogs", ["Dogs bark."], year=2022), [unit(0, 1)])])  # fmt: skip
    info = index.collection("c")
    assert info is not None
    writer = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("CREATE TABLE elsewhere (x)")  # another process's write, committed while the filters wait
    committer = threading.Timer(0.3, lambda: writer.execute("COMMIT"))
    committer.start()
    started = time.perf_counter()
    conditions = parse_filter({"year": {"$gte": 2021}})
    with ThreadPoolExecutor(2) as pool:
        dense = pool.submit(index.vector, info, unit(1, 1), 10, conditions)
        keyword = pool.submit(index.keyword, info, "cats dogs purr bark", 10, conditions)
        hits = [dense.result(), keyword.result()]
    committer.join()
    writer.close()
    assert time.perf_counter() - started >= 0.25  # it did wait for the writer
    for found in hits:
        assert {c.doc_id for c in index.chunks(info.collection_id, [h[0] for h in found]).values()} == {"dogs"}
    with store.transaction() as cur:
        cur.execute("SELECT COUNT(*) FROM sqlite_master WHERE type = 'index' AND name LIKE 'rag_meta_%'")
        assert cur.fetchone()[0] == 1
    index.close()
    store.close()


@pytest.mark.parametrize(
    "bad",
    ['{"a": [1]}', '{"a": {"$regex": "x"}}', '{"a b": 1}', '{"a": {"$in": []}}', "[1]", "{nope", '{"a": null}',
     '{"a": {}}', '{"a": {"$exists": 1}}'],
)  # fmt: skip
def test_bad_filters_are_input_errors(bad: str) -> None:
    with pytest.raises(InvalidFilter):
        parse_filter(bad)


def test_rewriting_a_document_replaces_its_chunks_everywhere(index: RagIndex, filled: CollectionInfo) -> None:
    cats = doc("cats", ["Cats hunt mice at night."])
    write(index, filled, [(*cats, [unit(0, 0, 0, 1)])])
    info = index.collection("c")
    assert info is not None and info.n_chunks == 4 and info.deletions == 2 and info.version == 2
    assert texts(index, info, index.keyword(info, "purr", 10)) == []
    assert texts(index, info, index.keyword(info, "mice", 10)) == ["Cats hunt mice at night."]
    nearest = index.vector(info, unit(1, 0), 4)
    assert "Cats purr when they are content." not in texts(index, info, nearest)
    assert texts(index, info, index.vector(info, unit(0, 0, 0, 1), 1)) == ["Cats hunt mice at night."]
    stored = index.document(info.collection_id, "cats")
    assert stored is not None and stored.text == "Cats hunt mice at night." and stored.n_chunks == 1


def test_deleting_documents(index: RagIndex, filled: CollectionInfo) -> None:
    index.write(filled, [], deletes=["dogs", "not-there"])
    info = index.collection("c")
    assert info is not None and info.n_chunks == 3
    assert set(index.document_hashes(info.collection_id)) == {"cats", "quantum"}
    assert index.keyword(info, "dog", 10) == []
    found = index.chunks(info.collection_id, [h[0] for h in index.vector(info, unit(0, 1), 10)])
    assert {c.doc_id for c in found.values()} == {"cats", "quantum"}


def test_documents_under_a_folder_and_round_trip(index: RagIndex, filled: CollectionInfo) -> None:
    assert set(index.documents_under(filled.collection_id, "docs")) == {"cats", "dogs", "quantum"}
    assert index.documents_under(filled.collection_id, "docs/cats.md") == {"cats": "docs/cats.md"}
    assert index.documents_under(filled.collection_id, "doc") == {}
    back = {d.doc_id: d for d in index.iter_documents(filled.collection_id, batch=2)}
    assert set(back) == {"cats", "dogs", "quantum"}
    assert back["cats"].sections == (Section(0, 1, "Cats"),)
    assert back["cats"].metadata["year"] == 2020
    chunks = index.document_chunks(filled.collection_id, "cats")
    assert [c.text for c in chunks] == ["Cats purr when they are content.", "A cat sleeps most of the day."]
    assert all(back["cats"].text[c.start : c.end] == c.text for c in chunks)


def test_collections_are_isolated_and_dropped_whole(index: RagIndex, filled: CollectionInfo) -> None:
    other = index.create_collection("other", embedding_model="m", embedding_id="test:m", dimensions=DIMS, settings={})
    write(index, other, [(*doc("cats", ["Completely different cat text."]), [unit(1, 0)])])
    assert texts(index, other, index.keyword(other, "cat", 10)) == ["Completely different cat text."]
    assert len(index.vector(other, unit(1, 0), 10)) == 1
    index.drop_collection(filled)
    assert [c.name for c in index.collections()] == ["other"]
    assert index.collection("c") is None
    assert len(index.keyword(other, "cat", 10)) == 1


def test_embedding_cache_by_model_and_hash(index: RagIndex) -> None:
    index.cache_vectors("m1", {"h1": unit(1), "h2": unit(0, 1)})
    index.cache_vectors("m1", {"h1": unit(0, 0, 1)})  # first write wins: a hash names one text
    found = index.cached_vectors("m1", ["h1", "h2", "h3", "h1"])
    assert set(found) == {"h1", "h2"} and np.allclose(found["h1"], unit(1))
    assert index.cached_vectors("m2", ["h1"]) == {}


def test_a_second_process_sees_writes_and_deletes(store: Store, store_url: str, filled: CollectionInfo) -> None:
    """Another process's index catches up from the store (vectors and keyword index alike)."""
    other = open_store(store_url)
    try:
        reader = open_index(other)
        info = reader.collection("c")
        assert info is not None and len(reader.vector(info, unit(1, 0), 10)) == 5
        assert len(reader.keyword(info, "dogs", 10)) == 2
        writer = open_index(store)
        write(writer, filled, [(*doc("birds", ["Birds sing at dawn."]), [unit(0, 0, 0, 0, 1)])])
        writer.write(filled, [], deletes=["dogs"])
        info = reader.collection("c")
        assert info is not None
        found = reader.chunks(info.collection_id, [h[0] for h in reader.vector(info, unit(0, 0, 0, 0, 1), 10)])
        assert {c.doc_id for c in found.values()} == {"cats", "quantum", "birds"}
        assert reader.vector(info, unit(0, 0, 0, 0, 1), 1)[0][1] == pytest.approx(1.0, abs=1e-4)
        found = reader.chunks(info.collection_id, [h[0] for h in reader.keyword(info, "birds dogs cats", 10)])
        assert {c.doc_id for c in found.values()} == {"cats", "birds"}
        writer.close()
        reader.close()
    finally:
        other.close()


def test_sqlite_vector_file_survives_restarts_and_damage(tmp_path: object) -> None:
    from pathlib import Path

    folder = Path(str(tmp_path))
    store = open_store(str(folder / "k.db"))
    index = open_index(store)
    info = index.create_collection("c", embedding_model="m", embedding_id="test:m", dimensions=DIMS, settings={})
    write(index, info, [(*doc("a", ["alpha text"]), [unit(1)]), (*doc("b", ["beta text"]), [unit(0, 1)])])
    index.flush(info)
    index.close()
    store.close()
    ann_file = folder / "k.db.rag" / f"{info.collection_id}.usearch"
    assert ann_file.exists() and ann_file.with_suffix(".json").exists()
    for damage in (None, b"garbage"):
        if damage is not None:
            ann_file.write_bytes(damage)
        store = open_store(str(folder / "k.db"))
        index = open_index(store)
        fresh = index.collection("c")
        assert fresh is not None
        found = index.chunks(fresh.collection_id, [h[0] for h in index.vector(fresh, unit(0, 1), 1)])
        assert [c.doc_id for c in found.values()] == ["b"]
        index.close()
        store.close()


def test_sqlite_keyword_index_survives_damage_and_a_lost_state(tmp_path: object) -> None:
    """The tantivy folder is derived: damaged, lost or behind, it is rebuilt from the store, each chunk once."""
    import shutil
    from pathlib import Path

    folder = Path(str(tmp_path))
    store = open_store(str(folder / "k.db"))
    index = open_index(store)
    info = index.create_collection("c", embedding_model="m", embedding_id="test:m", dimensions=DIMS, settings={})
    write(index, info, [(*doc("a", ["alpha text"]), [unit(1)]), (*doc("b", ["beta text"]), [unit(0, 1)])])
    index.close()
    store.close()
    tantivy_dir = folder / "k.db.rag" / f"{info.collection_id}.tantivy"
    assert (tantivy_dir / "meta.json").exists() and (tantivy_dir / "keel-state.json").exists()

    def damage_meta() -> None:
        (tantivy_dir / "meta.json").write_text("garbage")

    def lose_state() -> None:  # the documents stay, the record of what they reflect goes: a resync must not duplicate
        (tantivy_dir / "keel-state.json").unlink()

    def remove_folder() -> None:
        shutil.rmtree(tantivy_dir)

    for damage in (damage_meta, lose_state, remove_folder):
        damage()
        store = open_store(str(folder / "k.db"))
        index = open_index(store)
        fresh = index.collection("c")
        assert fresh is not None
        hits = index.keyword(fresh, "alpha beta text", 10)
        assert sorted(c.doc_id for c in index.chunks(fresh.collection_id, [h[0] for h in hits]).values()) == ["a", "b"]
        assert len(hits) == 2, damage.__name__
        index.close()
        store.close()


def test_sqlite_drops_the_fts5_tables_of_older_stores(tmp_path: object) -> None:
    from pathlib import Path

    path = str(Path(str(tmp_path)) / "k.db")
    store = open_store(path)
    index = open_index(store)
    info = index.create_collection("c", embedding_model="m", embedding_id="test:m", dimensions=DIMS, settings={})
    write(index, info, [(*doc("a", ["alpha text"]), [unit(1)])])
    with store.transaction() as cur:  # what a store made before the tantivy index holds
        cur.execute(f"CREATE VIRTUAL TABLE rag_fts_{info.collection_id} USING fts5(context, text)")
    index.close()
    store.close()
    store = open_store(path)
    index = open_index(store)
    with store.transaction() as cur:
        cur.execute("SELECT name FROM sqlite_master WHERE name LIKE 'rag_fts%'")
        assert cur.fetchall() == []
    assert len(index.keyword(info, "alpha", 10)) == 1
    index.close()
    store.close()


def test_a_store_with_rag_tables_from_before_namespaces_is_not_migrated_again(store: Store, store_url: str) -> None:
    """RAG's tables were recorded as `rag_0001_collections`; now RAG's namespace records them as `rag/...`."""
    from keel.rag.schema import RAG_MIGRATIONS

    index = open_index(store)
    info = index.create_collection("kept", embedding_model="m", embedding_id="test:m", dimensions=DIMS, settings={})
    write(index, info, [(*doc("cats", ["Cats purr."]), [unit(1)])])
    index.close()
    with store.transaction() as cur:  # how a store of the older version records the same tables
        cur.execute("UPDATE keel_migrations SET name = 'rag_0001_collections' WHERE name = 'rag/0001_collections'")
    older = open_store(store_url)
    try:
        reopened = open_index(older)  # would fail creating rag_collections a second time
        assert [c.name for c in reopened.collections()] == ["kept"]
        assert {"rag_0001_collections", "rag/0001_collections"} <= set(older.applied_migrations())
        assert RAG_MIGRATIONS[0].replaces == "rag_0001_collections"
        reopened.close()
    finally:
        older.close()
