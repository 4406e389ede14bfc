"""Online quality: a share of production calls scored by reference-free scorers, by a durable background job.

- **Which calls.** A production call is a root span: a chat call or a RAG answer
  (`rag.ask`) that the application made directly. Calls inside a job (eval runs,
  this scoring itself: the judge's calls join the job item's trace), a RAG
  answer's own model call and calls marked `keel.metadata.purpose = eval.*` are
  never eligible, so scoring cannot sample itself. A trace is sampled when a hash
  of its trace id falls below `[evals.online] sample`: every replica and every
  re-run picks the same traces.
- **When.** Time is cut into intervals of `interval_s` (by the call's end). Once an
  interval is `settle_s` old, one job `evals.online:<interval start>` is submitted
  with one item per sampled call (keyed by trace and span id). Several replicas
  submit the same name and items, which the job layer runs once; a watermark in
  the store remembers the last interval handed out, so restarts catch up (at most
  `CATCH_UP` intervals a tick, and no further back than `max_backfill_s`: an older
  pause is skipped, logged once) and a new deployment starts from now.
- **Scoring.** An item scores its call with every configured scorer and writes one
  row per (call, scorer) in `keel_eval_online_scores` with ON CONFLICT DO NOTHING,
  after skipping scorers already stored for the call: a step DBOS runs again after
  kill -9 calls no judge twice (the judge's answers are cached by input too). A
  scorer that raises is stored as errored (value NULL, its error), never a score.
- **Versions.** Model version: the response model the provider reported, else the
  requested model (a RAG answer: its answering call's; `extractive` when no model
  wrote it). Prompt version: the call's `metadata={"prompt_version": ...}`, i.e.
  the span attribute `keel.metadata.prompt_version` (`-` when not given).
- **The drop test** compares like with like: one configured model's newest version with
  that model's own earlier scores (not another model serving at the same time), each
  distinct (input, output) pair once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import socket
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from keel import jobs
from keel.config import AlertRule, Config, load_config, window_seconds
from keel.errors import InputError, JobConflict
from keel.evals import storage
from keel.evals.dataset import Case
from keel.evals.scorers import Sample, ScoreContext
from keel.evals.settings import OnlineConfig, OnlineScorer
from keel.evals.suite import ScorerSpec
from keel.store.base import Store
from keel.store.migrations import Migration
from keel.trace import Span

if TYPE_CHECKING:
    from keel.alerts import Evaluation
    from keel.gateway.core import Gateway
    from keel.jobs.worker import Worker

__all__ = [
    "ONLINE_KIND",
    "ONLINE_MIGRATIONS",
    "ONLINE_QUEUE",
    "DropTest",
    "OnlineScheduler",
    "OnlineService",
    "OnlineThread",
    "QualityReport",
    "QualityRow",
    "TraceScore",
    "backfill_skipped",
    "candidates",
    "drop_test",
    "measure_alert",
    "online_config",
    "parse_since",
    "quality",
    "sampled",
    "score_span",
    "start_online",
    "trace_scores",
]

log = logging.getLogger("keel.evals.online")

ONLINE_KIND = "evals.online"
#: The scoring items' own queue, so a server's embedded worker runs these items and no other kind's.
ONLINE_QUEUE = "evals.online"
#: Intervals one tick hands out at most (a server that was down a day catches up over a few ticks).
CATCH_UP = 100
#: A call that took longer than this is looked for only this far before its interval (keeps the index scan short).
MAX_CALL_S = 3600.0
NO_PROMPT_VERSION = "-"
#: A call the gateway failed because the model's JSON never matched the schema: format scores it 0 (else a
#: format validity would count only the calls that passed, and read 1.0 however often the model failed).
FORMAT_FAILURE = "StructuredOutputError"
EXTRACTIVE = "extractive"

ONLINE_MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        "online_0001_scores",
        (
            """
            CREATE TABLE IF NOT EXISTS keel_eval_online_scores (
                trace_id TEXT NOT NULL,
                span_id TEXT NOT NULL,
                scorer TEXT NOT NULL,
                kind TEXT NOT NULL,
                model_version TEXT NOT NULL,
                prompt_version TEXT NOT NULL,
                span_time {real} NOT NULL,
                value {real},
                spread {real},
                error TEXT,
                cost_usd {real},
                job TEXT,
                scored_at {real} NOT NULL,
                PRIMARY KEY (trace_id, span_id, scorer)
            )
            """,
            "CREATE INDEX IF NOT EXISTS keel_eval_online_scorer_time ON keel_eval_online_scores (scorer, span_time)",
            "CREATE TABLE IF NOT EXISTS keel_eval_online_state (name TEXT PRIMARY KEY, watermark {real} NOT NULL)",
        ),
    ),
    # What the drop test needs, NULL on rows scored before: the configured model name (`keel.model`) the call
    # asked for (a model is compared with its own earlier scores when several serve at once; NULLs form one
    # group), and a hash of the call's input and output (a repeated question and answer counts once; a NULL
    # counts as distinct).
    Migration(
        "online_0002_drop_test_keys",
        (
            "ALTER TABLE keel_eval_online_scores ADD COLUMN model_alias TEXT",
            "ALTER TABLE keel_eval_online_scores ADD COLUMN content_hash TEXT",
        ),
    ),
)
SCORE_COLUMNS = (
    "trace_id", "span_id", "scorer", "kind", "model_version", "prompt_version", "span_time", "value", "spread",
    "error", "cost_usd", "job", "scored_at", "model_alias", "content_hash",
)  # fmt: skip

_migrated: set[int] = set()


def ensure_tables(store: Store) -> None:
    if id(store) not in _migrated:
        storage.migrate(store)  # the judge's answers go to the evals cache
        store.migrate(ONLINE_MIGRATIONS, namespace="evals")
        _migrated.add(id(store))


def online_config(config: Config) -> OnlineConfig:
    online: OnlineConfig = config.section("evals").online
    return online


# --- which calls -------------------------------------------------------------------------------------------


def sampled(trace_id: str, share: float) -> bool:
    """Whether a trace is in the sample: the first 64 bits of sha256(trace id), over 2^64, below `share`."""
    if share <= 0:
        return False
    if share >= 1:
        return True
    return _hash(trace_id) / 2**64 < share


def _hash(trace_id: str) -> int:
    return int.from_bytes(hashlib.sha256(trace_id.encode()).digest()[:8], "big")


@dataclass(frozen=True)
class Candidate:
    """A sampled production call, as a job item's input."""

    trace_id: str
    span_id: str
    kind: str  # "chat" | "rag"

    @property
    def key(self) -> str:
        return f"{self.trace_id}:{self.span_id}"

    def to_json(self) -> dict[str, str]:
        return {"trace_id": self.trace_id, "span_id": self.span_id, "kind": self.kind}


def _attributes(raw: Any) -> dict[str, Any]:
    value = json.loads(raw) if isinstance(raw, str) else raw
    return value if isinstance(value, dict) else {}


def _selected(online: OnlineConfig, config: Config | None, attributes: Mapping[str, Any], model: str | None) -> bool:
    """The filters of `[evals.online]`: not keel's own calls, the configured models and tags."""
    if str(attributes.get("keel.metadata.purpose") or "").startswith("eval."):
        return False  # a judge called outside a job: still not production traffic
    if online.models:
        names = {model, attributes.get("gen_ai.response.model"), attributes.get("keel.model")}
        wanted = {m for name in online.models for m in (name, config.resolve_name(name) if config else None) if m}
        if not wanted & {n for n in names if n}:
            return False
    if online.tags:
        tags = attributes.get("keel.tags") or []
        tags = [tags] if isinstance(tags, str) else tags
        if not set(online.tags) & {str(t) for t in tags}:
            return False
    return True


def candidates(
    store: Store, online: OnlineConfig, since: float, until: float, *, config: Config | None = None
) -> list[Candidate]:
    """The sampled production calls that ended in [since, until), oldest first, at most `max_per_interval`:
    past it, those with the lowest hashes (a uniform subset every replica agrees on, not the first minutes)."""
    sql = (
        "SELECT trace_id, span_id, operation, COALESCE(model, request_model), attributes FROM spans"
        " WHERE parent_id IS NULL AND operation IN ('chat', 'rag')"
        f" AND (status = 'ok' AND output IS NOT NULL OR status = 'error' AND error_type = '{FORMAT_FAILURE}')"
        " AND start_time >= ? AND end_time >= ? AND end_time < ? ORDER BY end_time"
    )
    out: list[Candidate] = []
    for trace_id, span_id, operation, model, raw in store.query(sql, [since - MAX_CALL_S, since, until]):
        if not sampled(trace_id, online.sample):
            continue
        if _selected(online, config, _attributes(raw), model):
            out.append(Candidate(trace_id, span_id, str(operation)))
    if len(out) > online.max_per_interval:
        kept = {c.key for c in sorted(out, key=lambda c: (_hash(c.trace_id), c.span_id))[: online.max_per_interval]}
        out = [c for c in out if c.key in kept]
    return out


# --- scoring one call ----------------------------------------------------------------------------------------


def _model_version(span: Span, trace: Sequence[Span]) -> str:
    if span.attributes.get("gen_ai.operation.name") == "rag":
        answering = [
            s for s in trace
            if s.attributes.get("keel.metadata.purpose") == "rag.answer"
            and s.attributes.get("gen_ai.operation.name") == "chat"
        ]  # fmt: skip
        return _model_version(answering[-1], ()) if answering else EXTRACTIVE
    a = span.attributes
    return str(a.get("gen_ai.response.model") or a.get("keel.model") or a.get("gen_ai.request.model") or "?")


def _model_alias(span: Span, trace: Sequence[Span]) -> str | None:
    """The configured model name the call asked for (a RAG answer: its answering call's); None when unknown."""
    if span.attributes.get("gen_ai.operation.name") == "rag":
        answering = [s for s in trace if s.attributes.get("keel.metadata.purpose") == "rag.answer"
                     and s.attributes.get("gen_ai.operation.name") == "chat"]  # fmt: skip
        return _model_alias(answering[-1], ()) if answering else None
    value = span.attributes.get("keel.model")
    return str(value) if value else None


def _content_hash(span: Span) -> str:
    """The call's input and output (the request and what came back), as the drop test's identity of a pair."""
    text = json.dumps([span.input, span.output], sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _last_answered_as(store: Store, span: Span) -> str | None:
    """The response model a configured model last reported before this call (within a week), for a call
    that failed without one: else a failed call would look like a model version of its own."""
    model = span.attributes.get("keel.model")
    if span.attributes.get("gen_ai.response.model") or not model:
        return None
    rows = store.query(
        "SELECT response_model FROM spans WHERE model = ? AND response_model IS NOT NULL AND start_time >= ?"
        " AND start_time <= ? ORDER BY start_time DESC LIMIT 1",
        [model, span.start_time - 7 * 86_400, span.start_time],
    )
    return str(rows[0][0]) if rows else None


def _prompt_version(span: Span) -> str:
    value = span.attributes.get("keel.metadata.prompt_version")
    return NO_PROMPT_VERSION if value in (None, "") else str(value)


def _question(span: Span) -> str:
    value = span.input if isinstance(span.input, Mapping) else {}
    if "question" in value:
        return str(value["question"])
    users = [m for m in value.get("messages") or [] if isinstance(m, Mapping) and m.get("role") == "user"]
    content = users[-1].get("content") if users else ""
    if isinstance(content, list):  # content parts: keep the text ones
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, Mapping))
    return str(content or "")


def _answer(span: Span) -> str:
    value = span.output if isinstance(span.output, Mapping) else {}
    return str(value.get("answer", value.get("text")) or "")


def _faithfulness(span: Span) -> float | None:
    """A RAG answer's share of supported sentences (the engine's own checks); None: nothing to score."""
    output = span.output if isinstance(span.output, Mapping) else {}
    if span.attributes.get("gen_ai.operation.name") != "rag" or output.get("kind") == "abstained":
        return None
    sentences = output.get("sentences") or []
    if not sentences:
        return None
    return sum(bool(s.get("supported")) for s in sentences) / len(sentences)


def _format_validity(span: Span) -> float | None:
    """1 when a call that asked for JSON (`response_format`) answered JSON valid against its schema;
    None when it did not ask."""
    import jsonschema

    request = span.input if isinstance(span.input, Mapping) else {}
    fmt = request.get("response_format")
    if not isinstance(fmt, Mapping):
        return None
    if span.status != "ok":  # only a FORMAT_FAILURE is a candidate: no valid JSON after the gateway's tries
        return 0.0 if span.error_type == FORMAT_FAILURE else None
    try:
        value = json.loads(_answer(span))
    except json.JSONDecodeError:
        return 0.0
    return float(jsonschema.Draft202012Validator(dict(fmt.get("schema") or {})).is_valid(value))


def _judged_input(span: Span, trace: Sequence[Span]) -> str:
    """What the judge sees as the input: the last user message; for a RAG answer, the one its answering
    call sent (the sources and the question), since an answer's support cannot be graded without them."""
    if span.attributes.get("gen_ai.operation.name") == "rag":
        answering = [s for s in trace if s.attributes.get("keel.metadata.purpose") == "rag.answer"
                     and s.attributes.get("gen_ai.operation.name") == "chat" and _question(s)]  # fmt: skip
        if answering:
            return _question(answering[-1])
    return _question(span)


async def _judge(scorer: OnlineScorer, span: Span, trace: Sequence[Span], ctx: ScoreContext) -> tuple[float, float]:
    from keel.evals.judge import judge_scorer

    spec = ScorerSpec(
        type="judge", name=scorer.metric, rubric=scorer.rubric, model=scorer.model, samples=scorer.samples,
        scale=scorer.scale, retries=scorer.retries,
    )  # fmt: skip
    sample = Sample(Case(id=span.span_id, input=_judged_input(span, trace)), _answer(span))
    values = await judge_scorer(spec).fn(sample, ctx)
    return float(values[scorer.metric]), float(values[f"{scorer.metric}.spread"])


@dataclass
class ScoreRow:
    scorer: str
    value: float | None
    spread: float | None = None
    error: str | None = None
    cost_usd: float = 0.0


async def _score_one(
    scorer: OnlineScorer, span: Span, trace: Sequence[Span], gateway: Gateway | None, store: Store
) -> ScoreRow | None:
    """One scorer on one call: a row, or None when the scorer does not apply to it."""
    if scorer.type == "faithfulness":
        value = _faithfulness(span)
        return None if value is None else ScoreRow(scorer.metric, value)
    if scorer.type == "format":
        value = _format_validity(span)
        return None if value is None else ScoreRow(scorer.metric, value)
    if span.status != "ok":  # a call that failed has no answer to judge
        return None
    ctx = ScoreContext(gateway, lambda k: storage.cache_get(store, k), lambda k, v: storage.cache_put(store, k, v))
    try:
        value, spread = await _judge(scorer, span, trace, ctx)
    except Exception as exc:  # recorded as errored, never as a score
        return ScoreRow(scorer.metric, None, error=f"{type(exc).__name__}: {exc}"[:1000], cost_usd=ctx.cost_usd)
    if not (math.isfinite(value) and 0 <= value <= 1):
        return ScoreRow(scorer.metric, None, error=f"ValueError: judge score {value!r} outside [0, 1]")
    return ScoreRow(scorer.metric, value, spread, cost_usd=ctx.cost_usd)


def _scored(store: Store, trace_id: str, span_id: str) -> set[str]:
    rows = store.query(
        "SELECT scorer FROM keel_eval_online_scores WHERE trace_id = ? AND span_id = ?", [trace_id, span_id]
    )
    return {r[0] for r in rows}


def _write(store: Store, rows: Sequence[tuple[Any, ...]]) -> int:
    marks = ", ".join("?" for _ in SCORE_COLUMNS)
    sql = (
        f"INSERT INTO keel_eval_online_scores ({', '.join(SCORE_COLUMNS)}) VALUES ({marks})"
        " ON CONFLICT (trace_id, span_id, scorer) DO NOTHING"
    )
    written = 0
    with store.transaction() as cur:
        for row in rows:
            written += max(cur.execute(sql, row).rowcount, 0)
    return written


async def score_span(
    store: Store, gateway: Gateway | None, online: OnlineConfig, trace_id: str, span_id: str, *, job: str | None = None
) -> dict[str, Any]:
    """Score one call with every scorer not yet stored for it; write one row per scorer that applies.

    Idempotent: a scorer already stored for the call is skipped (no judge call), and rows are written
    with ON CONFLICT DO NOTHING, so a re-run (a step DBOS repeats after a crash) changes nothing.
    """
    await asyncio.to_thread(ensure_tables, store)
    trace = await asyncio.to_thread(store.get_trace, trace_id)
    span = next((s for s in trace if s.span_id == span_id), None)
    if span is None:
        raise InputError(f"no span {span_id} in trace {trace_id}")
    done = await asyncio.to_thread(_scored, store, trace_id, span_id)
    model, prompt = _model_version(span, trace), _prompt_version(span)
    if span.status != "ok":
        last: str | None = await asyncio.to_thread(_last_answered_as, store, span)
        model = last or model
    kind = "rag" if span.attributes.get("gen_ai.operation.name") == "rag" else "chat"
    alias, content = _model_alias(span, trace), _content_hash(span)
    rows, results = [], []
    for scorer in online.scorers:
        if scorer.metric in done:
            continue
        row = await _score_one(scorer, span, trace, gateway, store)
        if row is None:
            continue
        results.append(row)
        rows.append((
            trace_id, span_id, row.scorer, kind, model, prompt, span.end_time, row.value, row.spread, row.error,
            row.cost_usd or None, job, time.time(), alias, content,
        ))  # fmt: skip
    written = await asyncio.to_thread(_write, store, rows) if rows else 0
    return {
        "written": written, "skipped": sorted(done), "cost_usd": sum(r.cost_usd for r in results),
        "errors": {r.scorer: r.error for r in results if r.error},
    }  # fmt: skip


# --- the job kind ---------------------------------------------------------------------------------------------


@dataclass
class _Runtime:
    """What this process's items need: the configuration and a gateway of its own (on the worker's loop)."""

    config: Config
    gateway: Gateway | None = None


_runtimes: dict[int, _Runtime] = {}
_configured: Config | None = None


def use_config(config: Config) -> None:
    """The configuration this process's online items score with (`keel serve` / `keel worker` set theirs)."""
    global _configured
    _configured = config
    _runtimes.clear()


def _runtime(store: Store) -> _Runtime:
    found = _runtimes.get(id(store))
    if found is None:
        from keel.gateway.core import Gateway

        config = _configured or load_config()
        found = _runtimes[id(store)] = _Runtime(config, Gateway(config, store=store))
    return found


# The scoring items' own queue, 4 at once per worker unless `[jobs.queues."evals.online"]` says otherwise: a
# server's embedded worker, which listens to it only, never takes another kind's items.
@jobs.kind(ONLINE_KIND, queue=ONLINE_QUEUE, attempts=2, worker_concurrency=4)
async def score_item(item: dict[str, Any], ctx: jobs.ItemContext) -> dict[str, Any]:
    """One sampled production call, scored (a job item)."""
    if ctx.store is None:
        raise InputError("online scoring items run in a keel worker")
    runtime = _runtime(ctx.store)
    result = await score_span(
        ctx.store, runtime.gateway, online_config(runtime.config), str(item["trace_id"]), str(item["span_id"]),
        job=ctx.job,
    )  # fmt: skip
    ctx.add_cost(result["cost_usd"])
    if runtime.gateway is not None:  # the judge's spans in the store before the item is done: a worker
        await asyncio.to_thread(runtime.gateway.flush)  # stopped or killed next must not lose its trace
    return result


# --- handing out intervals ------------------------------------------------------------------------------------


def _stamp(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y%m%dT%H%M%SZ")


def job_name(start: float) -> str:
    return f"{ONLINE_KIND}:{_stamp(start)}"


Submit = Callable[[str, Mapping[str, Any]], None]


class OnlineScheduler:
    """Hands out closed intervals of production calls as scoring jobs; `tick(now)` once per period.

    Safe to run in every replica and worker: the job for an interval has one name and the same items
    wherever it is submitted (the job layer runs it once), and the watermark only moves forward.
    """

    def __init__(self, config: Config, store: Store, *, submit: Submit | None = None) -> None:
        self.config = config
        self.online = online_config(config)
        self.store = store
        self._submit = submit
        self._runner: Any = None

    def _default_submit(self, name: str, items: Mapping[str, Any]) -> None:
        if self._runner is None:
            from keel.jobs.runner import JobRunner

            self._runner = JobRunner(self.config, store=self.store)
        self._runner.submit(name, ONLINE_KIND, items, queue=ONLINE_QUEUE)

    def watermark(self) -> float | None:
        rows = self.store.query("SELECT watermark FROM keel_eval_online_state WHERE name = 'watermark'")
        return float(rows[0][0]) if rows else None

    def _start(self, latest: float) -> float:
        self.store.execute(
            "INSERT INTO keel_eval_online_state (name, watermark) VALUES ('watermark', ?)"
            " ON CONFLICT (name) DO NOTHING",
            [latest],
        )
        found = self.watermark()
        return latest if found is None else found

    def _advance(self, to: float) -> None:
        self.store.execute("UPDATE keel_eval_online_state SET watermark = ? WHERE name = 'watermark' AND watermark < ?",
                           [to, to])  # fmt: skip

    def _bound_backfill(self, start: float, latest: float) -> float:
        """Past `max_backfill_s` behind, move the watermark up to the bound: a long pause is not scored
        (nor paid for) when sampling comes back. The skip is logged once (the replica whose update moved the
        watermark) and kept in the state table for the quality report."""
        step = self.online.interval_s
        floor = math.floor((latest - self.online.backfill_s) / step) * step
        if start >= floor:
            return start
        with self.store.transaction(immediate=True) as cur:
            moved = cur.execute(
                "UPDATE keel_eval_online_state SET watermark = ? WHERE name = 'watermark' AND watermark < ?",
                [floor, floor],
            ).rowcount
            if moved:
                for name, value in (("backfill_skipped_from", start), ("backfill_skipped_until", floor)):
                    cur.execute(
                        "INSERT INTO keel_eval_online_state (name, watermark) VALUES (?, ?)"
                        " ON CONFLICT (name) DO UPDATE SET watermark = excluded.watermark",
                        [name, value],
                    )
        if moved:
            log.warning(
                "online quality: skipped the calls of %s to %s (%g s behind, past max_backfill_s = %g); scoring"
                " resumes from %s", _iso(start), _iso(floor), latest - start, self.online.backfill_s, _iso(floor),
            )  # fmt: skip
        return floor

    def skipped(self) -> tuple[float, float] | None:
        return backfill_skipped(self.store)

    def tick(self, now: float | None = None) -> list[str]:
        """Submit a job for each closed interval past the watermark (with sampled calls); the names submitted."""
        if not self.online.enabled:
            return []
        ensure_tables(self.store)
        now = time.time() if now is None else now
        step = self.online.interval_s
        latest = math.floor((now - self.online.settle_s) / step) * step  # end of the newest settled interval
        start = self.watermark()
        if start is None:
            self._start(latest)  # a new deployment scores from now on, not the whole history
            return []
        start = self._bound_backfill(start, latest)
        submitted = []
        for _ in range(CATCH_UP):
            if start + step > latest + 1e-6:
                break
            found = candidates(self.store, self.online, start, start + step, config=self.config)
            if found:
                name = job_name(start)
                try:
                    (self._submit or self._default_submit)(name, {c.key: c.to_json() for c in found})
                    submitted.append(name)
                except JobConflict as exc:  # another replica saw a late call this one did not: its job stands
                    log.info("online quality: %s already submitted with other calls (%s)", name, exc)
            start += step
            self._advance(start)
        return submitted

    def close(self) -> None:
        if self._runner is not None:
            self._runner.close()
            self._runner = None


def backfill_skipped(store: Store) -> tuple[float, float] | None:
    """The last range of calls a catch-up skipped past `max_backfill_s` (from, until), if any."""
    ensure_tables(store)
    rows = dict(store.query("SELECT name, watermark FROM keel_eval_online_state WHERE name LIKE 'backfill_skipped_%'"))
    if "backfill_skipped_from" not in rows:
        return None
    return float(rows["backfill_skipped_from"]), float(rows["backfill_skipped_until"])


# --- running it in a server or worker ---------------------------------------------------------------------------


@dataclass
class OnlineService:
    """The scheduler's loop (and a server's embedded worker) in one process; `await aclose()` it."""

    scheduler: OnlineScheduler
    worker: Worker | None = None
    task: asyncio.Task[None] | None = None
    period_s: float = 60.0
    ticks: int = field(default=0)

    async def run(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self.scheduler.tick)
                self.ticks += 1
            except Exception:  # the store or DBOS may be away for a while: keep trying
                log.exception("online quality: handing out calls failed; again in %g s", self.period_s)
            await asyncio.sleep(self.period_s)

    async def aclose(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        if self.worker is not None:
            await asyncio.to_thread(self.worker.stop)
        await asyncio.to_thread(self.scheduler.close)


def _tick_period(online: OnlineConfig) -> float:
    return min(max(online.interval_s / 4, 1.0), 60.0)


async def start_online(
    config: Config, store: Store | None, *, embedded_worker: bool | None = None
) -> OnlineService | None:
    """Start handing out calls to score (and, for `keel serve`, a worker of the online queue); None when off."""
    online = online_config(config)
    if not online.enabled or store is None:
        return None
    use_config(config)
    scheduler = OnlineScheduler(config, store)
    worker = None
    if online.embedded_worker if embedded_worker is None else embedded_worker:
        worker = await asyncio.to_thread(_embedded_worker, scheduler.config)
    service = OnlineService(scheduler, worker, period_s=_tick_period(online))
    service.task = asyncio.get_running_loop().create_task(service.run(), name="keel-online-quality")
    log.info("keel: online quality scores %g%% of calls every %g s", online.sample * 100, online.interval_s)
    return service


class OnlineThread:
    """The scheduler's loop in a thread, for `keel worker` (which has no event loop of its own)."""

    def __init__(self, config: Config, store: Store) -> None:
        use_config(config)
        self.scheduler = OnlineScheduler(config, store)
        self.period_s = _tick_period(self.scheduler.online)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="keel-online-quality", daemon=True)

    def start(self) -> OnlineThread:
        self._thread.start()
        return self

    def _run(self) -> None:
        while True:
            try:
                self.scheduler.tick()
            except Exception:
                log.exception("online quality: handing out calls failed; again in %g s", self.period_s)
            if self._stop.wait(self.period_s):
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.scheduler.close()


def _embedded_worker(config: Config) -> Worker | None:
    from keel.jobs.worker import Worker

    worker_id = f"{socket.gethostname()}:keel-serve:{ONLINE_QUEUE}"
    try:
        return Worker(config, worker_id=worker_id, queues=[ONLINE_QUEUE]).start()
    except Exception as exc:  # another replica on this host runs it, or this process runs a worker already
        log.warning("online quality: no embedded worker (%s); a `keel worker` must run the items", exc)
        return None


# --- reading it -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QualityRow:
    period: float  # start of the period (epoch seconds)
    model_version: str
    prompt_version: str
    scorer: str
    n: int
    errors: int
    mean: float | None
    low: float | None  # 95% t-interval of the mean (None below 2 scores)
    high: float | None
    cost_usd: float = 0.0  # what scoring these calls cost (a judge's model calls; other scorers are free)

    def to_json(self) -> dict[str, Any]:
        return {
            "period": _iso(self.period), "period_ts": self.period, "model_version": self.model_version,
            "prompt_version": self.prompt_version, "scorer": self.scorer, "n": self.n, "errors": self.errors,
            "mean": self.mean, "ci_low": self.low, "ci_high": self.high, "cost_usd": self.cost_usd,
        }  # fmt: skip


@dataclass(frozen=True)
class ChangePoint:
    time: float  # when this model and prompt version was first scored in the range
    model_version: str
    prompt_version: str

    def to_json(self) -> dict[str, Any]:
        return {"time": _iso(self.time), "ts": self.time, "model_version": self.model_version,
                "prompt_version": self.prompt_version}  # fmt: skip


@dataclass(frozen=True)
class QualityReport:
    since: float
    until: float
    period_s: float
    rows: list[QualityRow]
    changes: list[ChangePoint]  # every version's first appearance after the first one, oldest first
    scorers: list[str]

    @property
    def cost_usd(self) -> float:
        return sum(r.cost_usd for r in self.rows)

    def to_json(self) -> dict[str, Any]:
        return {
            "since": _iso(self.since), "until": _iso(self.until), "since_ts": self.since, "until_ts": self.until,
            "period_s": self.period_s, "scorers": self.scorers, "cost_usd": self.cost_usd,
            "rows": [r.to_json() for r in self.rows], "changes": [c.to_json() for c in self.changes],
        }  # fmt: skip


MAX_EPOCH = 10_000_000_000.0


def parse_since(text: str, now: float) -> float:
    """`keel eval quality --since` and `/api/quality?since=`: a duration back from now ("30m", "12h", "14d")
    or epoch seconds (a plain number)."""
    value = text.strip()
    hint = 'give a duration such as "14d" (s, m, h, d) or epoch seconds'
    try:
        epoch = float(value)
    except ValueError:
        try:
            back = window_seconds(value)
        except ValueError:
            back = None
        if back is None:
            raise InputError(f"since {text!r} is not a time: {hint}") from None
        return now - back
    if not (math.isfinite(epoch) and 0 <= epoch <= MAX_EPOCH):
        raise InputError(f"since {text!r} is out of range: {hint}")
    return epoch


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


def _period_expr(store: Store) -> str:
    return "FLOOR(span_time / ?)" if store.dialect == "postgres" else "CAST(span_time / ? AS INTEGER)"


def _interval(n: int, total: float, squares: float) -> tuple[float | None, float | None, float | None]:
    from scipy import stats

    if n == 0:
        return None, None, None
    mean = total / n
    if n < 2:
        return mean, None, None
    variance = max(squares - n * mean * mean, 0.0) / (n - 1)
    half = float(stats.t.ppf(0.975, n - 1)) * math.sqrt(variance / n)
    return mean, max(0.0, mean - half), min(1.0, mean + half)


def quality(
    store: Store, *, since: float, until: float, period_s: float = 86_400.0, scorer: str | None = None,
    model: str | None = None,
) -> QualityReport:  # fmt: skip
    """Scores of calls that ended in [since, until) by period, model version, prompt version and scorer."""
    if period_s <= 0:
        raise InputError(f"period must be positive, not {period_s:g} s")
    ensure_tables(store)
    where = ["span_time >= ?", "span_time < ?"]
    params: list[Any] = [since, until]
    if scorer is not None:
        where.append("scorer = ?")
        params.append(scorer)
    if model is not None:  # a model version, or a configured model name
        where.append("(model_version = ? OR model_alias = ?)")
        params += [model, model]
    clause = " AND ".join(where)
    period = _period_expr(store)
    sql = (
        "SELECT p, model_version, prompt_version, scorer, COUNT(value),"
        " SUM(CASE WHEN error IS NULL THEN 0 ELSE 1 END), COALESCE(SUM(value), 0), COALESCE(SUM(value * value), 0),"
        " COALESCE(SUM(cost_usd), 0)"
        f" FROM (SELECT {period} AS p, model_version, prompt_version, scorer, value, error, cost_usd"
        f" FROM keel_eval_online_scores WHERE {clause}) AS s"
        " GROUP BY p, model_version, prompt_version, scorer ORDER BY p, model_version, prompt_version, scorer"
    )
    rows = []
    for p, mv, pv, name, n, errors, total, squares, cost in store.query(sql, [period_s, *params]):
        mean, low, high = _interval(int(n), float(total), float(squares))
        rows.append(QualityRow(float(p) * period_s, mv, pv, name, int(n), int(errors), mean, low, high, float(cost)))
    firsts = store.query(
        f"SELECT model_version, prompt_version, MIN(span_time) FROM keel_eval_online_scores WHERE {clause}"
        " GROUP BY model_version, prompt_version ORDER BY MIN(span_time)",
        params,
    )
    changes = [ChangePoint(float(t), mv, pv) for mv, pv, t in firsts[1:]]
    names = sorted({r.scorer for r in rows})
    return QualityReport(since, until, period_s, rows, changes, names)


@dataclass(frozen=True)
class TraceScore:
    """One online score of a call in a trace, as the trace view and `keel traces show` list it."""

    trace_id: str
    span_id: str
    scorer: str
    value: float | None  # None: the scorer errored
    spread: float | None  # a judge's spread over its samples
    error: str | None
    cost_usd: float | None
    scored_at: float
    model_version: str
    prompt_version: str
    job: str | None

    def to_json(self) -> dict[str, Any]:
        return {**self.__dict__, "scored_at_iso": _iso(self.scored_at)}


ONLINE_TABLE_MIGRATION = "evals/online_0001_scores"


def trace_scores(store: Store, trace_id: str) -> list[TraceScore]:
    """The online scores of a trace's calls, by span and scorer; none when online quality never ran here
    (the table is not created by a read)."""
    if ONLINE_TABLE_MIGRATION not in store.applied_migrations():
        return []
    rows = store.query(
        "SELECT trace_id, span_id, scorer, value, spread, error, cost_usd, scored_at, model_version, prompt_version,"
        " job FROM keel_eval_online_scores WHERE trace_id = ? ORDER BY span_id, scorer",
        [trace_id],
    )
    return [
        TraceScore(str(t), str(sp), str(name), _real(v), _real(spread), err, _real(cost), float(at), mv, pv, job)
        for t, sp, name, v, spread, err, cost, at, mv, pv, job in rows
    ]


def _real(value: Any) -> float | None:
    return None if value is None else float(value)


# --- the alert: a drop after the latest change -----------------------------------------------------------------


@dataclass(frozen=True)
class DropTest:
    """Scores before and after the latest model or prompt version change of one configured model, and the
    one-sided test."""

    scorer: str
    change: ChangePoint | None
    previous: tuple[str, str] | None  # the version that model used just before the change
    n_before: int
    n_after: int
    mean_before: float | None
    mean_after: float | None
    p_value: float | None  # one-sided Welch t-test: after < before
    model: str | None = None  # the configured model name whose version changed (None: not recorded)
    calls_before: int = 0  # scored calls; n_before / n_after count a repeated (input, output) pair once
    calls_after: int = 0

    @property
    def drop(self) -> float | None:
        if self.mean_before is None or self.mean_after is None:
            return None
        return self.mean_before - self.mean_after


@dataclass(frozen=True)
class _Scored:
    time: float
    alias: str
    version: tuple[str, str]  # (model version, prompt version)
    value: float
    content: str  # the (input, output) pair's hash; the call's own key when not recorded


def _distinct(rows: Sequence[_Scored]) -> list[float]:
    """One value per distinct (input, output) pair, the mean of its scores (equal, when a judge's cached
    answer or a deterministic scorer gave them): repeats of a pair (a retry loop, a load test, an FAQ)
    measure the version once, and would otherwise shrink the test's variance as if independent."""
    groups: dict[str, list[float]] = {}
    for r in rows:
        groups.setdefault(r.content, []).append(r.value)
    return [sum(v) / len(v) for v in groups.values()]


def _newest_change(rows: Sequence[_Scored]) -> tuple[str, tuple[str, str], float] | None:
    """The newest (alias, version, first time) whose alias was scored with another version before it.

    Like with like: a version change is one configured model moving from one version to another. Two
    models serving at once are two series, and one model's first call is no change of the other's.
    """
    first: dict[tuple[str, tuple[str, str]], float] = {}
    for r in rows:
        first.setdefault((r.alias, r.version), r.time)
    changes = [(alias, version, t) for (alias, version), t in first.items()
               if any(a == alias and t0 < t for (a, _), t0 in first.items())]  # fmt: skip
    return max(changes, key=lambda c: c[2]) if changes else None


def drop_test(store: Store, scorer: str, *, since: float, until: float, model: str | None = None) -> DropTest:
    """Compare the scores of the newest version of a configured model with that model's earlier scores."""
    from scipy import stats

    ensure_tables(store)
    where, params = ["scorer = ?", "span_time >= ?", "span_time < ?", "value IS NOT NULL"], [scorer, since, until]
    if model is not None:  # a configured model name, or a model version
        where.append("(model_alias = ? OR model_version = ?)")
        params += [model, model]
    rows = [
        _Scored(float(t), str(alias), (str(mv), str(pv)), float(v), str(content or f"{trace}:{span}"))
        for t, alias, mv, pv, v, content, trace, span in store.query(
            "SELECT span_time, COALESCE(model_alias, ''), model_version, prompt_version, value, content_hash,"
            f" trace_id, span_id FROM keel_eval_online_scores WHERE {' AND '.join(where)} ORDER BY span_time",
            params,
        )
    ]
    newest = _newest_change(rows)
    if newest is None:
        return DropTest(scorer, None, None, 0, len(rows), None, None, None)
    alias, version, at = newest
    own = [r for r in rows if r.alias == alias]
    before_rows = [r for r in own if r.time < at]
    after_rows = [r for r in own if r.time >= at and r.version == version]
    before, after = _distinct(before_rows), _distinct(after_rows)
    previous = next((r.version for r in reversed(own) if r.time < at), None)
    p_value = None
    if len(before) >= 2 and len(after) >= 2:
        with warnings.catch_warnings():  # identical scores on a side: scipy warns, and the NaN is handled below
            warnings.simplefilter("ignore", RuntimeWarning)
            result = stats.ttest_ind(after, before, equal_var=False, alternative="less")
        p = float(result.pvalue)
        p_value = p if math.isfinite(p) else (0.0 if sum(after) / len(after) < sum(before) / len(before) else 1.0)
    change = ChangePoint(at, *version)
    return DropTest(
        scorer, change, previous, len(before), len(after), _mean(before), _mean(after), p_value, alias or None,
        len(before_rows), len(after_rows),
    )  # fmt: skip


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _version(v: tuple[str, str] | None) -> str:
    return "?" if v is None else f"{v[0]} / prompt {v[1]}"


def measure_alert(config: Config, rule: AlertRule, store: Store, now: float) -> Evaluation:
    """`metric = "quality_drop"`: holds when the scores after the latest version change are significantly lower."""
    from keel.alerts import Evaluation, describe, window_start

    scorer, min_n = str(rule.scorer), int(rule.min_n or 0)
    model = (config.resolve_name(rule.model) or rule.model) if rule.model else None
    test = drop_test(store, scorer, since=window_start(rule, now), until=now, model=model)
    subject = describe(rule).split(" >", 1)[0].split(" <", 1)[0]
    if test.change is None:
        return Evaluation(None, False, f"{scorer}: no model or prompt version change over {rule.window}")
    change = f"{_version(test.previous)} -> {_version((test.change.model_version, test.change.prompt_version))}"
    change = f"{test.model}: {change}" if test.model else change
    counts = f"n = {test.n_before} before, {test.n_after} after"
    if (test.calls_before, test.calls_after) != (test.n_before, test.n_after):
        counts += f" (distinct question and answer pairs; {test.calls_before} and {test.calls_after} calls)"
    counts += f"; min_n = {min_n}"
    if test.n_before < min_n or test.n_after < min_n or test.drop is None or test.p_value is None:
        return Evaluation(None, False, f"{subject} not judged after {change}: {counts}")
    significant = test.p_value < rule.alpha
    holds = significant and (test.drop >= rule.threshold if rule.op == ">=" else test.drop > rule.threshold)
    verdict = "significant" if significant else "not significant"
    message = (
        f"{scorer} fell from {test.mean_before:.3f} to {test.mean_after:.3f} (drop {test.drop:.3f},"
        f" threshold {rule.threshold:g}) after {change} at {_iso(test.change.time)}; one-sided Welch t-test"
        f" p = {test.p_value:.3g} ({verdict} at {rule.alpha:g}); {counts}"
    )
    return Evaluation(test.drop, holds, message)
