"""The RAG debugger: for each failing case of a RAG evaluation run, did retrieval or generation fail?

It reads only what the run stored (`CaseResult.details` of the RAG task: the ranked retrieval with
`in_context`, what the reranker cut, the gold, the answer's kind, its checked sentences, the settings
that decided them) and the run's own pass thresholds: nothing is re-run and no number is tuned to a
data set.

**Failing.** A case fails when its task errored, when it did not pass (some metric with a threshold
missed it, or its scorer errored), or when its abstention is wrong whatever the scorers say: it
abstained although the case is answerable, or answered although the case is unanswerable
(`answerable: false` in the dataset). A case without the flag is answerable.

**Gold evidence.** A case's gold is its gold documents; a gold document is *retrieved* when one of
its chunks is in the recorded retrieval (the task's `top_k`), *cut by rerank* when the reranker
scored it but placed it below `top_k`, and *in context* when one of its chunks was given to the
generator (the context packed within the `context_tokens` budget). *Gold in context* is measured on
the gold spans when the case has some (a span is in the context when its text is, or when it matches a
context sentence as the citation scorer matches quotes): a gold document's first chunk can be in the
context while its evidence sentence, in a later chunk, is not. Without spans it is the gold documents
with a chunk in the context. *Enough* gold is in the context when its share reaches the run's threshold
on `citation_recall` (when it has one; else any gold): less, and even a perfect answer could not pass.
A case with gold spans but no gold document ids cannot tell a retrieval miss from a ranking loss: with
no gold span in the context, it is called a retrieval miss.

**Rules**, in order, first match wins; upstream causes come first, because fixing them changes what
happens downstream:

1. `task error`: the task raised (no answer to look at).
2. `missing abstention`: the case is unanswerable and the answer is not an abstention.
3. `other`: the case is unanswerable and abstained (right), yet a metric failed: no RAG stage is at
   fault; the failed metrics are listed.
4. `retrieval miss`: the case has gold, and no gold document is retrieved (nor cut by rerank).
5. `wrong abstention`: the answer abstained, and gold was in the context, or the engine abstained
   before building a context (the closest chunk's support below `min_support`) although gold was
   retrieved.
6. `ranking loss`: gold was retrieved (or cut by rerank) but not enough of it reached the context:
   the reranker cut it or the context budget left it out.
7. `unfaithful generation`: some answer sentence is not supported by the context it cites (the
   engine's check at `grounding_threshold`), and the share of supported sentences is below the run's
   threshold on the faithfulness metric (any unsupported sentence when the run has no such threshold).
8. `wrong despite gold context`: enough gold was in the context and the answer is supported by it,
   but the case still failed (its citations, match or judge metrics missed their thresholds).
9. `other`: none of the above (a failing case with no gold to locate and a supported answer).

Each diagnosis carries its evidence: gold ranks and scores, whether each gold chunk was in the context,
what rerank cut, the answer's kind and reason, the support against `min_support`, the unsupported
sentences with their support and reason, and the failed metrics with their thresholds.

The class is stored in `keel_rag_debug` (keyed by run, case and repeat; a new diagnosis replaces the
old) and written into the case's trace as a `rag.debug` span (attribute `keel.rag.debug.class`), which
the dashboard's trace view shows as "RAG debug: <class>".
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from keel.evals.results import CaseResult, RunResult
from keel.evals.scorers import _span_match, normalize_text
from keel.store.base import Store
from keel.store.migrations import Migration
from keel.trace import Span

__all__ = [
    "CLASSES",
    "CaseDiagnosis",
    "RunDiagnosis",
    "diagnose_case",
    "diagnose_run",
    "load_diagnoses",
    "record_diagnoses",
]

TASK_ERROR = "task error"
MISSING_ABSTENTION = "missing abstention"
RETRIEVAL_MISS = "retrieval miss"
WRONG_ABSTENTION = "wrong abstention"
RANKING_LOSS = "ranking loss"
UNFAITHFUL = "unfaithful generation"
WRONG_WITH_GOLD = "wrong despite gold context"
OTHER = "other"

#: Every class, in rule order (the table's order).
CLASSES = (TASK_ERROR, MISSING_ABSTENTION, RETRIEVAL_MISS, WRONG_ABSTENTION, RANKING_LOSS, UNFAITHFUL,
           WRONG_WITH_GOLD, OTHER)  # fmt: skip

#: The span attribute the dashboard's trace view shows.
CLASS_ATTRIBUTE = "keel.rag.debug.class"

RAG_DEBUG_MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        "rag_debug_0001",
        (
            """
            CREATE TABLE IF NOT EXISTS keel_rag_debug (
                run_id TEXT NOT NULL,
                case_id TEXT NOT NULL,
                repeat INTEGER NOT NULL,
                label TEXT NOT NULL,
                rule TEXT NOT NULL,
                evidence {json} NOT NULL,
                trace_id TEXT,
                created_at {real} NOT NULL,
                PRIMARY KEY (run_id, case_id, repeat)
            )
            """,
        ),
    ),
)


@dataclass(frozen=True)
class CaseDiagnosis:
    """Why one failing case failed: its class, the rule that decided it, and the evidence."""

    case_id: str
    repeat: int
    label: str
    rule: str  # the rule in words, with this case's numbers
    evidence: Mapping[str, Any] = field(default_factory=dict)
    trace_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"evidence": dict(self.evidence)}


@dataclass(frozen=True)
class RunDiagnosis:
    run_id: str
    cases: int  # case repeats in the run
    failing: int
    diagnoses: Sequence[CaseDiagnosis] = ()

    @property
    def counts(self) -> dict[str, int]:
        found = Counter(d.label for d in self.diagnoses)
        return {label: found[label] for label in CLASSES if found[label]}

    def to_json(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "cases": self.cases, "failing": self.failing, "counts": self.counts,
                "diagnoses": [d.to_json() for d in self.diagnoses]}  # fmt: skip


# --- the rules ----------------------------------------------------------------------------------------


def _answerable(details: Mapping[str, Any]) -> bool:
    return details.get("answerable") is not False


def _abstained(details: Mapping[str, Any]) -> bool:
    return details.get("answer_kind") == "abstained"


def _failed_metrics(case: CaseResult, thresholds: Mapping[str, float]) -> dict[str, Any]:
    """metric -> {value, threshold} for every thresholded metric the case missed (None: its scorer errored)."""
    out = {}
    for metric, limit in thresholds.items():
        if metric not in case.scores:
            continue
        value = case.scores[metric]
        if value is None or value < limit:
            out[metric] = {"value": value, "threshold": limit}
    return out


def is_failing(case: CaseResult) -> bool:
    """The module docstring's definition: task error, not passed, or a wrong abstention."""
    if case.error is not None or case.passed is not True:
        return True
    details = case.details
    if "answer_kind" not in details:
        return False
    return _abstained(details) == _answerable(details)


def _gold_evidence(details: Mapping[str, Any]) -> dict[str, Any]:
    """Where the gold documents (or spans) are: their ranks, scores, whether in context, and rerank's cuts."""
    gold = {str(d) for d in details.get("gold_docs") or ()}
    retrieved = list(details.get("retrieved") or ())
    hits = [h for h in retrieved if str(h.get("doc_id")) in gold]
    cut = [h for h in details.get("cut_by_rerank") or () if str(h.get("doc_id")) in gold]
    spans = [str(s) for s in details.get("gold_spans") or ()]
    context = normalize_text(" ".join(str(c) for c in details.get("context") or ()))
    parts = [t for c in details.get("context") or () for t in re.split(r"(?<=[.!?])\s+", str(c))]
    sentences = [t for t in parts if len(t.split()) >= 4]  # a short fragment "matches" inside any span
    spans_in_context = [
        s for s in spans
        if (normalize_text(s) and normalize_text(s) in context) or any(_span_match(t, s) for t in sentences)
    ]  # fmt: skip
    in_context_docs = {str(h.get("doc_id")) for h in hits if h.get("in_context")}
    return {
        "gold_docs": sorted(gold),
        "gold_hits": [
            {
                "doc_id": h.get("doc_id"),
                "rank": h.get("rank"),
                "score": h.get("score"),
                "in_context": bool(h.get("in_context")),
            }
            for h in hits
        ],
        "cut_by_rerank": [{"doc_id": h.get("doc_id"), "rank": h.get("rank"), "rerank": h.get("rerank")} for h in cut],
        "gold_spans": len(spans),
        "gold_spans_in_context": len(spans_in_context),
        # the share of the gold evidence the generator was given: of the gold spans when there are some
        # (a gold document's chunk can be in the context without its evidence sentence), else of the documents
        "gold_in_context_share": (len(spans_in_context) / len(spans))
        if spans
        else (len(in_context_docs) / len(gold) if gold else 0.0),
        "retrieved": len(retrieved),
        "in_context": sum(bool(h.get("in_context")) for h in retrieved),
    }


def _sentences(details: Mapping[str, Any]) -> tuple[list[dict[str, Any]], float | None]:
    """The unsupported sentences, and the share of supported ones (None: the answer has no sentences)."""
    sentences = list(details.get("sentences") or ())
    if not sentences:
        return [], None
    unsupported = [{"text": s.get("text"), "support": s.get("support"), "reason": s.get("reason")}
                   for s in sentences if not s.get("supported")]  # fmt: skip
    return unsupported, 1 - len(unsupported) / len(sentences)


def _evidence(case: CaseResult, thresholds: Mapping[str, float]) -> dict[str, Any]:
    details = case.details
    unsupported, supported_share = _sentences(details)
    settings = dict(details.get("settings") or {})
    return {
        **_gold_evidence(details),
        "answerable": _answerable(details),
        "answer_kind": details.get("answer_kind"),
        "reason": details.get("reason"),
        "support": details.get("support"),
        "min_support": settings.get("min_support"),
        "unsupported_sentences": unsupported,
        "supported_share": supported_share,
        "generated_text": details.get("generated_text"),
        "failed_metrics": _failed_metrics(case, thresholds),
        "settings": settings,
    }


def _faithfulness_limit(thresholds: Mapping[str, float], metric: str) -> float | None:
    """The run's threshold on the faithfulness metric (by name, or a renamed one ending in it)."""
    if metric in thresholds:
        return thresholds[metric]
    return next((v for k, v in thresholds.items() if k.endswith(f".{metric}") or k.endswith(metric)), None)


def _enough_gold(thresholds: Mapping[str, float], metric: str) -> float | None:
    """The run's threshold on citation recall: a context holding less of the gold evidence than that
    could not pass even with a perfect answer."""
    return _faithfulness_limit(thresholds, metric)


def _classify(
    case: CaseResult, ev: Mapping[str, Any], limit: float | None, needed: float | None = None
) -> tuple[str, str]:
    """(class, the rule with this case's numbers): the module docstring's rules, in order."""
    details = case.details
    if case.error is not None:
        return TASK_ERROR, f"the task failed: {case.error[:200]}"
    abstained = _abstained(details)
    if not ev["answerable"]:
        if not abstained:
            return MISSING_ABSTENTION, "unanswerable (its gold is not in the collection) but it answered"
        return OTHER, f"abstained rightly on an unanswerable case; failed metrics: {sorted(ev['failed_metrics'])}"
    has_docs, has_spans = bool(ev["gold_docs"]), ev["gold_spans"] > 0
    retrieved = bool(ev["gold_hits"]) or bool(ev["cut_by_rerank"])
    share = ev["gold_in_context_share"]
    in_context = share > 0
    enough = share >= needed if needed else in_context
    if has_docs and not retrieved:
        return RETRIEVAL_MISS, f"none of the {len(ev['gold_docs'])} gold documents in the top {ev['retrieved']}"
    if not has_docs and has_spans and not in_context:
        return RETRIEVAL_MISS, f"none of the {ev['gold_spans']} gold spans in the context (no gold document ids)"
    no_context = ev["in_context"] == 0
    if abstained and (in_context or (no_context and retrieved)):
        where = "gold was in the context" if in_context else f"gold was retrieved ({_ranks(ev)}), but {ev['reason']}"
        return WRONG_ABSTENTION, f"abstained although {where}"
    if retrieved and not enough:
        cut = "cut by rerank" if not ev["gold_hits"] else "left out of the context budget"
        given = f"{share:.0%} of the gold evidence in context" + (f" (< the citation_recall threshold {needed:g})"
                                                                   if needed and in_context else "")  # fmt: skip
        return RANKING_LOSS, f"gold retrieved ({_ranks(ev)}) but {cut}: {given}, {ev['in_context']} chunks in context"
    supported = ev["supported_share"]
    if ev["unsupported_sentences"] and supported is not None and (limit is None or supported < limit):
        below = "" if limit is None else f" < the run's threshold {limit:g}"
        n = len(ev["unsupported_sentences"])
        return (
            UNFAITHFUL,
            f"{n} answer sentence(s) not supported by the context (supported share {supported:.2f}{below})",
        )
    if in_context:
        return WRONG_WITH_GOLD, f"gold in context, answer supported, but failed: {sorted(ev['failed_metrics'])}"
    return OTHER, f"no gold evidence to locate; failed metrics: {sorted(ev['failed_metrics'])}"


def _ranks(ev: Mapping[str, Any]) -> str:
    ranks = [f"{h['doc_id']}@{h['rank']}" for h in ev["gold_hits"]] + [f"{h['doc_id']}@{h['rank']} (cut)"
                                                                        for h in ev["cut_by_rerank"]]  # fmt: skip
    return ", ".join(ranks[:5]) + (" ..." if len(ranks) > 5 else "")


def diagnose_case(
    case: CaseResult, thresholds: Mapping[str, float], *, faithfulness_metric: str = "faithfulness"
) -> CaseDiagnosis | None:
    """The class of one case, or None when it does not fail."""
    if not is_failing(case):
        return None
    evidence = _evidence(case, thresholds)
    label, rule = _classify(case, evidence, _faithfulness_limit(thresholds, faithfulness_metric),
                            _enough_gold(thresholds, "citation_recall"))  # fmt: skip
    return CaseDiagnosis(case.case_id, case.repeat, label, rule, evidence, case.trace_id)


def diagnose_run(run: RunResult, *, faithfulness_metric: str = "faithfulness") -> RunDiagnosis:
    """Every failing case of a run, classified."""
    found = [diagnose_case(c, run.thresholds, faithfulness_metric=faithfulness_metric) for c in run.cases]
    diagnoses = [d for d in found if d is not None]
    return RunDiagnosis(run.run_id, len(run.cases), len(diagnoses), diagnoses)


# --- storing it, and the trace ------------------------------------------------------------------------

def _migrate(store: Store) -> None:
    store.migrate(RAG_DEBUG_MIGRATIONS, namespace="rag_debug")  # a no-op after the first time on this store


def _span_id(run_id: str, diagnosis: CaseDiagnosis) -> str:
    """One id per (run, case, repeat, class): recording the same diagnosis twice writes one span."""
    key = f"{run_id}/{diagnosis.case_id}/{diagnosis.repeat}/{diagnosis.label}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _debug_span(store: Store, run_id: str, diagnosis: CaseDiagnosis) -> Span | None:
    """A `rag.debug` span under the case's root span, unless its trace is unknown or already has it."""
    if not diagnosis.trace_id:
        return None
    spans = store.get_trace(diagnosis.trace_id)
    span_id = _span_id(run_id, diagnosis)
    if not spans or any(s.span_id == span_id for s in spans):
        return None
    root = next((s for s in spans if s.parent_id is None), spans[0])
    # an instant at the end of the case, not at debug time: the trace's duration stays the case's own
    end = max(s.end_time for s in spans)
    span = Span(diagnosis.trace_id, span_id, root.span_id, "rag.debug", end, end)
    span.set(gen_ai__operation__name="rag.debug", keel__eval__run=run_id, keel__eval__case=diagnosis.case_id)
    span.attributes["keel.rag.debug.at"] = time.time()  # which diagnosis is newest (the dashboard shows it)
    span.attributes[CLASS_ATTRIBUTE] = diagnosis.label
    span.attributes["keel.rag.debug.rule"] = diagnosis.rule
    span.output = {"class": diagnosis.label, "rule": diagnosis.rule, "evidence": dict(diagnosis.evidence)}
    return span


def record_diagnoses(store: Store, diagnosis: RunDiagnosis) -> int:
    """Store the run's classes (replacing older ones: a case a rescore made pass loses its class) and put
    each on its case's trace; returns how many spans were written."""
    _migrate(store)
    sql = (
        "INSERT INTO keel_rag_debug (run_id, case_id, repeat, label, rule, evidence, trace_id, created_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
    )
    now = time.time()
    with store.transaction() as cur:
        cur.execute("DELETE FROM keel_rag_debug WHERE run_id = ?", [diagnosis.run_id])
        for d in diagnosis.diagnoses:
            evidence = store.json_param(json.dumps(dict(d.evidence), default=str, ensure_ascii=False))
            cur.execute(sql, [diagnosis.run_id, d.case_id, d.repeat, d.label, d.rule, evidence,
                                          d.trace_id, now])  # fmt: skip
    spans = [s for d in diagnosis.diagnoses if (s := _debug_span(store, diagnosis.run_id, d)) is not None]
    store.write_spans(spans)
    return len(spans)


def load_diagnoses(store: Store, run_id: str) -> dict[tuple[str, int], str]:
    """(case id, repeat) -> the recorded class of a run's failing cases."""
    _migrate(store)
    with store.transaction() as cur:
        cur.execute("SELECT case_id, repeat, label FROM keel_rag_debug WHERE run_id = ?", [run_id])
        return {(str(r[0]), int(r[1])): str(r[2]) for r in cur.fetchall()}
