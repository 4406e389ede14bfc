"""Text blocks shared by every app: reading documents, sentences, chunks, token offsets, words, grounding.

    from keel.text import load_file, sentence_spans, chunk_document, ChunkSettings, token_counter

    document = load_file(Path("contract.pdf"), "contract.pdf")
    for start, end in sentence_spans(document.text):
        ...

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
    "DEFAULT_MAX_FILE_BYTES", "STOP_WORDS", "SUPPORTED_SUFFIXES", "BpeTokens", "Chunk", "ChunkSettings",
    "CitedSentence", "Document", "Problem", "Progress", "Section", "Support", "TokenCounter", "WordPieceTokens",
    "best_support", "chunk_document", "content_words", "coverage", "iter_files", "keyword_terms", "load_file",
    "missing_specifics", "rescale_cosine", "sentence_spans", "specifics", "split_cited", "storable", "storable_value",
    "support", "token_counter",
]  # fmt: skip
