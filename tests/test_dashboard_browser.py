"""The dashboard in a real browser: Debian's Chromium driven by Playwright, against a real keel server.

Never `playwright install` (it downloads a browser); the Makefile installs
Debian's `chromium` instead, and these tests fail, not skip, without it.
Screenshots land in tests/artifacts/dashboard/ (ignored by git) for a person to look at.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, expect

from browsers import admin_server, dashboard_page, launched_browser
from helpers import gateway
from keel import CallContext, Gateway, TestModel
from keel.errors import ProviderTimeout, ServerError, StructuredOutputError, UnknownModel
from keel.trace import Span, new_id, new_trace_id
from serving import Server

pytestmark = pytest.mark.slow

ARTIFACTS = Path(__file__).parent / "artifacts" / "dashboard"
ADMIN_KEY = "sk-keel-admin-browser-test-0123456789"

TOML = (
    "max_retries = 0\n"
    '[models.fast]\nprovider = "test"\nmodel = "fast"\nscript = ["Paris is the capital of France."]\n'
    "price = { input = 150.0, output = 600.0 }\n"
    '[models.smart]\nprovider = "test"\nmodel = "smart"\n'
    'script = ["Lyon sits where the Rhone meets the Saone, and is known for its food."]\n'
    "price = { input = 2500.0, output = 10000.0 }\n"
)

QUESTIONS = [
    "Summarise the refund policy for annual plans",
    "Translate the release notes into German",
    "Which invoice fields are required in the EU?",
    "Draft a reply to a customer asking about SSO",
    "Classify this ticket: the export button does nothing",
    "Extract the dates from this contract clause",
]


#: A model whose answers never fit the schema: the structured call to it fails after two re-asks.
NOT_JSON = ["Sure! The city is Lyon.", '{"city": 69}', '{"town": "Lyon"}']
OUTLIER_MS = 397_000.0  # one runaway local generation (issue 16): it must not flatten the latency charts


@dataclass
class Seeded:
    gw: Gateway
    calls_24h: int  # model calls in the last 24 hours
    calls_7d: int
    traces_7d: int


def _history(now: float, rng: random.Random) -> list[Span]:
    """A week of model calls written straight to the store, so the charts have a shape."""
    spans = []
    for i in range(220):
        age = rng.uniform(60, 7 * 86400) if i % 3 else rng.uniform(60, 86000)
        model = rng.choice(["fast", "fast", "smart"])
        start = now - age
        ms = rng.lognormvariate(6.3 if model == "smart" else 5.5, 0.5)
        failed = rng.random() < 0.07
        tokens_in, tokens_out = rng.randint(40, 900), 0 if failed else rng.randint(10, 400)
        rate_in, rate_out = (2.5e-6, 1e-5) if model == "smart" else (1.5e-7, 6e-7)  # USD per token
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": "chat", "keel.model": model, "gen_ai.request.model": model,
            "gen_ai.provider.name": "test", "gen_ai.usage.input_tokens": tokens_in,
            "gen_ai.usage.output_tokens": tokens_out, "keel.cost_usd": tokens_in * rate_in + tokens_out * rate_out,
            "keel.attempts": 1, "keel.api_key": rng.choice(["support-bot", "support-bot", "batch-jobs"]),
        }  # fmt: skip
        error = rng.choice([("ProviderTimeout", "no answer within 30 s"), ("ProviderRateLimited", "429 slow down")])
        spans.append(
            Span(
                trace_id=new_trace_id(),
                span_id=new_id(),
                parent_id=None,
                name=f"chat {model}",
                start_time=start,
                end_time=start + ms / 1000,
                status="error" if failed else "ok",
                error_type=error[0] if failed else None,
                error_message=error[1] if failed else None,
                attributes=attributes,
                input={"messages": [{"role": "user", "content": rng.choice(QUESTIONS)}]},
                output=None if failed else {"text": "Done: here is the answer.", "tool_calls": []},
            )
        )
    outlier = dict(spans[0].attributes, **{"keel.model": "fast", "gen_ai.request.model": "fast"})
    start = now - 3600
    spans.append(
        Span(
            trace_id=new_trace_id(), span_id=new_id(), parent_id=None, name="chat fast", start_time=start,
            end_time=start + OUTLIER_MS / 1000, status="ok", attributes=outlier,
            input={"messages": [{"role": "user", "content": "What is RAG?"}]},
            output={"text": 'A "type"A "type"A "type"', "tool_calls": []},
        )
    )  # fmt: skip
    return spans


def _traffic(gw: Gateway) -> int:
    """Real calls through the gateway: two models, two keys, failures, and one nested agent trace."""
    for question, model, key in [
        ("What is the capital of France?", "fast", "support-bot"),
        ("Tell me about Lyon", "smart", "support-bot"),
        ("And what about Marseille?", "smart", "batch-jobs"),
        ("Quick sanity check", "fast", "batch-jobs"),
    ]:
        gw.chat_sync(question, model=model, key=key)
    for model in ("broken", "slow"):
        with pytest.raises((ServerError, ProviderTimeout)):
            gw.chat_sync(f"Will the {model} model answer?", model=model, key="batch-jobs")
    session = CallContext(session="sess-42", user="alice", tags=("beta",))
    gw.chat_sync("Which plan suits a team of five?", model="fast", key="support-bot", context=session)
    with pytest.raises(UnknownModel):  # a name a client made up
        gw.chat_sync("Hello newest model", model="gpt-5-turbo", key="support-bot")
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    with pytest.raises(StructuredOutputError):
        gw.chat_sync("Which city is the trip to?", model="jsonish", key="batch-jobs", response_model=schema)

    async def agent() -> None:
        with gw.tracer.span("agent plan-trip", {"keel.agent": "planner"}) as root:
            root.input = "Plan a weekend trip to Lyon"
            await gw.chat(
                [
                    {"role": "system", "content": "You are a travel planner. Answer in two sentences."},
                    {"role": "user", "content": "Where should I stay in Lyon?"},
                ],
                model="smart",
                key="support-bot",
            )
            with gw.tracer.span("execute_tool hotels", {"gen_ai.operation.name": "execute_tool"}) as tool:
                tool.input = {"city": "Lyon"}
                time.sleep(0.02)
                tool.output = ["Hotel Bellecour", "Hotel des Célestins"]
            await gw.chat("Write the final plan", model="fast", key="support-bot")
            root.output = "Stay near Bellecour; walk the Presqu'île on Saturday."

    gw._loop().run(agent())
    return 4 + 2 + 2 + 3


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Seeded]:
    tmp = tmp_path_factory.mktemp("dashboard")
    failing = {
        "broken": TestModel(ServerError("upstream answered 503: overloaded", status=503)),
        "slow": TestModel(ProviderTimeout("no answer within 30 s")),
        "jsonish": TestModel(NOT_JSON),
    }
    gw = gateway(tmp, TOML, store=str(tmp / "keel.db"), models=failing)
    now = time.time()
    history = _history(now, random.Random(7))
    assert gw.store is not None
    gw.store.write_spans(history)
    live = _traffic(gw)
    gw.flush()
    recent = sum(1 for s in history if s.start_time > now - 86400)
    yield Seeded(gw, calls_24h=recent + live, calls_7d=len(history) + live, traces_7d=len(history) + live - 1)
    gw.close()


@pytest.fixture(scope="module")
def server(seeded: Seeded) -> Iterator[Server]:
    """A server with an admin key (read when the app is made), as every real deployment has."""
    with admin_server(seeded.gw, ADMIN_KEY) as running:
        yield running


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with launched_browser() as launched:
        yield launched


@pytest.fixture(params=[1440])
def page(browser: Browser, request: pytest.FixtureRequest) -> Iterator[Page]:
    with dashboard_page(browser, request.param, ADMIN_KEY, height=1000 if request.param > 1200 else 900) as opened:
        yield opened


def shot(page: Page, name: str, top_of: str | None = None, *, full: bool = False) -> Path:
    """The visible window (the trace table runs long), scrolled to put `top_of` under the top bar;
    with `full`, the whole page."""
    if top_of is not None:
        page.locator(top_of).evaluate("el => window.scrollTo(0, el.getBoundingClientRect().top + scrollY - 60)")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=full)
    return path


def rows(page: Page) -> Any:
    return page.locator("#traces tbody tr.trace-row")


def wait_for_rows(page: Page, predicate: str) -> None:
    """Wait until the trace table satisfies a JavaScript predicate over its rows (an array of <tr>)."""
    page.wait_for_function(
        f"(() => {{ const r = [...document.querySelectorAll('#traces tbody tr.trace-row')]; return {predicate}; }})()"
    )


def test_overview_shows_charts_and_traces(page: Page, server: Server, seeded: Seeded) -> None:
    page.goto(server.base + "/")
    expect(rows(page).first).to_be_visible()
    expect(page.locator("#kpis .kpi").first.locator(".value")).to_have_text(f"{seeded.calls_24h:,}")
    for chart in (
        "requests",
        "errors",
        "latency-time",
        "latency-model",
        "tokens",
        "cost-day",
        "cost-model",
        "cost-key",
    ):
        expect(page.locator(f"#chart-{chart} .chart svg")).to_have_count(1)
    assert page.locator("#chart-requests rect.bar-ok").count() > 10
    assert page.locator("#chart-requests rect.bar-err").count() >= 1
    assert page.locator("#chart-latency-time path.line-p95").get_attribute("d")
    cost_models = page.locator("#chart-cost-model svg text.label").all_text_contents()
    assert cost_models[:2] == ["smart", "fast"]
    assert set(cost_models) == {"smart", "fast", "broken", "slow", "jsonish", "unknown"}
    assert set(page.locator("#chart-cost-key svg text.label").all_text_contents()) == {"support-bot", "batch-jobs"}
    errors = page.locator("#chart-errors svg text.label").all_text_contents()
    assert {"ServerError", "ProviderTimeout"} <= set(errors)
    assert rows(page).count() >= 7
    expect(rows(page).first).to_contain_text("agent plan-trip")  # the newest trace
    shot(page, "01-overview")
    shot(page, "02-trace-list", top_of=".traces-card")

    page.click("#ranges button[data-range='7d']")
    expect(page.locator("#kpis .kpi").first.locator(".value")).to_have_text(f"{seeded.calls_7d:,}")
    assert page.locator("#chart-cost-day rect.bar-cost").count() >= 7
    shot(page, "03-overview-7d")


def test_filters_narrow_the_trace_list(page: Page, server: Server) -> None:
    page.goto(server.base + "/")
    expect(rows(page).first).to_be_visible()
    everything = rows(page).count()

    page.select_option("#f-model", "smart")
    model_of = "x => x.querySelector('td:nth-child(3) .tag').textContent"
    wait_for_rows(page, f"r.length > 0 && r.length < {everything} && r.map({model_of}).every(m => m === 'smart')")
    models_chart = page.locator("#chart-cost-model svg text.label").all_text_contents()
    assert models_chart == ["smart"]  # the charts follow the model filter too

    page.select_option("#f-model", "")
    page.select_option("#f-status", "error")
    wait_for_rows(page, "r.length > 0 && r.every(x => x.querySelector('.badge.error'))")
    expect(rows(page).filter(has_text="ProviderTimeout").first).to_be_visible()

    page.select_option("#f-status", "")
    page.fill("#f-q", "marseille")
    wait_for_rows(page, "r.length === 1")
    expect(rows(page).first).to_contain_text("And what about Marseille?")
    shot(page, "04-filtered", top_of=".traces-card")

    page.fill("#f-q", "no trace says this")
    expect(page.locator("#traces tbody tr.empty-row")).to_contain_text("No traces match")
    page.click("#f-clear")
    wait_for_rows(page, f"r.length === {everything}")

    page.fill("#f-to", "2001-01-01T00:00")  # a custom range long before any call
    expect(page.locator("#traces tbody tr.empty-row")).to_be_visible()
    expect(page.locator("#kpis .kpi").first.locator(".value")).to_have_text("0")
    expect(page.locator("#ranges button.active")).to_have_count(0)
    page.click("#ranges button[data-range='24h']")  # back to a preset range
    wait_for_rows(page, f"r.length === {everything}")


def test_a_trace_opens_with_its_span_tree(page: Page, server: Server) -> None:
    page.goto(server.base + "/")
    rows(page).filter(has_text="agent plan-trip").first.click()
    expect(page.locator("#trace-view")).to_be_visible()
    expect(page.locator("#overview-view")).to_be_hidden()
    spans = page.locator("#waterfall .span-row")
    expect(spans).to_have_count(4)
    names = page.locator("#waterfall .span-row .nm").all_text_contents()
    assert names[0] == "agent plan-trip" and set(names[1:]) == {"chat smart", "chat fast", "execute_tool hotels"}
    assert page.locator("#waterfall .span-row .tree").count() == 3  # the children are indented under the root
    expect(page.locator("#trace-stats")).to_contain_text("Model calls")

    detail = page.locator("#span-detail")  # the first model call is selected at first
    expect(detail.locator(".span-title")).to_contain_text("chat smart")
    expect(detail.locator(".io.input")).to_contain_text("Where should I stay in Lyon?")
    expect(detail.locator(".io.input .msg.system")).to_contain_text("travel planner")
    expect(detail.locator(".io.output")).to_contain_text("Lyon sits where the Rhone meets the Saone")
    expect(detail.locator(".meta")).to_contain_text("smart")
    expect(detail.locator(".attrs")).to_contain_text("gen_ai.usage.input_tokens")
    shot(page, "05-trace")

    spans.filter(has_text="agent plan-trip").click()
    expect(detail.locator(".io.input")).to_contain_text("Plan a weekend trip to Lyon")
    expect(detail.locator(".io.output")).to_contain_text("Stay near Bellecour")
    expect(page.locator("#waterfall .span-row.selected .nm")).to_have_text("agent plan-trip")

    page.click("#trace-back")
    expect(page.locator("#overview-view")).to_be_visible()
    expect(rows(page).first).to_be_visible()


def test_a_failed_call_shows_its_error(page: Page, server: Server) -> None:
    page.goto(server.base + "/")
    rows(page).filter(has_text="Will the broken model answer?").first.click()
    detail = page.locator("#span-detail")
    expect(detail.locator(".error-box")).to_contain_text("ServerError")
    expect(detail.locator(".error-box")).to_contain_text("overloaded")
    expect(detail.locator(".io.output")).to_contain_text("the span failed")
    shot(page, "06-failed-trace")


def test_the_page_asks_for_the_admin_key(browser: Browser, seeded: Seeded, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEEL_ADMIN_KEY", ADMIN_KEY)
    guarded = Server(seeded.gw)
    context = browser.new_context(viewport={"width": 1440, "height": 900})
    try:
        page = context.new_page()
        page.goto(guarded.base + "/")
        expect(page.locator("#login")).to_be_visible()
        shot(page, "07-admin-key")
        page.fill("#login-key", "sk-keel-not-the-admin-key-000000")
        page.click("#login button[type=submit]")
        expect(page.locator("#login")).to_be_visible()  # refused again
        expect(page.locator("#login-reason")).to_contain_text("refused")
        page.fill("#login-key", ADMIN_KEY)
        page.click("#login button[type=submit]")
        expect(page.locator("#login")).to_be_hidden()
        expect(rows(page).first).to_be_visible()
        assert page.evaluate("localStorage.getItem('keel.adminKey')") == ADMIN_KEY
        page.reload()  # kept across visits
        expect(rows(page).first).to_be_visible()
        expect(page.locator("#login")).to_be_hidden()
    finally:
        context.close()
        guarded.stop()


def no_horizontal_scroll(page: Page) -> None:
    widths = page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
    assert widths[0] <= widths[1], f"the page scrolls sideways at {widths[1]} px: {widths[0]} px wide"


def test_an_invented_model_is_one_unknown_entry(page: Page, server: Server) -> None:
    page.goto(server.base + "/")
    expect(rows(page).first).to_be_visible()
    options = page.locator("#f-model option").all_text_contents()
    assert options == ["All models", "broken", "fast", "jsonish", "slow", "smart", "unknown"]
    assert "gpt-5-turbo" not in page.locator("#chart-cost-model").text_content()
    assert "gpt-5-turbo" not in page.locator("#chart-latency-model").text_content()
    page.select_option("#f-model", "unknown")
    wait_for_rows(page, "r.length === 1")
    expect(rows(page).first).to_contain_text("gpt-5-turbo")  # the trace keeps the name it asked for
    expect(page.locator("#chart-cost-model .empty")).to_contain_text("No cost recorded")


@pytest.mark.parametrize("page", [1024], indirect=True)
def test_session_search_at_1024_px(page: Page, server: Server) -> None:
    page.goto(server.base + "/")
    expect(rows(page).first).to_be_visible()
    no_horizontal_scroll(page)
    shot(page, "08-overview-1024")
    page.fill("#f-q", "sess-42")
    wait_for_rows(page, "r.length === 1")
    expect(rows(page).first).to_contain_text("Which plan suits a team of five?")
    assert "q=sess-42" in page.url  # the search is in the link
    no_horizontal_scroll(page)
    shot(page, "09-session-search-1024", full=True)
    table = page.locator(".table-wrap").evaluate("el => [el.scrollWidth, el.clientWidth]")
    assert table[1] <= 1024  # a wide table scrolls inside its box, not the page

    page.goto(server.base + "/?session=sess-42&user=alice&tag=beta")  # explicit filters, from a link
    wait_for_rows(page, "r.length === 1")
    expect(page.locator("#f-session")).to_have_value("sess-42")
    expect(page.locator("#kpis .kpi").first.locator(".value")).to_have_text("1")  # the charts follow
    shot(page, "09b-session-filter-1024", full=True)
    page.goto(server.base + "/?tag=no-such-tag")
    expect(page.locator("#traces tbody tr.empty-row")).to_be_visible()

    page.goto(server.base + "/")
    rows(page).filter(has_text="Which city is the trip to?").first.click()
    expect(page.locator("#span-detail .invalid")).to_have_count(3)
    no_horizontal_scroll(page)
    shot(page, "10-structured-trace-1024")


def test_one_outlier_does_not_flatten_latency(page: Page, server: Server) -> None:
    page.goto(server.base + "/")
    expect(page.locator("#chart-latency-time .scale-note")).to_be_visible()
    expect(page.locator("#chart-latency-model .scale-note")).to_be_visible()
    # the typical call's p50 sits well above the axis, not squashed under a 397 s maximum
    lift = page.evaluate(
        """(() => {
        const svg = document.querySelector('#chart-latency-time svg');
        const axis = +svg.querySelector('line.axis-line').getAttribute('y1');
        const top = Math.min(...[...svg.querySelectorAll('line')].map(l => +l.getAttribute('y1')));
        const ys = [...svg.querySelectorAll('circle.dot-p50')].map(c => +c.getAttribute('cy')).sort((a, b) => a - b);
        return (axis - ys[Math.floor(ys.length / 2)]) / (axis - top);
    })()"""
    )
    assert lift > 0.1, lift
    labels = page.locator("#chart-latency-time svg text").all_text_contents()
    assert "100 s" in labels or "1000 s" in labels
    shot(page, "11-latency-log-scale", top_of="#chart-latency-time")


def test_cost_charts_say_when_no_cost_is_recorded(page: Page, server: Server) -> None:
    page.goto(server.base + "/?model=broken")
    wait_for_rows(page, "r.length === 1")
    for chart in ("#chart-cost-model", "#chart-cost-key", "#chart-cost-day"):
        expect(page.locator(chart + " .empty")).to_contain_text("No cost recorded")
        expect(page.locator(chart + " rect.bar-cost")).to_have_count(0)  # no bars of requests posing as cost
    expect(page.locator("#kpis .kpi").nth(2)).to_contain_text("no cost recorded")


def test_a_failed_structured_call_shows_each_invalid_answer(page: Page, server: Server) -> None:
    page.goto(server.base + "/")
    rows(page).filter(has_text="Which city is the trip to?").first.click()
    invalid = page.locator("#span-detail .invalid")
    expect(invalid).to_have_count(3)
    expect(invalid.nth(0)).to_contain_text(NOT_JSON[0])
    expect(invalid.nth(0)).to_contain_text("not valid JSON")
    expect(invalid.nth(1)).to_contain_text('{"city": 69}')
    expect(invalid.nth(2)).to_contain_text("required")
    shot(page, "12-structured-trace")


def test_the_list_pages_past_100_and_sorts_by_latency_and_cost(page: Page, server: Server, seeded: Seeded) -> None:
    page.goto(server.base + "/")
    page.click("#ranges button[data-range='7d']")
    wait_for_rows(page, "r.length === 100")
    expect(page.locator("#more")).to_be_visible()
    first_page = page.evaluate("[...document.querySelectorAll('#traces tr.trace-row')].map(r => r.dataset.traceId)")
    page.click("#more")
    wait_for_rows(page, f"r.length === {min(seeded.traces_7d, 200)}")
    every = page.evaluate("[...document.querySelectorAll('#traces tr.trace-row')].map(r => r.dataset.traceId)")
    assert every[:100] == first_page and len(set(every)) == len(every)  # the next page, no repeats
    while page.locator("#more").is_visible():
        page.click("#more")
        page.wait_for_timeout(200)
    wait_for_rows(page, f"r.length === {seeded.traces_7d}")

    page.select_option("#f-sort", "latency")
    expect(rows(page).first.locator("td.num").first).to_have_text("6.6 min")  # the 397 s outlier
    assert "sort=latency" in page.url
    page.select_option("#f-sort", "cost")
    wait_for_rows(page, "r.length === 100")
    costs = page.evaluate(
        "[...document.querySelectorAll('#traces tr.trace-row td:nth-child(8)')].map(td => td.textContent)"
    )
    assert costs[0] != "–" and costs[-1] != "–"
    shot(page, "13-sorted-by-cost", top_of=".traces-card")


def test_a_trace_links_to_the_other_traces_of_its_session(page: Page, server: Server) -> None:
    page.goto(server.base + "/")
    rows(page).filter(has_text="Which plan suits a team of five?").first.click()
    link = page.locator("#span-detail a.filter-link", has_text="sess-42")
    expect(link).to_be_visible()
    expect(page.locator("#span-detail a.filter-link", has_text="alice")).to_be_visible()
    link.click()
    expect(page.locator("#overview-view")).to_be_visible()
    expect(page.locator("#f-session")).to_have_value("sess-42")
    wait_for_rows(page, "r.length === 1")
