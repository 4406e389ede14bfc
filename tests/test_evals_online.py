"""Online quality: sampling, which calls are eligible, scoring each once, the quality report and the drop alert."""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from helpers import gateway, write_config
from keel import FunctionModel, Gateway
from keel.alerts import AlertEvaluator
from keel.cli.app import app
from keel.config import load_config
from keel.errors import ConfigError
from keel.evals.online import (
    OnlineScheduler,
    _stamp,
    candidates,
    drop_test,
    ensure_tables,
    online_config,
    quality,
    sampled,
    score_span,
)
from keel.evals.settings import OnlineConfig, OnlineScorer
from keel.store import Store, open_store
from keel.trace import Span, new_id, new_trace_id
from keel.types import ChatRequest, ModelResponse

# --- building production traffic -----------------------------------------------------------------------------


def call_span(
    *, end: float, operation: str = "chat", parent: str | None = None, output: Any = None, request: Any = None,
    attributes: dict[str, Any] | None = None, status: str = "ok", trace_id: str | None = None,
) -> Span:  # fmt: skip
    span = Span(trace_id or new_trace_id(), new_id(8), parent, operation, end - 0.5, end, status=status)
    span.attributes = {"gen_ai.operation.name": operation, "gen_ai.request.model": "prod", **(attributes or {})}
    span.input = request if request is not None else {"messages": [{"role": "user", "content": "hello"}]}
    span.output = output if output is not None else {"text": "hi", "tool_calls": []}
    return span


def rag_span(end: float, supported: list[bool], *, prompt: str = "v1") -> list[Span]:
    """A RAG answer (`rag.ask`) with its answering model call under it."""
    root = call_span(
        end=end, operation="rag", request={"question": "what?"}, attributes={"keel.metadata.prompt_version": prompt},
        output={"answer": "x.", "kind": "generated", "sentences": [{"text": "x", "supported": s} for s in supported]},
    )  # fmt: skip
    child = call_span(
        end=end - 0.1, parent=root.span_id, trace_id=root.trace_id,
        attributes={"keel.metadata.purpose": "rag.answer", "gen_ai.response.model": "answer-model-2"},
    )  # fmt: skip
    return [root, child]


def online(**kwargs: Any) -> OnlineConfig:
    return OnlineConfig(**{"sample": 1.0, **kwargs})


# --- sampling ------------------------------------------------------------------------------------------------


def test_sampling_takes_the_configured_share_and_the_same_traces_every_time() -> None:
    ids = [new_trace_id() for _ in range(20_000)]
    picked = [t for t in ids if sampled(t, 0.1)]
    assert 0.09 < len(picked) / len(ids) < 0.11
    assert picked == [t for t in ids if sampled(t, 0.1)]  # a replica or a re-run picks the same traces
    smaller = {t for t in ids if sampled(t, 0.05)}
    assert smaller < set(picked)  # raising the share adds traces, never swaps them
    assert not any(sampled(t, 0.0) for t in ids[:100])
    assert all(sampled(t, 1.0) for t in ids[:100])


def test_candidates_are_sampled_production_roots_not_keels_own_calls(store: Store) -> None:
    now = time.time()
    production = [call_span(end=now - i) for i in range(1, 4)]
    rag = rag_span(now - 5, [True])
    judge = call_span(end=now - 2, attributes={"keel.metadata.purpose": "eval.judge"})  # scoring's own call
    nested = call_span(end=now - 2, parent=new_id(8))  # inside a job item, an agent, an eval run
    failed = call_span(end=now - 2, status="error")
    old = call_span(end=now - 500)
    store.write_spans([*production, *rag, judge, nested, failed, old])
    found = candidates(store, online(), now - 100, now)
    assert {c.span_id for c in found} == {s.span_id for s in production} | {rag[0].span_id}
    assert {c.kind for c in found} == {"chat", "rag"}
    tagged = call_span(end=now - 1, attributes={"keel.tags": ["checkout"], "gen_ai.response.model": "gpt-x-2026"})
    store.write_spans([tagged])
    assert [c.span_id for c in candidates(store, online(tags=["checkout"]), now - 100, now)] == [tagged.span_id]
    assert [c.span_id for c in candidates(store, online(models=["gpt-x-2026"]), now - 100, now)] == [tagged.span_id]
    half = candidates(store, online(sample=0.5), now - 100, now)
    every = [*(c.trace_id for c in found), tagged.trace_id]
    assert {c.trace_id for c in half} == {t for t in every if sampled(t, 0.5)}


# --- scoring --------------------------------------------------------------------------------------------------


def judge_gateway(tmp_path: Path, store: Store, grade: Any) -> tuple[Gateway, list[str]]:
    asked: list[str] = []

    def answer(request: ChatRequest) -> str:
        text = str(request.messages[-1].content)
        asked.append(text)
        return str(grade(text))

    gw = gateway(tmp_path, store=store, models={"judge": FunctionModel(answer)})
    return gw, asked


JUDGE = OnlineScorer(type="judge", rubric="Is the answer polite?", model="judge")


def test_each_scorer_writes_one_row_per_call_and_a_rerun_calls_no_judge(tmp_path: Path, store: Store) -> None:
    now = time.time()
    schema = {"type": "object", "required": ["total"], "properties": {"total": {"type": "number"}}}
    fmt = {"name": "invoice", "schema": schema}
    good = call_span(end=now - 3, request={"messages": [], "response_format": fmt}, output={"text": '{"total": 3}'})
    bad = call_span(end=now - 2, request={"messages": [], "response_format": fmt}, output={"text": '{"sum": 3}'})
    rag = rag_span(now - 1, [True, True, False], prompt="v7")
    store.write_spans([good, bad, *rag])
    gw, asked = judge_gateway(tmp_path, store, lambda _: "Fine.\nSCORE: 4")
    config = online(scorers=[OnlineScorer(type="faithfulness"), OnlineScorer(type="format"), JUDGE])

    async def score_all() -> list[dict[str, Any]]:
        return [await score_span(store, gw, config, s.trace_id, s.span_id) for s in (good, bad, rag[0])]

    first = asyncio.run(score_all())
    assert [r["written"] for r in first] == [2, 2, 2]  # format + judge, format + judge, faithfulness + judge
    assert len(asked) == 3
    again = asyncio.run(score_all())  # the step DBOS runs again after a kill -9
    assert [r["written"] for r in again] == [0, 0, 0] and len(asked) == 3
    rows = store.query("SELECT span_id, scorer, value, model_version, prompt_version FROM keel_eval_online_scores")
    by = {(r[0], r[1]): r for r in rows}
    assert len(rows) == 6
    assert by[(good.span_id, "format")][2] == 1.0 and by[(bad.span_id, "format")][2] == 0.0
    assert by[(rag[0].span_id, "faithfulness")][2] == pytest.approx(2 / 3)
    assert by[(rag[0].span_id, "judge")][2] == 0.75  # SCORE 4 on 1..5
    assert by[(rag[0].span_id, "faithfulness")][3:] == ("answer-model-2", "v7")  # the answering call's model
    assert by[(good.span_id, "format")][3:] == ("prod", "-")  # no response model: the request model
    gw.close()


def test_a_judge_that_fails_is_recorded_as_errored_never_as_a_score(tmp_path: Path, store: Store) -> None:
    now = time.time()
    span = call_span(end=now - 1)
    store.write_spans([span])
    gw, asked = judge_gateway(tmp_path, store, lambda _: "I would rather not grade this.")
    result = asyncio.run(score_span(store, gw, online(scorers=[JUDGE]), span.trace_id, span.span_id))
    assert "UnparseableJudgement" in result["errors"]["judge"]
    assert len(asked) == 3  # asked, then re-asked `retries` (2) times
    value, error = store.query("SELECT value, error FROM keel_eval_online_scores")[0]
    assert value is None and "SCORE" in error
    report = quality(store, since=now - 100, until=now + 1, period_s=3600)
    assert [(r.n, r.errors, r.mean) for r in report.rows] == [(0, 1, None)]
    gw.close()


def test_versions_come_from_the_gateways_own_spans(tmp_path: Path) -> None:
    """Model version = what the provider reported; prompt version = metadata prompt_version."""
    store_path = str(tmp_path / "s.db")

    def prod(request: ChatRequest) -> ModelResponse:
        return ModelResponse(text="Hello there.", model="prod-2026-12-01")

    gw = gateway(tmp_path, store=store_path, models={"prod": FunctionModel(prod)})
    asyncio.run(gw.chat("hi", "prod", metadata={"prompt_version": "v3"}))
    gw.flush()
    assert gw.store is not None
    ensure_tables(gw.store)
    [found] = candidates(gw.store, online(), time.time() - 60, time.time() + 1)
    gw2, _ = judge_gateway(tmp_path / "j", gw.store, lambda _: "SCORE: 5")
    asyncio.run(score_span(gw.store, gw2, online(scorers=[JUDGE]), found.trace_id, found.span_id))
    rows = gw.store.query("SELECT model_version, prompt_version, value FROM keel_eval_online_scores")
    assert [tuple(r) for r in rows] == [("prod-2026-12-01", "v3", 1.0)]
    gw.close()
    gw2.close()


# --- the scheduler ----------------------------------------------------------------------------------------------


def test_scheduler_hands_out_each_closed_interval_once_across_replicas(tmp_path: Path, store: Store) -> None:
    path = write_config(tmp_path, "[evals.online]\nsample = 1.0\ninterval_s = 60\nsettle_s = 10\n")
    config = load_config(path)
    submitted: list[tuple[str, list[str]]] = []

    def submit(name: str, items: Any) -> None:
        submitted.append((name, sorted(items)))

    ensure_tables(store)
    start = 1_800_000_000.0  # an interval boundary
    replicas = [OnlineScheduler(config, store, submit=submit) for _ in range(2)]
    assert replicas[0].tick(start + 10) == []  # the first tick only sets the watermark: scoring starts now
    spans = [call_span(end=start + 5), call_span(end=start + 50), call_span(end=start + 65)]
    store.write_spans(spans)
    assert replicas[0].tick(start + 65) == []  # the first interval is not settled yet
    names = replicas[1].tick(start + 71) + replicas[0].tick(start + 72)
    assert names == ["evals.online:20270115T080000Z"]  # the other replica found the watermark moved
    assert submitted[0][1] == sorted(f"{s.trace_id}:{s.span_id}" for s in spans[:2])
    assert replicas[0].tick(start + 200) == ["evals.online:20270115T080100Z"]  # catches up
    assert replicas[0].watermark() == start + 180


# --- quality over time and the drop alert ------------------------------------------------------------------------


def _traffic(tmp_path: Path, store_path: str, versions: list[tuple[str, list[bool]]]) -> Gateway:
    """Production calls through a gateway: for each (prompt version, [good?...]) a call per entry; the
    judge (a scripted model) grades a good answer 5 and a bad one 2."""

    def prod(request: ChatRequest) -> str:
        return str(request.messages[-1].content)

    def judge(request: ChatRequest) -> str:
        return "SCORE: 5" if "Output to grade:\ngood" in str(request.messages[-1].content) else "SCORE: 2"

    toml = (
        '[models.judge]\nprovider = "test"\nmodel = "judge"\n\n'
        '[evals.online]\nsample = 1.0\nscorers = [{type = "judge", rubric = "Helpful?", model = "judge"}]\n'
    )
    gw = gateway(tmp_path, toml, store=store_path, models={"prod": FunctionModel(prod), "judge": FunctionModel(judge)})

    async def run() -> None:
        for prompt, answers in versions:
            for i, ok in enumerate(answers):  # distinct questions: a repeated pair counts once in the drop test
                await gw.chat(f"{'good' if ok else 'bad'} {prompt} {i}", "prod", metadata={"prompt_version": prompt})
        gw.flush()
        assert gw.store is not None
        for c in candidates(gw.store, online_config(gw.config), time.time() - 600, time.time() + 1):
            await score_span(gw.store, gw, online_config(gw.config), c.trace_id, c.span_id)

    asyncio.run(run())
    return gw


ALERT = '[alerts.faith]\nmetric = "quality_drop"\nscorer = "judge"\nthreshold = 0.1\nmin_n = 20\nwindow = "1h"\n'


def test_a_drop_after_a_prompt_change_fires_the_alert(
    tmp_path: Path, store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = [i % 10 != 0 for i in range(30)]  # 90% good
    after = [i % 2 == 0 for i in range(30)]  # 50% good
    gw = _traffic(tmp_path, store_url, [("v1", before), ("v2", after)])
    assert gw.store is not None
    test = drop_test(gw.store, "judge", since=time.time() - 3600, until=time.time() + 1)
    assert (test.n_before, test.n_after) == (30, 30) and test.change is not None
    assert test.change.prompt_version == "v2" and test.p_value is not None and test.p_value < 0.001
    config = load_config(write_config(tmp_path, (tmp_path / "keel.toml").read_text() + ALERT))
    [row] = asyncio.run(AlertEvaluator(config, gw.store).evaluate_once())
    assert row.state == "firing"
    assert "function / prompt v1 -> function / prompt v2" in row.message
    assert "n = 30 before, 30 after; min_n = 20" in row.message and "Welch" in row.message
    assert row.value == pytest.approx(0.75 * 0.9 + 0.0 - 0.75 * 0.5, abs=1e-9)
    monkeypatch.setenv("KEEL_STORE", store_url)  # `keel alerts list` reads the state the evaluator wrote
    listed = CliRunner().invoke(app, ["alerts", "list", "--json"])
    assert listed.exit_code == 0, listed.output
    [shown] = json.loads(listed.output)
    assert shown["state"] == "firing" and shown["value"] == pytest.approx(0.3)
    assert "at least 20 scores on each side" in shown["condition"]
    gw.close()


def test_replicas_submitting_the_same_interval_make_one_job(tmp_path: Path, store_url: str) -> None:
    """Two schedulers (two replicas) on one store, each with its own job runner: one job, each call once."""
    config = load_config(write_config(tmp_path, "[evals.online]\nsample = 1.0\ninterval_s = 60\nsettle_s = 0\n"))
    stores = [open_store(store_url) for _ in range(2)]
    ensure_tables(stores[0])
    start = math.floor(time.time() / 60) * 60 - 60
    spans = [call_span(end=start + 1 + i) for i in range(5)]
    stores[0].write_spans(spans)
    replicas = [OnlineScheduler(config, s) for s in stores]
    names = []
    for replica in replicas:  # the race: both read the watermark before either moved it
        stores[0].execute("DELETE FROM keel_eval_online_state")
        replica._start(start)
        names.append(replica.tick())
    assert names == [[f"evals.online:{_stamp(start)}"]] * 2  # the second submission resumes the first job
    jobs_rows = stores[0].query("SELECT name, kind, queue, total FROM keel_jobs")
    assert [tuple(r) for r in jobs_rows] == [(f"evals.online:{_stamp(start)}", "evals.online", "evals.online", 5)]
    for replica, store in zip(replicas, stores, strict=True):
        replica.close()
        store.close()


@pytest.mark.parametrize("case", ["no change", "same quality", "too few"])
def test_no_alert_without_a_significant_drop(tmp_path: Path, case: str) -> None:
    steady = [i % 10 != 0 for i in range(30)]
    versions = {
        "no change": [("v1", steady + steady)],
        "same quality": [("v1", steady), ("v2", steady)],
        "too few": [("v1", steady), ("v2", [False] * 10)],
    }[case]
    gw = _traffic(tmp_path, str(tmp_path / "s.db"), versions)
    assert gw.store is not None
    config = load_config(write_config(tmp_path, (tmp_path / "keel.toml").read_text() + ALERT))
    [row] = asyncio.run(AlertEvaluator(config, gw.store).evaluate_once())
    assert row.state == "ok"
    expected = {
        "no change": "no model or prompt version change",
        "same quality": "not significant",
        "too few": "n = 30 before, 10 after; min_n = 20",
    }[case]
    assert expected in row.message
    gw.close()


def test_quality_by_period_model_and_prompt_version(tmp_path: Path) -> None:
    steady = [i % 4 != 0 for i in range(8)]
    gw = _traffic(tmp_path, str(tmp_path / "s.db"), [("v1", steady), ("v2", [True] * 4)])
    assert gw.store is not None
    report = quality(gw.store, since=time.time() - 3600, until=time.time() + 1, period_s=86_400)
    rows = {(r.model_version, r.prompt_version): r for r in report.rows}
    v1, v2 = rows[("function", "v1")], rows[("function", "v2")]
    assert (v1.n, v2.n) == (8, 4)
    assert v1.mean == pytest.approx(0.75 * 1.0 + 0.25 * 0.25)
    assert v1.low is not None and v1.high is not None and v1.low < v1.mean < v1.high
    assert v2.mean == 1.0 and v2.low == v2.high == 1.0  # no spread, no width
    assert [(c.model_version, c.prompt_version) for c in report.changes] == [("function", "v2")]
    gw.close()


# --- configuration ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[evals.online]\nscorers = [{type = "bleu"}]\n', "faithfulness"),
        ('[evals.online]\nscorers = [{type = "judge"}]\n', "needs a `rubric`"),
        ("[evals.online]\nsample = 1.5\n", "less than or equal to 1"),
        ('[evals.online]\nscorers = [{type = "judge", rubric = "ok?", model = "nope"}]\n', "'nope' is not configured"),
        (ALERT.replace("min_n = 20\n", ""), "needs `min_n`"),
        (ALERT.replace('scorer = "judge"\n', ""), "needs `scorer`"),
        (ALERT.replace("threshold = 0.1", "threshold = 5"), "in (0, 1]"),
        (ALERT.replace('scorer = "judge"', 'scorer = "helpfulness"'), "scorer 'helpfulness'"),
        ('[alerts.x]\nmetric = "error_rate"\nthreshold = 0.1\nscorer = "judge"\n', "quality_drop"),
        # sampling calls with no scorer would score nothing, silently
        ("[evals.online]\nsample = 0.5\nscorers = []\n", "no scorers"),
        # a judge's fields on another scorer would be ignored, silently
        ('[evals.online]\nscorers = [{type = "format", rubric = "ok?", samples = 3}]\n', "judge scorer's only"),
        # an embedding model cannot grade: every item would error at run time
        ('[evals.online]\nscorers = [{type = "judge", rubric = "ok?", model = "local-embed"}]\n', "chat model"),
    ],
)
def test_bad_online_or_alert_configuration_is_a_clear_error(tmp_path: Path, text: str, message: str) -> None:
    base = '[evals.online]\nsample = 0.1\nscorers = [{type = "judge", rubric = "ok?"}]\n'
    body = text if text.startswith("[evals.online]") else base + text
    with pytest.raises(ConfigError) as info:
        load_config(write_config(tmp_path, body))
    assert message in str(info.value)


# --- the durable job: a real `keel worker`, killed with -9 and restarted --------------------------------------------

KEEL = [sys.executable, "-c", "from keel.cli.app import main; main()"]
SRC = Path(__file__).parent.parent / "src"


def _worker(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    command = [*KEEL, "worker", "--id", "online-w1"]
    return subprocess.Popen(command, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT)


def _rows(store: Store) -> list[tuple[Any, ...]]:
    return [tuple(r) for r in store.query("SELECT span_id, scorer, value, error FROM keel_eval_online_scores")]


def _closed_interval(tmp_path: Path, toml: str, back_s: int) -> tuple[dict[str, str], Store, float]:
    """keel.toml `toml` and a store whose scoring watermark is at the start of the minute `back_s` seconds ago:
    a process started with the env scores the calls written from there on. The env, the store, that start."""
    config = write_config(tmp_path, toml)
    store_path = tmp_path / "keel.db"
    env = {**os.environ, "KEEL_CONFIG": str(config), "KEEL_STORE": str(store_path), "PYTHONPATH": str(SRC)}
    store = open_store(str(store_path))
    ensure_tables(store)
    start = math.floor(time.time() / 60) * 60 - back_s
    store.execute("INSERT INTO keel_eval_online_state (name, watermark) VALUES ('watermark', ?)", [start])
    return env, store, start


def _wait_for_rows(store: Store, count: int, process: subprocess.Popen[bytes], log: Path, timeout_s: float) -> None:
    """Until `count` score rows are stored, while `process` lives (its log's tail if it dies or time runs out)."""
    deadline = time.monotonic() + timeout_s
    while len(_rows(store)) < count:
        assert time.monotonic() < deadline and process.poll() is None, log.read_text()[-3000:]
        time.sleep(0.05)


@pytest.mark.slow
def test_kill_9_mid_job_then_restart_scores_every_sampled_call_exactly_once(tmp_path: Path) -> None:
    n = 24  # calls of the interval two closed intervals ago
    env, store, start = _closed_interval(tmp_path, (
        '[models.judge]\nprovider = "test"\nmodel = "judge"\nscript = ["Polite.\\nSCORE: 4"]\ndelay_s = 0.25\n\n'
        '[evals.online]\nsample = 1.0\ninterval_s = 60\nsettle_s = 0\n'
        'scorers = [{type = "judge", rubric = "Polite?", model = "judge"}]\n\n'
        '[jobs]\npoll_s = 0.05\nheartbeat_s = 0.5\ndead_after_s = 2\n'
    ), 120)  # fmt: skip
    spans = [call_span(end=start + 1 + i, output={"text": f"answer {i}"}) for i in range(n)]  # judged one by one
    store.write_spans(spans)
    log = tmp_path / "worker.log"
    worker = _worker(env, log)
    try:
        _wait_for_rows(store, 4, worker, log, 60)
        worker.send_signal(signal.SIGKILL)  # mid-job: items running, others queued
        worker.wait(timeout=30)
        killed_at = len(_rows(store))
        assert killed_at < n
        worker = _worker(env, log)  # the same id: DBOS hands it back its pending items at once
        _wait_for_rows(store, n, worker, log, 90)
        time.sleep(1.0)  # anything run twice would land now
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=60)
    rows = _rows(store)
    assert sorted(r[0] for r in rows) == sorted(s.span_id for s in spans)  # none lost, none twice
    assert {(r[1], r[2], r[3]) for r in rows} == {("judge", 0.75, None)}
    jobs_rows = store.query("SELECT name, done, failed, total FROM keel_jobs WHERE kind = 'evals.online'")
    assert [tuple(r) for r in jobs_rows] == [(f"evals.online:{_stamp(start)}", n, 0, n)]
    judge_calls = store.query("SELECT COUNT(*) FROM spans WHERE operation = 'chat' AND parent_id IS NOT NULL")[0][0]
    assert n <= judge_calls <= n + 4  # a call in flight at the kill may run again (4 at once); its row does not
    store.close()


@pytest.mark.slow
def test_keel_serve_scores_sampled_calls_with_its_embedded_worker(tmp_path: Path) -> None:
    """No `keel worker` anywhere: the server hands out the interval and its own worker scores it."""
    from stubs import free_port

    n = 6
    env, store, start = _closed_interval(tmp_path, (
        '[models.judge]\nprovider = "test"\nmodel = "judge"\nscript = ["SCORE: 5"]\n\n'
        '[evals.online]\nsample = 1.0\ninterval_s = 60\nsettle_s = 0\n'
        'scorers = [{type = "format"}, {type = "judge", rubric = "Polite?", model = "judge"}]\n\n'
        '[jobs]\npoll_s = 0.05\n'
    ), 60)  # fmt: skip
    fmt = {"name": "o", "schema": {"type": "object"}}
    spans = [call_span(end=start + 1 + i, request={"messages": [], "response_format": fmt},
                       output={"text": "{}" if i % 2 else "not json"}) for i in range(n)]  # fmt: skip
    store.write_spans(spans)
    log = tmp_path / "serve.log"
    server = subprocess.Popen([*KEEL, "serve", "--port", str(free_port())], env=env, stdout=log.open("ab"),
                              stderr=subprocess.STDOUT)  # fmt: skip
    try:
        _wait_for_rows(store, 2 * n, server, log, 60)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    by = {(r[0], r[1]): r[2] for r in _rows(store)}
    assert [by[(s.span_id, "format")] for s in spans] == [0.0, 1.0] * (n // 2)
    assert {by[(s.span_id, "judge")] for s in spans} == {1.0}
    store.close()


def test_the_judges_cost_shows_in_the_quality_report_and_the_cli(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # what the judge calls cost is the price of watching quality: an engineer must see it next to the scores
    from keel.evals.online import SCORE_COLUMNS, _write

    store_path = tmp_path / "s.db"
    monkeypatch.setenv("KEEL_STORE", str(store_path))  # what `keel eval quality` reads
    store = open_store(str(store_path))
    ensure_tables(store)
    now = time.time()
    rows = [
        dict(zip(SCORE_COLUMNS, (new_trace_id(), new_id(8), scorer, "chat", "m", "v1", now - 10, 1.0, None, None,
                                 cost, None, now, None, None), strict=True))
        for scorer, cost in (("judge", 0.002), ("judge", 0.003), ("format", None))
    ]  # fmt: skip
    _write(store, [tuple(r.values()) for r in rows])
    report = quality(store, since=now - 3600, until=now + 1, period_s=86_400)
    by = {r.scorer: r for r in report.rows}
    assert by["judge"].cost_usd == pytest.approx(0.005) and by["format"].cost_usd == 0.0
    assert report.to_json()["cost_usd"] == pytest.approx(0.005)
    assert report.to_json()["rows"][1]["cost_usd"] == pytest.approx(0.005)
    store.close()
    result = CliRunner().invoke(app, ["eval", "quality", "--since", "1h"], env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    assert "cost" in result.output and "$0.0050" in result.output


def test_a_call_that_never_gave_valid_json_scores_format_0_and_nothing_else(tmp_path: Path, store: Store) -> None:
    # the gateway re-asks a model whose JSON is invalid and fails the call after its tries: were only the calls
    # that succeeded scored, format validity would read 1.0 however often the model failed the schema
    now = time.time()
    fmt = {"name": "invoice", "schema": {"type": "object", "required": ["total"]}}
    request = {"messages": [{"role": "user", "content": "total?"}], "response_format": fmt}
    answered = {"keel.model": "prod", "gen_ai.response.model": "gpt-x-2026-01"}
    good = call_span(end=now - 3, request=request, output={"text": '{"total": 3}'}, attributes=answered)
    failed = call_span(end=now - 2, request=request, status="error", attributes={"keel.model": "prod"})
    failed.output, failed.error_type = None, "StructuredOutputError"
    other = call_span(end=now - 1, request=request, status="error")  # a provider error says nothing of the format
    other.output, other.error_type = None, "ProviderError"
    store.write_spans([good, failed, other])
    found = candidates(store, online(), now - 100, now)
    assert [c.span_id for c in found] == [good.span_id, failed.span_id]
    gw, asked = judge_gateway(tmp_path, store, lambda _: "SCORE: 5")
    config = online(scorers=[OnlineScorer(type="format"), JUDGE])
    result = asyncio.run(score_span(store, gw, config, failed.trace_id, failed.span_id))
    assert result["written"] == 1 and asked == []  # no answer to judge
    # a failed call reports no response model: the one its model answered with last, not a version of its own
    assert store.query("SELECT scorer, value, model_version FROM keel_eval_online_scores") == [
        ("format", 0.0, "gpt-x-2026-01")
    ]
    gw.close()


def test_the_cap_per_interval_takes_a_uniform_subset_not_the_intervals_first_calls(store: Store) -> None:
    # more sampled calls than max_per_interval: taking the oldest would score only the interval's first minutes
    # (a morning's traffic, never the evening's); the lowest hashes are as random and every replica agrees
    now = time.time()
    calls = [call_span(end=now - 60 + i) for i in range(40)]
    store.write_spans(calls)
    found = candidates(store, online(max_per_interval=10), now - 100, now)
    assert len(found) == 10
    rank = sorted(calls, key=lambda s: hashlib.sha256(s.trace_id.encode()).digest())
    assert {c.span_id for c in found} == {s.span_id for s in rank[:10]}
    assert [c.span_id for c in found] == [s.span_id for s in calls if s.span_id in {c.span_id for c in found}]


def test_a_judge_of_a_rag_answer_sees_the_sources_the_model_answered_from(tmp_path: Path, store: Store) -> None:
    # "is the answer supported by its sources?" cannot be graded from the question alone
    root, child = rag_span(time.time() - 1, [True])
    prompt = "[1] The sky on Mars is butterscotch.\n\nQuestion: what?"
    child.input = {"messages": [{"role": "system", "content": "Answer from the sources."},
                                {"role": "user", "content": prompt}]}  # fmt: skip
    store.write_spans([root, child])
    gw, asked = judge_gateway(tmp_path, store, lambda _: "SCORE: 4")
    asyncio.run(score_span(store, gw, online(scorers=[JUDGE]), root.trace_id, root.span_id))
    assert len(asked) == 1 and "The sky on Mars is butterscotch." in asked[0]
    gw.close()


# --- bounded catch-up ----------------------------------------------------------------------------------------


def test_catch_up_after_a_long_pause_is_bounded_and_the_skip_logged_once(
    tmp_path: Path, store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_config(tmp_path, "[evals.online]\nsample = 1.0\ninterval_s = 60\nsettle_s = 0\nmax_backfill_s = 300\n")
    config = load_config(path)
    assert online_config(config).max_backfill_s == 300
    submitted: list[str] = []
    ensure_tables(store)
    start = 1_800_000_000.0
    scheduler = OnlineScheduler(config, store, submit=lambda name, items: submitted.append(name))
    scheduler.tick(start)  # the watermark: sampling on at `start`
    later = start + 86_400  # off (or down) for a day, then on again
    store.write_spans([call_span(end=start + 30), call_span(end=later - 250), call_span(end=later - 30)])
    with caplog.at_level("WARNING", logger="keel.evals.online"):
        names = scheduler.tick(later) + scheduler.tick(later + 60)
    assert names == [f"evals.online:{_stamp(later - 300)}", f"evals.online:{_stamp(later - 60)}"]
    skips = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(skips) == 1 and "max_backfill_s = 300" in skips[0], skips
    assert "2027-01-15T08:00:00+00:00 to 2027-01-16T07:55:00+00:00" in skips[0], skips
    assert scheduler.skipped() == (start, later - 300)
    assert OnlineConfig(sample=1.0, interval_s=600).backfill_s == 12 * 600  # the default: a few intervals
    with pytest.raises(ValueError, match="max_backfill_s"):
        OnlineConfig(sample=1.0, interval_s=600, max_backfill_s=60)


# --- the drop test with several models at once ----------------------------------------------------------------


def _two_models(tmp_path: Path, calls: list[tuple[str, str, bool]]) -> Gateway:
    """Production calls of two configured models interleaved: (model alias, prompt version, good?) each,
    all scored by the scripted judge (good 5, bad 2)."""

    def prod(request: ChatRequest) -> str:
        return str(request.messages[-1].content)

    def judge(request: ChatRequest) -> str:
        return "SCORE: 5" if "Output to grade:\ngood" in str(request.messages[-1].content) else "SCORE: 2"

    toml = (
        '[models.judge]\nprovider = "test"\nmodel = "judge"\n\n'
        '[evals.online]\nsample = 1.0\nscorers = [{type = "judge", rubric = "Helpful?", model = "judge"}]\n'
    )
    models = {"fast": FunctionModel(prod), "smart": FunctionModel(prod), "judge": FunctionModel(judge)}
    gw = gateway(tmp_path, toml, store=str(tmp_path / "s.db"), models=models)

    async def run() -> None:
        for i, (alias, prompt, ok) in enumerate(calls):
            await gw.chat(f"{'good' if ok else 'bad'} {i}", alias, metadata={"prompt_version": prompt})
        gw.flush()
        assert gw.store is not None
        for c in candidates(gw.store, online_config(gw.config), time.time() - 600, time.time() + 1):
            await score_span(gw.store, gw, online_config(gw.config), c.trace_id, c.span_id)

    asyncio.run(run())
    return gw


@pytest.mark.parametrize("smart_after", ["same", "worse"])
def test_the_drop_test_compares_a_model_with_its_own_earlier_scores(tmp_path: Path, smart_after: str) -> None:
    """`smart` (90% good) and `fast` (50% good) serve at once; only fast's prompt moves to v2. Fast's own v1
    scores are the before group: smart's, mixed in, would show a drop that no version change caused."""
    calls = [(alias, "v1", i % 10 != 0 if alias == "smart" else i % 2 == 0)
             for i in range(40) for alias in ("smart", "fast")]  # fmt: skip
    fast_v2 = [i % 2 == 0 for i in range(40)] if smart_after == "same" else [i % 5 == 0 for i in range(40)]
    calls += [c for i in range(40) for c in (("smart", "v1", i % 10 != 0), ("fast", "v2", fast_v2[i]))]
    gw = _two_models(tmp_path, calls)
    assert gw.store is not None
    test = drop_test(gw.store, "judge", since=time.time() - 3600, until=time.time() + 1)
    assert test.change is not None and test.change.prompt_version == "v2" and test.model == "fast"
    assert (test.n_before, test.n_after) == (40, 40)
    assert test.mean_before == pytest.approx(0.5 * 1.0 + 0.5 * 0.25)  # fast's v1 only
    assert test.p_value is not None
    if smart_after == "same":
        assert test.p_value > 0.2
    else:
        assert test.p_value < 0.01
    config = load_config(write_config(tmp_path, (tmp_path / "keel.toml").read_text() + ALERT))
    [row] = asyncio.run(AlertEvaluator(config, gw.store).evaluate_once())
    assert row.state == ("ok" if smart_after == "same" else "firing"), row.message
    assert "fast: function / prompt v1 -> function / prompt v2" in row.message
    gw.close()


# --- repeated questions and answers in the drop test ----------------------------------------------------------


def test_a_repeated_question_and_answer_counts_once_in_the_drop_test(tmp_path: Path) -> None:
    """One question asked 30 times after a prompt change (a retry loop, a load test) is one sample, not 30:
    the judge's cached score of it would otherwise pass for 30 independent measurements."""
    before = [(f"good {i}" if i % 4 else f"bad {i}") for i in range(30)]  # 30 distinct calls, 75% good
    after = [f"good {i}" for i in range(3)] + ["bad again"] * 30  # 3 distinct good + one bad pair 30 times
    gw = _two_models(tmp_path, [])  # a gateway and its judge, no traffic yet
    assert gw.store is not None

    async def run() -> None:
        for prompt, texts in (("v1", before), ("v2", after)):
            for text in texts:
                await gw.chat(text, "fast", metadata={"prompt_version": prompt})
        gw.flush()
        assert gw.store is not None
        for c in candidates(gw.store, online_config(gw.config), time.time() - 600, time.time() + 1):
            await score_span(gw.store, gw, online_config(gw.config), c.trace_id, c.span_id)

    asyncio.run(run())
    test = drop_test(gw.store, "judge", since=time.time() - 3600, until=time.time() + 1)
    assert (test.n_before, test.n_after) == (30, 4)
    assert (test.calls_before, test.calls_after) == (30, 33)
    assert test.mean_after == pytest.approx((3 * 1.0 + 0.25) / 4)
    config = load_config(write_config(tmp_path, (tmp_path / "keel.toml").read_text() + ALERT))
    [row] = asyncio.run(AlertEvaluator(config, gw.store).evaluate_once())
    assert row.state == "ok"  # 4 distinct answers after the change: below min_n = 20
    assert "n = 30 before, 4 after (distinct question and answer pairs; 30 and 33 calls); min_n = 20" in row.message
    gw.close()
