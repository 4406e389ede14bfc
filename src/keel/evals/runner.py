"""Running a suite: its case repeats are split into the items of one durable job (keel.jobs on DBOS).

- One job per suite run, named after the suite and a digest of its task,
  variants, cases and repeats: running the same suite again finds the same job
  and resumes it (after kill -9 too: the in-process worker restarts under the
  same id and DBOS hands it back its pending items).
- An item is a chunk of K case repeats (`item_count`: at least 4 items per
  unit of concurrency, at most 64 cases each, or `cases_per_item`), so that
  DBOS's per-item bookkeeping (a workflow, its step, about 16 statements) is
  paid once per K cases rather than per case. A resumed run keeps the split it
  started with. Every case is still its own unit of durability: its output is
  cached and its row written as soon as it is done, with ON CONFLICT DO
  NOTHING, and an item run again (a crash, a retry) first skips the cases its
  run already recorded; so a kill -9 in the middle of a chunk loses no case and
  records none twice, and only the cases in flight at the kill run again.
- Concurrency stays the suite's `concurrency` C across every worker: the job's
  queue runs at most C items at once and an item at most C // (items running
  at once) of its cases, so C x that window never exceeds C. With the usual
  split (4 C items or more) the window is 1: C items each run their cases one
  after the other, and their slots stay full while items start and end.
- Model outputs are cached by (task config, variant, case input, repeat):
  `rescore` re-scores a stored run with the suite's current scorers and calls
  no task at all; a new run of an unchanged task costs nothing.
- Every case repeat is its own trace: a root span `eval.case` with the run id,
  case id, variant and repeat (and the job item it ran in), which the
  gateway's spans (model calls, RAG retrieval) join. The gateway's limits,
  retries and cost apply to every call.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from keel import jobs
from keel.errors import InputError, UnknownJob
from keel.evals import storage
from keel.evals.dataset import Case
from keel.evals.results import CaseResult, RunResult
from keel.evals.scorers import Sample, ScoreContext, Scorer, build_scorers, score_case, thresholds
from keel.evals.suite import Suite, SuiteSpec, Variant, load_suite
from keel.evals.tasks import TaskOutput, run_task
from keel.jobs import records
from keel.store.base import Store
from keel.trace import Span, enter_span, exit_span, new_id, new_trace_id

if TYPE_CHECKING:
    from keel.gateway.core import Gateway
    from keel.rag.engine import RAG

__all__ = ["EVAL_KIND", "RunHandle", "RunProgress", "item_count", "job_name", "load_run", "rescore", "run_suite",
           "start_suite"]  # fmt: skip

EVAL_KIND = "keel.eval.case"
#: How often workers look for a running suite's items. A queue slot freed by an item that ends waits for the
#: next poll: with items of one case, at the jobs default (0.2 s) 1,000 cases of a 50 ms model at concurrency
#: 16 took 12.5 s or more instead of 3.1, hence 0.02 s then. Items of ~16 cases last ~16 latencies, so a poll
#: every 0.05 s costs a slot ~25 ms per item (~3%) with 2.5 times fewer polls than 0.02 s; measured on 1,000
#: cases (5 rounds each, load 5-7): run phase median 4.46 s at 0.05 against 4.95 s at 0.02, CPU the same
#: within noise (4.95 against 4.74 ms/case). The suite's queue goes back to `[jobs] poll_s` when the run is
#: over (`JobRunner.settle`).
POLL_S = 0.05
#: The usual split: at least this many items per unit of concurrency (a queue slot freed by an item that
#: ends waits for the next poll; with several items per slot those waits are a small share of the run)...
ITEMS_PER_SLOT = 4
#: ... and at most this many case repeats per item (beyond it DBOS's share per case is already small, while
#: bigger items balance worse across workers).
MAX_CASES_PER_ITEM = 64


def item_count(cases: int, concurrency: int, cases_per_item: int | None = None) -> int:
    """How many job items `cases` case repeats are split into (near-equal chunks, in dataset order)."""
    if cases_per_item is not None:
        if cases_per_item < 1:
            raise InputError(f"cases per item must be at least 1, not {cases_per_item}")
        return math.ceil(cases / cases_per_item)
    return min(cases, max(ITEMS_PER_SLOT * concurrency, math.ceil(cases / MAX_CASES_PER_ITEM)))


def case_window(concurrency: int, items: int) -> int:
    """Cases an item runs at once: the queue runs min(C, items) items at once, and C bounds them all."""
    return max(1, concurrency // max(1, min(concurrency, items)))


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
    window: int = 1  # cases an item runs at once (`case_window`)
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
    window = case_window(suite.spec.concurrency, records.get_job(store, job).total)
    ctx = _Context(suite, gateway, store, scorers, thresholds(scorers), suite.variants(), window)
    _contexts[job] = ctx
    return ctx


def _score_context(ctx: _Context) -> ScoreContext:
    return ScoreContext(
        ctx.gateway, lambda k: storage.cache_get(ctx.store, k), lambda k, v: storage.cache_put(ctx.store, k, v)
    )


#: Scorers that may call a model (slow, and billed): with one of these a task's output is cached as soon as the
#: task returns, before scoring; otherwise it is cached with the case's row, in one transaction.
MODEL_SCORERS = frozenset({"judge", "embedding_similarity", "faithfulness", "custom"})


async def _evaluate(
    ctx: _Context, unit: Mapping[str, Any], key: str, cached: Any, trace_id: str
) -> tuple[CaseResult, float, Any]:
    """Run the task on one case repeat (or take `cached`, its cached output) and score it: the result, what it
    cost now, and the output still to cache (None: nothing, or cached already)."""
    variant = ctx.variants[int(unit["variant"])]
    case = Case.from_json(unit["case"])
    repeat = int(unit["repeat"])
    rid = unit["run"]
    cost = 0.0
    error: str | None = None
    out: TaskOutput | None = None
    to_cache: Any = None
    if cached is not None:
        out = TaskOutput.from_json(cached)
    else:
        metadata = {"eval.run": rid, "eval.case": case.id}
        try:
            out = await run_task(ctx.suite, ctx.gateway, ctx.rag_engine(), case, variant, metadata)
            out.trace_id = out.trace_id or trace_id
            cost += out.cost_usd or 0.0
            to_cache = out.to_json()
            if any(s.spec.type in MODEL_SCORERS for s in ctx.scorers):
                await asyncio.to_thread(storage.cache_put, ctx.store, key, to_cache)
                to_cache = None
        except Exception as exc:  # the task failed on this case: recorded as such, never scored as a pass
            error = f"{type(exc).__name__}: {exc}"[:2000]
            cost += float(getattr(exc, "cost_usd", None) or 0.0)
    base = CaseResult(case_id=case.id, repeat=repeat, tags=case.tags, expected=case.expected, input=case.input,
                      error=error, trace_id=trace_id)  # fmt: skip
    if out is None:
        return base, cost, None
    sctx = _score_context(ctx)
    scores, errors, passed = await score_case(ctx.scorers, Sample(case, out.output, out.details), sctx, ctx.limits)
    result = replace(
        base, output=out.output, scores=scores, passed=passed, scorer_errors=tuple(errors), latency_s=out.latency_s,
        input_tokens=out.input_tokens, output_tokens=out.output_tokens, cost_usd=out.cost_usd,
        trace_id=out.trace_id or trace_id, details=out.details,
    )  # fmt: skip
    return result, cost + sctx.cost_usd, to_cache


def _case_span(ctx: _Context, unit: Mapping[str, Any], job: str, item_key: str) -> Span:
    """The root span of one case repeat's own trace (not the job item's: an item runs many cases)."""
    span = Span(new_trace_id(), new_id(8), None, "eval.case", time.time(), attributes={
        "keel.job": job, "keel.job.item": item_key,
    })  # fmt: skip
    span.set(keel__eval__run=unit["run"], keel__eval__case=unit["case"]["id"],
             keel__eval__variant=ctx.variants[int(unit["variant"])].name, keel__eval__repeat=int(unit["repeat"]),
             keel__eval__suite=ctx.suite.name)  # fmt: skip
    return span


async def _run_case(
    ctx: _Context, unit: Mapping[str, Any], key: str, cached: Any, job: str, item_key: str
) -> tuple[CaseResult, float]:
    """One case repeat in its own trace, its output cached and its row written as soon as it is done (one
    transaction); what it cost (0 if a run of this item before a crash recorded it first)."""
    span = _case_span(ctx, unit, job, item_key)
    token = enter_span(span)
    try:
        result, cost, to_cache = await _evaluate(ctx, unit, key, cached, span.trace_id)
        written = await asyncio.to_thread(
            storage.write_case, ctx.store, unit["run"], int(unit["position"]), key, result, unit["case"], to_cache
        )
        span.set(keel__cost_usd=cost or None)
        if result.error is not None:
            span.status, span.error_message = "error", result.error
        return result, cost if written else 0.0
    except BaseException as exc:
        span.fail(exc)
        raise
    finally:
        exit_span(token)
        ctx.gateway.tracer.finish(span)


def _chunk_state(ctx: _Context, units: list[Mapping[str, Any]]) -> tuple[list[Mapping[str, Any]], list[str], Any]:
    """The units not recorded yet, the cache key of each, and the cached outputs of all (one thread hop and two
    queries a chunk rather than one of each a case)."""
    recorded = storage.recorded_cases(ctx.store, units)
    todo = [u for u in units if (u["run"], str(u["case"]["id"]), int(u["repeat"])) not in recorded]
    keys = [cache_key(ctx.suite, ctx.variants[int(u["variant"])], Case.from_json(u["case"]), int(u["repeat"]))
            for u in todo]  # fmt: skip
    return todo, keys, storage.cache_get_many(ctx.store, keys)


def _units(item: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The case repeats of an item: a chunk's list, or the item itself (one case per item: small suites, and
    runs started before chunks)."""
    return list(item["cases"]) if "cases" in item else [item]


@jobs.kind(EVAL_KIND, attempts=2)
async def evaluate_item(item: dict[str, Any], ctx: jobs.ItemContext) -> dict[str, Any]:
    """A chunk of a suite run's case repeats (a job item): those not yet recorded, `window` at a time."""
    # the worker's store; the run's own when the handler is called directly
    store = ctx.store if ctx.store is not None else _contexts[item["job"]].store
    context = _context(item["job"], store)
    units = _units(item)
    todo, keys, cached = await asyncio.to_thread(_chunk_state, context, units)
    window = asyncio.Semaphore(context.window)

    async def one(unit: Mapping[str, Any], key: str) -> tuple[CaseResult, float]:
        async with window:
            return await _run_case(context, unit, key, cached.get(key), item["job"], ctx.key)

    outcomes = await asyncio.gather(*(one(u, k) for u, k in zip(todo, keys, strict=True)), return_exceptions=True)
    done = [o for o in outcomes if not isinstance(o, BaseException)]
    ctx.add_cost(sum(cost for _, cost in done))
    failures = [o for o in outcomes if isinstance(o, BaseException)]
    if failures:  # after every case of the chunk is over: the item runs again, and skips what is recorded
        raise failures[0]
    return {
        "cases": len(units),
        "skipped": len(units) - len(todo),
        "passed": sum(bool(r.passed) for r, _ in done),
        "errors": sum(r.error is not None for r, _ in done),
    }


# --- starting and waiting ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunProgress:
    """How far a suite run is, counted in case repeats (an item holds many)."""

    total: int  # case repeats of every variant
    done: int  # recorded: passed, failed or errored
    errored: int  # of those, the task raised
    cost_usd: float  # so far: the recorded cases' task cost, or the job's once its items report it
    status: str  # the job's: running, done, failed (items that failed for good), cancelled
    failed_items: int = 0  # items that failed for good (their unrecorded cases wait for `keel jobs retry`)

    @property
    def over(self) -> bool:
        return self.status in (records.DONE, records.FAILED, records.CANCELLED)


@dataclass
class RunHandle:
    """A submitted suite run: its job and one run id per variant."""

    job: str
    run_ids: list[str]
    store: Store
    runner: jobs.JobRunner
    worker: jobs.Worker | None
    gateway: Gateway | None = None  # its span writer is flushed on close
    total: int = 0  # case repeats of every variant

    def status(self) -> RunProgress:
        row = self.runner.get(self.job)
        done, errored, cost = storage.progress(self.store, self.run_ids)
        return RunProgress(self.total, done, errored, max(cost, row.cost_usd), row.status, row.failed)

    def wait(self, progress: Callable[[RunProgress], None] | None = None, poll_s: float = 0.1) -> list[RunResult]:
        while True:
            now = self.status()
            if progress is not None:
                progress(now)
            if now.over:
                break
            time.sleep(poll_s)
        return [storage.load_run(self.store, r) for r in self.run_ids]

    def close(self) -> None:
        """Stop this process's worker and flush the spans of its cases (the caller closes the gateway)."""
        try:
            self.runner.settle(self.job)  # a run that is over: its queue back on the default poll
        finally:
            try:
                if self.worker is not None:
                    worker, self.worker = self.worker, None
                    worker.stop()  # at once when no item runs (a cancelled job's running ones get the drain)
            finally:
                self.runner.close()
                if self.gateway is not None:
                    self.gateway.flush()


def _case_units(suite: Suite, variants: list[Variant], job: str) -> list[dict[str, Any]]:
    """Every case repeat of every variant, in dataset order (variant, case, repeat)."""
    runs = {v.index: run_id(suite, v) for v in variants}  # once: a run id digests every case
    cases = [case.to_json() for case in suite.cases]
    return [
        {"job": job, "run": runs[variant.index], "variant": variant.index, "case": case, "position": position,
         "repeat": repeat}
        for variant in variants for position, case in enumerate(cases) for repeat in range(suite.spec.repeats)
    ]  # fmt: skip


def _items(suite: Suite, variants: list[Variant], job: str, count: int) -> dict[str, dict[str, Any]]:
    """The job's items: `count` near-equal chunks of the case repeats, in order (a case per item if there are
    as many items as cases: the form runs had before chunks, so that they resume unchanged)."""
    units = _case_units(suite, variants, job)
    if count >= len(units):
        return {f"v{u['variant']}/{u['case']['id']}/{u['repeat']}": u for u in units}
    size, extra = divmod(len(units), count)
    items: dict[str, dict[str, Any]] = {}
    start = 0
    for i in range(count):
        end = start + size + (1 if i < extra else 0)
        chunk = [{k: v for k, v in u.items() if k != "job"} for u in units[start:end]]
        items[f"cases/{start}-{end - 1}"] = {"job": job, "cases": chunk}
        start = end
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


def _split(runner: jobs.JobRunner, job: str, cases: int, concurrency: int, cases_per_item: int | None) -> int:
    """How many items this run has: a resumed run keeps the split it started with (its items must not change)."""
    try:
        started = runner.get(job).total
    except UnknownJob:
        return item_count(cases, concurrency, cases_per_item)
    if cases_per_item is not None and started != item_count(cases, concurrency, cases_per_item):
        raise InputError(
            f"job {job} started with {started} items of about {math.ceil(cases / started)} cases; a run resumes"
            " with the split it started with: leave out cases per item (or change the suite's name for a new run)"
        )
    return started


def start_suite(
    suite: Suite | str | Path,
    *,
    gateway: Gateway | None = None,
    limit: int | None = None,
    worker: bool = True,
    cases_per_item: int | None = None,
) -> RunHandle:
    """Submit a suite's run (or find it, to resume) and, unless `worker=False`, run its items in this process.

    `cases_per_item` overrides how many case repeats each job item holds (`item_count`)."""
    from keel.gateway.core import Gateway

    suite = load_suite(suite) if isinstance(suite, (str, Path)) else suite
    suite = suite.limited(limit)
    if cases_per_item is not None and cases_per_item < 1:
        raise InputError(f"cases per item must be at least 1, not {cases_per_item}")
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
    total = len(suite.cases) * suite.spec.repeats
    for variant in variants:
        storage.create_run(store, {
            "run_id": run_id(suite, variant), "job": job, "suite": suite.name, "variant": variant.name,
            "variant_index": variant.index, "variant_params": variant.to_json(), "thresholds": limits, "spec": spec,
            "base_dir": str(suite.base_dir.resolve()), "source": suite.source, "total": total, "created_at": now,
        })  # fmt: skip
    runner = jobs.JobRunner(gateway.config, store=store)
    started: jobs.Worker | None = None
    try:
        concurrency = suite.spec.concurrency
        count = _split(runner, job, total * len(variants), concurrency, cases_per_item)
        window = case_window(concurrency, count)
        _contexts[job] = _Context(suite, gateway, store, scorers, limits, variants, window)
        row = runner.submit(job, EVAL_KIND, _items(suite, variants, job, count), concurrency=concurrency,
                            poll_s=min(POLL_S, gateway.config.jobs.poll_s))  # fmt: skip
        if worker and jobs.current_worker() is None:
            # Started after the job's queue exists, listening to it alone: a launched worker looks for new queues
            # once a second, and `keel eval run` should not run other jobs' items. The same worker id on every
            # attempt: after kill -9, DBOS gives this worker its pending items back.
            started = jobs.Worker(gateway.config, worker_id=job, store=store, queues=[row.queue]).start()
    except BaseException:
        if started is not None:
            started.stop()
        runner.close()
        raise
    return RunHandle(job, [run_id(suite, v) for v in variants], store, runner, started, gateway,
                     total * len(variants))  # fmt: skip


def run_suite(
    suite: Suite | str | Path,
    *,
    gateway: Gateway | None = None,
    limit: int | None = None,
    progress: Callable[[RunProgress], None] | None = None,
    cases_per_item: int | None = None,
) -> list[RunResult]:
    """Run a suite to the end (resuming it if it was started before); one `RunResult` per variant."""
    handle = start_suite(suite, gateway=gateway, limit=limit, cases_per_item=cases_per_item)
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
