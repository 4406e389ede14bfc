"""keel.text without RAG: read a file, split, chunk and check grounding with plain strings and arrays."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from keel.errors import InputError
from keel.text import (
    DEFAULT_THRESHOLD,
    ChunkSettings,
    CitedSentence,
    Document,
    Support,
    best_support,
    chunk_document,
    load_file,
    sentence_spans,
    split_cited,
    support,
    token_counter,
)


def test_blocks_load_without_rag() -> None:
    """What the apps import to use the blocks pulls in no part of keel.rag."""
    code = (
        "import sys, keel.text, keel.vectors, keel.evals.scorers\n"
        "print(sorted(m for m in sys.modules if m == 'keel.rag' or m.startswith('keel.rag.')))"
    )
    src = str(Path(__file__).resolve().parents[1] / "src")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": src, "PATH": ""})  # fmt: skip
    assert out.stdout.strip() == "[]"


def test_read_split_and_chunk_a_file(tmp_path: Path) -> None:
    path = tmp_path / "terms.md"
    path.write_text("# Terms\n\nThe fee is 12 euros. It is due in May.\n\n## Notice\n\nEither party may end it.\n")
    [document] = list(load_file(path, "terms.md"))
    assert isinstance(document, Document) and document.title == "Terms"
    spans = sentence_spans(document.text)
    assert [document.text[a:b] for a, b in spans][1:3] == ["The fee is 12 euros.", "It is due in May."]
    chunks = chunk_document(document, ChunkSettings(size=16, overlap=0), token_counter(None))
    assert all(c.text == document.text[c.start : c.end] for c in chunks)
    assert any(c.context.endswith("Notice") for c in chunks)


def test_support_of_cited_sentences_with_plain_types() -> None:
    sentences = split_cited("The fee is 12 euros [1]. It was set by Napoleon in 1802. [2]")
    assert sentences == [
        CitedSentence("The fee is 12 euros.", 0, 24, [1]),
        CitedSentence("It was set by Napoleon in 1802.", 25, 60, [2]),
    ]
    sources = ["The fee is 12 euros per month.", "The fee was set in 2020."]
    vectors = np.eye(3, dtype=np.float32)[[0, 0, 1]]  # sentence 1 means what source 1 says, nothing else
    first = support(sentences[0].text, vectors[0], sources, vectors[1:], cited_text=sources[0], threshold=0.6)
    assert first == Support(1.0, 0, [], 0.6) and first.supported
    second = support(sentences[1].text, vectors[2], sources[1:], vectors[2:], cited_text=sources[1], threshold=0.6)
    assert not second.supported and second.missing == ["napoleon", "1802"]


def test_an_app_reads_and_chunks_a_file_without_naming_rag_settings(tmp_path: Path) -> None:
    # an app without RAG has no source naming scheme, chunk settings or tokenizer of its own: defaults serve it
    path = tmp_path / "terms.md"
    path.write_text("# Terms\n\nThe fee is 12 euros. It is due in May.\n")
    [document] = list(load_file(path))
    assert isinstance(document, Document) and document.source == "terms.md" and document.doc_id == "terms.md"
    assert chunk_document(document) == chunk_document(document, ChunkSettings(), token_counter(None))
    assert token_counter().count("The fee is 12 euros.") == token_counter(None).count("The fee is 12 euros.")


def test_support_defaults_to_the_sources_as_cited_text_and_the_rag_threshold() -> None:
    sources = ["The fee is 12 euros per month."]
    vectors = np.eye(2, dtype=np.float32)[[0, 0]]
    found = support("The fee is 12 euros.", vectors[0], sources, vectors[1:])
    assert found == Support(1.0, 0, [], DEFAULT_THRESHOLD) and found.supported
    invented = support("The fee was set by Napoleon.", vectors[0], sources, vectors[1:])
    assert invented.missing == ["napoleon"] and not invented.supported


def test_support_takes_raw_embeddings_and_names_mismatched_shapes() -> None:
    # embeddings of most models are not unit length: the meaning signal is a cosine, whatever their norm
    rng = np.random.default_rng(3)
    sentence, sources = rng.normal(size=8), rng.normal(size=(2, 8))
    texts = ["alpha beta gamma", "delta epsilon zeta"]
    unit = best_support("omega", sentence / np.linalg.norm(sentence), texts,
                        sources / np.linalg.norm(sources, axis=1, keepdims=True))  # fmt: skip
    raw = best_support("omega", sentence * 7.0, texts, sources * 3.0)
    assert raw[1] == unit[1] and raw[0] == pytest.approx(unit[0], abs=1e-6)
    with pytest.raises(InputError, match="2 sources but 1 source vectors"):
        support("omega", sentence, texts, sources[:1])
    with pytest.raises(InputError, match="dimensions"):
        support("omega", sentence[:4], texts, sources)


def test_the_example_in_keel_texts_docstring_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import textwrap

    import keel.text

    doc = keel.text.__doc__ or ""
    lines = doc.split("\n\n", 1)[1].splitlines()  # the indented block after the first line, blank lines and all
    block = lines[: next(i for i, line in enumerate(lines) if line and not line.startswith(" "))]
    example = textwrap.dedent("\n".join(block))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.md").write_text("# Fees\n\nThe fee is 12 euros. It is due in May.\n")
    found: dict[str, Any] = {"embed": lambda texts: np.ones((len(texts), 4), dtype=np.float32)}
    exec(compile(example, "keel.text docstring", "exec"), found)
    assert found["chunks"] and found["verdict"].supported
