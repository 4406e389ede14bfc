"""Answers with citations: the prompt, the context budget, citations, grounding, and the extractive answer.

The model sees numbered sources and must cite them as [n]. Every [n] in the
answer maps to a chunk: its document, its span in the document text, and the
sentence in it that best supports the citing sentence (the "quote", with its
own character span), so a reader can be shown the exact text.

Extractive answers need no language model: the retrieved sentences closest
to the question (by the collection's embeddings, and by shared words), in
the order they appear, quoted, each with its citation. keel falls back to one
when the model's answer cites nothing, cites sources that do not exist, or is
mostly unsupported, which is what a small local model tends to do.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from keel.rag.retrieve import Hit, Retrieval
from keel.text.grounding import CitedSentence, rescale_cosine, split_cited, support
from keel.text.sentences import sentence_spans
from keel.text.words import coverage
from keel.types import Message

__all__ = [
    "LOCAL_ANSWER_MAX_TOKENS",
    "LOCAL_CONTEXT_TOKENS",
    "NOT_IN_DOCUMENTS",
    "Answer",
    "CheckedSentence",
    "Citation",
    "Quote",
    "build_messages",
    "pack_context",
    "source_sentences",
]  # fmt: skip

NOT_IN_DOCUMENTS = "Not in the documents."
_ABSTAIN_MARK = re.compile(r"not[ _]in[ _](the[ _])?documents", re.IGNORECASE)

SYSTEM = (
    "You answer questions using only the numbered sources you are given. After every sentence, cite the"
    " sources it comes from as [1] or [1][3]. Do not use anything you know that the sources do not say. If"
    f" the sources do not answer the question, reply exactly: {NOT_IN_DOCUMENTS}"
)

AnswerKind = Literal["generated", "extractive", "abstained"]

# The local model's share, unless the caller or rag.context_tokens / rag.answer_max_tokens say otherwise.
# On CPU its prompt evaluation dominates an answer: 2,517 prompt tokens took 43 s of a 50 s `rag ask` on
# the shared 2-core machine, and attention makes each token dearer the longer the prompt. A 135M model
# also loses track of long prompts, so three passages serve it better than eight (docs/benchmarks.md).
LOCAL_CONTEXT_TOKENS = 1000
LOCAL_ANSWER_MAX_TOKENS = 200


@dataclass(frozen=True)
class Quote:
    """A sentence of a source: where it is in its document's text."""

    start: int
    end: int
    text: str


@dataclass
class Citation:
    n: int
    hit: Hit
    quote: Quote | None = None  # the sentence of the chunk that best supports what cites it

    def to_json(self) -> dict[str, Any]:
        c = self.hit.chunk
        out: dict[str, Any] = {
            "n": self.n, "doc_id": c.doc_id, "chunk_id": c.chunk_id, "title": c.title, "source": c.source,
            "start": c.start, "end": c.end, "score": self.hit.score,
            "section": c.metadata.get("section"), "page": c.metadata.get("page"),
        }  # fmt: skip
        if self.quote is not None:
            out["quote"] = {"start": self.quote.start, "end": self.quote.end, "text": self.quote.text}
        return out


@dataclass
class CheckedSentence:
    text: str
    start: int
    end: int
    citations: list[int]
    supported: bool
    score: float
    reason: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "text": self.text, "start": self.start, "end": self.end, "citations": self.citations,
            "supported": self.supported, "score": round(self.score, 4), "reason": self.reason or None,
        }  # fmt: skip


@dataclass
class Answer:
    question: str
    text: str
    kind: AnswerKind
    citations: list[Citation] = field(default_factory=list)
    sentences: list[CheckedSentence] = field(default_factory=list)
    support: float = 0.0  # how close the best retrieved chunk is to the question, 0-1
    reason: str = ""  # why it abstained, or why it fell back to an extractive answer
    hits: list[Hit] = field(default_factory=list)  # the chunks the answer was given (its context)
    retrieval: Retrieval | None = None  # the search the context was cut from (ranked hits, what rerank cut)
    model: str | None = None
    generated_text: str | None = None  # the model's own answer when keel replaced it
    usage: dict[str, int] = field(default_factory=dict)
    cost_usd: float | None = None
    latency_s: float = 0.0
    trace_id: str = ""

    @property
    def abstained(self) -> bool:
        return self.kind == "abstained"

    @property
    def grounded(self) -> bool:
        """Every sentence supported by what it cites."""
        return bool(self.sentences) and all(s.supported for s in self.sentences)

    def to_json(self) -> dict[str, Any]:
        return {
            "question": self.question, "answer": self.text, "kind": self.kind, "abstained": self.abstained,
            "grounded": self.grounded, "support": round(self.support, 4), "reason": self.reason or None,
            "citations": [c.to_json() for c in self.citations],
            "sentences": [s.to_json() for s in self.sentences], "model": self.model,
            "generated_text": self.generated_text, "usage": self.usage, "cost_usd": self.cost_usd,
            "latency_s": round(self.latency_s, 3), "trace_id": self.trace_id,
            # an answer refused before any context was built shows what was retrieved
            "chunks": [h.to_json() for h in self.hits or (self.retrieval.hits if self.retrieval else [])],
        }  # fmt: skip


# --- prompt and context -----------------------------------------------------------------------------


def _source_block(n: int, hit: Hit) -> str:
    head = hit.chunk.context or hit.chunk.title or hit.chunk.doc_id
    return f"[{n}] {head}\n{hit.chunk.text}"


def build_messages(question: str, hits: Sequence[Hit]) -> list[Message]:
    sources = "\n\n".join(_source_block(n, h) for n, h in enumerate(hits, start=1))
    return [Message.system(SYSTEM), Message.user(f"Sources:\n\n{sources}\n\nQuestion: {question}")]


def pack_context(question: str, hits: Sequence[Hit], budget: int, count: Callable[[str], int]) -> list[Hit]:
    """The best-ranked hits whose source blocks, with the question, fit in `budget` tokens."""
    used = count(SYSTEM) + count(question) + 16
    packed: list[Hit] = []
    for hit in hits:
        cost = count(_source_block(len(packed) + 1, hit)) + 2
        if used + cost > budget:
            continue  # a long chunk is skipped; a shorter one further down may still fit
        packed.append(hit)
        used += cost
    return packed


def is_abstention(text: str) -> bool:
    return bool(_ABSTAIN_MARK.search(text)) and len(text) < 200


# --- sentences of the sources --------------------------------------------------------------------------


def source_sentences(hits: Sequence[Hit]) -> list[tuple[int, Quote]]:
    """(source number, sentence) for every sentence of the given hits, offsets in document text."""
    out = []
    for n, hit in enumerate(hits, start=1):
        chunk = hit.chunk
        for start, end in sentence_spans(chunk.text):
            text = chunk.text[start:end]
            if re.search(r"\w", text):
                out.append((n, Quote(chunk.start + start, chunk.start + end, text)))
    return out


# --- checking a generated answer ---------------------------------------------------------------------


def check_sentences(
    sentences: Sequence[CitedSentence],
    sentence_vectors: np.ndarray,
    sources: Sequence[tuple[int, Quote]],
    source_vectors: np.ndarray,
    n_sources: int,
    threshold: float,
    headings: Mapping[int, str] | None = None,
) -> tuple[list[CheckedSentence], dict[int, Quote]]:
    """Each sentence checked against the sentences of the sources it cites; the best quote per source.

    `headings` (source number -> title or heading path) count as cited text for the specifics check."""
    checked: list[CheckedSentence] = []
    quotes: dict[int, tuple[float, Quote]] = {}
    for i, sentence in enumerate(sentences):
        valid = [n for n in dict.fromkeys(sentence.citations) if 1 <= n <= n_sources]
        if not sentence.citations:
            checked.append(
                CheckedSentence(sentence.text, sentence.start, sentence.end, [], False, 0.0, "cites no source")
            )
            continue
        if not valid:
            checked.append(CheckedSentence(sentence.text, sentence.start, sentence.end, sentence.citations, False, 0.0,
                                           f"cites sources that do not exist (there are {n_sources})"))  # fmt: skip
            continue
        rows = [j for j, (n, _) in enumerate(sources) if n in valid]
        texts = [sources[j][1].text for j in rows]
        found = support(
            sentence.text, sentence_vectors[i], texts,
            source_vectors[rows] if rows else np.zeros((0, sentence_vectors.shape[1])),
            cited_text=" ".join(texts + [(headings or {}).get(n, "") for n in valid]), threshold=threshold,
        )  # fmt: skip
        if found.best >= 0:
            n, quote = sources[rows[found.best]]
            if found.score > quotes.get(n, (-1.0, quote))[0]:
                quotes[n] = (found.score, quote)
        reason = "" if found.supported else "its cited sources do not say this"
        if found.missing:
            reason = f"its cited sources do not mention {', '.join(repr(m) for m in found.missing[:5])}"
        checked.append(
            CheckedSentence(sentence.text, sentence.start, sentence.end, valid, found.supported, found.score, reason)
        )
    return checked, {n: q for n, (_, q) in quotes.items()}


def parse_answer(text: str) -> list[CitedSentence]:
    return split_cited(text)


# --- extractive answers ---------------------------------------------------------------------------------


def extract(
    question: str,
    question_vector: np.ndarray,
    sources: Sequence[tuple[int, Quote]],
    source_vectors: np.ndarray,
    *,
    max_sentences: int = 3,
) -> list[tuple[int, Quote, float]]:
    """The source sentences closest to the question: (source number, sentence, score), in reading order."""
    if not sources:
        return []
    meaning = np.asarray(rescale_cosine(source_vectors @ question_vector))
    wording = np.array([coverage(question, q.text) for _, q in sources])
    scores = 0.7 * meaning + 0.3 * wording
    best = [int(i) for i in np.argsort(-scores)[: max_sentences * 3]]
    picked: list[int] = []
    for i in best:
        if len(picked) == max_sentences:
            break
        if scores[i] < 0.5 * scores[best[0]]:
            break
        if any(sources[i][1].text == sources[j][1].text for j in picked):
            continue
        picked.append(i)
    picked.sort(key=lambda i: (sources[i][0], sources[i][1].start))
    return [(sources[i][0], sources[i][1], float(scores[i])) for i in picked]
