"""Alert rules: configuration, measuring on both stores, the state machine, webhooks and `keel alerts`."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from helpers import gateway, write_config
from keel import FunctionModel, Gateway, TestModel
from keel.alerts import MAX_DELIVERY_ATTEMPTS, AlertEvaluator, describe, evaluate, next_state
from keel.cli.app import app
from keel.config import AlertRule, load_config, window_seconds
from keel.errors import ConfigError, ServerError
from keel.store import Store
from keel.store.alerts import CallStats, CallWindow, measure, read_alerts
from keel.trace import Span, new_id, new_trace_id
from keel.types import ChatRequest
from serving import LOCAL
from stubs import free_port

# --- a webhook receiver, and a clock the tests can move ------------------------------------


class Receiver:
    """A real HTTP server on a local port that keeps the JSON body of every POST."""

    def __init__(self, port: int = 0, status: int = 200) -> None:
        self.bodies: list[dict[str, Any]] = []
        bodies, answer = self.bodies, status

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers["content-length"])
                bodies.append(json.loads(self.rfile.read(length)))
                self.send_response(answer)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks/secret-token"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def statuses(self) -> list[str]:
        return [body["status"] for body in self.bodies]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    hook = Receiver()
    yield hook
    hook.close()


class Clock:
    """Real time, until a test sets `at`."""

    def __init__(self) -> None:
        self.at: float | None = None

    def __call__(self) -> float:
        return time.time() if self.at is None else self.at


def rule(**fields: Any) -> AlertRule:
    return AlertRule.model_validate({"metric": "error_rate", "threshold": 0.05, **fields})


# --- configuration -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "line", "field", "message"),
    [
        (
            '[alerts.slow]\nmetric = "p95_latency_ms"\nthreshold = 8000\nwindow = "10 minutes"\n',
            4,
            "alerts.slow.window",
            'write "30s", "10m", "1h", "1d" or "today"',
        ),
        (
            '[alerts.slow]\nmetric = "p95_latency_ms"\nthreshold = 8000\nwindow = "0m"\n',
            4,
            "alerts.slow.window",
            "not a duration",
        ),
        ('[alerts.x]\nmetric = "p90"\nthreshold = 1\n', 2, "alerts.x.metric", "'error_rate'"),
        (
            '[models.a]\nprovider = "test"\nmodel = "a"\n\n'
            '[alerts.x]\nmetric = "errors"\nthreshold = 1\nmodel = "ghost"\n',
            8,
            "alerts.x.model",
            "alert 'x' watches unknown model 'ghost'",
        ),
        ('[alerts.x]\nmetric = "error_rate"\nthreshold = 5\n', 3, "alerts.x.threshold", "write 0.05 for 5%, not 5"),
        ('[alerts.x]\nmetric = "errors"\nthreshold = 1\nop = "!="\n', 4, "alerts.x.op", "Input should be"),
        ('[alerts.x]\nmetric = "errors"\nthreshold = 1\nwebhook = "hooks.example"\n', 4, "alerts.x.webhook", "http://"),
        ('[alerting]\nwebhook = "ftp://x"\n', 2, "alerting.webhook", "http://"),
        ('[alerts.x]\nmetric = "errors"\nthreshold = 1\nwindw = "1h"\n', 4, "alerts.x.windw", "unknown field"),
    ],
)
def test_config_errors_name_file_line_and_field(tmp_path: Path, text: str, line: int, field: str, message: str) -> None:
    path = write_config(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})
    assert caught.value.field == field and caught.value.line == line
    assert message in str(caught.value) and f"{path}:{line} [{field}]" in str(caught.value)


def test_config_accepts_rules_aliases_and_env_webhook(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        '[aliases]\nfast = "gpt-4o-mini"\n[alerting]\ninterval_s = 5\n'
        '[alerts.fast-errors]\nmetric = "error_rate"\nthreshold = 0.05\nmodel = "fast"\n'
        '[alerts.spend]\nmetric = "cost_usd"\nthreshold = 20\nwindow = "today"\nkey = "team-a"\n',
    )
    config = load_config(path, environ={"KEEL_ALERTING__WEBHOOK": "https://hooks.example/T0/B0/x"})
    assert config.alerting.webhook == "https://hooks.example/T0/B0/x" and config.alerting.interval_s == 5
    assert describe(config.alerts["fast-errors"]) == "error rate of fast > 5% over 10m"
    assert describe(config.alerts["spend"]) == "cost of all models for key team-a > $20.00 today (UTC)"


@pytest.mark.parametrize(("window", "seconds"), [("30s", 30), ("10m", 600), ("1.5h", 5400), ("1d", 86400)])
def test_windows(window: str, seconds: float) -> None:
    assert window_seconds(window) == seconds
    assert window_seconds("today") is None


# --- rules, pure ----------------------------------------------------------------------


def test_evaluation_messages() -> None:
    errors = evaluate(rule(model="gpt-4o-mini"), CallStats(calls=64, errors=8, cost_usd=0.0))
    assert errors.holds and errors.value == 0.125
    assert errors.message == "error rate of gpt-4o-mini 12.5% > 5% over 10m (8 of 64 calls)"
    fine = evaluate(rule(model="gpt-4o-mini"), CallStats(calls=64, errors=1, cost_usd=0.0))
    assert not fine.holds and fine.message == "error rate of gpt-4o-mini 1.56% <= 5% over 10m (1 of 64 calls)"
    slow = evaluate(rule(metric="p95_latency_ms", threshold=8000), CallStats(20, 0, 0.0, latency_ms=9240.4))
    assert slow.holds and slow.message == "p95 latency of all models 9,240 ms > 8,000 ms over 10m (20 calls)"
    quiet = evaluate(rule(metric="requests", op="<", threshold=1, window="1h"), CallStats(0, 0, 0.0))
    assert quiet.holds and quiet.message == "requests of all models 0 < 1 over 1h"


def test_too_few_calls_are_not_judged() -> None:
    one_failure = evaluate(rule(), CallStats(calls=1, errors=1, cost_usd=0.0))
    assert not one_failure.holds and one_failure.value is None
    assert one_failure.message == "error rate of all models not judged over 10m: 1 calls (min_requests = 10)"
    assert evaluate(rule(min_requests=1), CallStats(calls=1, errors=1, cost_usd=0.0)).holds
    assert evaluate(rule(metric="errors", threshold=0), CallStats(calls=1, errors=1, cost_usd=0.0)).holds


def test_state_machine() -> None:
    assert next_state("ok", 0, True, 100, for_s=0) == "firing"
    assert next_state("ok", 0, True, 100, for_s=60) == "pending"
    assert next_state("pending", 100, True, 159, for_s=60) == "pending"
    assert next_state("pending", 100, True, 160, for_s=60) == "firing"
    assert next_state("pending", 100, False, 160, for_s=60) == "ok"
    assert next_state("firing", 100, True, 1000, for_s=60) == "firing"
    assert next_state("firing", 100, False, 1000, for_s=60) == "ok"


# --- measuring on both stores -------------------------------------------------------------


def call_span(
    start: float, duration_ms: float, *, model: str = "a", error: bool = False, attrs: dict[str, Any] | None = None
) -> Span:
    span = Span(
        trace_id=new_trace_id(),
        span_id=new_id(),
        parent_id=None,
        name=f"chat {model}",
        start_time=start,
        end_time=start + duration_ms / 1000,
        attributes={"gen_ai.operation.name": "chat", "keel.model": model, **(attrs or {})},
    )
    if error:
        span.fail(ServerError("upstream is down", status=503))
    return span


@pytest.fixture
def calls(store: Store) -> float:
    """100 recent calls of model `a` (1..100 ms, every tenth failed, $0.001 each, half by key `team`),
    5 older calls of `b`, and a RAG span around them that must not count. Returns `now`."""
    now = float(int(time.time()))  # whole seconds: window edges below are exact
    spans = [
        call_span(
            now - 200 + i,
            i,
            error=i % 10 == 0,
            attrs={"keel.cost_usd": 0.001, "keel.api_key": "team" if i % 2 == 0 else "ops"},
        )
        for i in range(1, 101)
    ]
    spans += [call_span(now - 1200, 5000, model="b", error=True) for _ in range(5)]
    rag = call_span(now - 100, 90_000, model="a", error=True)
    rag.attributes["gen_ai.operation.name"] = "rag"
    store.write_spans([*spans, rag])
    return now


def test_measure_counts_errors_cost_and_nearest_rank_latency(store: Store, calls: float) -> None:
    now = calls
    stats = measure(store, CallWindow(now - 600, now, percentile=0.95))
    # durations are stored as end - start: exact to about a microsecond
    assert (stats.calls, stats.errors) == (100, 10) and stats.latency_ms == pytest.approx(95.0, abs=0.01)
    assert stats.cost_usd == pytest.approx(0.1)
    assert measure(store, CallWindow(now - 600, now, percentile=0.99)).latency_ms == pytest.approx(99.0, abs=0.01)
    team = measure(store, CallWindow(now - 600, now, api_key="team", percentile=0.5))
    assert (team.calls, team.errors) == (50, 10)
    assert team.latency_ms == pytest.approx(50.0, abs=0.01)  # the even durations: 2..100
    assert measure(store, CallWindow(now - 3600, now, model="b")).calls == 5
    assert measure(store, CallWindow(now - 600, now, model="b")).calls == 0
    assert measure(store, CallWindow(now - 150, now - 120)).calls == 30  # started in [now-150, now-120)
    empty = measure(store, CallWindow(now + 1, now + 2, percentile=0.95))
    assert (empty.calls, empty.errors, empty.cost_usd, empty.latency_ms) == (0, 0, 0.0, None)


async def test_evaluator_records_states_in_the_store(
    store: Store, calls: float, receiver: Receiver, tmp_path: Path
) -> None:
    config = load_config(
        write_config(
            tmp_path,
            '[models.a]\nprovider = "test"\nmodel = "a"\n[models.b]\nprovider = "test"\nmodel = "b"\n'
            f'[alerting]\nwebhook = "{receiver.url}"\n'
            '[alerts.a-errors]\nmetric = "error_rate"\nthreshold = 0.05\nmodel = "a"\n'
            '[alerts.a-slow]\nmetric = "p95_latency_ms"\nthreshold = 90\n'
            '[alerts.a-very-slow]\nmetric = "p99_latency_ms"\nthreshold = 99\n'
            '[alerts.team-spend]\nmetric = "cost_usd"\nthreshold = 0.04\nwindow = "1h"\nkey = "team"\n'
            '[alerts.b-errors]\nmetric = "errors"\nop = ">="\nthreshold = 1\nmodel = "b"\nwindow = "5m"\n',
        ),
        environ={},
    )
    evaluator = AlertEvaluator(config, store, clock=lambda: calls)
    try:
        rows = {row.name: row for row in await evaluator.evaluate_once()}
    finally:
        await evaluator.aclose()
    assert {name: row.state for name, row in rows.items()} == {
        "a-errors": "firing", "a-slow": "firing", "a-very-slow": "ok", "team-spend": "firing", "b-errors": "ok",
    }  # fmt: skip
    assert rows["a-errors"].message == "error rate of a 10% > 5% over 10m (10 of 100 calls)"
    assert rows["a-very-slow"].message == "p99 latency of all models 99 ms <= 99 ms over 10m (100 calls)"
    assert rows["team-spend"].message == "cost of all models for key team $0.05 > $0.04 over 1h (50 calls)"
    assert sorted(body["alert"] for body in receiver.bodies) == ["a-errors", "a-slow", "team-spend"]
    assert read_alerts(store) == rows  # what another process (keel alerts list) reads


async def test_replicas_evaluating_the_same_rules_notify_once(
    store: Store, calls: float, receiver: Receiver, tmp_path: Path
) -> None:
    toml = f'[alerting]\nwebhook = "{receiver.url}"\n[alerts.e]\nmetric = "errors"\nthreshold = 5\n'
    config = load_config(write_config(tmp_path, toml), environ={})
    clock = Clock()
    replicas = [AlertEvaluator(config, store, clock=clock) for _ in range(4)]

    async def all_evaluate() -> None:
        await asyncio.gather(*(replica.evaluate_once() for replica in replicas))

    try:
        clock.at = calls - 3600  # an hour before the calls: nothing to alert on
        await all_evaluate()
        clock.at = calls
        await all_evaluate()
        await all_evaluate()
    finally:
        for replica in replicas:
            await replica.aclose()
    assert receiver.statuses() == ["firing"]
    assert read_alerts(store)["e"].state == "firing"


# --- the alert test: a model that starts failing, then recovers ------------------------------


class Flaky:
    """Answers `ok_calls` times, then fails with a 503 until `recovered`."""

    def __init__(self, ok_calls: int) -> None:
        self.ok_calls = ok_calls
        self.calls = 0
        self.recovered = False

    def __call__(self, request: ChatRequest) -> str:
        self.calls += 1
        if self.calls > self.ok_calls and not self.recovered:
            raise ServerError("upstream is down", status=503)
        return "fine"


def flaky_gateway(tmp_path: Path, flaky: Flaky, webhook: str) -> Gateway:
    toml = (
        'max_retries = 0\n[circuit_breaker]\nfailures = 1000\n[models.flaky]\nprovider = "test"\nmodel = "flaky"\n'
        f'[alerting]\nwebhook = "{webhook}"\n'
        '[alerts.flaky-errors]\nmetric = "error_rate"\nthreshold = 0.05\nwindow = "10m"\nmodel = "flaky"\n'
        'min_requests = 5\ndescription = "the flaky model fails"\n'
    )
    return gateway(tmp_path, toml, models={"flaky": FunctionModel(flaky)})


def cli_list(tmp_path: Path, *args: str) -> Any:
    result = CliRunner().invoke(
        app, ["alerts", "list", *args], env={"KEEL_CONFIG": str(tmp_path / "keel.toml"), "COLUMNS": "250"}
    )
    assert result.exit_code == 0, result.output
    return result


async def test_a_failing_model_fires_the_alert_then_it_resolves(
    tmp_path: Path, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="keel.alerts")
    flaky, clock = Flaky(ok_calls=8), Clock()
    async with flaky_gateway(tmp_path, flaky, receiver.url) as gw:
        assert gw.store is not None
        evaluator = AlertEvaluator(gw.config, gw.store, clock=clock)
        for _ in range(8):
            await gw.chat("hi", model="flaky")
        gw.flush()
        [row] = await evaluator.evaluate_once()
        assert row.state == "ok" and receiver.bodies == []
        assert row.message == "error rate of flaky 0% <= 5% over 10m (0 of 8 calls)"

        for _ in range(4):
            with pytest.raises(ServerError):
                await gw.chat("hi", model="flaky")
        gw.flush()
        [row] = await evaluator.evaluate_once()
        firing = "alert flaky-errors FIRING: error rate of flaky 33.3% > 5% over 10m (4 of 12 calls)"
        assert row.state == "firing"
        assert [r.getMessage() for r in caplog.records if r.name == "keel.alerts"] == [firing]
        [body] = receiver.bodies
        assert body["text"] == firing and body["status"] == "firing" and body["alert"] == "flaky-errors"
        assert body["value"] == pytest.approx(1 / 3) and body["threshold"] == 0.05 and body["model"] == "flaky"
        assert body["description"] == "the flaky model fails" and body["condition"] == describe(
            gw.config.alerts["flaky-errors"]
        )
        listed = cli_list(tmp_path).stdout
        assert "flaky-errors" in listed and "firing" in listed and "33.3% > 5%" in listed

        await evaluator.evaluate_once()
        assert len(receiver.bodies) == 1  # still firing: not sent again

        flaky.recovered = True
        time.sleep(0.01)
        recovered_at = time.time()
        for _ in range(6):
            await gw.chat("hi", model="flaky")
        gw.flush()
        clock.at = recovered_at + 600  # ten minutes on: the window holds only the calls since the recovery
        [row] = await evaluator.evaluate_once()
        await evaluator.aclose()

    resolved = "alert flaky-errors RESOLVED: error rate of flaky 0% <= 5% over 10m (0 of 6 calls)"
    assert row.state == "ok" and receiver.statuses() == ["firing", "resolved"]
    assert receiver.bodies[1]["text"] == resolved and receiver.bodies[1]["value"] == 0.0
    assert [r.getMessage() for r in caplog.records if r.name == "keel.alerts"][-1] == resolved
    [state] = json.loads(cli_list(tmp_path, "--json").stdout)
    assert state["name"] == "flaky-errors" and state["state"] == "ok" and state["message"] == resolved.split(": ", 1)[1]


async def test_a_webhook_that_is_down_does_not_stop_evaluation(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    flaky = Flaky(ok_calls=0)
    async with flaky_gateway(tmp_path, flaky, f"http://127.0.0.1:{port}/hook") as gw:
        assert gw.store is not None
        evaluator = AlertEvaluator(gw.config, gw.store)
        for _ in range(5):
            with pytest.raises(ServerError):
                await gw.chat("hi", model="flaky")
        gw.flush()
        [row] = await evaluator.evaluate_once()
        assert row.state == "firing" and row.notified == "ok" and row.delivery_attempts == 1
        assert "alert flaky-errors FIRING" in caplog.text
        assert f"webhook http://127.0.0.1:{port} failed" in caplog.text and "attempt 1 of 5" in caplog.text
        assert "/hook" not in caplog.text  # a webhook's path may hold its secret

        late = Receiver(port=port)  # the receiver comes back: the next evaluation delivers
        try:
            [row] = await evaluator.evaluate_once()
            await evaluator.evaluate_once()
        finally:
            late.close()
            await evaluator.aclose()
    assert row.notified == "firing" and late.statuses() == ["firing"]


async def test_webhook_failures_are_given_up_after_a_few_attempts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    refusing = Receiver(status=500)
    try:
        async with flaky_gateway(tmp_path, Flaky(ok_calls=0), refusing.url) as gw:
            assert gw.store is not None
            evaluator = AlertEvaluator(gw.config, gw.store)
            for _ in range(5):
                with pytest.raises(ServerError):
                    await gw.chat("hi", model="flaky")
            gw.flush()
            for _ in range(MAX_DELIVERY_ATTEMPTS + 3):
                [row] = await evaluator.evaluate_once()
            await evaluator.aclose()
    finally:
        refusing.close()
    assert len(refusing.bodies) == MAX_DELIVERY_ATTEMPTS and row.state == "firing"
    assert "HTTP 500" in caplog.text and f"giving up after {MAX_DELIVERY_ATTEMPTS} attempts" in caplog.text


async def test_daily_cost_fires_from_real_costs(tmp_path: Path, receiver: Receiver) -> None:
    toml = (
        '[models.priced]\nprovider = "test"\nmodel = "priced"\nscript = ["a fairly long answer, priced per token"]\n'
        "price = { input = 1000, output = 2000 }\n"
        f'[alerts.team-daily-spend]\nmetric = "cost_usd"\nthreshold = 0.05\nwindow = "today"\nkey = "team"\n'
        f'webhook = "{receiver.url}"\n'
    )
    async with gateway(tmp_path, toml) as gw:
        assert gw.store is not None
        evaluator = AlertEvaluator(gw.config, gw.store)
        spent = 0.0
        while spent <= 0.05:
            result = await gw.chat("How much does this cost?", model="priced", key="team")
            assert result.cost_usd is not None
            spent += result.cost_usd
        await gw.chat("Not the team's money", model="priced", key="other")
        gw.flush()
        [row] = await evaluator.evaluate_once()
        await evaluator.aclose()
    assert row.state == "firing" and row.value == pytest.approx(spent)
    assert row.message.startswith(f"cost of all models for key team ${spent:.4g} > $0.05 today (UTC)")
    assert receiver.statuses() == ["firing"]


async def test_p95_latency_fires_for_a_slow_model(tmp_path: Path) -> None:
    toml = (
        '[models.slow]\nprovider = "test"\nmodel = "slow"\n'
        '[alerts.slow-p95]\nmetric = "p95_latency_ms"\nthreshold = 50\nwindow = "5m"\nmodel = "slow"\n'
        "min_requests = 4\n"
    )
    async with gateway(tmp_path, toml, models={"slow": TestModel("zzz", delay=0.06)}) as gw:
        assert gw.store is not None
        evaluator = AlertEvaluator(gw.config, gw.store)
        for _ in range(4):
            await gw.chat("hi", model="slow")
        gw.flush()
        [row] = await evaluator.evaluate_once()
        await evaluator.aclose()
    assert row.state == "firing" and row.value is not None and row.value >= 60
    assert row.message.startswith("p95 latency of slow ") and row.message.endswith(" ms > 50 ms over 5m (4 calls)")


async def test_for_s_keeps_an_alert_pending_first(tmp_path: Path) -> None:
    toml = (
        'max_retries = 0\n[models.flaky]\nprovider = "test"\nmodel = "flaky"\n'
        '[alerts.e]\nmetric = "errors"\nthreshold = 0\nfor_s = 60\nwindow = "1h"\n'
    )
    clock = Clock()
    async with gateway(tmp_path, toml, models={"flaky": FunctionModel(Flaky(ok_calls=0))}) as gw:
        assert gw.store is not None
        with pytest.raises(ServerError):
            await gw.chat("hi", model="flaky")
        gw.flush()
        evaluator = AlertEvaluator(gw.config, gw.store, clock=clock)
        clock.at = time.time()
        states = [(await evaluator.evaluate_once())[0].state]
        clock.at += 59
        states.append((await evaluator.evaluate_once())[0].state)
        clock.at += 1
        states.append((await evaluator.evaluate_once())[0].state)
        await evaluator.aclose()
    assert states == ["pending", "pending", "firing"]


# --- the CLI and the server ---------------------------------------------------------------


def test_cli_check_evaluates_now_and_dry_run_records_nothing(tmp_path: Path) -> None:
    flaky = Flaky(ok_calls=0)
    with flaky_gateway(tmp_path, flaky, "http://127.0.0.1:9/unused") as gw:
        for _ in range(5):
            with pytest.raises(ServerError):
                gw.chat_sync("hi", model="flaky")
        gw.flush()
    runner = CliRunner()
    env = {"KEEL_CONFIG": str(tmp_path / "keel.toml"), "COLUMNS": "250", "KEEL_ALERTING__WEBHOOK_TIMEOUT_S": "0.5"}
    dry = runner.invoke(app, ["alerts", "check", "--dry-run", "--json"], env=env)
    assert dry.exit_code == 0, dry.output
    [measured] = json.loads(dry.stdout)
    assert measured["holds"] and measured["message"] == "error rate of flaky 100% > 5% over 10m (5 of 5 calls)"
    never = runner.invoke(app, ["alerts", "list"], env=env)
    assert "not evaluated yet" in never.stdout
    checked = runner.invoke(app, ["alerts", "check"], env=env)
    assert checked.exit_code == 0, checked.output
    assert "firing" in checked.stdout and "100% > 5%" in checked.stdout
    assert "firing" in runner.invoke(app, ["alerts", "list"], env=env).stdout


def test_cli_without_rules_says_so(tmp_path: Path) -> None:
    env = {"KEEL_CONFIG": str(write_config(tmp_path, "")), "COLUMNS": "250"}
    result = CliRunner().invoke(app, ["alerts", "list"], env=env)
    assert result.exit_code == 0 and "no alert rules" in result.stdout and "add [alerts.NAME] tables" in result.stdout


def test_cli_bad_rule_is_a_config_error(tmp_path: Path) -> None:
    path = write_config(tmp_path, '[alerts.x]\nmetric = "errors"\nthreshold = 1\nwindow = "soon"\n')
    result = CliRunner().invoke(app, ["alerts", "list"], env={"KEEL_CONFIG": str(path)})
    assert result.exit_code == 3 and "[alerts.x.window]" in result.stderr


def test_the_server_evaluates_rules_in_the_background(tmp_path: Path, receiver: Receiver) -> None:
    from fastapi.testclient import TestClient

    from keel.server.app import create_app

    toml = (
        "[alerting]\ninterval_s = 0.05\n"
        f'webhook = "{receiver.url}"\n'
        '[alerts.quiet]\nmetric = "requests"\nop = "<"\nthreshold = 1\nwindow = "1m"\n'
    )
    gw = gateway(tmp_path, toml)
    with TestClient(create_app(gateway=gw), **LOCAL):
        deadline = time.time() + 10
        while not receiver.bodies and time.time() < deadline:
            time.sleep(0.02)
    gw.close()
    assert receiver.statuses() == ["firing"]
    assert receiver.bodies[0]["text"] == "alert quiet FIRING: requests of all models 0 < 1 over 1m"
