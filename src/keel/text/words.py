"""Words as keyword search and the grounding check see them.

Both drop English function words: matched by nearly every chunk, they add
only noise (and time) to BM25, and say nothing about whether a sentence is
supported by a source.
"""

from __future__ import annotations

import re

__all__ = ["STOP_WORDS", "content_words", "coverage", "keyword_terms"]

STOP_WORDS = frozenset(
    """a about above after again against all am an and any are as at be because been before being below between both
    but by can could did do does doing down during each few for from further had has have having he her here hers
    herself him himself his how i if in into is it its itself just me more most my myself no nor not now of off on
    once only or other our ours ourselves out over own same she should so some such than that the their theirs them
    themselves then there these they this those through to too under until up very was we were what when where which
    while who whom why will with would you your yours yourself yourselves""".split()  # noqa: SIM905 - a word list
)
_WORD = re.compile(r"\w+", re.UNICODE)
_CONTENT_WORD = re.compile(r"[^\W_]+(?:[.\-][^\W_]+)*", re.UNICODE)
MAX_QUERY_TERMS = 64


def keyword_terms(query: str) -> list[str]:
    """The distinct words of a query that keyword search uses, in order (at most 64)."""
    words = [w for w in _WORD.findall(query.lower()) if w not in STOP_WORDS]
    return list(dict.fromkeys(words))[:MAX_QUERY_TERMS]


def _fold(word: str) -> str:
    """A light suffix folding, so that 'cells'/'cell' and 'reduced'/'reduce' match."""
    for suffix in ("ing", "ed", "es", "s"):
        if len(word) > len(suffix) + 3 and word.endswith(suffix):
            return word[: -len(suffix)]
    return word


def content_words(text: str) -> set[str]:
    return {_fold(w) for w in (m.lower() for m in _CONTENT_WORD.findall(text)) if w not in STOP_WORDS and len(w) > 1}


def coverage(sentence: str, source: str) -> float:
    """Share of the sentence's content words present in the source (0 when it has none)."""
    words = content_words(sentence)
    if not words:
        return 0.0
    return len(words & content_words(source)) / len(words)
