"""keel.text without RAG: read a file, split, chunk and check grounding with plain strings and arrays."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from keel.text import (
    ChunkSettings,
    CitedSentence,
    Document,
    Support,
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
