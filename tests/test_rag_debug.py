"""The RAG debugger: each class on constructed runs, the stored class on the case's trace, `keel rag debug`,
and a small end-to-end RAG evaluation (a tiny ingested collection, scripted answers) debugged."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from helpers import gateway
from keel import FunctionModel, Gateway
from keel.cli.app import app
from keel.errors import InputError
from keel.evals import Suite, run_suite, storage
from keel.evals.dataset import Case, DatasetError, cases_from_rows
from keel.evals.rag_debug import (
    CLASS_ATTRIBUTE,
    MISSING_ABSTENTION,
    OTHER,
    RANKING_LOSS,
    RETRIEVAL_MISS,
    TASK_ERROR,
    UNFAITHFUL,
    WRONG_ABSTENTION,
    WRONG_WITH_GOLD,
    diagnose_case,
    diagnose_run,
    load_diagnoses,
    record_diagnoses,
)
from keel.evals.results import CaseResult, RunResult
from keel.evals.scorers import Sample, ScoreContext, build_scorers
from keel.evals.suite import ScorerSpec
from keel.rag import RAG, Document
from keel.rag.answer import NOT_IN_DOCUMENTS
from keel.store import open_store
from keel.trace import Span, new_trace_id

THRESHOLDS = {"recall@10": 0.5, "citation_precision": 0.5, "faithfulness": 0.5, "abstention": 1.0}


def hit(doc: str, rank: int, in_context: bool, score: float = 0.03) -> dict[str, Any]:
    return {"doc_id": doc, "chunk_id": rank, "rank": rank, "score": score, "in_context": in_context}


def details(
    retrieved: list[dict[str, Any]], *, gold: tuple[str, ...] = ("g",), kind: str = "generated",
    sentences: tuple[bool, ...] = (True,), answerable: bool | None = True, cut: list[dict[str, Any]] | None = None,
    reason: str | None = None, spans: tuple[str, ...] = (), context: tuple[str, ...] = ("some text",),
) -> dict[str, Any]:  # fmt: skip
    return {
        "retrieved": retrieved, "cut_by_rerank": cut or [], "context": list(context), "gold_docs": list(gold),
        "gold_spans": list(spans), "answerable": answerable, "answer_kind": kind, "support": 0.8, "reason": reason,
        "citations": [], "generated_text": None,
        "sentences": [{"text": f"sentence {i}", "supported": ok, "support": 0.9 if ok else 0.2, "citations": [1],
                       "reason": None if ok else "its cited sources do not say this"}
                      for i, ok in enumerate(sentences)],
        "settings": {"top_k": 10, "context_tokens": 800, "min_support": 0.55, "grounding_threshold": 0.6},
    }  # fmt: skip


def case(d: dict[str, Any], scores: dict[str, float | None], *, error: str | None = None, cid: str = "c") -> CaseResult:
    passed = None if error else all((scores.get(m) or 0) >= t for m, t in THRESHOLDS.items() if m in scores)
    return CaseResult(cid, scores=scores, passed=passed, error=error, details=d, trace_id=None)


GOOD = {"recall@10": 1.0, "citation_precision": 1.0, "faithfulness": 1.0, "abstention": 1.0}


def label(c: CaseResult) -> str | None:
    found = diagnose_case(c, THRESHOLDS)
    return None if found is None else found.label


# --- each class on constructed cases ----------------------------------------------------------------------


def test_a_passing_case_is_not_classified() -> None:
    assert label(case(details([hit("g", 1, True)]), GOOD)) is None


def test_retrieval_miss_when_no_gold_document_is_in_the_top_k() -> None:
    c = case(details([hit("x", 1, True), hit("y", 2, False)]), GOOD | {"recall@10": 0.0, "citation_precision": 0.0})
    diagnosis = diagnose_case(c, THRESHOLDS)
    assert diagnosis is not None and diagnosis.label == RETRIEVAL_MISS
    assert diagnosis.evidence["gold_hits"] == [] and diagnosis.evidence["failed_metrics"]["recall@10"] == {
        "value": 0.0, "threshold": 0.5}  # fmt: skip
    # an abstention on a retrieval miss is still a retrieval miss: retrieval failed first
    abstained = details([hit("x", 1, True)], kind="abstained", sentences=())
    assert label(case(abstained, {"recall@10": 0.0, "abstention": 0.0})) == RETRIEVAL_MISS


def test_ranking_loss_when_gold_is_retrieved_but_not_in_the_context() -> None:
    c = case(details([hit("x", 1, True), hit("g", 7, False)]), GOOD | {"citation_precision": 0.0})
    diagnosis = diagnose_case(c, THRESHOLDS)
    assert diagnosis is not None and diagnosis.label == RANKING_LOSS
    assert diagnosis.evidence["gold_hits"] == [{"doc_id": "g", "rank": 7, "score": 0.03, "in_context": False}]
    assert "left out of the context budget" in diagnosis.rule
    # cut by the reranker (below top_k): not retrieved, but a ranking loss, not a retrieval miss
    cut = details([hit("x", 1, True)], cut=[{"doc_id": "g", "chunk_id": 9, "rank": 12, "rerank": 0.1}])
    reranked = diagnose_case(case(cut, GOOD | {"recall@10": 0.0}), THRESHOLDS)
    assert reranked is not None and reranked.label == RANKING_LOSS and "cut by rerank" in reranked.rule


def test_unfaithful_generation_uses_the_runs_faithfulness_threshold() -> None:
    d = details([hit("g", 1, True)], sentences=(True, False, False))
    diagnosis = diagnose_case(case(d, GOOD | {"faithfulness": 1 / 3}), THRESHOLDS)
    assert diagnosis is not None and diagnosis.label == UNFAITHFUL
    assert [s["text"] for s in diagnosis.evidence["unsupported_sentences"]] == ["sentence 1", "sentence 2"]
    # one unsupported sentence of three is above a 0.5 threshold: not the cause; the failed citation is
    mostly = details([hit("g", 1, True)], sentences=(True, True, False))
    assert label(case(mostly, GOOD | {"faithfulness": 2 / 3, "citation_precision": 0.0})) == WRONG_WITH_GOLD
    # a run with no faithfulness threshold: any unsupported sentence is unfaithful
    found = diagnose_case(case(mostly, GOOD | {"citation_precision": 0.0}), {"citation_precision": 0.5})
    assert found is not None and found.label == UNFAITHFUL


def test_wrong_despite_gold_context() -> None:
    d = details([hit("g", 1, True)])
    diagnosis = diagnose_case(case(d, GOOD | {"citation_precision": 0.0}), THRESHOLDS)
    assert diagnosis is not None and diagnosis.label == WRONG_WITH_GOLD
    assert list(diagnosis.evidence["failed_metrics"]) == ["citation_precision"]


def test_wrong_abstention_with_gold_in_context_or_refused_before_the_context() -> None:
    d = details([hit("g", 1, True)], kind="abstained", sentences=())
    # no scorer caught it (passed), yet abstaining on an answerable case fails
    assert label(case(d, {"recall@10": 1.0})) == WRONG_ABSTENTION
    gated = details([hit("g", 1, False)], kind="abstained", sentences=(), context=(),
                    reason="the closest passage is too far from the question (support 0.40 < 0.55)")  # fmt: skip
    diagnosis = diagnose_case(case(gated, {"recall@10": 1.0, "abstention": 0.0}), THRESHOLDS)
    assert diagnosis is not None and diagnosis.label == WRONG_ABSTENTION and "too far" in diagnosis.rule
    # the model abstained with gold retrieved but left out of the context: a ranking loss
    cut = details([hit("x", 1, True), hit("g", 5, False)], kind="abstained", sentences=())
    assert label(case(cut, {"recall@10": 1.0, "abstention": 0.0})) == RANKING_LOSS


def test_missing_abstention_and_a_right_one() -> None:
    d = details([hit("x", 1, True)], gold=(), answerable=False)
    # an unanswerable case that answered fails even when no scorer says so
    assert label(case(d, {"faithfulness": 1.0})) == MISSING_ABSTENTION
    right = details([hit("x", 1, False)], gold=(), answerable=False, kind="abstained", sentences=())
    assert label(case(right, {"abstention": 1.0})) is None
    judged = CaseResult("c", scores={"abstention": 1.0, "judge": 0.0}, passed=False, details=right)
    failed_other = diagnose_case(judged, {"judge": 0.5})
    assert failed_other is not None and failed_other.label == OTHER and "judge" in failed_other.rule


def test_a_task_error_and_gold_spans_without_document_ids() -> None:
    assert label(case({}, {}, error="ProviderTimeout: slow")) == TASK_ERROR
    spans = ("The moon pulls the oceans.",)
    found = details([hit("a", 1, True)], gold=(), spans=spans, context=("The moon pulls the oceans. More.",))
    assert label(case(found, GOOD | {"citation_precision": 0.0})) == WRONG_WITH_GOLD
    missing = details([hit("a", 1, True)], gold=(), spans=spans, context=("Cats sleep.",))
    assert label(case(missing, GOOD | {"citation_precision": 0.0})) == RETRIEVAL_MISS


def test_diagnose_run_counts_classes_in_rule_order() -> None:
    cases = [
        case(details([hit("x", 1, True)]), GOOD | {"recall@10": 0.0}, cid="miss1"),
        case(details([hit("g", 1, True)]), GOOD, cid="ok"),
        case(details([hit("g", 1, True)], sentences=(False,)), GOOD | {"faithfulness": 0.0}, cid="unf"),
        case(details([hit("y", 1, True)]), GOOD | {"recall@10": 0.0}, cid="miss2"),
    ]
    result = diagnose_run(RunResult("r", "s", "v", thresholds=THRESHOLDS, cases=cases))
    assert (result.cases, result.failing) == (4, 3)
    assert result.counts == {RETRIEVAL_MISS: 2, UNFAITHFUL: 1}
    assert json.loads(json.dumps(result.to_json()))["counts"] == {RETRIEVAL_MISS: 2, UNFAITHFUL: 1}


# --- datasets: the answerable flag, and the abstention scorer ------------------------------------------------


def test_the_answerable_column_is_a_flag_and_a_bad_value_is_named() -> None:
    rows = [{"q": "a", "ok": "no"}, {"q": "b", "ok": True}, {"q": "c", "ok": ""}]
    cases = cases_from_rows(rows, {"input": "q", "answerable": "ok"}, source="d.csv")
    assert [c.answerable for c in cases] == [False, True, None]
    assert Case.from_json(cases[0].to_json()).answerable is False and "answerable" not in cases[2].to_json()
    inverted = cases_from_rows([{"q": "a", "is_impossible": True}, {"q": "b", "is_impossible": "false"}],
                               {"input": "q", "unanswerable": "is_impossible"}, source="squad.jsonl")  # fmt: skip
    assert [c.answerable for c in inverted] == [False, True]
    with pytest.raises(DatasetError, match=r"d.csv: row 1, column 'ok': 'maybe' is not a yes/no flag"):
        cases_from_rows([{"q": "a", "ok": "maybe"}], {"input": "q", "answerable": "ok"}, source="d.csv")


async def test_the_abstention_scorer() -> None:
    [scorer] = build_scorers([ScorerSpec(type="abstention")])
    ctx = ScoreContext(None)
    unanswerable, answerable = Case("1", "q", answerable=False), Case("2", "q")
    assert await scorer.fn(Sample(unanswerable, "x", {"answer_kind": "abstained"}), ctx) == {"abstention": 1.0}
    assert await scorer.fn(Sample(unanswerable, "x", {"answer_kind": "generated"}), ctx) == {"abstention": 0.0}
    assert await scorer.fn(Sample(answerable, "x", {"answer_kind": "abstained"}), ctx) == {"abstention": 0.0}
    # a plain task: the refusal text decides
    assert await scorer.fn(Sample(unanswerable, "Not in the documents.", {}), ctx) == {"abstention": 1.0}
    assert await scorer.fn(Sample(answerable, "Paris.", {}), ctx) == {"abstention": 1.0}


# --- stored with the case and on its trace -------------------------------------------------------------------


def _stored_run(store: Any, trace_id: str) -> str:
    storage.create_run(store, {
        "run_id": "rag-run", "job": "eval:rag", "suite": "rag", "variant": "model=t", "variant_index": 0,
        "variant_params": {}, "thresholds": THRESHOLDS, "spec": {"name": "rag", "task": {"rag": {"collection": "c"}}},
        "base_dir": ".", "source": None, "total": 2, "created_at": 1.0,
    })  # fmt: skip
    miss = CaseResult("miss", scores=GOOD | {"recall@10": 0.0}, passed=False, trace_id=trace_id,
                      details=details([hit("x", 1, True)]))  # fmt: skip
    ok = CaseResult("ok", scores=GOOD, passed=True, details=details([hit("g", 1, True)]))
    storage.write_case(store, "rag-run", 0, "k0", miss, {"id": "miss"})
    storage.write_case(store, "rag-run", 1, "k1", ok, {"id": "ok"})
    return "rag-run"


def _trace(store: Any) -> str:
    trace_id = new_trace_id()
    store.write_spans([Span(trace_id, "a" * 16, None, "job.item", 1.0, 2.0)])
    return trace_id


def test_the_class_is_stored_and_written_once_into_the_cases_trace(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "k.db"))
    try:
        trace_id = _trace(store)
        run = storage.load_run(store, _stored_run(store, trace_id))
        assert record_diagnoses(store, diagnose_run(run)) == 1
        assert load_diagnoses(store, "rag-run") == {("miss", 0): RETRIEVAL_MISS}
        [debug] = [s for s in store.get_trace(trace_id) if s.name == "rag.debug"]
        assert debug.parent_id == "a" * 16 and debug.attributes[CLASS_ATTRIBUTE] == RETRIEVAL_MISS
        assert debug.start_time == debug.end_time == 2.0  # at the case's end: the trace keeps its duration
        assert debug.output["evidence"]["gold_docs"] == ["g"]
        assert record_diagnoses(store, diagnose_run(run)) == 0  # the same diagnosis again: no second span
        assert len([s for s in store.get_trace(trace_id) if s.name == "rag.debug"]) == 1
    finally:
        store.close()


def test_the_dashboard_trace_view_shows_the_class() -> None:
    script = (Path(__file__).resolve().parents[1] / "src/keel/server/static/app.js").read_text()
    head = script[script.index("function renderTraceHead") : script.index("function renderWaterfall")]
    assert "ragDebugStat(trace.spans, stat)" in head and '"keel.rag.debug.class"' in head
    assert 'stat("RAG debug"' in head and '"keel.rag.debug.at"' in head


# --- the CLI ---------------------------------------------------------------------------------------------------


def test_keel_rag_debug_on_a_stored_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    store = open_store(str(tmp_path / "keel.db"))
    try:
        trace_id = _trace(store)
        _stored_run(store, trace_id)
        storage.create_run(store, {
            "run_id": "plain", "job": "eval:p", "suite": "p", "variant": "v", "variant_index": 0, "variant_params": {},
            "thresholds": {}, "spec": {"name": "p", "task": {"prompt": "{q}"}}, "base_dir": ".", "source": None,
            "total": 0, "created_at": 1.0,
        })  # fmt: skip
    finally:
        store.close()
    runner = CliRunner()
    result = runner.invoke(app, ["rag", "debug", "rag-run", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["counts"] == {RETRIEVAL_MISS: 1} and data["failing"] == 1 and data["cases"] == 2
    assert data["diagnoses"][0]["case_id"] == "miss" and data["diagnoses"][0]["trace_id"] == trace_id
    table = runner.invoke(app, ["rag", "debug", "rag-run"])
    assert table.exit_code == 0 and "retrieval miss" in table.output and "none retrieved" in table.output
    assert "failed: recall@10 0.000 < 0.50" in table.output
    unknown = runner.invoke(app, ["rag", "debug", "nope"])
    assert unknown.exit_code != 0 and "no evaluation run 'nope'" in unknown.output
    plain = runner.invoke(app, ["rag", "debug", "plain"])
    assert plain.exit_code != 0 and "is not a RAG run" in plain.output


# --- end to end: a tiny collection, scripted answers ----------------------------------------------------------

FACTS = [
    ("keys", "Keys", "To rotate a key, revoke it with keel keys revoke and create a new one with keel keys create."),
    ("budgets", "Budgets", "A budget caps what a key may spend in USD per day or per month."),
    ("cats", "Cats", "Cats sleep for about fifteen hours a day and hunt at dawn and dusk."),
    ("tides", "Tides", "Tides are caused by the gravitational pull of the moon and the sun on the oceans."),
]
ROWS = [
    {"id": "right", "answerable": True, "q": "How long do cats sleep each day?", "gold": ["cats"]},
    {"id": "wrong-cite", "answerable": True, "q": "What causes the tides of the oceans?", "gold": ["tides"]},
    {"id": "no-answer", "answerable": True, "q": "How do I rotate a key?", "gold": ["keys"]},
    {"id": "invented", "answerable": True, "q": "What does a budget cap?", "gold": ["budgets"]},
    {"id": "not-ingested", "answerable": True, "q": "When do cats hunt?", "gold": ["cat-hunting-paper"]},
    {"id": "unanswerable", "q": "How many hours a day do cats hunt?", "gold": [], "answerable": False},
]


def _source(request: Any, phrase: str) -> int:
    for match in re.finditer(r"^\[(\d+)\] [^\n]*\n([^\n]*)", request.messages[-1].content, re.MULTILINE):
        if phrase in match.group(2):
            return int(match.group(1))
    return 1


def _answer(request: Any) -> str:
    question = request.messages[-1].content.rsplit("Question:", 1)[-1]
    if "rotate" in question:
        return NOT_IN_DOCUMENTS
    if "tides" in question:  # cites the wrong (but real, supporting) source
        return f"Cats sleep for about fifteen hours a day [{_source(request, 'Cats sleep')}]."
    if "budget" in question:
        return f"A budget caps what Napoleon spent on rockets in 1802 [{_source(request, 'budget')}]."
    return f"Cats sleep for about fifteen hours a day [{_source(request, 'Cats sleep')}]."


@pytest.fixture
def rag_gateway(tmp_path: Path, store_url: str) -> Any:
    gw = gateway(tmp_path, "[rag]\nembed_batch = 4\n", store=store_url, models={"fn": FunctionModel(_answer)})
    yield gw
    gw.close()


def test_a_rag_eval_end_to_end_retrieves_once_and_is_debugged(rag_gateway: Gateway) -> None:
    rag = RAG(rag_gateway)
    rag.ingest_sync([Document(i, text, title=title) for i, title, text in FACTS], "facts")
    rag.close()
    suite = Suite.from_spec({
        "name": "tiny-rag",
        "dataset": {"rows": ROWS, "columns": {"input": "q", "gold_docs": "gold", "answerable": "answerable"}},
        "task": {"model": "fn", "rag": {"collection": "facts", "top_k": 4, "mode": "generate"}},
        "scorers": [{"type": "retrieval", "k": 4, "threshold": {"recall@4": 0.5}},
                    {"type": "citation", "threshold": {"citation_precision": 0.5}},
                    {"type": "faithfulness", "threshold": 0.5}, {"type": "abstention", "threshold": 1}],
        "concurrency": 2,
    })  # fmt: skip
    [run] = run_suite(suite, gateway=rag_gateway)
    assert run.status == "done" and not [c.error for c in run.cases if c.error]
    store = rag_gateway.store
    assert store is not None
    rag_gateway.flush()
    for c in run.cases:  # one retrieval per case: the metrics and the answer share it
        names = [s.name for s in store.get_trace(c.trace_id or "")]
        assert names.count("rag.retrieve facts") == 1, (c.case_id, names)
        assert [h["rank"] for h in c.details["retrieved"]] == list(range(1, len(c.details["retrieved"]) + 1))
    by_case = {d.case_id: d for d in diagnose_run(run).diagnoses}
    assert {k: d.label for k, d in by_case.items()} == {
        "wrong-cite": WRONG_WITH_GOLD, "no-answer": WRONG_ABSTENTION, "invented": UNFAITHFUL,
        "not-ingested": RETRIEVAL_MISS, "unanswerable": MISSING_ABSTENTION,
    }  # fmt: skip
    assert "right" not in by_case
    assert by_case["invented"].evidence["unsupported_sentences"][0]["reason"].startswith("its cited sources do not")
    record_diagnoses(store, diagnose_run(run))
    debug = [s for s in store.get_trace(by_case["not-ingested"].trace_id or "") if s.name == "rag.debug"]
    assert [s.attributes[CLASS_ATTRIBUTE] for s in debug] == [RETRIEVAL_MISS]


def test_each_quote_of_an_extractive_answer_is_a_citation_of_its_own(rag_gateway: Gateway) -> None:
    rag = RAG(rag_gateway)
    text = "Tides are caused mostly by the pull of the moon. Tides are also caused by the pull of the sun."
    rag.ingest_sync([Document("tides", text, title="Tides"), *[Document(i, t, title=n) for i, n, t in FACTS[:3]]],
                    "sea")  # fmt: skip
    rag.close()
    suite = Suite.from_spec({
        "name": "quotes", "dataset": {"rows": [{"q": "What causes tides, the moon or the sun?", "g": ["tides"],
                                                "s": ["Tides are also caused by the pull of the sun."]}],
                                      "columns": {"input": "q", "gold_docs": "g", "gold_spans": "s"}},
        "task": {"model": "fn", "rag": {"collection": "sea", "top_k": 4, "mode": "extractive"}},
        "scorers": [{"type": "citation"}],
    })  # fmt: skip
    [run] = run_suite(suite, gateway=rag_gateway)
    [c] = run.cases
    quotes = [q["quote"] for q in c.details["citations"]]
    assert c.details["answer_kind"] == "extractive" and len(quotes) == len(c.details["sentences"]) >= 2
    assert "Tides are also caused by the pull of the sun." in quotes
    assert c.scores["citation_recall"] == 1.0


def failed(d: dict[str, Any]) -> CaseResult:
    """A case that missed only its citation recall."""
    return CaseResult("c", scores=GOOD | {"citation_recall": 0.0}, passed=False, details=d)


def test_gold_in_context_is_measured_on_the_spans_and_against_the_citation_recall_threshold() -> None:
    spans = ("Carvedilol does not improve heart failure outcomes.", "Beta blockers were well tolerated by children.",
             "The trial stopped early for futility.")  # fmt: skip
    # the gold document's first chunk is in the context, its evidence sentences (a later chunk) are not
    first_chunk = details([hit("g", 1, True), hit("g", 2, False)], spans=spans, context=("Background of the trial.",))
    diagnosis = diagnose_case(failed(first_chunk), THRESHOLDS | {"citation_recall": 0.5})
    assert diagnosis is not None and diagnosis.label == RANKING_LOSS
    assert diagnosis.evidence["gold_in_context_share"] == 0.0
    # one of three spans given, the run asks for half of them cited: even a perfect answer fails
    one = details([hit("g", 1, True)], spans=spans, context=(spans[0] + " Other text here.",))
    found = diagnose_case(failed(one), THRESHOLDS | {"citation_recall": 0.5})
    assert found is not None and found.label == RANKING_LOSS and "< the citation_recall threshold 0.5" in found.rule
    # two of three given (one as a close paraphrase): the generator had enough, and missed it
    two = details([hit("g", 1, True)], spans=spans,
                  context=(spans[0] + " Beta blockers were well tolerated in children.",))  # fmt: skip
    anything = diagnose_case(failed(two), {"citation_precision": 0.5})  # no recall threshold: any gold is enough
    assert anything is not None and anything.label == WRONG_WITH_GOLD
    missed = diagnose_case(failed(two), THRESHOLDS | {"citation_recall": 0.5})
    assert missed is not None and missed.label == WRONG_WITH_GOLD and missed.evidence["gold_spans_in_context"] == 2


def test_a_suite_ingests_its_collection_first_and_names_a_missing_file(rag_gateway: Gateway, tmp_path: Path) -> None:
    docs = tmp_path / "facts.jsonl"
    docs.write_text("".join(json.dumps({"_id": i, "title": t, "text": x}) + "\n" for i, t, x in FACTS))
    spec = {
        "name": "ingesting", "dataset": {"rows": ROWS[:1], "columns": {"input": "q", "gold_docs": "gold"}},
        "task": {"model": "fn", "rag": {"collection": "own", "top_k": 4, "ingest": "facts.jsonl"}},
        "scorers": [{"type": "retrieval", "k": 4}],
    }  # fmt: skip
    [run] = run_suite(Suite.from_spec(spec, base_dir=tmp_path), gateway=rag_gateway)
    assert run.cases[0].scores["recall@4"] == 1.0 and run.cases[0].details["retrieved"][0]["doc_id"] == "cats"
    spec["task"]["rag"]["ingest"] = "missing.jsonl"  # type: ignore[index]
    with pytest.raises(InputError, match=r"task.rag.ingest: .*missing.jsonl does not exist"):
        run_suite(Suite.from_spec(spec, base_dir=tmp_path), gateway=rag_gateway)
