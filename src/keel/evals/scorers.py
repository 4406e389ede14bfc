"""Scorers: one case's output in, scores in [0, 1] out (one or more metrics per scorer).

A scorer is a coroutine `(sample, ctx) -> {metric: score}`; it returns no
metric when it does not apply to the case (citation recall of a case with no
gold evidence). A scorer that raises, or gives a score outside [0, 1] or NaN,
is recorded as errored for that case (`ScorerError`, its metrics None): never
a pass, never a silent NaN. Metrics are reduced over cases afterwards
(`keel.evals.metrics`), never inside the loop.

Retrieval metrics come from `ir-measures` (trec_eval's definitions), not
hand-rolled; faithfulness reuses the grounding check RAG uses too (`keel.text.grounding`).
"""

from __future__ import annotations

import inspect
import json
import math
import re
import string
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import jsonschema

from keel.errors import InputError
from keel.evals.dataset import Case
from keel.evals.results import ScorerError
from keel.evals.suite import ScorerSpec, import_object

if TYPE_CHECKING:
    from keel.gateway.core import Gateway

__all__ = [
    "Sample",
    "ScoreContext",
    "Scorer",
    "build_scorers",
    "normalize_text",
    "score_case",
    "thresholds",
    "token_f1",
]


@dataclass(frozen=True)
class Sample:
    """What a scorer sees: the case, the task's output and the task's evidence (`CaseResult.details`)."""

    case: Case
    output: Any
    details: Mapping[str, Any] = field(default_factory=dict)

    @property
    def text(self) -> str:
        return output_text(self.output)


@dataclass
class ScoreContext:
    """What scorers that call models need: the gateway, and a cache (judge answers by input)."""

    gateway: Gateway | None = None
    cache_get: Callable[[str], Any] | None = None
    cache_put: Callable[[str, Any], None] | None = None
    cost_usd: float = 0.0  # what scoring this case cost (judge and embedding calls)

    def need_gateway(self, scorer: str) -> Gateway:
        if self.gateway is None:
            raise InputError(f"the {scorer} scorer calls a model: run it with a gateway")
        return self.gateway


def output_text(output: Any) -> str:
    if output is None:
        return ""
    if isinstance(output, str):
        return output
    return json.dumps(output, ensure_ascii=False, sort_keys=True)


# --- text -------------------------------------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_text(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCT)).split())


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD's token F1 over normalised tokens (1.0 when both are empty)."""
    pred, ref = normalize_text(prediction).split(), normalize_text(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def _expected(sample: Sample, scorer: str) -> str:
    if sample.case.expected is None:
        raise InputError(f"the {scorer} scorer needs an expected output, and case {sample.case.id!r} has none")
    return output_text(sample.case.expected)


def _number(text: str) -> float:
    found = re.search(r"[-+]?(?:\d[\d,]*\.?\d*|\.\d+)(?:[eE][-+]?\d+)?", text)
    if found is None:
        raise ValueError(f"no number in {text[:80]!r}")
    return float(found.group().replace(",", ""))


# --- one scorer per type ------------------------------------------------------------------------------------

ScoreFn = Callable[[Sample, ScoreContext], Awaitable[Mapping[str, float]]]


@dataclass
class Scorer:
    spec: ScorerSpec
    fn: ScoreFn
    metrics: list[str]  # the metrics it gives (a custom scorer may give others)

    @property
    def name(self) -> str:
        return self.spec.metric


def _one(spec: ScorerSpec, compute: Callable[[Sample], float]) -> Scorer:
    async def fn(sample: Sample, ctx: ScoreContext) -> Mapping[str, float]:
        return {spec.metric: compute(sample)}

    return Scorer(spec, fn, [spec.metric])


def _exact(spec: ScorerSpec) -> Scorer:
    return _one(spec, lambda s: float(s.text.strip() == _expected(s, "exact").strip()))


def _normalized(spec: ScorerSpec) -> Scorer:
    return _one(spec, lambda s: float(normalize_text(s.text) == normalize_text(_expected(s, "normalized_match"))))


def _f1(spec: ScorerSpec) -> Scorer:
    return _one(spec, lambda s: token_f1(s.text, _expected(s, "token_f1")))


def _contains(spec: ScorerSpec) -> Scorer:
    def compute(s: Sample) -> float:
        needle = spec.value if spec.value is not None else _expected(s, "contains")
        text = s.text
        if spec.ignore_case:
            needle, text = needle.lower(), text.lower()
        return float(needle in text)

    return _one(spec, compute)


def _regex(spec: ScorerSpec) -> Scorer:
    try:
        pattern = re.compile(spec.pattern or "", re.IGNORECASE if spec.ignore_case else 0)
    except re.error as exc:
        raise InputError(f"scorer {spec.metric!r}: invalid regex {spec.pattern!r}: {exc}") from None
    return _one(spec, lambda s: float(pattern.search(s.text) is not None))


def _json_schema(spec: ScorerSpec) -> Scorer:
    try:
        validator = jsonschema.Draft202012Validator(spec.schema_ or {})
        validator.check_schema(spec.schema_ or {})
    except jsonschema.SchemaError as exc:
        raise InputError(f"scorer {spec.metric!r}: invalid JSON schema: {exc.message}") from None

    def compute(s: Sample) -> float:
        value = s.output
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                return 0.0
        return float(validator.is_valid(value))

    return _one(spec, compute)


def _numeric(spec: ScorerSpec) -> Scorer:
    def compute(s: Sample) -> float:
        expected = _number(_expected(s, "numeric"))
        try:
            got = _number(s.text)
        except ValueError:
            return 0.0  # an answer without a number is wrong, not a scorer failure
        return float(abs(got - expected) <= max(spec.tolerance, spec.relative * abs(expected)))

    return _one(spec, compute)


def _embedding(spec: ScorerSpec) -> Scorer:
    async def fn(sample: Sample, ctx: ScoreContext) -> Mapping[str, float]:
        gateway = ctx.need_gateway("embedding_similarity")
        result = await gateway.embed([sample.text or " ", _expected(sample, "embedding_similarity")], spec.model)
        ctx.cost_usd += result.cost_usd or 0.0
        a, b = result.vectors
        norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
        cosine = sum(x * y for x, y in zip(a, b, strict=True)) / norm if norm else 0.0
        return {spec.metric: min(1.0, max(0.0, cosine))}

    return Scorer(spec, fn, [spec.metric])


def _prefixed(spec: ScorerSpec, metric: str) -> str:
    return f"{spec.name}.{metric}" if spec.name else metric


def _retrieval(spec: ScorerSpec) -> Scorer:
    import ir_measures

    measures = {
        _prefixed(spec, f"recall@{spec.k}"): ir_measures.parse_measure(f"R@{spec.k}"),
        _prefixed(spec, "mrr"): ir_measures.parse_measure("RR"),
        _prefixed(spec, f"ndcg@{spec.k}"): ir_measures.parse_measure(f"nDCG@{spec.k}"),
    }

    async def fn(sample: Sample, ctx: ScoreContext) -> Mapping[str, float]:
        if not sample.case.gold_docs:
            return {}  # no gold documents (an unanswerable question): retrieval is not scored
        retrieved = sample.details.get("retrieved")
        if retrieved is None:
            raise InputError("the retrieval scorer needs the retrieved documents: use a rag task (or return them)")
        ranked: dict[str, float] = {}
        for hit in sorted(retrieved, key=lambda h: h["rank"]):
            # one score per document, its best chunk's; by rank so ties cannot reorder it
            ranked.setdefault(str(hit["doc_id"]), float(len(retrieved) - int(hit["rank"]) + 1))
        qrels = {"q": {doc: 1 for doc in sample.case.gold_docs}}
        values = {m: 0.0 for m in measures}
        if ranked:
            by_measure = {str(v): k for k, v in measures.items()}
            for metric in ir_measures.iter_calc(list(measures.values()), qrels, {"q": ranked}):
                values[by_measure[str(metric.measure)]] = float(metric.value)
        return values

    return Scorer(spec, fn, list(measures))


def _span_match(quote: str, gold: str) -> bool:
    """A cited span contains a gold span (or is contained in it, or shares most of its words)."""
    a, b = normalize_text(quote), normalize_text(gold)
    if not a or not b:
        return False
    return b in a or a in b or token_f1(a, b) >= 0.6


def _citation(spec: ScorerSpec) -> Scorer:
    precision_name, recall_name = _prefixed(spec, "citation_precision"), _prefixed(spec, "citation_recall")

    async def fn(sample: Sample, ctx: ScoreContext) -> Mapping[str, float]:
        gold_docs, gold_spans = set(sample.case.gold_docs), list(sample.case.gold_spans)
        if not gold_docs and not gold_spans:
            return {}
        citations = sample.details.get("citations")
        if citations is None:
            raise InputError("the citation scorer needs the answer's citations: use a rag task (or return them)")

        def correct(c: Mapping[str, Any]) -> bool:
            doc_ok = not gold_docs or str(c.get("doc_id")) in gold_docs
            span_ok = not gold_spans or any(_span_match(str(c.get("quote") or ""), g) for g in gold_spans)
            return doc_ok and span_ok

        precision = sum(correct(c) for c in citations) / len(citations) if citations else 0.0
        if gold_spans:
            quotes = [str(c.get("quote") or "") for c in citations]
            recall = sum(any(_span_match(q, g) for q in quotes) for g in gold_spans) / len(gold_spans)
        else:
            cited = {str(c.get("doc_id")) for c in citations}
            recall = len(cited & gold_docs) / len(gold_docs)
        return {precision_name: precision, recall_name: recall}

    return Scorer(spec, fn, [precision_name, recall_name])


def _faithfulness(spec: ScorerSpec) -> Scorer:
    async def fn(sample: Sample, ctx: ScoreContext) -> Mapping[str, float]:
        sentences = sample.details.get("sentences")
        if sentences is not None:  # a RAG answer: the engine checked each sentence against what it cites
            if not sentences:
                return {}  # an abstention states nothing
            return {spec.metric: sum(bool(s["supported"]) for s in sentences) / len(sentences)}
        context = sample.details.get("context", sample.case.fields.get("context"))
        if context is None:
            raise InputError("faithfulness needs the retrieved text: a rag task, or a `context` column")
        texts = [context] if isinstance(context, str) else [str(c) for c in context]
        value = await grounded_share(sample.text, texts, ctx, spec.model)
        return {} if value is None else {spec.metric: value}

    return Scorer(spec, fn, [spec.metric])


async def grounded_share(answer: str, contexts: Sequence[str], ctx: ScoreContext, model: str | None) -> float | None:
    """The share of the answer's sentences supported by any sentence of the contexts (RAG's grounding check,
    citations ignored); None for an empty answer."""
    import numpy as np

    from keel.text.grounding import split_cited, support
    from keel.text.sentences import sentence_spans

    sentences = [s for s in split_cited(answer) if s.text.strip()]
    if not sentences:
        return None
    sources = [text[a:b] for text in contexts for a, b in sentence_spans(text)]
    if not sources:
        return 0.0
    gateway = ctx.need_gateway("faithfulness")
    result = await gateway.embed([s.text for s in sentences] + sources, model)
    ctx.cost_usd += result.cost_usd or 0.0
    vectors = np.asarray(result.vectors, dtype=np.float32)
    vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    sentence_vectors, source_vectors = vectors[: len(sentences)], vectors[len(sentences) :]
    whole = " ".join(contexts)
    threshold = gateway.config.rag.grounding_threshold
    supported = sum(
        support(s.text, sentence_vectors[i], sources, source_vectors, cited_text=whole, threshold=threshold).supported
        for i, s in enumerate(sentences)
    )
    return supported / len(sentences)


#: What a non-RAG task's output says when it declines (RAG's own answers say whether they abstained).
DEFAULT_REFUSAL = "not in the documents"


def _abstention(spec: ScorerSpec) -> Scorer:
    """1 when the task abstained exactly when the case is unanswerable (`answerable: false`), else 0."""
    refusal = normalize_text(spec.value or DEFAULT_REFUSAL)

    async def fn(sample: Sample, ctx: ScoreContext) -> Mapping[str, float]:
        kind = sample.details.get("answer_kind")
        abstained = kind == "abstained" if kind is not None else refusal in normalize_text(sample.text)
        unanswerable = sample.case.answerable is False
        return {spec.metric: float(abstained == unanswerable)}

    return Scorer(spec, fn, [spec.metric])


def _custom(spec: ScorerSpec) -> Scorer:
    function = import_object(spec.function or "", "scorer function")
    if not callable(function):
        raise InputError(f"scorer {spec.metric!r}: {spec.function!r} is not a function")
    params = len(inspect.signature(function).parameters)

    async def fn(sample: Sample, ctx: ScoreContext) -> Mapping[str, float]:
        args = (sample.output, sample.case.expected, sample)[: max(1, min(params, 3))]
        value = function(*args)
        if inspect.isawaitable(value):
            value = await value
        if isinstance(value, Mapping):
            return {_prefixed(spec, str(k)) if len(value) > 1 else spec.metric: v for k, v in value.items()}
        return {spec.metric: value}

    return Scorer(spec, fn, [spec.metric])


def _judge(spec: ScorerSpec) -> Scorer:
    from keel.evals.judge import judge_scorer

    return judge_scorer(spec)


BUILDERS: dict[str, Callable[[ScorerSpec], Scorer]] = {
    "exact": _exact, "normalized_match": _normalized, "token_f1": _f1, "contains": _contains, "regex": _regex,
    "json_schema": _json_schema, "numeric": _numeric, "embedding_similarity": _embedding, "retrieval": _retrieval,
    "citation": _citation, "faithfulness": _faithfulness, "abstention": _abstention, "judge": _judge,
    "custom": _custom,
}  # fmt: skip


def build_scorers(specs: Sequence[ScorerSpec]) -> list[Scorer]:
    return [BUILDERS[spec.type](spec) for spec in specs]


def thresholds(scorers: Sequence[Scorer]) -> dict[str, float]:
    """metric -> pass threshold: a scorer's one threshold applies to each of its metrics (not a judge's spread)."""
    out: dict[str, float] = {}
    for scorer in scorers:
        t = scorer.spec.threshold
        if isinstance(t, Mapping):
            out.update({str(k): float(v) for k, v in t.items()})
        elif t is not None:
            out.update({m: float(t) for m in scorer.metrics if not m.endswith(".spread")})
    return out


def _checked(scorer: str, values: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for metric, value in values.items():
        if isinstance(value, bool):
            value = float(value)
        if not isinstance(value, (int, float)) or math.isnan(value) or not 0.0 <= value <= 1.0:
            raise ValueError(f"metric {metric!r} is {value!r}: a score must be a number in [0, 1]")
        out[metric] = float(value)
    return out


async def score_case(
    scorers: Sequence[Scorer], sample: Sample, ctx: ScoreContext, limits: Mapping[str, float]
) -> tuple[dict[str, float | None], list[ScorerError], bool]:
    """Every scorer on one sample: (scores, errors, passed). An errored metric with a threshold fails the case."""
    scores: dict[str, float | None] = {}
    errors: list[ScorerError] = []
    for scorer in scorers:
        try:
            scores.update(_checked(scorer.name, await scorer.fn(sample, ctx)))
        except Exception as exc:
            errors.append(ScorerError(scorer.name, f"{type(exc).__name__}: {exc}"[:1000]))
            scores.update(dict.fromkeys(scorer.metrics))
    passed = all(scores[m] is not None and scores[m] >= t for m, t in limits.items() if m in scores)  # type: ignore[operator]
    return scores, errors, passed
