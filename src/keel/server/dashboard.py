"""The web dashboard: one static page at `/` and the JSON API it reads under `/api/`.

The page is plain HTML, CSS and JavaScript shipped in `keel/server/static/`
(no build step, nothing fetched from a CDN); it draws its charts as SVG from
`/api/overview`, lists traces from `/api/traces` and jobs from `/api/jobs` (read
through keel.jobs, from keel's store), and eval runs from `/api/evals` (dashboard_evals.py). The page itself is public:
it holds no data. Every `/api/` route needs the admin key (open mode on
localhost counts as admin); on a 401 or 403 the page asks for the key.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import FileResponse

from keel.errors import InputError, NotFound, StoreDisabled
from keel.server.auth import require_admin
from keel.server.dashboard_evals import evals_router
from keel.store import SpanFilter, Store, analytics
from keel.trace import Span

if TYPE_CHECKING:
    from keel.config import Config
    from keel.evals.online import OnlineService
    from keel.jobs import ItemRow, JobRow, JobRunner

__all__ = ["dashboard_router"]

STATIC = Path(__file__).parent / "static"
#: What /static/ serves: only these files, whatever the path asks for.
ASSETS = {
    "app.js": "text/javascript",
    "style.css": "text/css",
    "quality.js": "text/javascript",
    "evals.js": "text/javascript",
}
DEFAULT_RANGE_S = 86400.0
QUALITY_RANGE_S = 14 * 86400.0  # the Quality page looks further back: a version's effect shows over days
PERIODS = {"hour": 3600.0, "day": 86400.0, "week": 7 * 86400.0}
#: Recorded once online quality created its table (keel.evals.online.ONLINE_TABLE_MIGRATION, kept in step by a test).
ONLINE_TABLE_MIGRATION = "evals/online_0001_scores"
NO_CACHE = {"cache-control": "no-cache"}  # an upgraded keel serves its new page at once

NO_NUL = r"^[^\x00]*$"  # PostgreSQL refuses NUL in text: a 400, not a 500
Epoch = Annotated[float | None, Query(ge=0, le=10_000_000_000, description="Epoch seconds.")]
Since = Annotated[
    str | None, Query(min_length=1, max_length=40, pattern=NO_NUL, description='A duration ("14d") or epoch seconds.')
]
Name = Annotated[str | None, Query(min_length=1, max_length=200, pattern=NO_NUL)]
Text = Annotated[
    str | None, Query(max_length=200, pattern=NO_NUL, description="Text in an input, output, error or metadata value.")
]
Session = Annotated[str | None, Query(min_length=1, max_length=256, pattern=NO_NUL, description="A session id.")]
User = Annotated[str | None, Query(min_length=1, max_length=256, pattern=NO_NUL, description="A user, exactly.")]
Tag = Annotated[str | None, Query(min_length=1, max_length=64, pattern=NO_NUL, description="One of a call's tags.")]
Cursor = Annotated[
    str | None, Query(min_length=3, max_length=400, pattern=NO_NUL, description="The next_cursor of the last page.")
]


def _store(request: Request) -> Store:
    store: Store | None = request.app.state.gateway.store
    if store is None:
        raise StoreDisabled("this gateway runs without a trace store (Gateway(store=False)): the dashboard has no data")
    return store


def _known_models(request: Request) -> frozenset[str]:
    """The configured models: any other name a span holds (one a client made up) shows as "unknown",
    so a caller cannot add series to the charts or entries to the filters."""
    return frozenset(request.app.state.gateway.model_names)


def _range(since: float | None, until: float | None) -> tuple[float, float]:
    """The requested range; by default the last 24 hours."""
    until = time.time() if until is None else until
    since = until - DEFAULT_RANGE_S if since is None else since
    if since >= until:
        raise InputError("since must be before until")
    return since, until


def span_json(span: Span) -> dict[str, Any]:
    """A span as the trace view draws it: the store's columns plus every attribute."""
    a = span.attributes
    return {
        "span_id": span.span_id, "parent_id": span.parent_id, "name": span.name,
        "operation": a.get("gen_ai.operation.name"), "start_time": span.start_time, "end_time": span.end_time,
        "duration_ms": span.duration_ms, "status": span.status, "error_type": span.error_type,
        "error_message": span.error_message, "model": a.get("keel.model") or a.get("gen_ai.request.model"),
        "provider": a.get("gen_ai.provider.name"), "api_key": a.get("keel.api_key"),
        "input_tokens": a.get("gen_ai.usage.input_tokens"), "output_tokens": a.get("gen_ai.usage.output_tokens"),
        "cost_usd": a.get("keel.cost_usd"), "attempts": a.get("keel.attempts"),
        "attributes": a, "input": span.input, "output": span.output,
    }  # fmt: skip


def _api_router() -> APIRouter:
    api = APIRouter(prefix="/api", dependencies=[Depends(require_admin)], tags=["dashboard"])

    @api.get("/overview")
    async def overview(
        request: Request,
        since: Epoch = None,
        until: Epoch = None,
        model: Name = None,
        key: Name = None,
        session: Session = None,
        user: User = None,
        tag: Tag = None,
    ) -> dict[str, Any]:
        """Chart data for a range: requests and errors over time, cost by model, key and day,
        latency percentiles and errors by type. Model calls only; unconfigured models are "unknown"."""
        start, end = _range(since, until)
        f = SpanFilter(
            model=model, api_key=key, session=session, user=user, tag=tag, since=start, until=end,
            known_models=_known_models(request),
        )  # fmt: skip
        return asdict(await asyncio.to_thread(analytics.overview, _store(request), f))

    @api.get("/traces")
    async def traces(
        request: Request,
        model: Name = None,
        key: Name = None,
        status: Annotated[Literal["ok", "error"] | None, Query()] = None,
        since: Epoch = None,
        until: Epoch = None,
        q: Text = None,
        session: Session = None,
        user: User = None,
        tag: Tag = None,
        sort: Annotated[analytics.TraceSort, Query(description="time (newest first), latency or cost")] = "time",
        cursor: Cursor = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
    ) -> dict[str, Any]:
        """Traces newest (or slowest, or costliest) first, each as its root span with the totals of its
        model calls; `next_cursor`, passed back as `cursor` with the same filters, gives the next page."""
        after = analytics.parse_cursor(cursor) if cursor is not None else None
        f = SpanFilter(
            model=model, api_key=key, status=status, since=since, until=until, text=q or None, session=session,
            user=user, tag=tag, known_models=_known_models(request), limit=limit + 1,  # one more: is there a next page?
        )  # fmt: skip
        found = await asyncio.to_thread(analytics.list_traces, _store(request), f, sort=sort, after=after)
        page = found[:limit]
        more = len(found) > limit
        return {
            "traces": [asdict(t) for t in page],
            "next_cursor": analytics.trace_cursor(page[-1], sort) if more else None,
        }

    @api.get("/traces/{trace_id}")
    async def trace(
        request: Request, trace_id: Annotated[str, PathParam(max_length=128, pattern=NO_NUL)]
    ) -> dict[str, Any]:
        """Every span of a trace, oldest first, with parent ids, content, tokens, cost and timing."""
        store = _store(request)
        spans = await asyncio.to_thread(store.get_trace, trace_id)
        if not spans:
            raise NotFound(f"no trace {trace_id!r} in the store")
        scores = await asyncio.to_thread(_trace_scores, store, trace_id)
        return {"trace_id": trace_id, "spans": [span_json(s) for s in spans], "scores": scores}

    @api.get("/facets")
    async def facets(request: Request) -> dict[str, Any]:
        """The models (configured ones, and "unknown" for any other), keys and error types seen, for the filters."""
        found = await asyncio.to_thread(analytics.facets, _store(request), known_models=_known_models(request))
        return asdict(found)

    @api.get("/jobs")
    async def jobs(
        request: Request,
        status: Annotated[JobState | None, Query(description="Only jobs in this state.")] = None,
        kind: Annotated[
            str | None, Query(min_length=1, max_length=200, pattern=NO_NUL, description="Only jobs of this kind.")
        ] = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 100,
    ) -> dict[str, Any]:
        """Durable jobs, most recently active first: kind, status, progress (done, failed, total) and cost."""
        runner = _job_runner(request)
        found = await asyncio.to_thread(runner.jobs, status=status, kind=kind, limit=limit)
        kinds = await asyncio.to_thread(runner.kinds)  # for the page's kind filter: every kind, not the listed ones'
        return {"jobs": [job_json(j) for j in found], "kinds": kinds}

    @api.get("/jobs/{name}")
    async def job(
        request: Request,
        name: Annotated[str, PathParam(min_length=1, max_length=200, pattern=NO_NUL)],
        limit: Annotated[int, Query(ge=1, le=1000, description="Items listed, in submission order.")] = 100,
    ) -> dict[str, Any]:
        """One job: its items by status, its failed items with their errors, and its first items, each with the
        trace of its last run."""
        return await asyncio.to_thread(_job_detail, _job_runner(request), name, limit)

    @api.get("/quality")
    async def quality(
        request: Request,
        since: Since = None,
        until: Epoch = None,
        period: Annotated[Literal["hour", "day", "week"], Query(description="Length of each period.")] = "day",
        scorer: Annotated[str | None, Query(min_length=1, max_length=64, pattern=NO_NUL)] = None,
        model: Name = None,
    ) -> dict[str, Any]:
        """Online quality ([evals.online]): each scorer's mean with its 95% CI by period, model version and
        prompt version; the version changes; per scorer, the test of the latest change (before vs after)."""
        from keel.evals.online import parse_since

        now = time.time()
        end = now if until is None else until
        start, end = _range(end - QUALITY_RANGE_S if since is None else parse_since(since, now), end)
        config = request.app.state.gateway.config
        return await asyncio.to_thread(_quality, config, _store(request), start, end, PERIODS[period], scorer, model)

    api.include_router(evals_router(_store))  # /api/evals, /api/evals/{run}, /api/evals/compare
    return api


def _trace_scores(store: Store, trace_id: str) -> list[dict[str, Any]]:
    """The trace's online scores ([evals.online]): scorer, value or error, spread, when scored, by span."""
    if ONLINE_TABLE_MIGRATION not in store.applied_migrations():
        return []  # online quality never ran on this store: no need to import the evals app (and DBOS)
    from keel.evals.online import trace_scores

    return [s.to_json() for s in trace_scores(store, trace_id)]


def _quality(
    config: Config, store: Store, since: float, until: float, period_s: float, scorer: str | None, model: str | None
) -> dict[str, Any]:
    from keel.evals.online import backfill_skipped, drop_test, online_config, quality

    report = quality(store, since=since, until=until, period_s=period_s, scorer=scorer, model=model)
    online = online_config(config)
    tests = []
    for name in report.scorers:
        t = drop_test(store, name, since=since, until=until, model=model)
        if t.change is not None:
            tests.append({
                "scorer": name, "change": t.change.to_json(), "previous": list(t.previous) if t.previous else None,
                "n_before": t.n_before, "n_after": t.n_after, "mean_before": t.mean_before,
                "mean_after": t.mean_after, "drop": t.drop, "p_value": t.p_value,
            })  # fmt: skip
    skipped = backfill_skipped(store)
    return {
        **report.to_json(), "tests": tests,
        "online": {"sample": online.sample, "interval_s": online.interval_s,
                   "scorers": [s.metric for s in online.scorers], "max_backfill_s": online.backfill_s,
                   "skipped": {"from_ts": skipped[0], "until_ts": skipped[1]} if skipped else None},
    }  # fmt: skip


async def start_online_quality(config: Config, store: Store | None) -> OnlineService | None:
    """`keel serve`'s online scoring (scheduler and embedded worker), when `[evals.online]` samples calls.

    The evals app (and DBOS) is imported only when the file has an `[evals]` section.
    """
    if store is None or not config.has_section("evals"):
        return None
    from keel.evals.online import start_online

    return await start_online(config, store)


JobState = Literal["running", "done", "failed", "cancelled"]


def _job_runner(request: Request) -> JobRunner:
    """A runner over the server's store: it only reads keel's job rows here (no DBOS client is opened)."""
    from keel.jobs import JobRunner  # imported at the first jobs request: DBOS adds a second to the server's start

    gateway = request.app.state.gateway
    return JobRunner(gateway.config, store=_store(request))


def job_json(job: JobRow) -> dict[str, Any]:
    return {
        "name": job.name, "kind": job.kind, "queue": job.queue, "status": job.status, "total": job.total,
        "done": job.done, "failed": job.failed, "remaining": job.remaining, "cost_usd": job.cost_usd,
        "created_at": job.created_at, "updated_at": job.updated_at,
    }  # fmt: skip


def item_json(item: ItemRow) -> dict[str, Any]:
    return {
        "key": item.key, "position": item.position, "status": item.status, "attempts": item.attempts,
        "error": item.error, "cost_usd": item.cost_usd, "trace_id": item.trace_id, "updated_at": item.updated_at,
    }  # fmt: skip


def _job_detail(runner: JobRunner, name: str, limit: int) -> dict[str, Any]:
    status = runner.status(name, errors=limit)
    items = runner.items(name, limit=limit)
    counts = {state: status.counts.get(state, 0) for state in ("pending", "running", "done", "failed")}
    return {
        "job": job_json(status.job), "counts": counts, "failed_items": [item_json(i) for i in status.errors],
        "items": [item_json(i) for i in items], "items_shown": len(items),
    }  # fmt: skip


def dashboard_router() -> APIRouter:
    """`/` (the page), `/static/*` (its script and style) and `/api/*` (its data, admin only)."""
    router = APIRouter()

    @router.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html", headers=NO_CACHE)

    @router.get("/static/{name}", include_in_schema=False)
    async def asset(name: str) -> FileResponse:
        if name not in ASSETS:
            raise NotFound(f"no static file {name!r}")
        return FileResponse(STATIC / name, media_type=ASSETS[name], headers=NO_CACHE)

    router.include_router(_api_router())
    return router
