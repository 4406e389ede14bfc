"""The dashboard's queries (both store backends) and its JSON API (real spans from a real gateway)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from helpers import gateway
from keel import Gateway, TestModel
from keel.errors import InputError, ServerError, StructuredOutputError
from keel.server.app import create_app
from keel.store import SpanFilter, Store, analytics
from keel.trace import Span
from serving import LOCAL

T0 = 1_699_923_600.0  # 2023-11-14 01:00:00 UTC, a whole hour
HOUR = 3600.0
DAY = 86_400.0


def make_span(
    span_id: str,
    *,
    trace_id: str | None = None,
    parent_id: str | None = None,
    start: float = T0,
    ms: float = 100.0,
    model: str | None = "m1",
    operation: str | None = "chat",
    key: str | None = None,
    cost: float | None = None,
    tokens: tuple[int, int] | None = (10, 5),
    error_type: str | None = None,
    input: Any = None,
    output: Any = None,
    request_model: str | None = None,
    extra: dict[str, Any] | None = None,
) -> Span:
    attributes: dict[str, Any] = dict(extra or {})
    if request_model is not None:
        attributes["gen_ai.request.model"] = request_model
    if operation is not None:
        attributes["gen_ai.operation.name"] = operation
    if model is not None:
        attributes["keel.model"] = model
    if tokens is not None:
        attributes["gen_ai.usage.input_tokens"], attributes["gen_ai.usage.output_tokens"] = tokens
    if cost is not None:
        attributes["keel.cost_usd"] = cost
    if key is not None:
        attributes["keel.api_key"] = key
    return Span(
        trace_id=trace_id or f"trace-{span_id}", span_id=span_id, parent_id=parent_id,
        name=f"{operation or 'step'} {model or ''}".strip(), start_time=start, end_time=start + ms / 1000.0,
        status="error" if error_type else "ok", error_type=error_type,
        error_message=f"{error_type}: it failed" if error_type else None,
        attributes=attributes, input=input, output=output,
    )  # fmt: skip


def usd(value: float | None) -> float | None:
    """Rounded to a micro-dollar: sums of floats differ in their last bits between backends."""
    return None if value is None else round(value, 6)


def ms(value: float | None) -> float | None:
    """Rounded to 0.01 ms: epoch seconds near 1.7e9 keep about 0.5 µs of precision."""
    return None if value is None else round(value, 2)


def chat_input(text: str) -> dict[str, Any]:
    return {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]}


# --- the queries, on SQLite and PostgreSQL ----------------------------------------------


def test_time_series_buckets_are_floors_on_both_backends(store: Store) -> None:
    # CAST(x AS INTEGER) rounds on PostgreSQL: the spans just past the middle of the first hour
    # and just before its end must still land in it.
    store.write_spans([
        make_span("a", start=T0), make_span("b", start=T0 + 1800.4, error_type="ServerError"),
        make_span("c", start=T0 + HOUR - 0.001), make_span("d", start=T0 + HOUR),
        make_span("e", start=T0 + 2 * HOUR + 5, ms=300.0),
        make_span("before", start=T0 - 1), make_span("after", start=T0 + 3 * HOUR),
    ])  # fmt: skip
    series = analytics.time_series(store, SpanFilter(since=T0, until=T0 + 3 * HOUR), 3600)
    assert [b.start for b in series] == [T0, T0 + HOUR, T0 + 2 * HOUR]
    assert [(b.requests, b.errors) for b in series] == [(3, 1), (1, 0), (1, 0)]
    assert series[2].p50_ms == pytest.approx(300.0, abs=0.01)
    assert series[0].input_tokens == 30 and series[0].output_tokens == 15


def test_time_series_keeps_empty_buckets_and_aligns_them(store: Store) -> None:
    store.write_spans([make_span("a", start=T0 + 125)])
    series = analytics.time_series(store, SpanFilter(since=T0 + 30, until=T0 + 330), 60)
    assert [b.start for b in series] == [T0 + 60 * i for i in range(6)]  # aligned to whole minutes
    assert [b.requests for b in series] == [0, 0, 1, 0, 0, 0]
    assert series[0].cost_usd is None and series[0].p95_ms is None


def test_bucket_size_follows_the_range() -> None:
    assert analytics.bucket_seconds(0, HOUR) == 60
    assert analytics.bucket_seconds(0, DAY) == 1800
    assert analytics.bucket_seconds(0, 7 * DAY) == 3 * 3600
    assert analytics.bucket_seconds(0, 30 * DAY) == 12 * 3600
    assert DAY / analytics.bucket_seconds(0, DAY) <= analytics.MAX_BUCKETS


@pytest.fixture
def mixed(store: Store) -> Store:
    """Two models, two keys (and calls without one), errors of two types, a nested trace, two days."""
    store.write_spans([
        make_span("a1", start=T0, ms=100, model="m1", key="k1", cost=0.010, input=chat_input("Capital of France?"),
                  output={"text": "Paris.", "tool_calls": []}),
        make_span("a2", start=T0 + 10, ms=200, model="m1", key="k2", cost=0.020),
        make_span("a3", start=T0 + 20, ms=300, model="m1", key="k1", cost=None, tokens=(7, 0),
                  error_type="ProviderTimeout"),
        make_span("b1", start=T0 + 30, ms=1000, model="m2", key="k1", cost=0.500, tokens=(100, 50)),
        make_span("b2", start=T0 + DAY, ms=3000, model="m2", cost=0.250, error_type="ServerError"),
        make_span("e1", start=T0 + 40, ms=50, model="emb", operation="embeddings", key="k2", cost=0.001,
                  tokens=(40, 0)),
        # an agent run: a root with no model, a model call and a tool call under it
        make_span("root", trace_id="agent", start=T0 + 50, ms=2000, model=None, operation=None, tokens=None,
                  input={"task": "weather in Oslo"}, output="It is sunny in Oslo."),
        make_span("call", trace_id="agent", parent_id="root", start=T0 + 50.1, ms=800, model="m2", key="k2",
                  cost=0.100, tokens=(200, 20), input=chat_input("What is the weather in Oslo?")),
        make_span("tool", trace_id="agent", parent_id="root", start=T0 + 51, ms=30, model=None,
                  operation="execute_tool", tokens=(999, 999), cost=9.0, error_type="ToolError"),
    ])  # fmt: skip
    return store


MODEL_CALLS = {"a1", "a2", "a3", "b1", "b2", "e1", "call"}
WEEK = SpanFilter(since=T0 - HOUR, until=T0 + 7 * DAY)


def test_totals_count_model_calls_only(mixed: Store) -> None:
    t = analytics.totals(mixed, WEEK)
    assert t.requests == len(MODEL_CALLS)  # the agent root and the tool span are not requests
    assert t.errors == 2  # a3 and b2; the tool's error is not a model call's
    assert t.cost_usd == pytest.approx(0.010 + 0.020 + 0.500 + 0.250 + 0.001 + 0.100)
    assert (t.input_tokens, t.output_tokens) == (10 + 10 + 7 + 100 + 10 + 40 + 200, 5 + 5 + 0 + 50 + 5 + 0 + 20)


def test_cost_by_model_key_and_day(mixed: Store) -> None:
    by_model = {g.name: (g.requests, g.errors, usd(g.cost_usd)) for g in analytics.cost_by_model(mixed, WEEK)}
    assert by_model == {
        "m2": (3, 1, 0.85),
        "m1": (3, 1, 0.03),  # a3 has no price: the sum is of the priced calls
        "emb": (1, 0, 0.001),
    }
    assert [g.name for g in analytics.cost_by_model(mixed, WEEK)] == ["m2", "m1", "emb"]  # costliest first
    by_key = {g.name: (g.requests, usd(g.cost_usd)) for g in analytics.cost_by_key(mixed, WEEK)}
    assert by_key == {"k1": (3, 0.51), "k2": (3, 0.121), None: (1, 0.25)}
    midnight = T0 - HOUR
    days = analytics.cost_by_day(mixed, SpanFilter(since=midnight, until=midnight + 3 * DAY))
    assert [d.name for d in days] == ["2023-11-14", "2023-11-15", "2023-11-16"]  # the empty day is there
    assert [d.requests for d in days] == [6, 1, 0]
    assert days[0].cost_usd == pytest.approx(0.631) and days[2].cost_usd is None


def test_a_very_long_range_lists_only_days_with_calls(mixed: Store) -> None:
    centuries = SpanFilter(since=0, until=10_000_000_000)
    assert [d.name for d in analytics.cost_by_day(mixed, centuries)] == ["2023-11-14", "2023-11-15"]
    assert len(analytics.time_series(mixed, centuries, analytics.bucket_seconds(0, 10_000_000_000))) == 60


def test_filters_narrow_the_statistics(mixed: Store) -> None:
    assert analytics.totals(mixed, SpanFilter(model="m1", since=T0 - 1, until=T0 + DAY)).requests == 3
    only_k2 = analytics.totals(mixed, SpanFilter(api_key="k2", since=T0 - 1, until=T0 + DAY))
    assert (only_k2.requests, usd(only_k2.cost_usd)) == (3, 0.121)
    assert analytics.totals(mixed, SpanFilter(since=T0 + DAY, until=T0 + 2 * DAY)).requests == 1


def test_latency_percentiles_by_model_are_nearest_rank(store: Store) -> None:
    # m1: 1..100 ms (written shuffled); m2: one call
    store.write_spans([make_span(f"m1-{k}", start=T0 + k, ms=float(k)) for k in (*range(51, 101), *range(1, 51))])
    store.write_spans([make_span("m2-1", start=T0, ms=5000.0, model="m2")])
    rows = {r.name: r for r in analytics.latency_by_model(store, SpanFilter(since=T0 - 1, until=T0 + HOUR))}
    m1 = rows["m1"]
    assert m1.requests == 100
    assert [ms(m1.p50_ms), ms(m1.p90_ms), ms(m1.p95_ms), ms(m1.p99_ms)] == [50, 90, 95, 99]
    assert rows["m2"].p50_ms == rows["m2"].p99_ms == pytest.approx(5000, abs=0.01)
    assert [r.name for r in analytics.latency_by_model(store, SpanFilter(since=T0 - 1))] == [
        "m2",
        "m1",
    ]  # slowest first
    overall = analytics.overall_latency(store, SpanFilter(since=T0 - 1, until=T0 + HOUR))
    assert overall.requests == 101 and overall.p99_ms == pytest.approx(100, abs=0.01)


def test_error_counts_by_type_with_rate(mixed: Store) -> None:
    errors = analytics.error_counts(mixed, WEEK)
    assert [(e.error_type, e.count) for e in errors] == [("ProviderTimeout", 1), ("ServerError", 1)]
    assert errors[0].rate == pytest.approx(1 / len(MODEL_CALLS))
    assert errors[0].example == "ProviderTimeout: it failed"
    assert analytics.error_counts(mixed, SpanFilter(model="m1", since=T0 - 1))[0].rate == pytest.approx(1 / 3)


def test_facets_list_what_the_store_holds(mixed: Store) -> None:
    f = analytics.facets(mixed)
    assert f.models == ["emb", "m1", "m2"]
    assert f.keys == ["k1", "k2"]
    assert f.error_types == ["ProviderTimeout", "ServerError", "ToolError"]


def test_overview_gathers_every_chart(mixed: Store) -> None:
    o = analytics.overview(mixed, SpanFilter(since=T0 - HOUR, until=T0 - HOUR + DAY))  # 2023-11-14, UTC
    assert o.bucket_seconds == 1800 and len(o.series) == 48
    assert sum(b.requests for b in o.series) == o.totals.requests == 6  # b2 is on the next day
    assert o.latency.p50_ms is not None and [d.name for d in o.by_day] == ["2023-11-14"]
    assert {g.name for g in o.by_model} == {"m1", "m2", "emb"}


def trace_ids(store: Store, **filters: Any) -> list[str]:
    return [t.trace_id for t in analytics.list_traces(store, SpanFilter(**filters))]


def test_list_traces_filters(mixed: Store) -> None:
    everything = trace_ids(mixed)
    assert everything == ["trace-b2", "agent", "trace-e1", "trace-b1", "trace-a3", "trace-a2", "trace-a1"]
    assert trace_ids(mixed, model="m2") == ["trace-b2", "agent", "trace-b1"]  # the agent's child called m2
    assert trace_ids(mixed, api_key="k2") == ["agent", "trace-e1", "trace-a2"]
    assert trace_ids(mixed, status="error") == ["trace-b2", "trace-a3"]  # the root's status
    assert trace_ids(mixed, text="oslo") == ["agent"]
    assert trace_ids(mixed, text="capital of") == ["trace-a1"]
    assert trace_ids(mixed, since=T0 + 30, until=T0 + DAY) == ["agent", "trace-e1", "trace-b1"]
    assert trace_ids(mixed, model="m1", api_key="k1", status="ok") == ["trace-a1"]
    assert trace_ids(mixed, limit=2) == everything[:2]
    assert trace_ids(mixed, text="nowhere") == []


def test_a_listed_trace_sums_its_model_calls(mixed: Store) -> None:
    (agent,) = analytics.list_traces(mixed, SpanFilter(text="sunny"))
    assert (agent.name, agent.span_id, agent.spans, agent.errors) == ("step", "root", 3, 1)
    assert agent.model == "m2" and agent.api_key == "k2"  # from its model call: the root has neither
    assert (agent.input_tokens, agent.output_tokens) == (200, 20)  # the tool span's numbers are not a model's
    assert agent.cost_usd == pytest.approx(0.100)
    assert agent.duration_ms == pytest.approx(2000, abs=0.01)
    assert agent.input_preview == '{"task": "weather in Oslo"}' and agent.output_preview == "It is sunny in Oslo."
    (a1,) = analytics.list_traces(mixed, SpanFilter(text="capital"))
    assert (a1.input_preview, a1.output_preview) == ("Capital of France?", "Paris.")


def test_previews_are_short_and_readable() -> None:
    long_question = "word " * 100
    assert analytics.input_preview(chat_input(long_question)).endswith("…")
    assert len(analytics.input_preview(chat_input(long_question))) == analytics.PREVIEW_CHARS
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "look"}, {"type": "image_url"}]}]}
    assert analytics.input_preview(parts) == "look"
    calls = {"text": "", "tool_calls": [{"name": "weather", "arguments": '{"city": "Oslo"}'}]}
    assert analytics.output_preview(calls) == 'weather({"city": "Oslo"})'
    assert analytics.output_preview(None) == "" and analytics.output_preview(42) == "42"


@pytest.fixture
def invented(store: Store) -> Store:
    """Two configured models, and calls to names a client made up (one failed before routing)."""
    store.write_spans([
        make_span("k1", start=T0, ms=100, model="m1", cost=0.01),
        make_span("k2", start=T0 + 1, ms=200, model="m2", cost=0.02),
        make_span("u1", start=T0 + 2, ms=300, model=None, request_model="gpt-5-turbo", tokens=None,
                  error_type="UnknownModel"),
        make_span("u2", start=T0 + 3, ms=400, model=None, request_model="my-own-model", tokens=None,
                  error_type="UnknownModel"),
        make_span("u3", start=T0 + 4, ms=500, model="it's-new", cost=0.5),  # a quote in the name
    ])  # fmt: skip
    return store


KNOWN = frozenset({"m1", "m2", "unused"})


def test_unknown_models_are_one_group_in_breakdowns_and_filters(invented: Store) -> None:
    f = SpanFilter(since=T0 - 1, until=T0 + HOUR, known_models=KNOWN)
    by_model = {g.name: (g.requests, g.errors, usd(g.cost_usd)) for g in analytics.cost_by_model(invented, f)}
    assert by_model == {"m1": (1, 0, 0.01), "m2": (1, 0, 0.02), "unknown": (3, 2, 0.5)}
    assert {x.name: x.requests for x in analytics.latency_by_model(invented, f)} == {"m1": 1, "m2": 1, "unknown": 3}
    assert analytics.facets(invented, known_models=KNOWN).models == ["m1", "m2", "unknown"]
    assert analytics.totals(invented, replace(f, model="unknown")).requests == 3
    assert analytics.totals(invented, replace(f, model="m2")).requests == 1
    assert analytics.totals(invented, replace(f, model="gpt-5-turbo")).requests == 0  # not a model of its own
    assert trace_ids(invented, model="unknown", known_models=KNOWN) == ["trace-u3", "trace-u2", "trace-u1"]
    # the list shows each trace under the name it asked for
    listed = analytics.list_traces(invented, SpanFilter(model="unknown", known_models=KNOWN))
    assert [t.model for t in listed] == ["it's-new", "my-own-model", "gpt-5-turbo"]
    # without a configuration to compare with, names are as stored
    assert {g.name for g in analytics.cost_by_model(invented, replace(f, known_models=None))} == {
        "m1", "m2", "gpt-5-turbo", "my-own-model", "it's-new",
    }  # fmt: skip
    assert {g.name for g in analytics.cost_by_model(invented, replace(f, known_models=frozenset()))} == {"unknown"}


@pytest.fixture
def attributed(store: Store) -> Store:
    """Calls tagged as the server tags them: session, user, tags (a list, or one string) and other metadata."""
    meta = "keel.metadata."
    store.write_spans([
        make_span("s1", start=T0, extra={"keel.session": "sess-42", "keel.user": "alice",
                                         "keel.tags": ["beta", "eu"]}),
        make_span("s2", start=T0 + 1, extra={"keel.session": "sess-421", "keel.user": "bob",
                                             "keel.tags": "beta", meta + "ticket": "T_100%"}),
        make_span("s3", start=T0 + 2, input=chat_input("nothing to see")),
        # an agent whose root carries nothing: its model call has the session
        make_span("root", trace_id="agent", start=T0 + 3, model=None, operation=None, tokens=None),
        make_span("call", trace_id="agent", parent_id="root", start=T0 + 3.1,
                  extra={"keel.session": "sess-42", "keel.tags": ["eu"]}),
    ])  # fmt: skip
    return store


def test_search_and_filters_find_session_user_tags_and_metadata(attributed: Store) -> None:
    assert trace_ids(attributed, text="sess-42") == ["agent", "trace-s2", "trace-s1"]  # sess-421 contains it
    assert trace_ids(attributed, text="ALICE") == ["trace-s1"]
    assert trace_ids(attributed, text="t_100%") == ["trace-s2"]  # a metadata value
    assert trace_ids(attributed, text="t%100") == []  # LIKE wildcards are literal
    assert trace_ids(attributed, text="s_ss") == []
    assert trace_ids(attributed, text="keel.session") == []  # names are not values
    assert trace_ids(attributed, session="sess-42") == ["agent", "trace-s1"]  # exact, through the child
    assert trace_ids(attributed, user="bob") == ["trace-s2"]
    assert trace_ids(attributed, tag="beta") == ["trace-s2", "trace-s1"]  # a list, or a single string
    assert trace_ids(attributed, tag="eu", session="sess-42") == ["agent", "trace-s1"]
    assert trace_ids(attributed, tag="be") == []
    assert analytics.totals(attributed, SpanFilter(session="sess-42", since=T0 - 1, until=T0 + HOUR)).requests == 2


def walk(store: Store, sort: analytics.TraceSort, limit: int, **filters: Any) -> list[str]:
    """Every page of the trace list, following the cursor; the ids in order."""
    seen: list[str] = []
    after = None
    for _ in range(50):
        page = analytics.list_traces(store, SpanFilter(limit=limit + 1, **filters), sort=sort, after=after)
        seen += [t.trace_id for t in page[:limit]]
        if len(page) <= limit:
            return seen
        after = analytics.parse_cursor(analytics.trace_cursor(page[limit - 1], sort))
    raise AssertionError("the pages did not end")


def test_keyset_pages_walk_every_trace_once_in_each_order(store: Store) -> None:
    # ties on every sort key: equal start times, durations and costs, and unpriced traces
    store.write_spans([
        make_span(f"t{i}", start=T0 + (i // 2), ms=100.0 * (i % 3), cost=None if i % 4 == 0 else 0.01 * (i % 3))
        for i in range(11)
    ])  # fmt: skip
    everything = trace_ids(store, limit=100)
    assert len(everything) == 11
    assert walk(store, "time", 3) == everything
    slowest = walk(store, "latency", 4)
    durations = {t.trace_id: t.duration_ms for t in analytics.list_traces(store, SpanFilter(limit=100))}
    assert sorted(slowest) == sorted(everything) and len(set(slowest)) == 11
    assert [durations[t] for t in slowest] == sorted(durations.values(), reverse=True)
    costliest = walk(store, "cost", 2)
    costs = {t.trace_id: t.cost_usd for t in analytics.list_traces(store, SpanFilter(limit=100))}
    assert sorted(costliest) == sorted(everything) and len(set(costliest)) == 11
    ranked = [-1.0 if costs[t] is None else costs[t] for t in costliest]
    assert ranked == sorted(ranked, reverse=True) and costs[costliest[-1]] is None  # unpriced last
    assert walk(store, "time", 2, status="error") == []


def test_a_cursor_must_be_one_the_list_gave() -> None:
    assert analytics.parse_cursor("1699923600.25:trace-a") == analytics.TraceCursor(1699923600.25, "trace-a")
    assert analytics.parse_cursor("-1.0:a:b") == analytics.TraceCursor(-1.0, "a:b")
    for bad in ("", "12", "x:trace", "nan:trace", "inf:t", "1.5:"):
        with pytest.raises(InputError, match="not a trace list cursor"):
            analytics.parse_cursor(bad)


# --- the HTTP API, over spans a gateway wrote ------------------------------------------------

TOML = (
    "max_retries = 0\n"
    '[models.fast]\nprovider = "test"\nmodel = "fast"\nscript = ["Paris is the capital of France."]\n'
    "price = { input = 1000.0, output = 2000.0 }\n"
    '[models.smart]\nprovider = "test"\nmodel = "smart"\nscript = ["Lyon sits where the Rhone meets the Saone."]\n'
    "price = { input = 3000.0, output = 6000.0 }\n"
)


ADMIN_KEY = "sk-keel-admin-dashboard-0123456789abcdef"
#: A model whose answers never fit a schema: a structured call to it fails after its re-asks.
NOT_JSON = ["Sure! The city is Lyon.", '{"city": 69}', '{"town": "Lyon"}']


@pytest.fixture
def gw(tmp_path: Path) -> Iterator[Gateway]:
    models = {"broken": TestModel(ServerError("upstream down", status=503)), "jsonish": TestModel(NOT_JSON)}
    gateway_ = gateway(tmp_path, TOML, models=models)
    yield gateway_
    gateway_.close()


ADMIN_KEY = "sk-keel-admin-0123456789abcdef"


@pytest.fixture
def client(gw: Gateway, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    """The dashboard's API as the page calls it: with the admin key (read when the app is made)."""
    monkeypatch.setenv("KEEL_ADMIN_KEY", ADMIN_KEY)
    app = create_app(gateway=gw)
    with TestClient(app, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, **LOCAL) as test_client:
        yield test_client


@pytest.fixture
def traffic(gw: Gateway, client: TestClient) -> list[Span]:
    """Calls through the gateway: two priced models, two keys, one failure, one nested trace."""
    for question, model, key in [
        ("What is the capital of France?", "fast", "team-a"),
        ("Tell me about Lyon", "smart", "team-a"),
        ("And Marseille?", "smart", "team-b"),
        ("Quick one", "fast", None),
    ]:
        gw.chat_sync(question, model=model, key=key)
    with pytest.raises(ServerError):
        gw.chat_sync("Will this work?", model="broken", key="team-b")

    async def agent() -> None:
        with gw.tracer.span("agent plan-trip", {"keel.agent": "planner"}) as root:
            root.input = "Plan a trip to Lyon"
            await gw.chat("Where should I stay in Lyon?", model="smart", key="team-b")
            with gw.tracer.span("execute_tool hotels", {"gen_ai.operation.name": "execute_tool"}) as tool:
                tool.output = ["Hotel Bellecour"]
            root.output = "Stay near Bellecour."

    gw._loop().run(agent())
    gw.flush()
    assert gw.store is not None
    return gw.store.list_spans(SpanFilter(limit=1000))


def get(client: TestClient, path: str, **params: Any) -> Any:
    response = client.get(path, params={k: v for k, v in params.items() if v is not None})
    assert response.status_code == 200, response.text
    return response.json()


def test_overview_numbers_match_the_stored_spans(client: TestClient, traffic: list[Span]) -> None:
    calls = [s for s in traffic if s.attributes.get("gen_ai.operation.name") == "chat"]
    assert len(calls) == 6
    o = get(client, "/api/overview")
    assert o["totals"]["requests"] == 6 and o["totals"]["errors"] == 1
    for model in ("fast", "smart"):
        expected = sum(s.attributes["keel.cost_usd"] for s in calls if s.attributes.get("keel.model") == model)
        (row,) = [g for g in o["by_model"] if g["name"] == model]
        assert expected > 0 and row["cost_usd"] == pytest.approx(expected)
    key_cost = {g["name"]: g["cost_usd"] for g in o["by_key"]}
    team_a = sum(s.attributes.get("keel.cost_usd") or 0 for s in calls if s.attributes.get("keel.api_key") == "team-a")
    assert key_cost["team-a"] == pytest.approx(team_a) and None in key_cost
    assert sum(b["requests"] for b in o["series"]) == 6 and sum(b["errors"] for b in o["series"]) == 1
    assert o["errors"] == [
        {"error_type": "ServerError", "count": 1, "rate": pytest.approx(1 / 6), "example": "upstream down"}
    ]
    assert o["by_day"][-1]["cost_usd"] == pytest.approx(o["totals"]["cost_usd"])
    assert {row["name"] for row in o["latency_by_model"]} == {"fast", "smart", "broken"}


def test_overview_filters_and_range(client: TestClient, traffic: list[Span]) -> None:
    assert get(client, "/api/overview", model="smart")["totals"]["requests"] == 3
    assert get(client, "/api/overview", key="team-b")["totals"]["requests"] == 3
    now = max(s.start_time for s in traffic)
    hour = get(client, "/api/overview", since=now + 1 - 3600, until=now + 1)
    assert hour["bucket_seconds"] == 60 and hour["totals"]["requests"] == 6
    assert get(client, "/api/overview", since=now + 10, until=now + 20)["totals"]["requests"] == 0


def test_traces_list_and_filters(client: TestClient, traffic: list[Span]) -> None:
    traces = get(client, "/api/traces")["traces"]
    assert len(traces) == 6  # five calls, one agent run
    assert [t["start_time"] for t in traces] == sorted((t["start_time"] for t in traces), reverse=True)
    agent = traces[0]
    assert (agent["name"], agent["spans"], agent["model"], agent["api_key"]) == (
        "agent plan-trip",
        3,
        "smart",
        "team-b",
    )
    assert agent["input_preview"] == "Plan a trip to Lyon" and agent["output_preview"] == "Stay near Bellecour."
    first = next(t for t in traces if t["input_preview"] == "What is the capital of France?")
    assert first["output_preview"] == "Paris is the capital of France." and first["cost_usd"] > 0

    def names(**params: Any) -> list[str]:
        return [t["input_preview"] for t in get(client, "/api/traces", **params)["traces"]]

    assert names(model="fast") == ["Quick one", "What is the capital of France?"]
    assert names(status="error") == ["Will this work?"]
    assert names(key="team-a", model="smart") == ["Tell me about Lyon"]
    assert names(q="MARSEILLE") == ["And Marseille?"]
    assert names(q="bellecour") == ["Plan a trip to Lyon"]  # the tool's output, inside the agent's trace
    assert len(names(limit=2)) == 2
    assert names(since=max(s.end_time for s in traffic) + 1) == []


def test_trace_view_returns_the_span_tree(client: TestClient, traffic: list[Span]) -> None:
    root = next(s for s in traffic if s.name == "agent plan-trip")
    body = get(client, f"/api/traces/{root.trace_id}")
    spans = {s["name"]: s for s in body["spans"]}
    assert body["scores"] == []  # no online quality on this store (its scores: tests/test_evals_online_page.py)
    assert set(spans) == {"agent plan-trip", "chat smart", "execute_tool hotels"}
    assert spans["agent plan-trip"]["parent_id"] is None
    assert spans["chat smart"]["parent_id"] == spans["execute_tool hotels"]["parent_id"] == root.span_id
    call = spans["chat smart"]
    assert call["input"]["messages"][-1] == {"role": "user", "content": "Where should I stay in Lyon?"}
    assert call["output"]["text"] == "Lyon sits where the Rhone meets the Saone."
    assert call["model"] == "smart" and call["api_key"] == "team-b" and call["operation"] == "chat"
    assert call["input_tokens"] > 0 and call["output_tokens"] > 0 and call["cost_usd"] > 0
    assert call["duration_ms"] == pytest.approx((call["end_time"] - call["start_time"]) * 1000)
    assert spans["agent plan-trip"]["attributes"]["keel.agent"] == "planner"
    assert spans["execute_tool hotels"]["output"] == ["Hotel Bellecour"]
    failed = next(s for s in traffic if s.status == "error")
    (failed_span,) = get(client, f"/api/traces/{failed.trace_id}")["spans"]
    assert (failed_span["status"], failed_span["error_type"]) == ("error", "ServerError")
    assert "upstream down" in failed_span["error_message"]


def test_facets(client: TestClient, traffic: list[Span]) -> None:
    facets = get(client, "/api/facets")
    assert facets == {
        "models": ["broken", "fast", "smart"],
        "keys": ["team-a", "team-b"],
        "error_types": ["ServerError"],
    }


@pytest.mark.parametrize(
    ("path", "param"),
    [
        ("/api/traces?status=maybe", "status"),
        ("/api/traces?limit=0", "limit"),
        ("/api/traces?limit=501", "limit"),
        ("/api/traces?since=yesterday", "since"),
        ("/api/overview?until=-5", "until"),
        ("/api/traces?q=" + "x" * 201, "q"),
        ("/api/overview?model=", "model"),
        ("/api/traces?q=a%00b", "q"),  # PostgreSQL would refuse the NUL
        ("/api/traces?key=%00", "key"),
        ("/api/traces?sort=price", "sort"),
        ("/api/traces?cursor=%00%00%00", "cursor"),
        ("/api/traces?session=", "session"),
        ("/api/overview?tag=" + "t" * 65, "tag"),
        ("/api/traces?user=a%00", "user"),
    ],
)
def test_bad_parameters_are_400(client: TestClient, path: str, param: str) -> None:
    response = client.get(path)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == f"query.{param}"


def test_an_empty_range_is_400_and_an_unknown_trace_404(client: TestClient) -> None:
    response = client.get("/api/overview", params={"since": 200, "until": 100})
    assert response.status_code == 400 and "since must be before until" in response.json()["error"]["message"]
    response = client.get("/api/traces/no-such-trace")
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"


def test_an_empty_store_answers_zeroes(client: TestClient) -> None:
    o = get(client, "/api/overview")
    assert o["totals"]["requests"] == 0 and o["totals"]["cost_usd"] is None
    assert len(o["series"]) in (48, 49) and all(b["requests"] == 0 for b in o["series"])  # 49 unless aligned
    assert o["latency"]["p50_ms"] is None and o["errors"] == [] and o["by_model"] == []
    assert get(client, "/api/traces") == {"traces": [], "next_cursor": None}
    assert get(client, "/api/facets") == {"models": [], "keys": [], "error_types": []}


def test_a_cursor_the_list_did_not_give_is_400(client: TestClient) -> None:
    response = client.get("/api/traces", params={"cursor": "yesterday:trace-1"})
    assert response.status_code == 400 and "not a trace list cursor" in response.json()["error"]["message"]


def test_an_invented_model_is_unknown_in_charts_and_filters_but_named_on_its_trace(
    client: TestClient, gw: Gateway, traffic: list[Span]
) -> None:
    for name in ("gpt-5-turbo", "gpt-6-ultra"):
        body = {"model": name, "messages": [{"role": "user", "content": f"Hello {name}"}]}
        assert client.post("/v1/chat/completions", json=body).status_code == 404
    gw.flush()
    o = get(client, "/api/overview")
    names = {g["name"] for g in o["by_model"]}
    assert names == {"fast", "smart", "broken", "unknown"}
    assert {row["name"] for row in o["latency_by_model"]} == names
    assert next(g for g in o["by_model"] if g["name"] == "unknown")["requests"] == 2
    assert get(client, "/api/facets")["models"] == ["broken", "fast", "smart", "unknown"]
    assert get(client, "/api/overview", model="unknown")["totals"]["requests"] == 2
    assert get(client, "/api/overview", model="gpt-5-turbo")["totals"]["requests"] == 0
    listed = get(client, "/api/traces", model="unknown")["traces"]
    assert [t["model"] for t in listed] == ["gpt-6-ultra", "gpt-5-turbo"]
    (span,) = get(client, f"/api/traces/{listed[1]['trace_id']}")["spans"]
    assert span["model"] == "gpt-5-turbo" and span["error_type"] == "UnknownModel"


def test_traces_are_found_by_session_user_and_tag(client: TestClient, gw: Gateway, traffic: list[Span]) -> None:
    for session, user, tags in [("sess-42", "alice", "beta,eu"), ("sess-7", "bob", "eu"), (None, None, None)]:
        headers = {"x-keel-session-id": session, "x-keel-user": user, "x-keel-tags": tags}
        body = {"model": "fast", "messages": [{"role": "user", "content": f"Question from {user}"}]}
        sent = client.post("/v1/chat/completions", json=body, headers={k: v for k, v in headers.items() if v})
        assert sent.status_code == 200, sent.text
    gw.flush()

    def asked(**params: Any) -> list[str]:
        return [t["input_preview"] for t in get(client, "/api/traces", **params)["traces"]]

    assert asked(q="sess-42") == ["Question from alice"]  # the search box finds a session
    assert asked(q="BOB") == ["Question from bob"]
    assert asked(session="sess-42") == ["Question from alice"]
    assert asked(session="sess-4") == []  # the filter is exact
    assert asked(user="bob") == ["Question from bob"]
    assert asked(tag="eu") == ["Question from bob", "Question from alice"]
    assert asked(tag="eu", user="alice") == ["Question from alice"]
    assert asked(q="sess_42") == [] and asked(q="sess%42") == []  # wildcards match themselves
    assert get(client, "/api/overview", session="sess-7")["totals"]["requests"] == 1
    assert get(client, "/api/overview", tag="eu")["totals"]["requests"] == 2


def test_traces_page_past_the_first_and_sort_by_latency_and_cost(client: TestClient, traffic: list[Span]) -> None:
    everything = get(client, "/api/traces")["traces"]
    assert len(everything) == 6
    pages, cursor = [], None
    while True:
        body = get(client, "/api/traces", limit=4, cursor=cursor)
        pages.append([t["trace_id"] for t in body["traces"]])
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert [len(p) for p in pages] == [4, 2]
    assert [trace for page in pages for trace in page] == [t["trace_id"] for t in everything]
    slowest = get(client, "/api/traces", sort="latency")["traces"]
    assert [t["duration_ms"] for t in slowest] == sorted((t["duration_ms"] for t in everything), reverse=True)
    costliest = get(client, "/api/traces", sort="cost")["traces"]
    ranked = [t["cost_usd"] for t in costliest]
    assert ranked[-1] is None and all(c is not None for c in ranked[:-1])  # the failed call has no cost: last
    assert ranked[:-1] == sorted(ranked[:-1], reverse=True)
    first = get(client, "/api/traces", sort="cost", limit=2)
    second = get(client, "/api/traces", sort="cost", limit=2, cursor=first["next_cursor"])
    assert [t["trace_id"] for t in first["traces"] + second["traces"]] == [t["trace_id"] for t in costliest[:4]]


def test_a_failed_structured_call_keeps_every_invalid_answer_on_its_trace(client: TestClient, gw: Gateway) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    with pytest.raises(StructuredOutputError):
        gw.chat_sync("Which city?", model="jsonish", response_model=schema, max_reasks=2)
    gw.flush()
    (trace,) = get(client, "/api/traces", model="jsonish")["traces"]
    (span,) = get(client, f"/api/traces/{trace['trace_id']}")["spans"]
    invalid = span["attributes"]["keel.structured.invalid_outputs"]
    assert [(i["try"], i["output"]) for i in invalid] == [(1, NOT_JSON[0]), (2, NOT_JSON[1]), (3, NOT_JSON[2])]
    assert "not valid JSON" in invalid[0]["error"]
    assert "city" in invalid[1]["error"] and "string" in invalid[1]["error"]
    assert "required" in invalid[2]["error"]
    assert span["attributes"]["keel.structured.tries"] == 3


def test_without_a_store_the_api_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEEL_ADMIN_KEY", ADMIN_KEY)
    gw = Gateway(store=False, models={"t": TestModel("hi")})
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    with TestClient(create_app(gateway=gw), headers=admin, **LOCAL) as client:
        response = client.get("/api/overview")
        assert response.status_code == 503 and "without a trace store" in response.json()["error"]["message"]
        assert client.get("/").status_code == 200  # the page itself still loads


def test_the_page_and_its_assets_are_served(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'src="static/app.js"' in page.text and 'href="static/style.css"' in page.text
    script = client.get("/static/app.js")
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert "api/overview" in script.text or '"overview"' in script.text
    assert client.get("/static/style.css").headers["content-type"].startswith("text/css")
    assert client.get("/static/index.html").status_code == 404
    assert client.get("/static/..%2Fdashboard.py").status_code == 404


def test_the_api_needs_the_admin_key_when_one_is_set(gw: Gateway, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEEL_ADMIN_KEY", "sk-keel-admin-0123456789abcdef")
    with TestClient(create_app(gateway=gw), **LOCAL) as client:
        assert client.get("/").status_code == 200  # the page holds no data
        assert client.get("/static/app.js").status_code == 200
        for path in ("/api/overview", "/api/traces", "/api/facets", "/api/traces/x"):
            assert client.get(path).status_code == 401, path
        wrong = client.get("/api/facets", headers={"Authorization": "Bearer sk-keel-wrong-0123456789abcdef"})
        assert wrong.status_code == 401
        ok = client.get("/api/facets", headers={"Authorization": "Bearer sk-keel-admin-0123456789abcdef"})
        assert ok.status_code == 200


def test_overview_range_default_is_a_day(client: TestClient) -> None:
    o = get(client, "/api/overview")
    assert math.isclose(o["until"] - o["since"], 86400.0)
