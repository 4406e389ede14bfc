"""`keel rag` as a user runs it: ingest, search, ask, collections, drop; exit codes; a SIGKILL mid-ingest."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from helpers import write_config
from keel.cli.app import app
from rag_files import write_corpus

#: the scripted answer model cites source [1]; the tests filter retrieval to the one document it is about
TOML = """default_model = "t"
[models.t]
provider = "test"
model = "t"
script = ["Cats sleep for about fifteen hours a day [1]."]
[rag]
embed_batch = 8
"""

FACTS = [
    {"_id": "cats", "title": "Cats", "text": "Cats sleep for about fifteen hours a day and hunt.", "kind": "animal"},
    {"_id": "tides", "title": "Tides", "text": "Tides are caused by the pull of the moon and the sun.", "kind": "sea"},
    {"_id": "keys", "title": "Keys", "text": "To rotate a key, revoke it and create a new one.", "kind": "ops"},
]  # fmt: skip


@pytest.fixture
def runner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.setenv("KEEL_CONFIG", str(write_config(tmp_path, TOML)))
    monkeypatch.setenv("COLUMNS", "200")
    return CliRunner()


def write_facts(path: Path) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in FACTS))
    return path


def run_json(runner: CliRunner, *args: str) -> object:
    result = runner.invoke(app, ["rag", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_ingest_search_ask_collections_drop(runner: CliRunner, tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "docs")
    first = runner.invoke(app, ["rag", "ingest", str(corpus), "-c", "docs", "--meta", "team=platform"])
    assert first.exit_code == 0, first.output
    assert "docs: 7 added, 0 updated, 0 unchanged, 0 deleted" in first.stdout
    again = run_json(runner, "ingest", str(corpus), "-c", "docs", "--meta", "team=platform")
    assert isinstance(again, dict) and again["unchanged"] == 7 and again["added"] == 0 and again["embedded"] == 0

    found = run_json(runner, "search", "when does the office open", "-c", "docs", "-k", "3")
    assert isinstance(found, dict)
    top = found["hits"][0]
    assert top["doc_id"] == "docs/notes.txt" and top["bm25"] is not None and top["dense"] is not None
    assert top["metadata"]["team"] == "platform"
    table = runner.invoke(app, ["rag", "search", "hotel cap in capitals", "-c", "docs", "--retriever", "bm25"])
    assert table.exit_code == 0 and "docs/travel.docx" in table.stdout and "bm25" in table.stdout

    listed = run_json(runner, "collections")
    assert isinstance(listed, list) and [(c["name"], c["documents"]) for c in listed] == [("docs", 7)]
    dropped = runner.invoke(app, ["rag", "drop", "docs", "--yes"])
    assert dropped.exit_code == 0 and "dropped docs" in dropped.stdout
    assert run_json(runner, "collections") == []


def test_ask_prints_citations_to_exact_spans(runner: CliRunner, tmp_path: Path) -> None:
    facts = write_facts(tmp_path / "facts.jsonl")
    assert runner.invoke(app, ["rag", "ingest", str(facts), "-c", "facts"]).exit_code == 0
    only_cats = ["--filter", '{"kind": "animal"}']
    answer = run_json(runner, "ask", "How long do cats sleep?", "-c", "facts", *only_cats)
    assert isinstance(answer, dict) and answer["kind"] == "generated"
    citation = answer["citations"][0]
    text = FACTS[0]["text"]
    chunk = next(c for c in answer["chunks"] if c["chunk_id"] == citation["chunk_id"])
    assert citation["doc_id"] == "cats" and text[citation["start"] : citation["end"]] == chunk["text"]
    quote = citation["quote"]
    assert text[quote["start"] : quote["end"]] == quote["text"] and "fifteen hours" in quote["text"]
    assert answer["sentences"][0]["supported"] is True

    printed = runner.invoke(app, ["rag", "ask", "How long do cats sleep?", "-c", "facts", *only_cats])
    assert printed.exit_code == 0, printed.output
    assert "[1] Cats (cats), chars 0-" in printed.stdout and "supported" in printed.stdout

    quotes = run_json(runner, "ask", "What causes tides?", "-c", "facts", "--mode", "extractive")
    assert isinstance(quotes, dict) and quotes["kind"] == "extractive" and "moon" in quotes["answer"]
    abstained = run_json(runner, "ask", "What is the boiling point of tungsten?", "-c", "facts")
    assert isinstance(abstained, dict) and abstained["kind"] == "abstained" and abstained["citations"] == []


def test_errors_name_the_problem_with_exit_code_2(runner: CliRunner, tmp_path: Path) -> None:
    facts = write_facts(tmp_path / "facts.jsonl")
    assert runner.invoke(app, ["rag", "ingest", str(facts), "-c", "facts"]).exit_code == 0
    cases = [
        (["search", "cats", "-c", "nope"], "unknown collection 'nope'"),
        (["ask", "cats?", "-c", "nope"], "unknown collection 'nope'"),
        (["drop", "nope", "--yes"], "unknown collection 'nope'"),
        (["search", "   ", "-c", "facts"], "empty"),
        (["search", "cats", "-c", "facts", "--filter", '{"kind": {"$near": 1}}'], "$near"),
        (["search", "cats", "-c", "facts", "--filter", "{not json"], "JSON"),
        (["search", "cats", "-c", "facts", "--retriever", "magic"], "retriever"),
        (["search", "cats", "-c", "facts", "-k", "0"], "top_k must be 1 to 1000"),
        (["ingest", str(tmp_path / "missing"), "-c", "facts"], "no such file"),
        (["ingest", str(facts), "-c", "bad/name"], "collection name"),
        (["ingest", str(facts), "-c", "facts", "--meta", "novalue"], "NAME=VALUE"),
        (["ingest", str(facts), "-c", "facts", "--chunk-size", "64"], "--reembed"),
    ]
    for args, message in cases:
        result = runner.invoke(app, ["rag", *args])
        assert result.exit_code == 2, (args, result.output)
        assert message in result.stderr, (args, result.stderr)


def test_a_rebuild_applies_new_chunking(runner: CliRunner, tmp_path: Path) -> None:
    facts = write_facts(tmp_path / "facts.jsonl")
    assert runner.invoke(app, ["rag", "ingest", str(facts), "-c", "facts"]).exit_code == 0
    rebuilt = runner.invoke(app, ["rag", "ingest", str(facts), "-c", "facts", "--chunker", "sentences", "--reembed"])
    assert rebuilt.exit_code == 0, rebuilt.output
    listed = run_json(runner, "collections")
    assert isinstance(listed, list) and listed[0]["chunking"]["strategy"] == "sentences"


def _documents_in(db: Path) -> int:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            return int(conn.execute("SELECT COUNT(*) FROM rag_documents").fetchone()[0])
    except sqlite3.OperationalError:  # not created yet
        return 0


@pytest.mark.slow
def test_a_killed_ingest_resumes_without_losing_or_duplicating(tmp_path: Path) -> None:
    """SIGKILL, not an exception: nothing runs on the way out, so only what was committed survives."""
    rows = [{"_id": f"d{i}", "title": f"Note {i}", "text": f"Note {i}: " + "the tide turns at dusk. " * (5 + i % 9)}
            for i in range(400)]  # fmt: skip
    corpus = tmp_path / "notes.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    db = tmp_path / "keel.db"
    config = write_config(tmp_path, "[rag]\nembed_batch = 8\n")
    env = {**os.environ, "KEEL_CONFIG": str(config), "KEEL_STORE": str(db)}
    keel = str(Path(sys.executable).with_name("keel"))
    command = [keel, "rag", "ingest", str(corpus), "-c", "notes", "--json"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while _documents_in(db) < 40:
        assert process.poll() is None, process.stderr.read() if process.stderr else ""
        assert time.monotonic() < deadline, "the ingest wrote nothing in 5 minutes"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = _documents_in(db)
    assert 40 <= done < 400

    resumed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    report = json.loads(resumed.stdout)
    # a document is written with all its chunks or not at all, so those committed before the kill are unchanged
    assert report["unchanged"] == done and report["added"] == 400 - done and report["deleted"] == 0
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM rag_documents").fetchone()[0] == 400
        per_doc = conn.execute("SELECT doc_id, COUNT(*), COUNT(DISTINCT ordinal) FROM rag_chunks GROUP BY doc_id")
        assert all(n == distinct for _, n, distinct in per_doc.fetchall())
        chunks = conn.execute("SELECT COUNT(*) FROM rag_chunks").fetchone()[0]
    for retriever, query in (("dense", "Note 399"), ("bm25", "tide")):  # every chunk holds "tide"
        search = subprocess.run([keel, "rag", "search", query, "-c", "notes", "--retriever", retriever,
                                 "-k", "400", "--candidates", "400", "--json"],
                                env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
        assert search.returncode == 0, search.stderr
        hits = json.loads(search.stdout)["hits"]
        assert len({h["chunk_id"] for h in hits}) == len(hits) == chunks, retriever  # each index holds each chunk once
