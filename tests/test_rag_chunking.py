"""Chunking: every chunk is an exact span of its document, within the token budget, with its heading path."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keel.models.onnx import minilm_paths
from keel.text import chunking
from keel.text.chunking import ChunkSettings, chunk_document
from keel.text.documents import Document, load_file, markdown_sections
from keel.text.sentences import sentence_spans
from keel.text.tokenize import BpeTokens, TokenCounter, WordPieceTokens
from rag_files import MARKDOWN

STRATEGIES = ("tokens", "structure", "sentences")


@pytest.fixture(scope="module")
def wordpiece() -> TokenCounter:
    return WordPieceTokens(minilm_paths()[1], "minilm")


def markdown_document(text: str) -> Document:
    return Document("doc", text, title="Guide", sections=markdown_sections(text))


def check_chunks(document: Document, chunk_settings: ChunkSettings, tokens: TokenCounter) -> None:
    chunks = chunk_document(document, chunk_settings, tokens)
    for i, chunk in enumerate(chunks):
        assert chunk.ordinal == i
        assert chunk.text == document.text[chunk.start : chunk.end]
        assert chunk.text == chunk.text.strip() and chunk.text
        assert tokens.count(chunk.text) <= chunk_settings.size
    covered = set()
    for chunk in chunks:
        covered.update(range(chunk.start, chunk.end))
    missing = [i for i, ch in enumerate(document.text) if not ch.isspace() and i not in covered]
    assert not missing, f"characters in no chunk: {document.text[missing[0] : missing[0] + 40]!r}"


WORDS = (
    "the cell protein gene study results showed patients risk increased reduced expression levels Dr. e.g. 3.5"
    " mg/kg (p < 0.05) et al. U.S. well-known naïve 東京"
)
words = st.sampled_from(WORDS.split())
sentence = st.lists(words, min_size=1, max_size=40).map(lambda ws: " ".join(ws) + ".")
paragraph = st.lists(sentence, min_size=1, max_size=8).map(" ".join)
heading = st.tuples(st.integers(1, 3), st.lists(words, min_size=1, max_size=4)).map(
    lambda t: "#" * t[0] + " " + " ".join(t[1])
)
block = st.one_of(paragraph, heading)
markdown = st.lists(block, min_size=1, max_size=12).map("\n\n".join)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=markdown, strategy=st.sampled_from(STRATEGIES), size=st.integers(16, 120), overlap=st.integers(0, 15))
def test_chunks_are_exact_spans_within_budget_covering_the_text(
    wordpiece: TokenCounter, text: str, strategy: str, size: int, overlap: int
) -> None:
    check_chunks(markdown_document(text), ChunkSettings(strategy=strategy, size=size, overlap=overlap), wordpiece)  # type: ignore[arg-type]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_bpe_counter_gives_exact_spans_too(strategy: str) -> None:
    check_chunks(markdown_document(MARKDOWN * 5), ChunkSettings(strategy=strategy, size=40, overlap=8), BpeTokens())  # type: ignore[arg-type]


def test_structure_never_crosses_a_heading_and_keeps_the_path(wordpiece: TokenCounter) -> None:
    text = "# Guide\n\nIntro text.\n\n## Install\n\nRun pip.\n\n### Linux\n\nUse apt.\n\n## Use\n\nCall it."
    chunks = chunk_document(markdown_document(text), ChunkSettings(size=200, overlap=0), wordpiece)
    assert [c.text.splitlines()[0] for c in chunks] == ["# Guide", "## Install", "### Linux", "## Use"]
    assert [c.context for c in chunks] == ["Guide", "Guide > Install", "Guide > Install > Linux", "Guide > Use"]
    assert [c.metadata.get("section") for c in chunks] == ["Guide", "Install", "Linux", "Use"]
    assert chunks[2].indexed_text == "Guide > Install > Linux\n### Linux\n\nUse apt."


def test_structure_packs_paragraphs_and_splits_long_ones_by_sentence(wordpiece: TokenCounter) -> None:
    short = "One short paragraph.\n\nAnother short one."
    long = " ".join(f"Sentence number {i} talks about proteins and cells." for i in range(30))
    doc = Document("d", short + "\n\n" + long)
    chunks = chunk_document(doc, ChunkSettings(size=40, overlap=0), wordpiece)
    assert chunks[0].text.startswith("One short paragraph.") and "Another short one." in chunks[0].text
    assert all(c.text.endswith(".") for c in chunks)  # long paragraph cut at sentence ends
    assert len(chunks) > 3


def test_token_windows_overlap_by_the_asked_tokens(wordpiece: TokenCounter) -> None:
    doc = Document("d", " ".join(f"word{i}" for i in range(200)))
    chunks = chunk_document(doc, ChunkSettings(strategy="tokens", size=50, overlap=10), wordpiece)
    assert all(c.n_tokens <= 50 for c in chunks)
    for a, b in itertools.pairwise(chunks):
        shared = doc.text[b.start : a.end]
        assert a.end > b.start and 5 <= wordpiece.count(shared) <= 12


def test_sentence_chunks_repeat_trailing_sentences(wordpiece: TokenCounter) -> None:
    names = [
        "alpha",
        "beta",
        "gamma",
        "delta",
        "epsilon",
        "zeta",
        "eta",
        "theta",
        "iota",
        "kappa",
        "lambda",
        "omicron",
        "sigma",
        "tau",
        "upsilon",
    ]
    doc = Document("d", " ".join(f"This sentence is about {a} and {b}." for a in names for b in names[:3]))
    chunks = chunk_document(doc, ChunkSettings(strategy="sentences", size=30, overlap=10), wordpiece)
    assert len(chunks) > 3
    for a, b in itertools.pairwise(chunks):
        assert b.start < a.end  # overlapping
        assert doc.text[b.start : a.end].endswith(".")  # by whole sentences


def test_a_sentence_longer_than_the_size_is_cut_into_windows(wordpiece: TokenCounter) -> None:
    doc = Document("d", " ".join(["endless"] * 300) + ".")
    for strategy in ("structure", "sentences"):
        chunks = chunk_document(doc, ChunkSettings(strategy=strategy, size=32, overlap=4), wordpiece)  # type: ignore[arg-type]
        assert len(chunks) > 5 and all(wordpiece.count(c.text) <= 32 for c in chunks)


def test_pdf_chunks_know_their_pages(tmp_path: Path, wordpiece: TokenCounter) -> None:
    from rag_files import write_pdf

    one = "Page one talks about revenue growth in the northern and southern regions."
    two = "Page two talks about the costs of shipping goods across the eastern border."
    path = write_pdf(tmp_path / "r.pdf", [one, two])
    (doc,) = list(load_file(path, "r.pdf"))
    assert isinstance(doc, Document)
    chunks = chunk_document(doc, ChunkSettings(strategy="sentences", size=16, overlap=0), wordpiece)
    pages = {c.text: (c.metadata["page"], c.metadata["page_end"]) for c in chunks}
    assert pages == {one: (1, 1), two: (2, 2)}


def test_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="overlap"):
        ChunkSettings(size=32, overlap=32)
    with pytest.raises(ValueError):
        ChunkSettings(size=4)
    with pytest.raises(ValueError):
        ChunkSettings(strategy="paragraphs")  # type: ignore[arg-type]


def long_text(paragraphs: int, seed: int = 8) -> str:
    """Prose with abbreviations, decimals, repeated sentences and single newlines inside paragraphs."""
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(paragraphs):
        sentences = [
            " ".join(rng.choice(WORDS.split()) for _ in range(rng.randint(3, 30))).capitalize() + rng.choice(".?!")
            for _ in range(rng.randint(1, 12))
        ]
        out.append(rng.choice((" ", "\n", "  ")).join(sentences))
    return rng.choice(("\n\n", "\n \n", "\n\n\n")).join(out)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_chunking_reports_its_progress_in_characters(strategy: str, wordpiece: TokenCounter) -> None:
    text = long_text(40)
    positions: list[int] = []
    chunk_document(Document("doc", text), ChunkSettings(strategy=strategy, size=64), wordpiece, positions.append)
    assert positions == sorted(positions) and positions[-1] == len(text)
    # inside the document, not only at its end (token windows are one fast tokenizer call)
    assert len(positions) > (0 if strategy == "tokens" else 20)
    assert all(0 <= p <= len(text) for p in positions)


def pysbd_sentence_spans(text: str) -> list[tuple[int, int]]:
    """The spans as keel found them before it called pysbd's processor itself: through `Segmenter.segment`,
    which locates every sentence with a regex compiled for it and run from the start of the paragraph."""
    import pysbd

    segmenter = pysbd.Segmenter(language="en", clean=False, char_span=False)
    spans: list[tuple[int, int]] = []
    cursor = 0
    for paragraph in re.split(r"\n\s*\n", text):
        found = text.find(paragraph, cursor) if paragraph else -1
        if found < 0 or not paragraph.strip():
            continue
        end, inner = found + len(paragraph), []
        for sentence in segmenter.segment(paragraph):
            piece = sentence.strip()
            at = text.find(piece, inner[-1][1] if inner else found, end) if piece else -1
            if at >= 0:
                inner.append((at, at + len(piece)))
        if not inner:
            lead = len(paragraph) - len(paragraph.lstrip())
            inner.append((found + lead, found + len(paragraph.rstrip())))
        spans.extend(inner)
        cursor = end
    return spans


@pytest.mark.parametrize("seed", range(4))
def test_faster_sentence_splitting_gives_the_same_sentences_and_chunks(
    seed: int, wordpiece: TokenCounter, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = long_text(30, seed) + "\n\nYes. Yes. Yes.\n\nDr. Smith et al. found 3.5 mg/kg. It held in the U.S. too."
    assert sentence_spans(text) == pysbd_sentence_spans(text)
    document = Document("doc", text)
    after = {s: chunk_document(document, ChunkSettings(strategy=s, size=48), wordpiece) for s in STRATEGIES}
    monkeypatch.setattr(chunking, "sentence_spans", lambda text, start, end, progress=None: [
        (a + start, b + start) for a, b in pysbd_sentence_spans(text[start:end])
    ])  # fmt: skip
    before = {s: chunk_document(document, ChunkSettings(strategy=s, size=48), wordpiece) for s in STRATEGIES}
    assert after == before and len(after["sentences"]) > 20
