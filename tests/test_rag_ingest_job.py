"""`keel rag ingest --job`: a large ingest as a durable job, killed with -9 and resumed, detached, refused.

The check after a kill counts what the collection holds (documents, chunks,
chunk ids), not the job's status: every document once, every chunk once.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from helpers import write_config
from keel.cli.app import app

pytestmark = pytest.mark.slow
SRC = Path(__file__).parent.parent / "src"
KEEL = [sys.executable, "-c", "from keel.cli.app import main; main()"]
TOML = "retry_base_s = 0.01\n[rag]\nembed_batch = 8\n[jobs]\npoll_s = 0.05\n"


def write_notes(folder: Path, n: int, *, paragraphs: int = 1) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        body = "\n\n".join(
            f"Paragraph {p} of note {i}: the tide turns at dusk, and sailors read the moon before leaving port."
            for p in range(paragraphs)
        )
        (folder / f"note-{i:03d}.md").write_text(f"# Note {i}\n\n{body}\n")
    return folder


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    monkeypatch.setenv("KEEL_CONFIG", str(write_config(tmp_path, TOML)))
    monkeypatch.setenv("COLUMNS", "200")
    return {**os.environ, "PYTHONPATH": str(SRC)}


class Cli(CliRunner):
    """CliRunner for commands that launch DBOS in this process: DBOS logs to the stderr of its first launch,
    which CliRunner closes after each command; a fresh launch gets a fresh handler."""

    def invoke(self, *args: Any, **kwargs: Any) -> Any:
        logging.getLogger("dbos").handlers.clear()
        return super().invoke(*args, **kwargs)


def count(db: Path, sql: str) -> int:
    try:
        with sqlite3.connect(db, timeout=30) as conn:
            return int(conn.execute(sql).fetchone()[0])
    except sqlite3.OperationalError:  # the tables are not there yet
        return 0


def show(env: dict[str, str], job: str) -> dict[str, Any]:
    shown = subprocess.run([*KEEL, "jobs", "show", job, "--json"], env=env, capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    result: dict[str, Any] = json.loads(shown.stdout)
    return result


def assert_each_document_once(db: Path, n: int) -> int:
    """Every file's document is in the collection once, each with all its chunks once; the chunk count."""
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(*), COUNT(DISTINCT doc_id) FROM rag_documents").fetchone() == (n, n)
        chunks, ids, positions = conn.execute(
            "SELECT COUNT(*), COUNT(DISTINCT chunk_id), COUNT(DISTINCT doc_id || ':' || ordinal) FROM rag_chunks"
        ).fetchone()
        assert chunks == ids == positions
        assert conn.execute("SELECT SUM(n_chunks) FROM rag_documents").fetchone()[0] == chunks
        assert conn.execute("SELECT n_chunks FROM rag_collections WHERE name = 'notes'").fetchone()[0] == chunks
    return int(chunks)


def test_an_ingest_job_killed_with_sigkill_resumes_with_every_document_once(
    tmp_path: Path, env: dict[str, str]
) -> None:
    n = 60
    docs = write_notes(tmp_path / "docs", n, paragraphs=8)
    db = Path(env["KEEL_STORE"])
    command = [*KEEL, "rag", "ingest", str(docs), "-c", "notes", "--job", "notes-1", "--chunk-size", "48",
               "--concurrency", "2"]  # fmt: skip
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while count(db, "SELECT COUNT(*) FROM rag_documents") < 8:
            assert process.poll() is None, process.stderr.read() if process.stderr else ""
            assert time.monotonic() < deadline, "the job ingested nothing in 5 minutes"
            time.sleep(0.05)
        during = show(env, "notes-1")  # another process looks at the job while it runs
        assert during["status"] == "running" and during["total"] == n and during["kind"] == "rag.ingest"
        assert 0 < during["done"] < n and during["failed"] == 0
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    documents = count(db, "SELECT COUNT(*) FROM rag_documents")
    assert documents < n, "the job finished before the kill: give it more work"
    killed = show(env, "notes-1")
    assert killed["status"] == "running" and killed["done"] < n

    resumed = subprocess.run([*command, "--json"], env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    report = json.loads(resumed.stdout)
    assert (report["status"], report["files"], report["done"], report["failed"]) == ("done", n, n, 0)
    # an item running at the kill may have written its document before it was recorded done: run again, it
    # finds the document stored (unchanged) and writes nothing; at most one such item per concurrent slot
    assert report["added"] + report["unchanged"] == n and report["updated"] == 0
    assert report["unchanged"] <= 2
    chunks = assert_each_document_once(db, n)
    assert report["chunks"] <= chunks and report["embedded"] + report["cached"] == report["chunks"]

    after = show(env, "notes-1")
    assert (after["status"], after["done"], after["failed"]) == ("done", n, 0)
    assert after["items"] == {"done": n}
    search = subprocess.run(
        [*KEEL, "rag", "search", "tide", "-c", "notes", "--retriever", "bm25", "-k", "1000", "--candidates", "1000",
         "--json"], env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert search.returncode == 0, search.stderr
    hits = json.loads(search.stdout)["hits"]
    assert len({h["chunk_id"] for h in hits}) == len(hits) == chunks  # the keyword index holds each chunk once


def test_a_detached_job_is_done_by_keel_worker_and_the_same_command_then_reports_it(
    tmp_path: Path, env: dict[str, str]
) -> None:
    docs = write_notes(tmp_path / "docs", 6)
    (docs / "empty.txt").write_text("")  # a file that fails: recorded with its reason, the job goes on
    cli = Cli()
    submitted = cli.invoke(app, ["rag", "ingest", str(docs), "-c", "notes", "--job", "later", "--detach", "--json"])
    assert submitted.exit_code == 0, submitted.output
    body = json.loads(submitted.stdout)
    assert (body["status"], body["files"], body["done"], body["detached"]) == ("running", 7, 0, True)

    # a plain `keel worker` (no --import) knows the rag.ingest kind
    worker = subprocess.Popen([*KEEL, "worker", "--id", "w1"], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while (shown := show(env, "later"))["status"] == "running":
            assert worker.poll() is None, worker.stderr.read() if worker.stderr else ""
            assert time.monotonic() < deadline, f"the worker did not finish the job: {shown}"
            time.sleep(0.3)
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=60)
    assert (shown["status"], shown["done"], shown["failed"]) == ("failed", 6, 1)
    assert shown["errors"][0]["item"] == "docs/empty.txt" and "empty file" in shown["errors"][0]["error"]
    assert shown["errors"][0]["trace_id"]

    again = cli.invoke(app, ["rag", "ingest", str(docs), "-c", "notes", "--job", "later"])
    assert again.exit_code == 2, again.output  # a failed file is an input problem, named with how to rerun it
    assert "6/7 files into notes" in again.stdout and "6 added" in again.stdout
    assert "failed docs/empty.txt: InputError: empty file" in again.stdout
    assert "keel jobs retry later" in again.stdout
    assert_each_document_once(Path(env["KEEL_STORE"]), 6)


def test_the_same_job_name_with_other_files_or_settings_is_refused(tmp_path: Path, env: dict[str, str]) -> None:
    docs = write_notes(tmp_path / "docs", 3)
    cli = Cli()
    first = cli.invoke(app, ["rag", "ingest", str(docs), "-c", "notes", "--job", "j", "--json"])
    assert first.exit_code == 0, first.output
    assert json.loads(first.stdout)["added"] == 3
    assert cli.invoke(app, ["rag", "ingest", str(docs), "-c", "notes", "--job", "j"]).exit_code == 0  # resumes: done

    write_notes(tmp_path / "docs", 4)  # one more file under the same folder
    grown = cli.invoke(app, ["rag", "ingest", str(docs), "-c", "notes", "--job", "j"])
    assert grown.exit_code == 2
    assert "job 'j' holds another ingest" in grown.output and "4 files" in grown.output
    assert "give --job a new name" in grown.output
    other = cli.invoke(app, ["rag", "ingest", str(docs), "-c", "other", "--job", "j"])
    assert other.exit_code == 2 and "holds another ingest" in other.output
    chunking = cli.invoke(app, ["rag", "ingest", str(docs), "-c", "notes", "--job", "j2", "--chunk-size", "64"])
    assert chunking.exit_code == 2 and "was built with chunking" in chunking.output  # the collection's settings hold

    for args, message in (
        (["--detach"], "--detach needs --job NAME"),
        (["--job", "j3", "--reembed"], "--reembed rebuilds the collection"),
        (["--job", "bad name!"], "job name 'bad name!' must be"),
    ):
        refused = cli.invoke(app, ["rag", "ingest", str(docs), "-c", "notes", *args])
        assert refused.exit_code == 2 and message in refused.output, refused.output
    missing = cli.invoke(app, ["rag", "ingest", str(tmp_path / "nowhere"), "-c", "notes", "--job", "j4"])
    assert missing.exit_code == 2 and "no such file or folder" in missing.output
