"""Text blocks shared by every app: reading documents, sentences, chunks, token offsets, words, grounding.

    from pathlib import Path
    from keel.text import Problem, chunk_document, load_file, sentence_spans, split_cited, support

    for document in load_file(Path("notes.md")):  # .txt .md .html .pdf .docx .jsonl: Documents, or Problems
        if isinstance(document, Problem):  # why a file (or a .jsonl line) was skipped, or a warning
            print(document)
            continue
        sentences = [document.text[start:end] for start, end in sentence_spans(document.text)]
        chunks = chunk_document(document)  # ChunkSettings() (structure-aware, 256 tokens): spans of the text
        for cited in split_cited("The fee is 12 euros [1]."):  # a model's output citing sources as [n]
            # the vectors: embeddings of one model (any norm), e.g. gateway.embed; one row per source sentence
            vectors = embed([cited.text, *sentences])
            verdict = support(cited.text, vectors[0], sentences, vectors[1:])  # .supported, .score, .missing

RAG ingests with them, evaluation scores faithfulness with them, and extraction, agents and the semantic
cache will read, split and check text with them, none of them importing `keel.rag`. Offsets are the
contract: a chunk, a sentence and a quote are spans of the document's text, so a citation points at the
exact characters. Nothing here knows about collections, stores or models (an embedding is passed in as
an array); imports point down only (tests/test_layers.py).
"""

from keel.text.chunking import Chunk, ChunkSettings, chunk_document
from keel.text.documents import (
    DEFAULT_MAX_FILE_BYTES,
    SUPPORTED_SUFFIXES,
    Document,
    Problem,
    Section,
    iter_files,
    load_file,
    storable,
    storable_value,
)
from keel.text.grounding import (
    DEFAULT_THRESHOLD,
    CitedSentence,
    Support,
    best_support,
    missing_specifics,
    rescale_cosine,
    specifics,
    split_cited,
    support,
)
from keel.text.sentences import Progress, sentence_spans
from keel.text.tokenize import BpeTokens, TokenCounter, WordPieceTokens, token_counter
from keel.text.words import STOP_WORDS, content_words, coverage, keyword_terms

__all__ = [
    "DEFAULT_MAX_FILE_BYTES", "DEFAULT_THRESHOLD", "STOP_WORDS", "SUPPORTED_SUFFIXES", "BpeTokens", "Chunk",
    "ChunkSettings",
    "CitedSentence", "Document", "Problem", "Progress", "Section", "Support", "TokenCounter", "WordPieceTokens",
    "best_support", "chunk_document", "content_words", "coverage", "iter_files", "keyword_terms", "load_file",
    "missing_specifics", "rescale_cosine", "sentence_spans", "specifics", "split_cited", "storable", "storable_value",
    "support", "token_counter",
]  # fmt: skip
