"""Online quality read back: `/api/quality` (admin), `keel eval quality`, and the dashboard's Quality page in Chromium.

Two weeks of production RAG answers are seeded as spans and scored by `score_span` (faithfulness from the
engine's own sentence checks, a scripted judge): the prompt moves from v1 to v2, then the model changes and
faithfulness drops. Screenshots at 1024 and 1440 px land in tests/artifacts/dashboard/.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from playwright.sync_api import Browser, Page, expect
from typer.testing import CliRunner

from browsers import admin_server, close_gateway, dashboard_page, launched_browser, no_horizontal_scroll, shot
from helpers import gateway
from keel import FunctionModel, Gateway
from keel.cli import traces as traces_cli
from keel.cli.app import app
from keel.evals.online import ONLINE_TABLE_MIGRATION, score_span
from keel.evals.settings import OnlineConfig, OnlineScorer
from keel.server import dashboard
from keel.server.app import create_app
from keel.trace import Span, new_id, new_trace_id
from keel.types import ChatRequest
from serving import LOCAL, Server

ADMIN_KEY = "sk-keel-admin-quality-page-0123456789"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
DAY = 86400.0
#: (days ago it starts, model the provider reported, prompt version, share of supported sentences)
VERSIONS = [(13.5, "gpt-4o-mini-2024-07-18", "v1", 0.86), (8.5, "gpt-4o-mini-2024-07-18", "v2", 0.9),
            (3.5, "gpt-4.1-nano-2025-04-14", "v2", 0.62)]  # fmt: skip
CONFIG = (
    '[models.judge]\nprovider = "test"\nmodel = "judge"\n\n'
    "[evals.online]\nsample = 0.2\ninterval_s = 300\n"
    'scorers = [{type = "faithfulness"}, {type = "judge", rubric = "Does it answer the question?", model = "judge"}]\n'
)


def _answers(now: float) -> list[list[Span]]:
    rng = random.Random(7)
    out = []
    for i, (start, model, prompt, quality) in enumerate(VERSIONS):
        end = VERSIONS[i + 1][0] if i + 1 < len(VERSIONS) else 0.0
        for k in range(int((start - end) * 12)):  # 12 sampled answers a day
            t = now - (start - k / 12) * DAY
            supported = [rng.random() < quality for _ in range(5)]
            root = Span(new_trace_id(), new_id(8), None, "rag.ask handbook", t - 2, t)
            root.attributes = {"gen_ai.operation.name": "rag", "keel.metadata.prompt_version": prompt}
            root.input = {"question": f"question {k}"}
            root.output = {"answer": f"answer {k} {sum(supported)}", "kind": "generated",
                           "sentences": [{"text": "s", "supported": s} for s in supported]}  # fmt: skip
            child = Span(root.trace_id, new_id(8), root.span_id, "chat", t - 1.5, t - 0.5)
            child.attributes = {"gen_ai.operation.name": "chat", "gen_ai.response.model": model,
                                "keel.metadata.purpose": "rag.answer"}  # fmt: skip
            out.append([root, child])
    return out


def _grade(request: ChatRequest) -> str:
    text = str(request.messages[-1].content)
    good = int(text.split("Output to grade:\nanswer ", 1)[1].split()[1])  # the number of supported sentences
    return f"SCORE: {max(1, good)}"


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("quality-page")
    gw = gateway(tmp, CONFIG, store=str(tmp / "keel.db"), models={"judge": FunctionModel(_grade)})
    assert gw.store is not None
    store = gw.store
    answers = _answers(time.time())
    store.write_spans([s for pair in answers for s in pair])
    scorers = OnlineConfig(sample=1.0, scorers=[
        OnlineScorer(type="faithfulness"), OnlineScorer(type="judge", rubric="Does it answer?", model="judge"),
    ])  # fmt: skip

    async def score() -> None:
        for root, _ in answers:
            await score_span(store, gw, scorers, root.trace_id, root.span_id)

    scoring = threading.Thread(target=asyncio.run, args=(score(),))  # Playwright may hold this thread's loop
    scoring.start()
    scoring.join(timeout=120)
    yield gw
    close_gateway(gw)


@pytest.fixture
def client(seeded: Gateway, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    monkeypatch.setenv("KEEL_ADMIN_KEY", ADMIN_KEY)
    with TestClient(create_app(gateway=seeded), **LOCAL) as test_client:
        yield test_client


def test_the_quality_api_gives_means_with_cis_by_version_and_the_latest_change(client: TestClient) -> None:
    body = client.get("/api/quality", params={"period": "day"}, headers=ADMIN).json()
    assert body["scorers"] == ["faithfulness", "judge"]
    assert body["online"] == {
        "sample": 0.2, "interval_s": 300.0, "scorers": ["faithfulness", "judge"], "max_backfill_s": 3600.0,
        "skipped": None,
    }  # fmt: skip
    versions = {(r["model_version"], r["prompt_version"]) for r in body["rows"]}
    assert versions == {(m, p) for _, m, p, _ in VERSIONS}
    assert sum(r["n"] for r in body["rows"] if r["scorer"] == "faithfulness") == 162  # 13.5 days x 12
    assert all(r["ci_low"] <= r["mean"] <= r["ci_high"] for r in body["rows"] if r["n"] > 1)
    assert [(c["model_version"], c["prompt_version"]) for c in body["changes"]] == [
        ("gpt-4o-mini-2024-07-18", "v2"), ("gpt-4.1-nano-2025-04-14", "v2"),
    ]  # fmt: skip
    [faith] = [t for t in body["tests"] if t["scorer"] == "faithfulness"]
    assert faith["previous"] == ["gpt-4o-mini-2024-07-18", "v2"] and faith["n_after"] == 42
    assert faith["drop"] > 0.15 and faith["p_value"] < 0.001
    hourly = client.get("/api/quality", params={"period": "hour", "scorer": "judge"}, headers=ADMIN).json()
    assert {r["scorer"] for r in hourly["rows"]} == {"judge"} and len(hourly["rows"]) > len(body["rows"]) / 2


def test_the_quality_api_needs_the_admin_key_and_names_bad_input(client: TestClient) -> None:
    assert client.get("/api/quality").status_code == 401
    for query, param in (("period=month", "period"), ("since=5&until=4", None), ("scorer=a%00b", "scorer")):
        bad = client.get("/api/quality?" + query, headers=ADMIN)
        assert bad.status_code == 400, (query, bad.text)
        if param:
            assert bad.json()["error"]["param"].endswith(param)
    assert "since must be before until" in client.get("/api/quality?since=5&until=4", headers=ADMIN).text


def test_keel_eval_quality_prints_the_table_and_the_latest_change(
    seeded: Gateway, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    assert seeded.store is not None
    monkeypatch.setenv("KEEL_STORE", seeded.store.url)
    monkeypatch.setenv("COLUMNS", "140")
    result = CliRunner().invoke(
        app, ["eval", "quality", "--since", "14d", "--period", "week", "--scorer", "faithfulness"]
    )
    assert result.exit_code == 0, result.output
    assert "gpt-4.1-nano-2025-04-14" in result.output and "95% CI" in result.output
    text = " ".join(result.output.split())  # rich wraps long lines
    assert "faithfulness: since" in text and "one-sided Welch t-test p =" in text
    as_json = CliRunner().invoke(app, ["eval", "quality", "--since", "3d", "--json"])
    assert as_json.exit_code == 0
    assert {r["model_version"] for r in json.loads(as_json.output)["rows"]} == {"gpt-4.1-nano-2025-04-14"}
    for args, message in ((["--period", "month"], "--period 'month'"), (["--since", "soon"], "--since")):
        bad = CliRunner().invoke(app, ["eval", "quality", *args])
        assert bad.exit_code == 2 and message in bad.output, bad.output


# --- the page in Chromium ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(seeded: Gateway) -> Iterator[Server]:
    with admin_server(seeded, ADMIN_KEY) as running:
        yield running


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with launched_browser() as launched:
        yield launched


@pytest.fixture(params=[1024, 1440])
def page(browser: Browser, request: pytest.FixtureRequest) -> Iterator[Page]:
    with dashboard_page(browser, request.param, ADMIN_KEY) as opened:
        yield opened


@pytest.mark.slow
def test_the_quality_page_charts_each_scorer_by_version_with_change_points(page: Page, server: Server) -> None:
    page.goto(server.base + "/")
    page.click("#nav a[data-view='quality']")
    expect(page.locator("#quality-view")).to_be_visible()
    expect(page.locator("#nav a[data-view='quality']")).to_have_class("active")
    charts = page.locator(".quality-chart")
    expect(charts).to_have_count(2)
    faith = page.locator(".quality-chart[data-scorer='faithfulness']")
    expect(faith.locator(".legend-item")).to_have_count(3)
    expect(faith.locator("line.change-line")).to_have_count(2)
    expect(faith.locator(".quality-test")).to_have_attribute("data-significant", "yes")
    expect(faith.locator(".quality-test")).to_contain_text("gpt-4o-mini-2024-07-18 / v2 → gpt-4.1-nano-2025-04-14 / v2")
    assert faith.locator("circle.quality-dot").count() >= 14
    expect(page.locator("#quality-config")).to_contain_text("20% of calls scored every 300 s")
    expect(page.locator("#quality-table tbody tr").first).to_contain_text("gpt-4.1-nano-2025-04-14")
    expect(page.locator("#quality-config")).to_contain_text("scoring cost $")  # the judges' calls have a price
    clipped = page.evaluate("""[...document.querySelectorAll('.quality-chart svg')].flatMap((svg) => {
        const box = svg.getBoundingClientRect();
        return [...svg.querySelectorAll('text.change-label')].map((t) => t.getBoundingClientRect())
          .filter((b) => b.left < box.left - 1 || b.right > box.right + 1).map((b) => [b.left, b.right, box.right]);
    })""")
    assert clipped == [], f"a version change's label runs off its chart: {clipped}"
    no_horizontal_scroll(page)
    shot(page, "30-quality")
    daily = faith.locator("circle.quality-dot").count()
    page.select_option("#quality-period", "week")
    expect(faith.locator("circle.quality-dot")).not_to_have_count(daily)  # fewer, wider periods
    page.click("#nav a[data-view='jobs']")  # leaving the page hides it
    expect(page.locator("#quality-view")).to_be_hidden()


# --- a trace's own online scores -----------------------------------------------------------------------


@pytest.fixture
def scored_trace(seeded: Gateway) -> Iterator[tuple[str, str]]:
    """A seeded answer's trace and root span, given an errored score of a third scorer while the test runs."""
    yield _scored_trace(seeded)
    assert seeded.store is not None
    seeded.store.execute("DELETE FROM keel_eval_online_scores WHERE scorer = 'tone'")  # the other tests' report


def _scored_trace(gw: Gateway) -> tuple[str, str]:
    assert gw.store is not None
    [(trace_id, span_id, span_time)] = gw.store.query(
        "SELECT trace_id, span_id, span_time FROM keel_eval_online_scores WHERE scorer = 'judge'"
        " ORDER BY span_time DESC LIMIT 1"
    )
    gw.store.execute(
        "INSERT INTO keel_eval_online_scores (trace_id, span_id, scorer, kind, model_version, prompt_version,"
        " span_time, value, error, scored_at) VALUES (?, ?, 'tone', 'rag', 'm', 'v2', ?, NULL,"
        " 'JudgeError: no SCORE line', ?) ON CONFLICT (trace_id, span_id, scorer) DO NOTHING",
        [trace_id, span_id, span_time, time.time()],
    )
    return str(trace_id), str(span_id)


def test_a_traces_api_gives_its_calls_online_scores(
    seeded: Gateway, client: TestClient, scored_trace: tuple[str, str]
) -> None:
    trace_id, span_id = scored_trace
    body = client.get(f"/api/traces/{trace_id}", headers=ADMIN).json()
    scores = {s["scorer"]: s for s in body["scores"]}
    assert set(scores) == {"faithfulness", "judge", "tone"}
    assert all(s["span_id"] == span_id and s["scored_at"] > 0 for s in scores.values())
    assert 0 <= scores["judge"]["value"] <= 1 and scores["judge"]["spread"] is not None
    assert scores["tone"]["value"] is None and scores["tone"]["error"] == "JudgeError: no SCORE line"
    assert ONLINE_TABLE_MIGRATION == dashboard.ONLINE_TABLE_MIGRATION == traces_cli.ONLINE_TABLE_MIGRATION
    unscored = seeded.store.query("SELECT trace_id FROM spans WHERE name = 'chat' LIMIT 1") if seeded.store else []
    other = client.get(f"/api/traces/{unscored[0][0]}", headers=ADMIN).json()
    assert all(s["trace_id"] == unscored[0][0] for s in other["scores"])


def test_keel_traces_show_prints_the_online_scores(
    seeded: Gateway, monkeypatch: pytest.MonkeyPatch, scored_trace: tuple[str, str]
) -> None:
    trace_id, _ = scored_trace
    assert seeded.store is not None
    monkeypatch.setenv("KEEL_STORE", seeded.store.url)
    monkeypatch.setenv("COLUMNS", "200")
    result = CliRunner().invoke(app, ["traces", "show", trace_id])
    assert result.exit_code == 0, result.output
    assert "online scores" in result.output
    lines = {line.split("online score ")[1].split()[0]: line for line in result.output.splitlines()
             if "online score " in line}  # fmt: skip
    assert set(lines) == {"faithfulness", "judge", "tone"}
    assert "errored: JudgeError: no SCORE line" in lines["tone"] and "spread" in lines["judge"]


@pytest.mark.slow
def test_the_trace_view_shows_the_online_scores_next_to_the_span(
    page: Page, server: Server, scored_trace: tuple[str, str]
) -> None:
    trace_id, span_id = scored_trace
    page.goto(server.base + f"/#/trace/{trace_id}")
    row = page.locator(f".span-row[data-span-id='{span_id}']")
    expect(row.locator(".score-chip")).to_have_text("3 scores")
    row.click()
    scores = page.locator("#span-detail .online-scores")
    expect(scores.locator("tbody tr")).to_have_count(3)
    expect(scores.locator("tr[data-scorer='tone']")).to_contain_text("errored")
    expect(scores.locator("tr[data-scorer='tone']")).to_contain_text("JudgeError: no SCORE line")
    expect(scores.locator("tr[data-scorer='judge']")).to_contain_text("spread")
    no_horizontal_scroll(page)
    shot(page, "31-trace-scores")


def test_the_quality_api_takes_a_duration_or_epoch_seconds_for_since(client: TestClient) -> None:
    before = time.time()
    body = client.get("/api/quality", params={"since": "3d"}, headers=ADMIN).json()
    assert before - 3 * DAY - 5 < body["since_ts"] <= time.time() - 3 * DAY
    assert {r["model_version"] for r in body["rows"]} == {"gpt-4.1-nano-2025-04-14"}
    epoch = client.get("/api/quality", params={"since": str(before - 3 * DAY)}, headers=ADMIN).json()
    assert epoch["since_ts"] == pytest.approx(before - 3 * DAY)
    for value in ("soon", "-3d", "0d", "1e99", "3 weeks"):
        bad = client.get("/api/quality", params={"since": value}, headers=ADMIN)
        assert bad.status_code == 400, (value, bad.text)
        assert "since" in bad.text and "14d" in bad.text, bad.text


def test_keel_eval_quality_takes_epoch_seconds_too(seeded: Gateway, monkeypatch: pytest.MonkeyPatch) -> None:
    assert seeded.store is not None
    monkeypatch.setenv("KEEL_STORE", seeded.store.url)
    result = CliRunner().invoke(app, ["eval", "quality", "--since", str(time.time() - 3 * DAY), "--json"])
    assert result.exit_code == 0, result.output
    assert {r["model_version"] for r in json.loads(result.output)["rows"]} == {"gpt-4.1-nano-2025-04-14"}


@pytest.fixture
def skipped_day(seeded: Gateway) -> Iterator[tuple[float, float]]:
    """A catch-up that skipped a day of calls (as OnlineScheduler records it), while the test runs."""
    assert seeded.store is not None
    skipped = (time.time() - 2 * DAY, time.time() - DAY)
    for name, value in zip(("backfill_skipped_from", "backfill_skipped_until"), skipped, strict=True):
        seeded.store.execute("INSERT INTO keel_eval_online_state (name, watermark) VALUES (?, ?)", [name, value])
    yield skipped
    seeded.store.execute("DELETE FROM keel_eval_online_state WHERE name LIKE 'backfill_skipped_%'")


def test_the_quality_api_says_which_calls_a_catch_up_skipped(
    client: TestClient, skipped_day: tuple[float, float]
) -> None:
    online = client.get("/api/quality", headers=ADMIN).json()["online"]
    assert online["skipped"] == {"from_ts": skipped_day[0], "until_ts": skipped_day[1]}
    assert online["max_backfill_s"] == 12 * 300


@pytest.mark.slow
def test_the_quality_page_says_which_calls_a_catch_up_skipped(
    page: Page, server: Server, skipped_day: tuple[float, float]
) -> None:
    page.goto(server.base + "/#/quality")
    expect(page.locator("#quality-skipped")).to_contain_text("Not scored: the calls from")
    expect(page.locator("#quality-skipped")).to_contain_text("max_backfill_s")
    shot(page, "32-quality-skipped")
