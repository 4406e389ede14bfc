"""`keel eval run` and `run_suite`: durable, resumable, cached runs; rescoring without a model call; kill -9."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from keel import Gateway
from keel.evals import Suite, load_run, rescore, run_suite, summarize
from keel.models.test import FunctionModel

ROOT = Path(__file__).resolve().parents[1]
ROWS = [{"id": f"c{i}", "q": f"what is {i}?", "a": str(i)} for i in range(6)]


def _suite(**extra: Any) -> Suite:
    spec = {
        "name": "numbers", "dataset": {"rows": ROWS, "columns": {"input": "q", "expected": "a"}},
        "task": {"prompt": "{q}", "model": "fn"}, "scorers": [{"type": "contains", "threshold": 1}],
        "repeats": 2, "concurrency": 3, **extra,
    }  # fmt: skip
    return Suite.from_spec(spec)


def _model(calls: Counter[str]) -> FunctionModel:
    def answer(request: Any) -> str:
        text = request.messages[-1].content
        calls[text] += 1
        n = int(text.split()[2].rstrip("?"))
        # case 1 flips between repeats (a flaky case); case 5 is always wrong
        return "no" if n == 5 or (n == 1 and calls[text] % 2 == 0) else f"it is {n}"

    return FunctionModel(answer)


def test_a_run_records_every_case_and_a_rerun_calls_no_model() -> None:
    calls: Counter[str] = Counter()
    gw = Gateway(models={"fn": _model(calls)})
    try:
        [run] = run_suite(_suite(), gateway=gw)
        assert run.status == "done" and len(run.cases) == 12
        assert sum(calls.values()) == 12 and set(calls.values()) == {2}
        summary = summarize(run)
        assert summary.flaky == ["c1"]
        assert summary.pass_at_k == {1: pytest.approx(9 / 12), 2: pytest.approx(5 / 6)}
        assert summary.pass_hat_k[2] == pytest.approx(4 / 6)
        case = run.cases[0]
        assert case.output == "it is 0" and case.input_tokens and case.latency_s is not None
        span = next(s for s in gw.store.get_trace(case.trace_id) if s.name == "eval.case")  # type: ignore[union-attr]
        assert span.attributes["keel.eval.run"] == run.run_id and span.attributes["keel.eval.case"] == "c0"
        assert span.attributes["keel.eval.variant"] == "model=fn"
        assert any(s.name.startswith("chat") for s in gw.store.get_trace(case.trace_id))  # type: ignore[union-attr]
        # the same suite again: the same run, nothing called
        [again] = run_suite(_suite(), gateway=gw)
        assert again.run_id == run.run_id and sum(calls.values()) == 12
        # a new run (other concurrency is the same task) takes every output from the cache
        [other] = run_suite(_suite(name="numbers2"), gateway=gw)
        assert other.run_id != run.run_id and len(other.cases) == 12 and sum(calls.values()) == 12
    finally:
        gw.close()


def test_rescore_uses_the_current_scorers_and_calls_nothing() -> None:
    calls: Counter[str] = Counter()
    gw = Gateway(models={"fn": _model(calls)})
    try:
        [run] = run_suite(_suite(repeats=1), gateway=gw)
        assert sum(calls.values()) == 6
        new = _suite(
            repeats=1,
            scorers=[
                {"type": "regex", "pattern": "^it is", "threshold": 1},
                {"type": "custom", "function": "evals_app:broken_score"},
            ],
        )
        assert gw.store is not None
        result = rescore(gw.store, run.run_id, suite=new)
        assert sum(calls.values()) == 6  # no model call
        assert set(result.metric_names()) == {"regex", "custom"}
        by_id = {c.case_id: c for c in result.cases}
        assert by_id["c5"].scores["regex"] == 0.0 and by_id["c0"].scores["regex"] == 1.0
        assert by_id["c0"].scores["custom"] is None and by_id["c0"].scorer_errors[0].scorer == "custom"
        assert load_run(gw.store, run.run_id).thresholds == {"regex": 1.0}
    finally:
        gw.close()


def test_a_failing_task_is_recorded_as_errored() -> None:
    def answer(request: Any) -> str:
        if "3" in request.messages[-1].content:
            raise ValueError("boom")
        return "ok"

    gw = Gateway(models={"fn": FunctionModel(answer)})
    try:
        [run] = run_suite(_suite(repeats=1), gateway=gw)
        failed = [c for c in run.cases if c.error is not None]
        assert [c.case_id for c in failed] == ["c3"] and failed[0].passed is None and not failed[0].scores
        assert summarize(run).task_errors == 1
    finally:
        gw.close()


def test_a_suite_queue_polls_fast_while_it_runs_and_is_settled_when_it_is_over() -> None:
    from keel.evals.runner import POLL_S, start_suite

    calls: Counter[str] = Counter()
    gw = Gateway(models={"fn": _model(calls)})
    try:
        # at the jobs default (0.2 s) a worker starts at most `concurrency` cases per poll: 12.5 s for
        # 1,000 cases at 16 instead of 3.1 s of a 50 ms model
        handle = start_suite(_suite(repeats=1), gateway=gw, worker=False)
        queue = handle.runner._dbos().retrieve_queue(f"job:{handle.job}")
        handle.close()  # not over: the queue keeps its short poll for the run's next worker
        assert queue is not None and queue.polling_interval_sec == POLL_S < gw.config.jobs.poll_s
        [run] = run_suite(_suite(repeats=1), gateway=gw)
        assert run.status == "done" and queue.polling_interval_sec == gw.config.jobs.poll_s
    finally:
        gw.close()


SUITE_YAML = """\
name: killed
dataset: {path: data.jsonl}
task: {function: "evals_app:answer"}
scorers:
  - {type: contains, value: WHAT, threshold: 1}
concurrency: 1
"""


def _keel(args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}:{ROOT / 'tests'}", "EVALS_CALLS": str(tmp_path / "calls"),
               "KEEL_STORE": str(tmp_path / "keel.db"), **env}  # fmt: skip
    code = "from keel.cli.app import main; main()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=environ,
                          cwd=tmp_path, timeout=240)  # fmt: skip


def test_kill_9_then_rerun_resumes_with_no_case_done_twice_and_none_lost(tmp_path: Path) -> None:
    rows = [{"id": f"k{i}", "input": f"what {i}"} for i in range(12)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "suite.yaml").write_text(SUITE_YAML)
    killed = _keel(["eval", "run", "suite.yaml"], tmp_path, EVALS_KILL_AT="6")
    assert killed.returncode == -9, killed.stderr
    assert (tmp_path / "calls").read_text().count("\n") == 5
    done = _keel(["eval", "run", "suite.yaml", "--json"], tmp_path)
    assert done.returncode == 0, done.stderr
    calls = Counter((tmp_path / "calls").read_text().splitlines())
    assert set(calls) == {r["input"] for r in rows} and set(calls.values()) == {1}  # none twice, none lost
    summary = json.loads(done.stdout)[0]
    assert summary["cases"] == 12 and summary["pass_rate"] == 1.0
    shown = _keel(["eval", "show", summary["run_id"]], tmp_path)
    assert shown.returncode == 0 and "pass@1 1.000" in shown.stdout
    listed = _keel(["eval", "list"], tmp_path)
    assert "12/12" in listed.stdout


def test_cli_errors_are_clear(tmp_path: Path) -> None:
    (tmp_path / "suite.yaml").write_text(SUITE_YAML.replace("concurrency: 1", "concurency: 1"))
    (tmp_path / "data.jsonl").write_text('{"input": "x"}\n')
    bad = _keel(["eval", "run", "suite.yaml"], tmp_path)
    assert bad.returncode == 3 and "suite.yaml:6 [concurency]: unknown field" in bad.stderr
    missing = _keel(["eval", "show", "nope"], tmp_path)
    assert missing.returncode == 2 and "no evaluation run 'nope'" in missing.stderr


# --- items of many cases ---------------------------------------------------------------------------------------


def test_how_a_run_is_split_into_items_and_how_many_cases_an_item_runs_at_once() -> None:
    from keel.evals.runner import case_window, item_count

    assert item_count(1000, 16) == 64  # 4 items per unit of concurrency: 15-16 cases each
    assert item_count(12, 3) == 12 and item_count(10, 16) == 10  # small suites: a case per item
    assert item_count(100_000, 16) == 1563  # at most 64 cases an item
    assert item_count(1000, 16, cases_per_item=100) == 10 and item_count(5, 16, cases_per_item=100) == 1
    for concurrency in (1, 3, 16, 64):
        for items in (1, 2, 5, 16, 64, 1000):
            window = case_window(concurrency, items)
            assert window >= 1 and window * min(concurrency, items) <= max(concurrency, 1)
    assert case_window(16, 64) == 1 and case_window(16, 2) == 8 and case_window(4, 1) == 4


def _function_suite(n: int, concurrency: int, function: str = "evals_app:slow_answer", **extra: Any) -> Suite:
    rows = [{"id": f"f{i}", "input": f"case {i}"} for i in range(n)]
    spec = {
        "name": f"chunks{n}",
        "dataset": {"rows": rows},
        "task": {"function": function},
        "scorers": [{"type": "contains", "value": "CASE", "threshold": 1}],
        "concurrency": concurrency,
        **extra,
    }
    return Suite.from_spec(spec)


def test_chunks_record_every_case_in_its_own_trace_with_per_case_progress() -> None:
    import evals_app
    from keel.evals.runner import start_suite

    evals_app.peak = 0
    gw = Gateway(models={"fn": _model(Counter())})
    try:
        seen: list[tuple[int, int]] = []
        handle = start_suite(_function_suite(40, 2, repeats=2), gateway=gw)
        try:
            [run] = handle.wait(lambda p: seen.append((p.done, p.total)))
            items = handle.runner.items(handle.job)
        finally:
            handle.close()
        assert len(items) == 8 and {len(i.input["cases"]) for i in items} == {10}  # 80 repeats, 4 x 2 items
        assert run.status == "done" and len(run.cases) == 80 and summarize(run).pass_rate == 1.0
        assert evals_app.peak == 2  # the suite's concurrency, across items (a window of 1 in each)
        assert seen[-1] == (80, 80) and len({done for done, _ in seen}) > 2  # progress moved case by case
        assert len({c.trace_id for c in run.cases}) == 80  # a trace per case repeat, not per item
        assert gw.store is not None
        for case in run.cases[:3] + run.cases[-3:]:
            [root] = [s for s in gw.store.get_trace(case.trace_id) if s.parent_id is None]  # type: ignore[arg-type]
            assert root.name == "eval.case" and root.attributes["keel.eval.case"] == case.case_id
            assert root.attributes["keel.eval.repeat"] == case.repeat and root.attributes["keel.eval.run"] == run.run_id
            assert root.attributes["keel.job.item"] in {i.key for i in items}
    finally:
        gw.close()


def test_fewer_items_than_the_concurrency_run_their_cases_at_once_and_a_resume_keeps_the_split() -> None:
    import evals_app
    from keel.errors import InputError
    from keel.evals.runner import start_suite

    evals_app.peak = 0
    gw = Gateway(models={"fn": _model(Counter())})
    try:
        [run] = run_suite(_function_suite(30, 4), gateway=gw, cases_per_item=15)  # 2 items, 2 cases each at once
        assert len(run.cases) == 30 and evals_app.peak == 4
        with pytest.raises(InputError, match="started with 2 items"):
            start_suite(_function_suite(30, 4), gateway=gw, cases_per_item=10)
        [again] = run_suite(_function_suite(30, 8), gateway=gw)  # other concurrency: the same job, resumed
        assert again.run_id == run.run_id and len(again.cases) == 30
    finally:
        gw.close()


CHUNK_SUITE_YAML = """\
name: killed-chunks
dataset: {path: data.jsonl}
task: {function: "evals_app:answer_async"}
scorers:
  - {type: contains, value: WHAT, threshold: 1}
concurrency: 4
"""


def test_kill_9_in_the_middle_of_chunks_loses_no_case_and_does_none_twice(tmp_path: Path) -> None:
    import sqlite3

    rows = [{"id": f"k{i}", "input": f"what {i}"} for i in range(12)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "suite.yaml").write_text(CHUNK_SUITE_YAML)
    # 2 items of 6 cases, 2 at once in each: the 5th call kills the process while both chunks are half done
    killed = _keel(["eval", "run", "suite.yaml", "--cases-per-item", "6"], tmp_path, EVALS_KILL_AT="5")
    assert killed.returncode == -9, killed.stderr
    answered = (tmp_path / "calls").read_text().splitlines()
    with sqlite3.connect(tmp_path / "keel.db") as db:
        positions = [p for (p,) in db.execute("SELECT position FROM keel_eval_cases")]
        items = db.execute("SELECT COUNT(*) FROM keel_job_items").fetchone()[0]
    assert items == 2 and len(positions) == len(answered)  # every answered case was recorded at once
    assert 0 < sum(p < 6 for p in positions) < 6 and 0 < sum(p >= 6 for p in positions) < 6  # both chunks midway
    done = _keel(["eval", "run", "suite.yaml", "--json"], tmp_path)  # no --cases-per-item: the run keeps its split
    assert done.returncode == 0, done.stderr
    calls = Counter((tmp_path / "calls").read_text().splitlines())
    assert set(calls) == {r["input"] for r in rows} and set(calls.values()) == {1}  # none twice, none lost
    summary = json.loads(done.stdout)[0]
    assert summary["cases"] == 12 and summary["pass_rate"] == 1.0


def _spy_on_drains(monkeypatch: Any) -> list[int]:
    """The drain (seconds) of each DBOS shutdown from now on."""
    from dbos import DBOS

    drains: list[int] = []
    destroy = DBOS.destroy

    def spy(*, workflow_completion_timeout_sec: int = 0, **options: Any) -> None:
        drains.append(workflow_completion_timeout_sec)
        destroy(workflow_completion_timeout_sec=workflow_completion_timeout_sec, **options)

    monkeypatch.setattr(DBOS, "destroy", spy)
    return drains


def test_the_runs_worker_runs_its_own_job_only_and_stops_at_once_when_the_run_is_over(monkeypatch: Any) -> None:
    from keel import jobs

    ran: list[Any] = []

    @jobs.kind("test.evals.other")
    def other(value: int) -> int:
        ran.append(value)
        return value

    drains = _spy_on_drains(monkeypatch)
    gw = Gateway(models={"fn": _model(Counter())})
    try:
        with jobs.JobRunner(gw.config, store=gw.store) as runner:
            runner.submit("not-the-evals", "test.evals.other", [1, 2, 3])  # the default queue: a `keel worker`'s
            [run] = run_suite(_function_suite(10, 2), gateway=gw)
            assert run.status == "done" and ran == [] and runner.get("not-the-evals").status == "running"
        assert drains == [0]  # DBOS's drain (which sleeps a second before it first looks) is skipped
    finally:
        gw.close()


def test_chunks_across_variants() -> None:
    calls: Counter[str] = Counter()
    gw = Gateway(models={"fn": _model(calls), "fn2": _model(calls)})
    try:
        rows = [{"id": f"c{i}", "q": f"what is {i}?", "a": str(i)} for i in range(30)]
        suite = Suite.from_spec({
            "name": "variants", "dataset": {"rows": rows, "columns": {"input": "q", "expected": "a"}},
            "task": {"prompt": "{q}"}, "variants": {"models": ["fn", "fn2"]},
            "scorers": [{"type": "contains", "threshold": 1}], "concurrency": 2,
        })  # fmt: skip
        runs = run_suite(suite, gateway=gw)  # 60 case repeats in 8 items of 7-8: one holds both variants
        assert [len(r.cases) for r in runs] == [30, 30] and set(calls.values()) == {2}
        assert [r.variant for r in runs] == ["model=fn", "model=fn2"]
        assert all(c.error is None for r in runs for c in r.cases)
    finally:
        gw.close()


def test_a_worker_elsewhere_rebuilds_a_chunked_run_from_the_store() -> None:
    import evals_app
    from keel import jobs
    from keel.evals import runner as runner_module

    evals_app.peak = 0
    gw = Gateway(models={"fn": _model(Counter())})
    try:
        handle = runner_module.start_suite(_function_suite(24, 3), gateway=gw, worker=False)
        runner_module._contexts.clear()  # a `keel worker` knows nothing of this process: it reads the stored spec
        worker = jobs.Worker(gw.config, store=gw.store).start()
        try:
            [run] = handle.wait()
        finally:
            worker.stop()
            handle.close()
        assert len(handle.runner.items(handle.job)) == 12 and len(run.cases) == 24
        assert summarize(run).pass_rate == 1.0 and evals_app.peak == 3
    finally:
        gw.close()


def test_eval_run_called_in_process_returns_instead_of_exiting(tmp_path: Path) -> None:
    """The command leaves without the interpreter's teardown only as a real process: called in-process (a test
    runner, a host application) it must return like any command."""
    from typer.testing import CliRunner

    from keel.cli.app import app

    rows = [{"id": f"p{i}", "input": f"what {i}"} for i in range(3)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "suite.yaml").write_text(SUITE_YAML.replace("evals_app:answer", "evals_app:slow_answer"))
    result = CliRunner().invoke(app, ["eval", "run", str(tmp_path / "suite.yaml"), "--json"],
                                env={"KEEL_STORE": str(tmp_path / "keel.db")})  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)[0]["cases"] == 3


def test_a_case_reaches_the_store_in_one_transaction_unless_a_scorer_may_call_a_model(monkeypatch: Any) -> None:
    """Per case: the row and the output to cache in one commit, cached outputs read once per item; a suite whose
    scorers may call a model (slow, billed) caches each output as soon as the task returns, before scoring."""
    from keel.evals import storage

    counts: Counter[str] = Counter()
    for name in ("cache_get", "cache_put", "cache_get_many", "write_case"):
        original = getattr(storage, name)
        monkeypatch.setattr(storage, name, lambda *a, _f=original, _n=name, **k: counts.update([_n]) or _f(*a, **k))
    gw = Gateway(models={"fn": _model(Counter())})
    try:
        [run] = run_suite(_function_suite(40, 2), gateway=gw)  # 8 items of 5
        assert len(run.cases) == 40 and all(c.output == c.input.upper() for c in run.cases)  # type: ignore[union-attr]
        assert counts == Counter(write_case=40, cache_get_many=8)
        counts.clear()
        custom = [{"type": "contains", "value": "CASE", "threshold": 1},
                  {"type": "custom", "function": "evals_app:length_score"}]  # fmt: skip
        suite = _function_suite(40, 2, "evals_app:slow_answer_too", name="chunks-custom", scorers=custom)
        [other] = run_suite(suite, gateway=gw)
        assert len(other.cases) == 40 and all(c.scores["custom"] is not None for c in other.cases)
        assert counts == Counter(write_case=40, cache_get_many=8, cache_put=40)
        counts.clear()
        [again] = run_suite(_function_suite(40, 2, "evals_app:slow_answer_too", name="again", scorers=custom),
                            gateway=gw)  # fmt: skip
        assert len(again.cases) == 40 and "cache_put" not in counts  # every output came from the cache
    finally:
        gw.close()


def test_what_an_item_reads_and_writes_on_both_backends(store: Any) -> None:
    from keel.evals import storage
    from keel.evals.results import CaseResult

    row = {"run_id": "r1", "job": "j", "suite": "s", "variant": "v", "variant_index": 0, "variant_params": {},
           "thresholds": {}, "spec": {}, "base_dir": ".", "source": None, "total": 3, "created_at": 1.0}  # fmt: skip
    storage.create_run(store, row)
    units = [{"run": "r1", "case": {"id": f"c{i}"}, "repeat": r, "position": i} for i in range(3) for r in range(2)]
    assert storage.recorded_cases(store, units) == set() and storage.progress(store, ["r1"]) == (0, 0, 0.0)
    done = CaseResult("c1", 1, output="out", passed=True, cost_usd=0.25)
    assert storage.write_case(store, "r1", 1, "k1", done, {"id": "c1"}, output={"output": "out"})
    assert not storage.write_case(store, "r1", 1, "k1", done, {"id": "c1"}, output={"output": "other"})  # a re-run
    storage.write_case(store, "r1", 2, "k2", CaseResult("c2", 0, error="boom"), {"id": "c2"})
    assert storage.recorded_cases(store, units) == {("r1", "c1", 1), ("r1", "c2", 0)}
    assert storage.cache_get_many(store, ["k1", "k2", "k3"]) == {"k1": {"output": "out"}}
    assert storage.progress(store, ["r1", "r2"]) == (2, 1, 0.25)


def test_a_cancelled_runs_worker_lets_its_running_cases_finish(monkeypatch: Any) -> None:
    from keel.evals.runner import start_suite

    drains = _spy_on_drains(monkeypatch)
    gw = Gateway(models={"fn": _model(Counter())})
    try:
        handle = start_suite(_function_suite(60, 2, name="cancelled"), gateway=gw)
        deadline = time.monotonic() + 30
        while handle.runner.status(handle.job).counts.get("running", 0) == 0 and time.monotonic() < deadline:
            time.sleep(0.005)
        handle.runner.cancel(handle.job)
        handle.close()
        assert drains == [10]  # items ran: DBOS's drain lets the cases in flight end
        assert handle.runner.status(handle.job).counts.get("running", 0) == 0
    finally:
        gw.close()
