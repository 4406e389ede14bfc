"""`keel rag ingest` at its edges (issue 16): a large document shows progress and stops on the first Ctrl-C,
resuming from the embedding cache; a run that skips every file fails; pypdf's warnings reach the report."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from helpers import gateway, write_config
from keel.cli.app import app
from keel.rag import RAG, Document
from rag_files import write_pdf

#: a scripted embedding model: fast, so that the tests measure keel, not ONNX
TOML = """[models.e]
provider = "test"
model = "e"
kind = "embedding"
context_window = 512
[rag]
embed_batch = 8
embedding_model = "e"
chunk_size = 64
"""


def write_text(path: Path, size: int) -> Path:
    """Prose-like text of about `size` bytes, in paragraphs (what the chunker spends its time on)."""
    rng = random.Random(16)
    words = [
        "the",
        "tide",
        "turns",
        "at",
        "dusk",
        "while",
        "cats",
        "sleep",
        "and",
        "keys",
        "rotate",
        "under",
        "a",
        "pale",
        "moon",
        "over",
        "quiet",
        "harbours",
    ]
    out, total, n = [], 0, 0
    while total < size:
        sentence = " ".join(rng.choice(words) for _ in range(rng.randint(8, 20))).capitalize() + f" {n}."
        n += 1
        out.append(sentence + ("\n\n" if n % 30 == 0 else " "))
        total += len(out[-1])
    path.write_text("".join(out))
    return path


@pytest.fixture
def runner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.setenv("KEEL_CONFIG", str(write_config(tmp_path, TOML)))
    monkeypatch.setenv("COLUMNS", "200")
    return CliRunner()


class Interrupted(Exception):
    pass


class Recorder:
    def __init__(self, stop_after: int | None = None) -> None:
        self.events: list[tuple[str, int]] = []
        self.stop_after = stop_after

    def started(self, total: int | None) -> None:
        self.events.append(("started", total or 0))

    def embedded(self, chunks: int) -> None:
        self.events.append(("embedded", chunks))
        if self.stop_after is not None and len(self.events) > self.stop_after:
            raise Interrupted  # a run stopped in the middle of the document

    def advanced(self, documents: int, chunks: int) -> None:
        self.events.append(("advanced", documents))


def test_a_large_document_reports_chunks_as_they_are_embedded_and_resumes_from_the_cache(tmp_path: Path) -> None:
    gw = gateway(tmp_path, TOML)
    rag = RAG(gw)
    text = write_text(tmp_path / "big.txt", 40_000).read_text()
    interrupted = Recorder(stop_after=4)
    with pytest.raises(Interrupted):
        rag.ingest_sync([Document("big", text)], "big", progress=interrupted)
    assert [e for e, _ in interrupted.events] == ["started"] + ["embedded"] * 4  # progress before the write

    resumed = Recorder()
    report = rag.ingest_sync([Document("big", text)], "big", progress=resumed)
    embedded = [n for e, n in resumed.events if e == "embedded"]
    assert len(embedded) > 4 and sum(embedded) == report.chunks and all(n <= 8 for n in embedded)
    written = [i for i, (e, n) in enumerate(resumed.events) if e == "advanced" and n]
    assert len(written) == 1 and written[0] > max(i for i, (e, _) in enumerate(resumed.events) if e == "embedded")
    # the four batches embedded before the interruption came from the cache: the run continued, not restarted
    assert report.cached >= 4 * 8 and report.embedded == report.chunks - report.cached and report.added == 1
    assert rag.collection("big").n_chunks == report.chunks  # no duplicates
    rag.close()
    gw.close()


class ChunkingRecorder(Recorder):
    def chunking(self, source: str, done: int, total: int) -> None:
        self.events.append((f"chunking {source} of {total}", done))


def test_a_large_document_reports_its_chunking_before_its_embedding(tmp_path: Path) -> None:
    gw = gateway(tmp_path, TOML)
    rag = RAG(gw)
    path = write_text(tmp_path / "big.txt", 700_000)
    recorder = ChunkingRecorder()
    rag.ingest_sync(path, "big", progress=recorder)
    total = len(path.read_text())
    chunking = [(i, e, n) for i, (e, n) in enumerate(recorder.events) if e.startswith("chunking")]
    assert {e for _, e, _ in chunking} == {f"chunking big.txt of {total}"}
    done = [n for _, _, n in chunking]
    assert len(done) >= 2 and done == sorted(done) and done[-1] == total  # inside the document, up to its end
    first_embedded = next(i for i, (e, _) in enumerate(recorder.events) if e == "embedded")
    assert chunking[-1][0] < first_embedded
    small = ChunkingRecorder()  # a small document says nothing of its chunking
    rag.ingest_sync([Document("small", "A short text. Two sentences.")], "small", progress=small)
    assert not [e for e, _ in small.events if e.startswith("chunking")]
    rag.close()
    gw.close()


def test_the_progress_line_says_how_far_chunking_went() -> None:
    from rich.progress import Progress

    from keel.cli.rag import _Bar

    with Progress(disable=True) as progress:
        bar = _Bar(progress)
        bar.chunking("docs/big.txt", 1_200_000, 3_000_000)
        assert progress.tasks[0].description == "chunking docs/big.txt: 1.2/3.0 MB"
        bar.chunking("docs/big.txt", 3_000_000, 3_000_000)
        assert progress.tasks[0].description == "ingesting"


def test_the_first_ctrl_c_stops_an_ingest_cleanly(tmp_path: Path) -> None:
    corpus = write_text(tmp_path / "big.txt", 3_000_000)
    env = {**os.environ, "KEEL_CONFIG": str(write_config(tmp_path, TOML)), "KEEL_STORE": str(tmp_path / "k.db")}
    keel = str(Path(sys.executable).with_name("keel"))
    process = subprocess.Popen(
        [keel, "rag", "ingest", str(corpus), "-c", "big"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    time.sleep(4)  # well into the document (chunking it alone takes longer)
    assert process.poll() is None, process.communicate()
    process.send_signal(signal.SIGINT)
    started = time.monotonic()
    try:
        _, stderr = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        pytest.fail("the ingest went on for a minute after Ctrl-C")
    assert process.returncode == 130, stderr
    assert time.monotonic() - started < 30
    assert "run the same command again to resume" in stderr and "Traceback" not in stderr


def test_a_run_that_skips_every_file_fails_and_says_so(runner: CliRunner, tmp_path: Path) -> None:
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "empty.txt").write_text("")
    (folder / "broken.pdf").write_bytes(b"%PDF-1.4 not really")
    result = runner.invoke(app, ["rag", "ingest", str(folder), "-c", "docs"])
    assert result.exit_code == 2, result.output
    assert "every file was skipped (2 problems)" in result.stderr
    assert "skipped docs/empty.txt: empty file" in result.stdout
    as_json = runner.invoke(app, ["rag", "ingest", str(folder), "-c", "docs", "--json"])
    assert as_json.exit_code == 2 and json.loads(as_json.stdout)["problems"][0]["skipped"] is True


def test_pypdf_warnings_go_to_the_per_file_report(runner: CliRunner, tmp_path: Path) -> None:
    folder = tmp_path / "pdfs"
    folder.mkdir()
    pdf = write_pdf(folder / "odd.pdf", ["Cats sleep for about fifteen hours a day."])
    pdf.write_bytes(pdf.read_bytes().replace(b"\n%%EOF", b" %%EOF"))  # pypdf reads it, with a warning
    (folder / "notes.txt").write_text("Tides follow the moon.")
    result = runner.invoke(app, ["rag", "ingest", str(folder), "-c", "pdfs"])
    assert result.exit_code == 0, result.output
    assert "2 added" in result.stdout
    assert "warning pdfs/odd.pdf: pypdf: EOF marker not at start of line" in result.stdout
    assert "EOF marker" not in result.stderr  # not raw on stderr any more
