"""The dashboard's read queries: time series, cost and latency breakdowns, errors, trace lists.

They sit apart from `Store` because only the dashboard needs them; they use the
store's own connection, placeholder rewriting and filter clauses, so one SQL
text runs on SQLite and PostgreSQL alike. Statistics count model calls only
(chat and embeddings spans): a span around them (a RAG request, an agent step)
is not a request of its own and carries no cost, as in `Store.spend`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from keel.errors import InputError
from keel.store.base import MODEL as BY_MODEL
from keel.store.base import UNKNOWN_MODEL, SpanFilter, Store, model_expr

__all__ = [
    "Bucket",
    "ErrorCount",
    "Facets",
    "GroupTotals",
    "Latency",
    "Overview",
    "TraceCursor",
    "TraceSort",
    "TraceSummary",
    "bucket_seconds",
    "cost_by_day",
    "cost_by_key",
    "cost_by_model",
    "error_counts",
    "facets",
    "latency_by_model",
    "list_traces",
    "overall_latency",
    "overview",
    "parse_cursor",
    "time_series",
    "totals",
    "trace_cursor",
]

MODEL_CALLS = "operation IN ('chat', 'embeddings')"
ERRORS = "SUM(CASE WHEN status = 'error' THEN 1 ELSE 0 END)"
#: Bucket sizes a chart may use, smallest first; the range picks the first that gives at most MAX_BUCKETS.
BUCKET_SIZES = (60, 300, 900, 1800, 3600, 3 * 3600, 6 * 3600, 12 * 3600, 86400, 7 * 86400, 30 * 86400)
MAX_BUCKETS = 60
PREVIEW_CHARS = 160
MAX_FILLED_DAYS = 400  # beyond this, cost_by_day lists only the days that had calls
#: Nearest-rank percentiles over rows numbered by ROW_NUMBER() (rn) among n, as in `Store.stats`.
PERCENTILES = ", ".join(f"MIN(CASE WHEN rn >= {p} * n THEN duration_ms END)" for p in ("0.50", "0.90", "0.95", "0.99"))


@dataclass(frozen=True)
class Bucket:
    start: float  # epoch seconds
    requests: int
    errors: int
    cost_usd: float | None
    input_tokens: int
    output_tokens: int
    p50_ms: float | None
    p95_ms: float | None


@dataclass(frozen=True)
class GroupTotals:
    """Requests, errors, tokens and cost of one model, key, day or of everything."""

    name: str | None  # None: calls without a key
    requests: int
    errors: int
    cost_usd: float | None  # None when no call of the group had a known price
    input_tokens: int
    output_tokens: int

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


@dataclass(frozen=True)
class Latency:
    """Nearest-rank latency percentiles of a model's calls (all of them, failed ones too, as `Store.stats`)."""

    name: str | None
    requests: int
    p50_ms: float | None
    p90_ms: float | None
    p95_ms: float | None
    p99_ms: float | None


@dataclass(frozen=True)
class ErrorCount:
    error_type: str
    count: int
    rate: float  # of every model call in the range
    example: str | None  # one of its error messages


@dataclass(frozen=True)
class Facets:
    models: list[str]
    keys: list[str]
    error_types: list[str]


@dataclass(frozen=True)
class Overview:
    since: float
    until: float
    bucket_seconds: int
    totals: GroupTotals
    latency: Latency
    series: list[Bucket]
    by_model: list[GroupTotals]
    by_key: list[GroupTotals]
    by_day: list[GroupTotals]
    latency_by_model: list[Latency]
    errors: list[ErrorCount]


@dataclass(frozen=True)
class TraceSummary:
    """A trace as the list shows it: its root span, plus totals over its model calls."""

    trace_id: str
    span_id: str
    name: str
    start_time: float
    duration_ms: float
    status: str  # the root's status
    error_type: str | None
    error_message: str | None
    model: str | None  # the root's model, else the filter's, else one the trace called
    models: int  # how many models the trace called
    api_key: str | None
    spans: int
    errors: int  # failed spans anywhere in the trace
    input_tokens: int
    output_tokens: int
    cost_usd: float | None
    input_preview: str
    output_preview: str


# --- helpers --------------------------------------------------------------------


def _calls_where(store: Store, f: SpanFilter) -> tuple[str, list[Any]]:
    """The filter's WHERE clause, narrowed to model calls."""
    where, params = store._where(replace(f, operation=None))
    return (f"{where} AND {MODEL_CALLS}" if where else f" WHERE {MODEL_CALLS}"), params


def _query(store: Store, sql: str, params: list[Any]) -> list[tuple[Any, ...]]:
    with store.transaction() as cur:
        cur.execute(sql, params)
        return [tuple(row) for row in cur.fetchall()]


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def _int(value: Any) -> int:
    return 0 if value is None else int(value)


def _totals_row(name: Any, row: tuple[Any, ...]) -> GroupTotals:
    requests, errors, cost, input_tokens, output_tokens = row
    return GroupTotals(name, _int(requests), _int(errors), _float(cost), _int(input_tokens), _int(output_tokens))


# --- time series ----------------------------------------------------------------


def bucket_seconds(since: float, until: float) -> int:
    """The smallest usual bucket size that splits the range into at most MAX_BUCKETS buckets."""
    span = max(until - since, 1.0)
    for size in BUCKET_SIZES:
        if span / size <= MAX_BUCKETS:
            return size
    return math.ceil(span / MAX_BUCKETS)


def time_series(store: Store, f: SpanFilter, bucket: int) -> list[Bucket]:
    """Model calls per bucket of `bucket` seconds from `f.since` (required) to `f.until` (default now).

    Buckets are aligned to multiples of their size since the epoch (whole hours, UTC days),
    and every bucket of the range is returned, empty ones included.
    """
    if f.since is None:
        raise ValueError("time_series needs a start (SpanFilter.since)")
    origin = float(math.floor(f.since / bucket) * bucket)
    where, params = _calls_where(store, f)
    # FLOOR is not in every SQLite build, and CAST(x AS INTEGER) truncates on SQLite but rounds on
    # PostgreSQL: subtracting 1 where the cast went above x makes it a floor on both.
    sql = f"""
        WITH b AS (
            SELECT (start_time - ?) / ? AS x, status, duration_ms, cost_usd, input_tokens, output_tokens
            FROM spans{where}
        ), c AS (
            SELECT CAST(x AS INTEGER) - CASE WHEN CAST(x AS INTEGER) > x THEN 1 ELSE 0 END AS bucket,
                   status, duration_ms, cost_usd, input_tokens, output_tokens
            FROM b
        ), r AS (
            SELECT bucket, status, duration_ms, cost_usd, input_tokens, output_tokens,
                   ROW_NUMBER() OVER (PARTITION BY bucket ORDER BY duration_ms) AS rn,
                   COUNT(*) OVER (PARTITION BY bucket) AS n
            FROM c
        )
        SELECT bucket, COUNT(*), {ERRORS}, SUM(cost_usd), SUM(input_tokens), SUM(output_tokens),
               MIN(CASE WHEN rn >= 0.50 * n THEN duration_ms END), MIN(CASE WHEN rn >= 0.95 * n THEN duration_ms END)
        FROM r GROUP BY bucket
    """
    found = {int(r[0]): r for r in _query(store, sql, [origin, float(bucket), *params])}
    until = f.until if f.until is not None else datetime.now(UTC).timestamp()
    count = max(1, math.ceil((until - origin) / bucket))
    return [_bucket(origin + i * bucket, found.get(i)) for i in range(count)]


def _bucket(start: float, row: tuple[Any, ...] | None) -> Bucket:
    if row is None:
        return Bucket(start, 0, 0, None, 0, 0, None, None)
    _, requests, errors, cost, input_tokens, output_tokens, p50, p95 = row
    return Bucket(
        start, _int(requests), _int(errors), _float(cost), _int(input_tokens), _int(output_tokens),
        _float(p50), _float(p95),
    )  # fmt: skip


# --- breakdowns -----------------------------------------------------------------


def _grouped(store: Store, f: SpanFilter, group: str) -> list[GroupTotals]:
    where, params = _calls_where(store, f)
    sql = f"""
        SELECT {group}, COUNT(*), {ERRORS}, SUM(cost_usd), SUM(input_tokens), SUM(output_tokens)
        FROM spans{where} GROUP BY {group}
    """
    rows = [_totals_row(r[0], r[1:]) for r in _query(store, sql, params)]
    return sorted(rows, key=lambda g: (-(g.cost_usd or 0.0), -g.requests, g.name or ""))


def totals(store: Store, f: SpanFilter) -> GroupTotals:
    """Every model call that matches the filter, as one group named "all"."""
    where, params = _calls_where(store, f)
    sql = f"SELECT COUNT(*), {ERRORS}, SUM(cost_usd), SUM(input_tokens), SUM(output_tokens) FROM spans{where}"
    return _totals_row("all", _query(store, sql, params)[0])


def cost_by_model(store: Store, f: SpanFilter) -> list[GroupTotals]:
    """By configured model (the requested name when the call failed before one was chosen), costliest first.

    With `f.known_models` set, every other name (one a client made up) is the one group "unknown".
    """
    return _grouped(store, f, model_expr(f.known_models))


def cost_by_key(store: Store, f: SpanFilter) -> list[GroupTotals]:
    """By key name, costliest first; calls made without a key are the group named None."""
    return _grouped(store, f, "api_key")


def cost_by_day(store: Store, f: SpanFilter) -> list[GroupTotals]:
    """By UTC day, oldest first; with `f.since` set, every day of the range is there, empty ones too
    (up to MAX_FILLED_DAYS days)."""
    found = {g.name: g for g in _grouped(store, f, "day")}
    days = sorted(d for d in found if d is not None)
    until = f.until if f.until is not None else datetime.now(UTC).timestamp()
    if f.since is not None and until - f.since <= MAX_FILLED_DAYS * 86400:
        days = _days(f.since, until)
    return [found.get(day) or GroupTotals(day, 0, 0, None, 0, 0) for day in days]


def _days(since: float, until: float) -> list[str]:
    day = datetime.fromtimestamp(since, UTC).date()
    last = datetime.fromtimestamp(max(since, until - 1e-6), UTC).date()
    days = []
    while day <= last:
        days.append(day.isoformat())
        day += timedelta(days=1)
    return days


def _latency(store: Store, f: SpanFilter, group: str | None) -> list[Latency]:
    where, params = _calls_where(store, f)
    partition = f"PARTITION BY {group}" if group else ""
    sql = f"""
        WITH r AS (
            SELECT {group or "NULL"} AS g, duration_ms,
                   ROW_NUMBER() OVER ({partition} ORDER BY duration_ms) AS rn,
                   COUNT(*) OVER ({partition}) AS n
            FROM spans{where}
        )
        SELECT {"g" if group else "NULL"}, COUNT(*), {PERCENTILES} FROM r {"GROUP BY g" if group else ""}
    """
    rows = _query(store, sql, params)
    return [Latency(r[0], int(r[1]), _float(r[2]), _float(r[3]), _float(r[4]), _float(r[5])) for r in rows if r[1]]


def latency_by_model(store: Store, f: SpanFilter) -> list[Latency]:
    """p50/p90/p95/p99 of each model's calls, slowest p95 first."""
    return sorted(_latency(store, f, model_expr(f.known_models)), key=lambda x: (-(x.p95_ms or 0.0), x.name or ""))


def overall_latency(store: Store, f: SpanFilter) -> Latency:
    found = _latency(store, f, None)
    return replace(found[0], name="all") if found else Latency("all", 0, None, None, None, None)


def error_counts(store: Store, f: SpanFilter) -> list[ErrorCount]:
    """Failed model calls by error type, most frequent first, with the share of all calls each is."""
    where, params = _calls_where(store, replace(f, status=None))
    sql = f"""
        SELECT COALESCE(error_type, 'unknown'), COUNT(*), MAX(error_message)
        FROM spans{where} AND status = 'error' GROUP BY COALESCE(error_type, 'unknown')
    """
    requests = totals(store, replace(f, status=None)).requests
    rows = [
        ErrorCount(r[0], int(r[1]), int(r[1]) / requests if requests else 0.0, r[2]) for r in _query(store, sql, params)
    ]
    return sorted(rows, key=lambda e: (-e.count, e.error_type))


def overview(store: Store, f: SpanFilter) -> Overview:
    """Everything the dashboard's charts show for one range (`f.since` and `f.until` required)."""
    if f.since is None or f.until is None:
        raise ValueError("overview needs a range (SpanFilter.since and .until)")
    bucket = bucket_seconds(f.since, f.until)
    return Overview(
        since=f.since,
        until=f.until,
        bucket_seconds=bucket,
        totals=totals(store, f),
        latency=overall_latency(store, f),
        series=time_series(store, f, bucket),
        by_model=cost_by_model(store, f),
        by_key=cost_by_key(store, f),
        by_day=cost_by_day(store, f),
        latency_by_model=latency_by_model(store, f),
        errors=error_counts(store, f),
    )


def facets(store: Store, limit: int = 500, known_models: frozenset[str] | None = None) -> Facets:
    """The models, keys and error types in the store, for the filters' drop-downs.

    With `known_models`, the models are those of them the store holds, plus "unknown" for any other.
    """
    values: dict[str, list[str]] = {}
    with store.transaction() as cur:
        for name, column, present in (
            ("model", model_expr(known_models), BY_MODEL), ("api_key", "api_key", "api_key"),
            ("error_type", "error_type", "error_type"),
        ):  # fmt: skip
            sql = f"SELECT DISTINCT {column} FROM spans WHERE {present} IS NOT NULL ORDER BY 1 LIMIT ?"
            cur.execute(sql, [limit])
            values[name] = [str(r[0]) for r in cur.fetchall()]
    return Facets(values["model"], values["api_key"], values["error_type"])


# --- traces -----------------------------------------------------------------------


#: How the trace list may be ordered, each descending: newest, slowest (the root's duration) or costliest
#: (the sum over the trace's model calls; traces without a known cost last).
TraceSort = Literal["time", "latency", "cost"]
ROOT_SORT_COLUMNS = {"time": "start_time", "latency": "duration_ms"}


@dataclass(frozen=True)
class TraceCursor:
    """Where a page of the trace list ends: the last trace's sort value and id (keyset paging, never OFFSET:
    a page stays right while new traces arrive, and costs the same however deep it is)."""

    value: float
    trace_id: str


def trace_cursor(trace: TraceSummary, sort: TraceSort) -> str:
    """The cursor after `trace`, as the API hands it out: `VALUE:TRACE_ID` (repr keeps a float exact)."""
    value = {"time": trace.start_time, "latency": trace.duration_ms, "cost": trace.cost_usd}[sort]
    return f"{float(-1 if value is None else value)!r}:{trace.trace_id}"


def parse_cursor(text: str) -> TraceCursor:
    value, sep, trace_id = text.partition(":")
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not sep or not trace_id or not math.isfinite(number):
        raise InputError(f"not a trace list cursor: {text[:80]!r} (pass back the next_cursor of a page)")
    return TraceCursor(number, trace_id)


def list_traces(
    store: Store, f: SpanFilter, *, sort: TraceSort = "time", after: TraceCursor | None = None
) -> list[TraceSummary]:
    """Traces as their root spans, newest (or slowest, or costliest) first; `after` continues a page.

    Status and time apply to the root; model, key, session, user, tag and text match any span of
    the trace, since a root that wraps model calls (an agent, a RAG request) has none of its own.
    """
    outer, params = store._where(SpanFilter(status=f.status, since=f.since, until=f.until, roots_only=True))
    if f.text or any(v is not None for v in (f.model, f.api_key, f.session, f.user, f.tag)):
        inner, inner_params = store._where(
            SpanFilter(
                model=f.model, api_key=f.api_key, text=f.text, session=f.session, user=f.user, tag=f.tag,
                known_models=f.known_models, since=f.since,  # a child starts after its root: `since` narrows it
            )
        )  # fmt: skip
        outer += f" AND trace_id IN (SELECT trace_id FROM spans{inner})"
        params += inner_params
    if sort == "cost":  # the order needs every candidate's totals: page after the join
        roots_limit, roots_params = "", []
        final_where, final_params = _after(after, "COALESCE(t.cost_usd, -1)", "r.trace_id")
        order = "ORDER BY COALESCE(t.cost_usd, -1) DESC, r.trace_id DESC"
    else:  # the order is the root's own: only one page of roots needs its totals
        column = ROOT_SORT_COLUMNS[sort]
        page, page_params = _after(after, column, "trace_id")
        outer += f" AND {page}" if page else ""
        params += page_params
        roots_limit, roots_params = f"ORDER BY {column} DESC, trace_id DESC LIMIT ?", [f.limit]
        final_where, final_params = "", []
        order = f"ORDER BY r.{column} DESC, r.trace_id DESC"
    sql = f"""
        WITH roots AS (
            SELECT trace_id, span_id, name, start_time, duration_ms, status, error_type, error_message,
                   {BY_MODEL} AS model, api_key, input, output
            FROM spans{outer} {roots_limit}
        ), totals AS (
            SELECT trace_id, COUNT(*) AS spans, {ERRORS} AS errors,
                   SUM(CASE WHEN {MODEL_CALLS} THEN input_tokens END) AS input_tokens,
                   SUM(CASE WHEN {MODEL_CALLS} THEN output_tokens END) AS output_tokens,
                   SUM(CASE WHEN {MODEL_CALLS} THEN cost_usd END) AS cost_usd,
                   MIN({BY_MODEL}) AS model, COUNT(DISTINCT {BY_MODEL}) AS models, MIN(api_key) AS api_key
            FROM spans WHERE trace_id IN (SELECT trace_id FROM roots) GROUP BY trace_id
        )
        SELECT r.trace_id, r.span_id, r.name, r.start_time, r.duration_ms, r.status, r.error_type, r.error_message,
               COALESCE(r.model, ?, t.model), t.models, COALESCE(r.api_key, t.api_key), t.spans, t.errors,
               t.input_tokens, t.output_tokens, t.cost_usd, r.input, r.output
        FROM roots r JOIN totals t ON t.trace_id = r.trace_id
        {"WHERE " + final_where if final_where else ""}
        {order} LIMIT ?
    """
    # a trace that called several models is listed under the one the filter asked for; under "unknown",
    # a trace shows the name it asked for (its own trace, not a chart's series)
    listed_as = None if f.model == UNKNOWN_MODEL and f.known_models is not None else f.model
    values = [*params, *roots_params, listed_as, *final_params, f.limit]
    return [_trace_summary(row) for row in _query(store, sql, values)]


def _after(after: TraceCursor | None, key: str, trace_id: str) -> tuple[str, list[Any]]:
    """The keyset condition for the rows after a cursor in (key, trace id) descending order."""
    if after is None:
        return "", []
    return f"({key} < ? OR ({key} = ? AND {trace_id} < ?))", [after.value, after.value, after.trace_id]


def _trace_summary(row: tuple[Any, ...]) -> TraceSummary:
    (trace_id, span_id, name, start, duration, status, error_type, error_message, model, models, key, spans, errors,
     input_tokens, output_tokens, cost, input_json, output_json) = row  # fmt: skip
    return TraceSummary(
        trace_id=trace_id, span_id=span_id, name=name, start_time=float(start), duration_ms=float(duration),
        status=status, error_type=error_type, error_message=_clip(error_message or "", 300) or None,
        model=model, models=int(models), api_key=key, spans=int(spans), errors=_int(errors),
        input_tokens=_int(input_tokens), output_tokens=_int(output_tokens), cost_usd=_float(cost),
        input_preview=input_preview(_decode(input_json)), output_preview=output_preview(_decode(output_json)),
    )  # fmt: skip


def _decode(value: Any) -> Any:
    """A JSON column: text on SQLite, and on PostgreSQL too (the store reads JSONB as text)."""
    return json.loads(value) if isinstance(value, str) else value


def _clip(text: str, limit: int = PREVIEW_CHARS) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _content_text(content: Any) -> str:
    """A message's content: a string, or OpenAI content parts of which the text ones count."""
    if isinstance(content, list):
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict) and p.get("type") == "text")
    return "" if content is None else str(content)


def input_preview(value: Any) -> str:
    """The last user message of a chat input; otherwise the input as JSON."""
    if isinstance(value, dict) and isinstance(value.get("messages"), list):
        users = [m for m in value["messages"] if isinstance(m, dict) and m.get("role") == "user"]
        if users:
            return _clip(_content_text(users[-1].get("content")))
    return _preview(value)


def output_preview(value: Any) -> str:
    """The text of a chat output, or the tool calls it asked for; otherwise the output as JSON."""
    if isinstance(value, dict) and "text" in value:
        calls = value.get("tool_calls") or []
        if not value["text"] and calls:
            return _clip(", ".join(f"{c.get('name')}({c.get('arguments', '')})" for c in calls if isinstance(c, dict)))
        return _clip(str(value["text"] or ""))
    return _preview(value)


def _preview(value: Any) -> str:
    if value is None:
        return ""
    return _clip(value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str))
