"""The dashboard's Evals page data: `/api/evals` (the runs), `/api/evals/{run}` (one run's report) and
`/api/evals/compare?a=RUN&b=RUN` (two runs compared), admin only like every `/api/` route.

A module of its own so that the dashboard's router only includes it: the numbers are
`keel.evals.report_data`'s, the same that `keel eval report` draws into its HTML file, and the
comparison is `keel.evals.compare`'s, exactly as `keel eval compare --json` prints it.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi import Path as PathParam

from keel.errors import InputError, UnknownJob

if TYPE_CHECKING:
    from keel.evals.results import RunResult
    from keel.store import Store

__all__ = ["evals_router"]

NO_NUL = r"^[^\x00]*$"  # PostgreSQL refuses NUL in text: a 400, not a 500
RunId = Annotated[str, Query(min_length=1, max_length=300, pattern=NO_NUL, description="A run id (keel eval list).")]
EMPTY_HINT = "No evaluation run yet: keel eval run SUITE records one run per variant."


def _load(store: Store, run_id: str) -> RunResult:
    from keel.evals import storage

    return storage.load_run(store, run_id)


def _job_status(store: Store, job: str) -> str | None:
    """The run's job state (running, failed, cancelled), read only for runs that are not complete."""
    from keel.jobs import records
    from keel.jobs.schema import ensure_tables

    ensure_tables(store)  # the jobs app's tables, made on first use (a store may hold runs and no job table yet)
    try:
        return records.get_job(store, job).status
    except UnknownJob:
        return None


def _status(store: Store, row: dict[str, Any]) -> str:
    """done when every case repeat is recorded; otherwise what its job says (a cancelled run stays partial)."""
    if int(row["recorded"]) >= int(row["total"]):
        return "done"
    job = _job_status(store, row["job"])
    return job if job in ("running", "failed", "cancelled") else "partial"


def _summary_run(store: Store, row: dict[str, Any]) -> RunResult:
    """A listed run with only what its summary needs (no inputs, outputs or details decoded)."""
    from keel.evals import storage
    from keel.evals.results import RunResult

    return RunResult(run_id=row["run_id"], suite=row["suite"], variant=row["variant"], created_at=row["created_at"],
                     cases=storage.summary_cases(store, row["run_id"]), status=_status(store, row))  # fmt: skip


def list_runs(store: Store, limit: int) -> dict[str, Any]:
    from keel.evals import storage
    from keel.evals.report_data import run_stats

    rows = storage.list_runs(store, limit=limit)
    runs = []
    for row in rows:
        stats = run_stats(_summary_run(store, row)).to_dict()
        stats.update(job=row["job"], total=row["total"], started_at=row["created_at"],
                     finished_at=row["updated_at"] if int(row["recorded"]) >= int(row["total"]) else None)  # fmt: skip
        runs.append(stats)
    return {"runs": runs, "empty_hint": None if runs else EMPTY_HINT}


def run_report(store: Store, run_id: str, failing: int) -> dict[str, Any]:
    """One run's report, and every variant of its `keel eval run` (the same job) for cost against quality."""
    from keel.evals import storage
    from keel.evals.report_data import build_report_data, run_stats

    run = _load(store, run_id)
    job = storage.get_run_row(store, run_id)["job"]
    out = build_report_data([run], max_failing=failing).to_dict()
    siblings = storage.list_runs(store, job=job, limit=100)
    out["variants"] = [
        run_stats(run if row["run_id"] == run_id else _summary_run(store, row)).to_dict()
        for row in sorted(siblings, key=lambda r: r["variant_index"])
    ]
    out["job"] = job
    return out


def compare_report(store: Store, a: str, b: str, cluster: str | None, alpha: float) -> dict[str, Any]:
    """A against B: the comparison (`keel eval compare`'s) and both runs' report data; runs that share no
    case are a 400 naming both, as `keel eval compare` exits 2."""
    from keel.evals.report_data import build_report_data

    return build_report_data([_load(store, a), _load(store, b)], cluster_by=cluster, alpha=alpha, strict=True).to_dict()


def evals_router(store_of: Any) -> APIRouter:
    """The routes, mounted inside the dashboard's admin-only `/api` router; `store_of(request)` is its store."""
    api = APIRouter()

    @api.get("/evals")
    async def evals(
        request: Request, limit: Annotated[int, Query(ge=1, le=500, description="Runs, newest first.")] = 50
    ) -> dict[str, Any]:
        """Evaluation runs, newest first: suite, variant, cases, repeats, pass rate, mean scores, cost,
        latency, started and finished, status."""
        return await asyncio.to_thread(list_runs, store_of(request), limit)

    @api.get("/evals/compare")
    async def evals_compare(
        request: Request,
        a: RunId,
        b: RunId,
        cluster: Annotated[str | None, Query(min_length=1, max_length=64, pattern=NO_NUL)] = None,
        alpha: Annotated[float, Query(gt=0, lt=1, description="Significance level.")] = 0.05,
    ) -> dict[str, Any]:
        """Run B against the baseline A, as `keel eval compare`: paired deltas with their intervals (Tango's for
        pass/fail, bootstrap for scores), McNemar's exact test, the flipped cases with both outputs and traces,
        cost and latency deltas; plus both runs' plots' data."""
        if a == b:
            raise InputError(f"compare two different runs (a and b are both {a!r})")
        return await asyncio.to_thread(compare_report, store_of(request), a, b, cluster, alpha)

    @api.get("/evals/{run_id}")
    async def eval_run(
        request: Request,
        run_id: Annotated[str, PathParam(min_length=1, max_length=300, pattern=NO_NUL)],
        failing: Annotated[int, Query(ge=0, le=500, description="Failing cases listed.")] = 50,
    ) -> dict[str, Any]:
        """One run's report: summary, score distributions, cost against quality of its suite's variants,
        per-tag breakdown, failing cases with their outputs and trace ids."""
        return await asyncio.to_thread(run_report, store_of(request), run_id, failing)

    return api
