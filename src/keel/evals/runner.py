"""Running a suite: every case x variant x repeat is one item of a durable job (keel.jobs on DBOS).

- One job per suite run, named after the suite and a digest of its task,
  variants, cases and repeats: running the same suite again finds the same job
  and resumes it (after kill -9 too: the in-process worker restarts under the
  same id and DBOS hands it back its pending items).
- Each item runs the task once (or takes its output from the cache), scores
  it and writes the case's row with ON CONFLICT DO NOTHING: a step DBOS re-runs
  after a crash records nothing twice.
- Model outputs are cached by (task config, variant, case input, repeat):
  `rescore` re-scores a stored run with the suite's current scorers and calls
  no task at all; a new run of an unchanged task costs nothing.
- Every item's trace is the job item's trace: its span carries the run id, case
  id, variant and repeat, and the gateway's spans (model calls, RAG retrieval)
  join it. The gateway's limits, retries and cost apply to every call; the job
  queue bounds concurrency (`concurrency` of the suite).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from keel import jobs
from keel.errors import InputError
from keel.evals import storage
from keel.evals.dataset import Case
from keel.evals.results import CaseResult, RunResult
from keel.evals.scorers import Sample, ScoreContext, Scorer, build_scorers, score_case, thresholds
from keel.evals.suite import Suite, SuiteSpec, Variant, load_suite
from keel.evals.tasks import TaskOutput, run_task
from keel.jobs.records import JobRow
from keel.store.base import Store
from keel.trace import current_span

if TYPE_CHECKING:
    from keel.gateway.core import Gateway
    from keel.rag.engine import RAG

__all__ = ["EVAL_KIND", "RunHandle", "job_name", "load_run", "rescore", "run_suite", "start_suite"]

EVAL_KIND = "keel.eval.case"
#: How often workers look for a running suite's items. A worker starts items only when it polls, so a
#: suite of C concurrent cases that take L seconds runs at most C cases per max(L, poll): at the jobs
#: default (0.2 s) 1,000 cases of a 50 ms model at concurrency 16 took 12.5 s or more instead of 3.1.
#: The suite's queue goes back to `[jobs] poll_s` when the run is over (`JobRunner.settle`).
POLL_S = 0.02


def job_name(suite: Suite) -> str:
    return f"eval:{suite.name}-{suite.identity()}"


def run_id(suite: Suite, variant: Variant) -> str:
    return f"{suite.name}-{suite.identity()}-v{variant.index}"


def cache_key(suite: Suite, variant: Variant, case: Case, repeat: int) -> str:
    data = {
        "task": suite.task_config(), "variant": variant.to_json(), "prompt": variant.prompt,
        "input": case.input, "fields": dict(case.fields), "repeat": repeat,
    }  # fmt: skip
    return "out:" + hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class _Context:
    """What the items of one running suite need, in the process that runs them."""

    suite: Suite
    gateway: Gateway
    store: Store
    scorers: list[Scorer]
    limits: dict[str, float]
    variants: list[Variant]
    rag: RAG | None = None

    def rag_engine(self) -> RAG | None:
        if self.rag is None and self.suite.spec.task.kind == "rag":
            from keel.rag.engine import RAG

            self.rag = RAG(self.gateway)
        return self.rag


_contexts: dict[str, _Context] = {}  # job name -> context, for this process's items


def _context(job: str, store: Store) -> _Context:
    """The job's context: registered by `run_suite`, else rebuilt from the stored spec (a `keel worker`)."""
    found = _contexts.get(job)
    if found is not None:
        return found
    from keel.gateway.core import Gateway

    rows = storage.list_runs(store, job=job, limit=1)
    if not rows:
        raise storage.UnknownRun(f"no evaluation run belongs to job {job!r}")
    row = storage.get_run_row(store, rows[0]["run_id"])
    suite = Suite(SuiteSpec.model_validate(row["spec"]), [], Path(row["base_dir"]), row["source"])
    scorers = build_scorers(suite.spec.scorers)
    gateway = Gateway(store=store)
    ctx = _Context(suite, gateway, store, scorers, thresholds(scorers), suite.variants())
    _contexts[job] = ctx
    return ctx


def _score_context(ctx: _Context) -> ScoreContext:
    return ScoreContext(
        ctx.gateway, lambda k: storage.cache_get(ctx.store, k), lambda k, v: storage.cache_put(ctx.store, k, v)
    )


async def _evaluate(ctx: _Context, item: Mapping[str, Any], trace_id: str) -> tuple[CaseResult, float]:
    """Run (or take from the cache) and score one case repeat; the result and what it cost now."""
    variant = ctx.variants[int(item["variant"])]
    case = Case.from_json(item["case"])
    repeat = int(item["repeat"])
    rid = item["run"]
    span = current_span()
    if span is not None:
        span.set(keel__eval__run=rid, keel__eval__case=case.id, keel__eval__variant=variant.name,
                 keel__eval__repeat=repeat, keel__eval__suite=ctx.suite.name)  # fmt: skip
    key = cache_key(ctx.suite, variant, case, repeat)
    cached = await asyncio.to_thread(storage.cache_get, ctx.store, key)
    cost = 0.0
    error: str | None = None
    out: TaskOutput | None = None
    if cached is not None:
        out = TaskOutput.from_json(cached)
    else:
        metadata = {"eval.run": rid, "eval.case": case.id}
        try:
            out = await run_task(ctx.suite, ctx.gateway, ctx.rag_engine(), case, variant, metadata)
            out.trace_id = out.trace_id or trace_id
            cost += out.cost_usd or 0.0
            await asyncio.to_thread(storage.cache_put, ctx.store, key, out.to_json())
        except Exception as exc:  # the task failed on this case: recorded as such, never scored as a pass
            error = f"{type(exc).__name__}: {exc}"[:2000]
            cost += float(getattr(exc, "cost_usd", None) or 0.0)
    base = CaseResult(case_id=case.id, repeat=repeat, tags=case.tags, expected=case.expected, input=case.input,
                      error=error, trace_id=trace_id)  # fmt: skip
    if out is None:
        return base, cost
    sctx = _score_context(ctx)
    scores, errors, passed = await score_case(ctx.scorers, Sample(case, out.output, out.details), sctx, ctx.limits)
    result = replace(
        base, output=out.output, scores=scores, passed=passed, scorer_errors=tuple(errors), latency_s=out.latency_s,
        input_tokens=out.input_tokens, output_tokens=out.output_tokens, cost_usd=out.cost_usd,
        trace_id=out.trace_id or trace_id, details=out.details,
    )  # fmt: skip
    return result, cost + sctx.cost_usd


@jobs.kind(EVAL_KIND, attempts=2)
async def evaluate_item(item: dict[str, Any], ctx: jobs.ItemContext) -> dict[str, Any]:
    """One case x variant x repeat of a suite run (a job item)."""
    from keel.jobs.engine import _active

    store = _active.store if _active is not None else _contexts[item["job"]].store
    context = _context(item["job"], store)
    result, cost = await _evaluate(context, item, ctx.trace_id)
    written = await asyncio.to_thread(
        storage.write_case, context.store, item["run"], int(item["position"]),
        cache_key(context.suite, context.variants[int(item["variant"])], Case.from_json(item["case"]), result.repeat),
        result, item["case"],
    )  # fmt: skip
    ctx.add_cost(cost if written else 0.0)
    return {"passed": result.passed, "error": result.error is not None}


# --- starting and waiting ----------------------------------------------------------------------------------------


@dataclass
class RunHandle:
    """A submitted suite run: its job and one run id per variant."""

    job: str
    run_ids: list[str]
    store: Store
    runner: jobs.JobRunner
    worker: jobs.Worker | None

    def status(self) -> JobRow:
        return self.runner.get(self.job)

    def wait(self, progress: Callable[[JobRow], None] | None = None, poll_s: float = 0.2) -> list[RunResult]:
        while True:
            row = self.runner.get(self.job)
            if progress is not None:
                progress(row)
            if row.finished or row.status == "cancelled":
                break
            time.sleep(poll_s)
        return [storage.load_run(self.store, r) for r in self.run_ids]

    def close(self) -> None:
        try:
            self.runner.settle(self.job)  # a run that is over: its queue back on the default poll
        finally:
            if self.worker is not None:
                self.worker.stop()
                self.worker = None
            self.runner.close()


def _items(suite: Suite, variants: list[Variant], job: str) -> dict[str, dict[str, Any]]:
    items: dict[str, dict[str, Any]] = {}
    for variant in variants:
        rid = run_id(suite, variant)
        for position, case in enumerate(suite.cases):
            for repeat in range(suite.spec.repeats):
                items[f"v{variant.index}/{case.id}/{repeat}"] = {
                    "job": job, "run": rid, "variant": variant.index, "case": case.to_json(),
                    "position": position, "repeat": repeat,
                }  # fmt: skip
    return items


def _prepare_collection(suite: Suite, gateway: Gateway) -> None:
    """Ingest a RAG task's documents (`task.rag.ingest`) before any case asks the collection a question."""
    spec = suite.spec.task.rag
    if spec is None or spec.ingest is None:
        return
    from keel.rag.engine import RAG

    path = Path(spec.ingest) if Path(spec.ingest).is_absolute() else suite.base_dir / spec.ingest
    if not path.exists():
        raise InputError(f"task.rag.ingest: {path} does not exist (the documents of collection {spec.collection!r})")
    RAG(gateway).ingest_sync(path, spec.collection)


def start_suite(
    suite: Suite | str | Path, *, gateway: Gateway | None = None, limit: int | None = None, worker: bool = True
) -> RunHandle:
    """Submit a suite's run (or find it, to resume) and, unless `worker=False`, run its items in this process."""
    from keel.gateway.core import Gateway
    from keel.jobs import worker as worker_module

    suite = load_suite(suite) if isinstance(suite, (str, Path)) else suite
    suite = suite.limited(limit)
    gateway = gateway or Gateway()
    if gateway.store is None:
        raise storage.UnknownRun("an evaluation run is stored: give the gateway a store")
    store = gateway.store
    _prepare_collection(suite, gateway)
    scorers = build_scorers(suite.spec.scorers)
    limits = thresholds(scorers)
    variants = suite.variants()
    job = job_name(suite)
    now = time.time()
    spec = suite.spec.model_dump(mode="json", by_alias=True)
    for variant in variants:
        storage.create_run(store, {
            "run_id": run_id(suite, variant), "job": job, "suite": suite.name, "variant": variant.name,
            "variant_index": variant.index, "variant_params": variant.to_json(), "thresholds": limits, "spec": spec,
            "base_dir": str(suite.base_dir.resolve()), "source": suite.source,
            "total": len(suite.cases) * suite.spec.repeats, "created_at": now,
        })  # fmt: skip
    _contexts[job] = _Context(suite, gateway, store, scorers, limits, variants)
    runner = jobs.JobRunner(gateway.config, store=store)
    started: jobs.Worker | None = None
    try:
        if worker and worker_module._running is None:
            # the same worker id on every attempt: after kill -9, DBOS gives this worker its pending items back
            started = jobs.Worker(gateway.config, worker_id=job, store=store).start()
        runner.submit(job, EVAL_KIND, _items(suite, variants, job), concurrency=suite.spec.concurrency,
                      poll_s=min(POLL_S, gateway.config.jobs.poll_s))  # fmt: skip
    except BaseException:
        if started is not None:
            started.stop()
        runner.close()
        raise
    return RunHandle(job, [run_id(suite, v) for v in variants], store, runner, started)


def run_suite(
    suite: Suite | str | Path,
    *,
    gateway: Gateway | None = None,
    limit: int | None = None,
    progress: Callable[[JobRow], None] | None = None,
) -> list[RunResult]:
    """Run a suite to the end (resuming it if it was started before); one `RunResult` per variant."""
    handle = start_suite(suite, gateway=gateway, limit=limit)
    try:
        return handle.wait(progress)
    finally:
        handle.close()


def load_run(store: Store, run_id: str) -> RunResult:
    """A stored run with its cases (see `keel.evals.storage.load_run`)."""
    return storage.load_run(store, run_id)


async def _rescore(store: Store, rid: str, suite: Suite, gateway: Gateway | None) -> RunResult:
    scorers = build_scorers(suite.spec.scorers)
    limits = thresholds(scorers)
    ctx = ScoreContext(gateway, lambda k: storage.cache_get(store, k), lambda k, v: storage.cache_put(store, k, v))
    for case, case_data in storage.case_rows(store, rid):
        if case.error is not None:
            continue  # the task failed: there is no output to score
        sample = Sample(Case.from_json(case_data), case.output, case.details)
        scores, errors, passed = await score_case(scorers, sample, ctx, limits)
        storage.update_scores(store, rid, replace(case, scores=scores, scorer_errors=tuple(errors), passed=passed))
    storage.update_thresholds(store, rid, limits)
    return storage.load_run(store, rid)


def rescore(
    store: Store, rid: str, *, suite: Suite | str | Path | None = None, gateway: Gateway | None = None
) -> RunResult:
    """Re-score a stored run with the suite's current scorers (its file re-read, or `suite`); no task is called."""
    row = storage.get_run_row(store, rid)
    if suite is None and row["source"]:
        suite = load_suite(row["source"])
    elif suite is None:
        suite = Suite(SuiteSpec.model_validate(row["spec"]), [], Path("."))
    if isinstance(suite, (str, Path)):
        suite = load_suite(suite)
    return asyncio.run(_rescore(store, rid, suite, gateway))
