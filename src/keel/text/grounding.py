"""Grounding: is a sentence supported by the passages it cites?

Support of one sentence (of a model's output) by one source sentence combines
two signals:

- meaning: the cosine similarity of their embeddings (the caller embeds both
  with one model and passes the vectors), rescaled so that what the local
  models give unrelated text maps near 0 and a paraphrase near 1;
- wording: the share of the sentence's content words (stop words dropped,
  lower-cased, simple plural/suffix folding) found in the source sentence.

The score is the better of the two, and a sentence is supported when its best
cited source sentence reaches `threshold` and every specific it states (a
number, or a name: a capitalised word inside the sentence) appears somewhere
in the text it cites. Embeddings place "The tides were discovered by Napoleon
in 1802" close to a passage about tides; the specifics check catches the
invented name and year, the commonest kind of made-up detail. This is a
similarity check, not an entailment model: it catches invented content and
wrong citations, not a negation that keeps the words ("X does not cause Y"
against "X causes Y"). keel says so rather than pretend otherwise.

Output that cites its sources as [n] markers is split into `CitedSentence`s
(`split_cited`). RAG checks its answers with this module (and decides
abstention and extractive answers with the same signals); evaluation scores
faithfulness against a context with it; extraction and agents can check
their own outputs the same way.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from keel.errors import InputError
from keel.text.sentences import sentence_spans
from keel.text.words import STOP_WORDS, coverage

__all__ = [
    "DEFAULT_THRESHOLD", "CitedSentence", "Support", "best_support", "missing_specifics", "rescale_cosine",
    "specifics", "split_cited", "support",
]  # fmt: skip

#: The support a sentence needs, what RAG uses by default (`[rag] grounding_threshold`), tuned on the local models.
DEFAULT_THRESHOLD = 0.6

_CITATION = re.compile(r"\[(\d{1,3}(?:\s*,\s*\d{1,3})*)\]")
_TOKEN = re.compile(r"[^\W_]+(?:[.,\-/][^\W_]+)*", re.UNICODE)
_LEADING_CITATIONS = re.compile(r"\s*(?:\[\d{1,3}(?:\s*,\s*\d{1,3})*\]\s*)+")

#: Cosine similarities of the local models for unrelated and near-identical text (measured on SciFact
#: sentence pairs with bge-small-en-v1.5; see docs/rag.md): used to put similarity on a 0-1 scale.
COSINE_FLOOR = 0.45
COSINE_CEILING = 0.90


def rescale_cosine(value: float | np.ndarray) -> float | np.ndarray:
    scaled = (np.asarray(value) - COSINE_FLOOR) / (COSINE_CEILING - COSINE_FLOOR)
    clipped = np.clip(scaled, 0.0, 1.0)
    return float(clipped) if np.ndim(clipped) == 0 else clipped


@dataclass
class CitedSentence:
    text: str  # without citation markers
    start: int  # offsets in the whole text (markers included)
    end: int
    citations: list[int]  # the [n] numbers it cites, as written


def _numbers(text: str) -> list[int]:
    return [int(n) for group in _CITATION.findall(text) for n in re.split(r"\s*,\s*", group)]


def split_cited(answer: str) -> list[CitedSentence]:
    """The sentences of a text citing numbered sources as [n], with the numbers each one cites.

    A marker after a sentence's full stop ("... end. [2] Next ...") belongs to that sentence, whether
    the sentence splitter left it alone or at the start of the next sentence.
    """
    sentences: list[CitedSentence] = []
    for start, end in sentence_spans(answer):
        lead = _LEADING_CITATIONS.match(answer, start, end)
        if lead and sentences and lead.end() < end:
            sentences[-1].citations.extend(_numbers(lead.group()))
            sentences[-1].end = lead.end()
            start = lead.end()
        raw = answer[start:end]
        numbers = _numbers(raw)
        text = re.sub(r"\s+", " ", _CITATION.sub("", raw)).strip()
        if not re.search(r"\w", text) and sentences:  # only markers: they cite the previous sentence
            sentences[-1].citations.extend(numbers)
            sentences[-1].end = end
            continue
        sentences.append(CitedSentence(re.sub(r"\s+([.,;:!?])", r"\1", text), start, end, numbers))
    return sentences


def best_support(
    sentence: str, sentence_vector: np.ndarray, sources: Sequence[str], source_vectors: np.ndarray
) -> tuple[float, int]:
    """(support score, index of the best source sentence); (0, -1) with no sources."""
    if not sources:
        return 0.0, -1
    vector = np.asarray(sentence_vector, dtype=np.float32).reshape(-1)
    matrix = np.asarray(source_vectors, dtype=np.float32)
    if matrix.ndim == 1 and len(sources) == 1:
        matrix = matrix.reshape(1, -1)
    if matrix.ndim != 2 or matrix.shape[0] != len(sources):
        rows = matrix.shape[0] if matrix.ndim else 0
        raise InputError(f"{len(sources)} sources but {rows} source vectors: give one row per source")
    if matrix.shape[1] != vector.shape[0]:
        raise InputError(f"source vectors have {matrix.shape[1]} dimensions, the sentence's {vector.shape[0]}: embed"
                         " both with one model")  # fmt: skip
    # a cosine whatever the norm: most models' embeddings are not unit length, and a dot product of them means nothing
    norms = np.linalg.norm(matrix, axis=1) * max(float(np.linalg.norm(vector)), 1e-12)
    meaning = np.asarray(rescale_cosine((matrix @ vector) / np.clip(norms, 1e-12, None)))
    wording = np.array([coverage(sentence, s) for s in sources])
    scores = np.maximum(meaning, wording)
    best = int(np.argmax(scores))
    return float(scores[best]), best


@dataclass(frozen=True)
class Support:
    """How well a sentence is supported: its best source sentence, and the specifics no cited text has."""

    score: float  # the better of meaning and wording for the best source, 0-1
    best: int  # index of that source, -1 with none
    missing: list[str]  # numbers and names the sentence states that the cited text does not contain
    threshold: float

    @property
    def supported(self) -> bool:
        return self.score >= self.threshold and not self.missing


def support(
    sentence: str,
    sentence_vector: np.ndarray,
    sources: Sequence[str],
    source_vectors: np.ndarray,
    *,
    cited_text: str | None = None,
    threshold: float = DEFAULT_THRESHOLD,
) -> Support:
    """The check of one sentence against the source sentences it may draw on.

    `sentence_vector` and `source_vectors` (one row per source, in order) are embeddings of one model, of
    any norm. `cited_text`: everything the sentence cites, where its numbers and names must appear (it may
    hold more than `sources`, e.g. a title); default: the sources. Raises InputError on mismatched shapes.
    """
    score, best = best_support(sentence, sentence_vector, sources, source_vectors)
    cited = " ".join(sources) if cited_text is None else cited_text
    return Support(score, best, missing_specifics(sentence, cited), threshold)


def specifics(sentence: str) -> list[str]:
    """The numbers and names a sentence states: tokens with a digit, and capitalised words after its first word
    that are not function words ("In", "The"). Lower-cased, in order, without repeats."""
    found: list[str] = []
    for i, match in enumerate(_TOKEN.finditer(sentence)):
        token = match.group()
        has_digit = any(ch.isdigit() for ch in token)
        named = i > 0 and token[0].isupper() and token.lower() not in STOP_WORDS and len(token) > 1
        if (has_digit or named) and token.lower() not in found:
            found.append(token.lower())
    return found


def missing_specifics(sentence: str, cited_text: str) -> list[str]:
    """The sentence's specifics that the cited text does not contain (case-insensitive, as whole tokens)."""
    present = {m.group().lower() for m in _TOKEN.finditer(cited_text)}
    present |= {w.lower() for w in re.findall(r"[^\W_]+", cited_text)}
    return [s for s in specifics(sentence) if s not in present]
