"""Is each answer sentence supported by the text it cites? And is the question answerable at all?

Support of one answer sentence by one source sentence combines two signals:

- meaning: the cosine similarity of their embeddings (the collection's own
  embedding model), rescaled so that what the model gives unrelated text maps
  near 0 and a paraphrase near 1;
- wording: the share of the answer sentence's content words (stop words
  dropped, lower-cased, simple plural/suffix folding) found in the source
  sentence.

The score is the better of the two, and a sentence is supported when its best
cited source sentence reaches `threshold`. A sentence that cites nothing, or
only numbers that are not sources, is unsupported. This is a similarity
check, not an entailment model: it catches invented content and wrong
citations, not a negation that keeps the words ("X does not cause Y" against
"X causes Y"). keel says so rather than pretend otherwise.

The same signals decide extractive answers (the source sentences closest to
the question) and abstention: when even the best retrieved chunk is far from
the question, keel answers "not in the documents" instead of guessing.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from keel.rag.sentences import sentence_spans
from keel.rag.words import coverage

__all__ = ["AnswerSentence", "best_support", "rescale_cosine", "split_answer"]

_CITATION = re.compile(r"\[(\d{1,3}(?:\s*,\s*\d{1,3})*)\]")

#: Cosine similarities of the local models for unrelated and near-identical text (measured on SciFact
#: sentence pairs with bge-small-en-v1.5; see docs/rag.md): used to put similarity on a 0-1 scale.
COSINE_FLOOR = 0.45
COSINE_CEILING = 0.90


def rescale_cosine(value: float | np.ndarray) -> float | np.ndarray:
    scaled = (np.asarray(value) - COSINE_FLOOR) / (COSINE_CEILING - COSINE_FLOOR)
    clipped = np.clip(scaled, 0.0, 1.0)
    return float(clipped) if np.ndim(clipped) == 0 else clipped


@dataclass
class AnswerSentence:
    text: str  # without citation markers
    start: int  # offsets in the answer text (markers included)
    end: int
    citations: list[int]


def split_answer(answer: str) -> list[AnswerSentence]:
    """The answer's sentences with the source numbers each one cites.

    A marker standing alone after a sentence's full stop ("... end. [2]") belongs to that sentence.
    """
    sentences: list[AnswerSentence] = []
    for start, end in sentence_spans(answer):
        raw = answer[start:end]
        numbers = [int(n) for group in _CITATION.findall(raw) for n in re.split(r"\s*,\s*", group)]
        text = _CITATION.sub("", raw).strip()
        if not re.search(r"\w", text) and sentences:  # only markers: they cite the previous sentence
            sentences[-1].citations.extend(numbers)
            sentences[-1].end = end
            continue
        sentences.append(AnswerSentence(re.sub(r"\s+([.,;:!?])", r"\1", text), start, end, numbers))
    return sentences


def best_support(
    sentence: str, sentence_vector: np.ndarray, sources: Sequence[str], source_vectors: np.ndarray
) -> tuple[float, int]:
    """(support score, index of the best source sentence); (0, -1) with no sources."""
    if not sources:
        return 0.0, -1
    meaning = np.asarray(rescale_cosine(source_vectors @ sentence_vector))
    wording = np.array([coverage(sentence, s) for s in sources])
    scores = np.maximum(meaning, wording)
    best = int(np.argmax(scores))
    return float(scores[best]), best
