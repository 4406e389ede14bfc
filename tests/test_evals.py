"""keel.evals without a run: suite files and their errors, datasets, every scorer, the judge, reducers."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from keel import Gateway
from keel.errors import ConfigError
from keel.evals import CaseResult, pass_at_k, pass_hat_k, summarize
from keel.evals.dataset import Case, DatasetError
from keel.evals.judge import judge_agreement
from keel.evals.results import RunResult
from keel.evals.scorers import Sample, ScoreContext, build_scorers, score_case, thresholds
from keel.evals.suite import ScorerSpec, Suite, load_suite, parse_suite
from keel.models.test import FunctionModel, TestModel

SUITE = """\
name: qa
dataset:
  path: data.jsonl
  columns: {input: question, expected: answer}
task:
  prompt: "Answer: {question}"
scorers:
  - type: exact
    threshold: 1
"""


def _write(tmp_path: Path, suite: str, rows: list[dict[str, Any]] | None = None) -> Path:
    rows = rows or [{"question": "q", "answer": "a"}]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = tmp_path / "suite.yaml"
    path.write_text(suite)
    return path


def test_a_valid_suite_loads_its_cases(tmp_path: Path) -> None:
    suite = load_suite(_write(tmp_path, SUITE, [{"question": "2+2?", "answer": "4", "id": "c1"}]))
    assert [c.id for c in suite.cases] == ["c1"]
    assert suite.cases[0].input == "2+2?" and suite.cases[0].expected == "4"
    assert [v.name for v in suite.variants()] == ["model=default"]


def test_an_unknown_field_names_file_line_and_field(tmp_path: Path) -> None:
    path = _write(tmp_path, SUITE.replace("    threshold: 1\n", "    threshold: 1\n    treshold: 2\n"))
    with pytest.raises(ConfigError) as info:
        load_suite(path)
    assert info.value.file == str(path) and info.value.line == 10 and info.value.field == "scorers.0.treshold"
    assert "unknown field" in info.value.message


def test_a_bad_value_names_its_line(tmp_path: Path) -> None:
    path = _write(tmp_path, SUITE.replace("threshold: 1", "threshold: 7"))
    with pytest.raises(ConfigError) as info:
        load_suite(path)
    assert info.value.line == 9 and info.value.field == "scorers.0.threshold"
    assert "between 0 and 1" in info.value.message


def test_two_tasks_and_broken_yaml_are_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"suite.yaml:5 \[task\]: .*exactly one of"):
        two = SUITE.replace('  prompt: "Answer: {question}"', '  prompt: "x"\n  function: "m:f"')
        load_suite(_write(tmp_path, two))
    with pytest.raises(ConfigError, match=r"suite.yaml:3.*not valid YAML") as info:
        parse_suite("name: x\ndataset: {path: a\n  bad: [\n", "suite.yaml")
    assert info.value.line is not None


def test_missing_columns_and_empty_datasets_are_clear(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"row 1 has no column 'answer' \(mapped from 'expected'\)"):
        load_suite(_write(tmp_path, SUITE, [{"question": "q"}]))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DatasetError, match="the dataset is empty"):
        load_suite(_write(tmp_path, SUITE.replace("data.jsonl", "empty.jsonl")))
    (tmp_path / "data.csv").write_text("question,answer\n")
    with pytest.raises(DatasetError, match="empty"):
        load_suite(_write(tmp_path, SUITE.replace("data.jsonl", "data.csv")))


def test_csv_with_list_columns(tmp_path: Path) -> None:
    (tmp_path / "d.csv").write_text('q,a,docs,tags\nwhat,it,d1|d2,"[""x"", ""y""]"\n')
    suite = load_suite(_write(tmp_path, SUITE.replace("data.jsonl", "d.csv").replace(
        "{input: question, expected: answer}", "{input: q, expected: a, gold_docs: docs, tags: tags}")))
    assert suite.cases[0].gold_docs == ("d1", "d2") and suite.cases[0].tags == ("x", "y")


def test_variants_are_the_matrix() -> None:
    suite = Suite.from_spec({
        "name": "m", "dataset": {"rows": [{"input": "x", "expected": "y"}]},
        "task": {"prompt": "{input}", "params": {"max_tokens": 5}},
        "variants": {"models": ["a", "b"], "prompts": {"short": "{input}", "long": "Please: {input}"},
                     "params": [{"temperature": 0}, {"temperature": 1}]},
        "scorers": [{"type": "exact"}],
    })
    variants = suite.variants()
    assert len(variants) == 8
    assert variants[0].name == "model=a prompt=short max_tokens=5 temperature=0"
    assert variants[-1].prompt == "Please: {input}" and variants[-1].params == {"max_tokens": 5, "temperature": 1}


# --- scorers ------------------------------------------------------------------------------------------------


def _score(spec: dict[str, Any], output: Any, case: Case, details: dict[str, Any] | None = None,
           gateway: Gateway | None = None) -> tuple[dict[str, float | None], list[Any], bool]:
    scorers = build_scorers([ScorerSpec.model_validate(spec)])
    ctx = ScoreContext(gateway)
    return asyncio.run(score_case(scorers, Sample(case, output, details or {}), ctx, thresholds(scorers)))


@pytest.mark.parametrize(
    ("spec", "output", "expected", "score"),
    [
        ({"type": "exact"}, "Paris", "Paris", 1.0),
        ({"type": "exact"}, "paris", "Paris", 0.0),
        ({"type": "normalized_match"}, "The  Paris!", "paris", 1.0),
        ({"type": "token_f1"}, "the cat sat", "cat sat down", 0.8),
        ({"type": "contains"}, "It is Paris, France", "paris", 1.0),
        ({"type": "contains", "value": "lyon"}, "It is Paris", None, 0.0),
        ({"type": "regex", "pattern": r"\d{4}"}, "in 1802", None, 1.0),
        ({"type": "json_schema", "schema": {"type": "object", "required": ["a"]}}, '{"a": 1}', None, 1.0),
        ({"type": "json_schema", "schema": {"type": "object", "required": ["a"]}}, '{"b": 1}', None, 0.0),
        ({"type": "json_schema", "schema": {"type": "object"}}, "not json", None, 0.0),
        ({"type": "numeric", "tolerance": 0.1}, "about 3.05 m", "3", 1.0),
        ({"type": "numeric", "relative": 0.01}, "1,050", "1000", 0.0),
        ({"type": "numeric"}, "no idea", "3", 0.0),
    ],
)
def test_text_scorers(spec: dict[str, Any], output: str, expected: str | None, score: float) -> None:
    scores, errors, _ = _score(spec, output, Case("c", "q", expected))
    assert errors == [] and scores == {spec.get("name", spec["type"]): pytest.approx(score)}


def test_a_raising_scorer_is_errored_never_a_pass() -> None:
    case = Case("c", "q", "a")
    scores, errors, passed = _score({"type": "custom", "function": "evals_app:broken_score", "threshold": 0}, "x", case)
    assert scores == {"custom": None} and passed is False
    assert errors[0].scorer == "custom" and "this scorer is broken" in errors[0].message
    scores, errors, passed = _score({"type": "custom", "name": "n", "function": "evals_app:nan_score"}, "x", case)
    assert scores == {"n": None} and "a score must be a number in [0, 1]" in errors[0].message
    scores, errors, _ = _score({"type": "custom", "function": "evals_app:length_score"}, "12345", case)
    assert scores == {"custom": 0.5} and not errors
    scores, errors, _ = _score({"type": "exact"}, "x", Case("c", "q", None))  # no expected output
    assert scores == {"exact": None} and "needs an expected output" in errors[0].message


def test_retrieval_metrics_come_from_ir_measures() -> None:
    case = Case("c", "q", gold_docs=("d1", "d3"))
    retrieved = [{"doc_id": d, "rank": i} for i, d in enumerate(["d2", "d1", "d1", "d9"], start=1)]
    scores, errors, _ = _score({"type": "retrieval", "k": 10}, "", case, {"retrieved": retrieved})
    assert not errors
    assert scores["recall@10"] == pytest.approx(0.5) and scores["mrr"] == pytest.approx(0.5)
    assert scores["ndcg@10"] == pytest.approx((1 / 1.5849625) / (1 + 1 / 1.5849625), rel=1e-4)
    assert _score({"type": "retrieval"}, "", Case("c", "q"), {"retrieved": retrieved})[0] == {}  # no gold: n/a


def test_citation_precision_and_recall_against_gold_spans() -> None:
    case = Case("c", "q", gold_docs=("d1",), gold_spans=("Aspirin lowers the risk of stroke.",))
    citations = [
        {"doc_id": "d1", "quote": "In trials, aspirin lowers the risk of stroke."},
        {"doc_id": "d2", "quote": "Unrelated text about tides."},
    ]
    scores, _, _ = _score({"type": "citation"}, "answer", case, {"citations": citations})
    assert scores == {"citation_precision": 0.5, "citation_recall": 1.0}
    scores, _, _ = _score({"type": "citation"}, "answer", case, {"citations": []})
    assert scores == {"citation_precision": 0.0, "citation_recall": 0.0}


def test_faithfulness_from_checked_sentences_and_from_a_context_column() -> None:
    details = {"sentences": [{"supported": True}, {"supported": False}, {"supported": True}, {"supported": True}]}
    assert _score({"type": "faithfulness"}, "x", Case("c", "q"), details)[0] == {"faithfulness": 0.75}
    gw = Gateway(store=False, models={"emb": TestModel()})
    case = Case("c", "q", fields={"context": "The Eiffel Tower is in Paris. It was built in 1889."})
    scores, errors, _ = _score({"type": "faithfulness", "model": "emb"}, "The Eiffel Tower was built in 1889. "
                               "Napoleon built it in 1802.", case, gateway=gw)
    assert not errors and scores == {"faithfulness": 0.5}


def test_embedding_similarity_uses_the_gateway() -> None:
    gw = Gateway(store=False, models={"emb": TestModel()})
    spec = {"type": "embedding_similarity", "model": "emb"}
    scores, errors, _ = _score(spec, "same", Case("c", "q", "same"), gateway=gw)
    assert not errors and scores["embedding_similarity"] == pytest.approx(1.0)


def test_judge_retries_unparseable_output_then_errors() -> None:
    answers = iter(["I think it is fine", "Reasoning... SCORE: 4"])
    judge = FunctionModel(lambda r: next(answers))
    gw = Gateway(store=False, models={"judge": judge})
    spec = {"type": "judge", "model": "judge", "rubric": "Is it correct?", "threshold": 0.7, "retries": 1}
    scores, errors, passed = _score(spec, "Paris", Case("c", "capital?", "Paris"), gateway=gw)
    assert not errors and scores == {"judge": 0.75, "judge.spread": 0.0} and passed is True
    assert len(judge.requests) == 2
    never = FunctionModel(lambda r: "no score here, SCORE: 9")  # 9 is off the 1..5 scale
    gw = Gateway(store=False, models={"judge": never})
    scores, errors, passed = _score(spec, "Paris", Case("c", "capital?", "Paris"), gateway=gw)
    assert scores == {"judge": None, "judge.spread": None} and passed is False
    assert "no `SCORE: n` on 1..5 in 2 answers" in errors[0].message and len(never.requests) == 2


def test_judge_samples_report_spread_and_are_cached_by_input() -> None:
    grades = iter(["SCORE: 5", "SCORE: 3", "SCORE: 5"])
    judge = FunctionModel(lambda r: next(grades))
    gw = Gateway(store=False, models={"judge": judge})
    cache: dict[str, Any] = {}
    scorers = build_scorers([ScorerSpec.model_validate(
        {"type": "judge", "model": "judge", "rubric": "ok?", "samples": 3, "reduce": "majority"})])
    ctx = ScoreContext(gw, cache.get, cache.__setitem__)
    sample = Sample(Case("c", "q"), "answer")
    scores, _, _ = asyncio.run(score_case(scorers, sample, ctx, {}))
    assert scores["judge"] == 1.0 and scores["judge.spread"] == pytest.approx(0.2357, abs=1e-4)
    again, _, _ = asyncio.run(score_case(scorers, sample, ScoreContext(gw, cache.get, cache.__setitem__), {}))
    assert again == scores and len(judge.requests) == 3  # every sample from the cache


def test_judge_agreement_and_kappa() -> None:
    judge = ["pass", "pass", "fail", "fail", "pass", "fail"]
    human = ["pass", "fail", "fail", "fail", "pass", "pass"]
    report = judge_agreement(judge, human)
    assert report.agreement == pytest.approx(4 / 6)
    assert report.kappa == pytest.approx(1 / 3)  # po = 2/3, pe = 1/2
    assert report.confusion == [[2, 1], [1, 2]]
    assert judge_agreement(["pass"], ["pass"]).kappa is None


# --- reducers -----------------------------------------------------------------------------------------------


def test_pass_at_k_and_pass_hat_k_estimators() -> None:
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert pass_at_k(5, 4, 2) == 1.0
    assert pass_hat_k(5, 2, 2) == pytest.approx(1 / 10)  # C(2,2)/C(5,2)
    assert pass_hat_k(5, 5, 5) == 1.0 and pass_hat_k(5, 4, 5) == 0.0
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)


def test_summary_flags_flaky_cases_and_reduces_over_cases() -> None:
    cases = [
        CaseResult("a", 0, scores={"m": 1.0}, passed=True, latency_s=1.0),
        CaseResult("a", 1, scores={"m": 0.0}, passed=False, latency_s=3.0),
        CaseResult("b", 0, scores={"m": 1.0}, passed=True, latency_s=2.0),
        CaseResult("b", 1, scores={"m": None}, passed=False, latency_s=2.0),
    ]
    summary = summarize(RunResult("r", "s", "v", thresholds={"m": 0.5}, cases=cases))
    assert summary.flaky == ["a", "b"]
    metric = summary.metrics[0]
    assert metric.mean == pytest.approx(0.75) and metric.n == 2 and metric.errored == 1
    assert metric.pass_rate == pytest.approx(2 / 3)
    assert summary.pass_at_k == {1: 0.5, 2: 1.0} and summary.pass_hat_k == {1: 0.5, 2: 0.0}
    assert summary.latency_p50_s == 2.0


def test_the_interval_is_scipys_t_interval_and_scipy_loads_only_when_a_run_is_reduced() -> None:
    import subprocess
    import sys

    from scipy import stats

    values = [0.1, 0.9, 0.4, 0.35, 0.8, 0.55, 0.6]
    cases = [CaseResult(f"c{i}", 0, scores={"m": v}, passed=True) for i, v in enumerate(values)]
    metric = summarize(RunResult("r", "s", "v", thresholds={}, cases=cases)).metrics[0]
    low, high = stats.t.interval(0.95, len(values) - 1, loc=sum(values) / len(values), scale=stats.sem(values))
    assert metric.stderr == pytest.approx(stats.sem(values)) and (metric.ci_low, metric.ci_high) == pytest.approx(
        (low, high)
    )
    # `keel eval run` imports these at start; scipy.stats alone takes about a second to import
    code = (
        "import sys, keel.evals, keel.evals.runner, keel.evals.metrics, keel.cli.evals, keel.cli.app\n"
        "print(sorted(m for m in ('scipy', 'bpe_openai', 'sklearn', 'statsmodels') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_new_store_object_gets_the_eval_and_debug_tables_even_at_a_freed_objects_address(tmp_path: Path) -> None:
    """The tables were remembered by id(store): a store object born at a closed one's address (CPython reuses
    them at once) skipped its migrations and failed with "no such table"."""
    from keel.evals import rag_debug, storage
    from keel.store import open_store

    for i in range(8):
        store = open_store(str(tmp_path / f"{i}.db"))
        try:
            assert storage.list_runs(store) == []
            assert rag_debug.load_diagnoses(store, "no-such-run") == {}
        finally:
            store.close()
        del store
