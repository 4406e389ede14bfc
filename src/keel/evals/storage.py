"""The SQL of evaluation runs: runs, per-case results and the output cache, in keel's store.

Evals own their tables through their own migration list (`EVAL_MIGRATIONS`,
applied on first use, as RAG does), so a gateway-only deployment never has them.

- `keel_eval_runs`: one row per run (one suite under one variant), with the
  suite's spec so that any worker can rebuild the task and `rescore` can find it.
- `keel_eval_cases`: one row per case and repeat, keyed (run, case, repeat);
  written as soon as the case is done, with ON CONFLICT DO NOTHING, so a job
  step DBOS re-runs after a crash changes nothing (it skips the cases recorded
  already: `recorded_cases`); rescoring updates the scores explicitly.
- `keel_eval_cache`: model outputs by (task config, variant, case input, repeat)
  and judge answers by input: a re-run or a re-score calls no model for them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

from keel.errors import UnknownRun
from keel.evals.results import CaseResult, RunResult, ScorerError
from keel.store.base import Store
from keel.store.migrations import Migration

__all__ = ["EVAL_MIGRATIONS", "UnknownRun", "cache_get", "cache_get_many", "cache_put", "create_run", "get_run_row",
           "list_runs", "load_run", "progress", "recorded_cases", "write_case"]  # fmt: skip

EVAL_MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        "evals_0001_runs",
        (
            """
            CREATE TABLE IF NOT EXISTS keel_eval_runs (
                run_id TEXT PRIMARY KEY,
                job TEXT NOT NULL,
                suite TEXT NOT NULL,
                variant TEXT NOT NULL,
                variant_index INTEGER NOT NULL,
                variant_params {json} NOT NULL,
                thresholds {json} NOT NULL,
                spec {json} NOT NULL,
                base_dir TEXT NOT NULL,
                source TEXT,
                total INTEGER NOT NULL,
                created_at {real} NOT NULL
            )
            """,
            "CREATE INDEX IF NOT EXISTS keel_eval_runs_job ON keel_eval_runs (job)",
            """
            CREATE TABLE IF NOT EXISTS keel_eval_cases (
                run_id TEXT NOT NULL,
                case_id TEXT NOT NULL,
                repeat INTEGER NOT NULL,
                position INTEGER NOT NULL,
                cache_key TEXT NOT NULL,
                output {json},
                scores {json} NOT NULL,
                passed INTEGER,
                error TEXT,
                scorer_errors {json} NOT NULL,
                tags {json} NOT NULL,
                expected {json},
                input {json},
                case_data {json} NOT NULL,
                latency_s {real},
                input_tokens INTEGER,
                output_tokens INTEGER,
                cost_usd {real},
                trace_id TEXT,
                details {json} NOT NULL,
                updated_at {real} NOT NULL,
                PRIMARY KEY (run_id, case_id, repeat)
            )
            """,
            """
            CREATE TABLE IF NOT EXISTS keel_eval_cache (
                key TEXT PRIMARY KEY,
                value {json} NOT NULL,
                created_at {real} NOT NULL
            )
            """,
        ),
    ),
)

def migrate(store: Store) -> None:
    # the store remembers the lists it has applied (per object): no id() memo here, which a new store born
    # at a closed one's address would inherit
    store.migrate(EVAL_MIGRATIONS, namespace="evals")


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, default=str)


def _loads(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


# --- runs ------------------------------------------------------------------------------------------------

RUN_COLUMNS = ("run_id", "job", "suite", "variant", "variant_index", "variant_params", "thresholds", "spec",
               "base_dir", "source", "total", "created_at")  # fmt: skip


def create_run(store: Store, row: Mapping[str, Any]) -> None:
    """Record a run unless it exists (a resumed run keeps its row)."""
    migrate(store)
    values = [row[c] for c in RUN_COLUMNS]
    for i, column in enumerate(RUN_COLUMNS):
        if column in ("variant_params", "thresholds", "spec"):
            values[i] = store.json_param(_dumps(values[i]))
    marks = ", ".join("?" for _ in RUN_COLUMNS)
    sql = f"INSERT INTO keel_eval_runs ({', '.join(RUN_COLUMNS)}) VALUES ({marks}) ON CONFLICT (run_id) DO NOTHING"
    with store.transaction() as cur:
        cur.execute(sql, values)


def update_thresholds(store: Store, run_id: str, thresholds: Mapping[str, float]) -> None:
    with store.transaction() as cur:
        cur.execute("UPDATE keel_eval_runs SET thresholds = ? WHERE run_id = ?",
                    [store.json_param(_dumps(dict(thresholds))), run_id])  # fmt: skip


def get_run_row(store: Store, run_id: str) -> dict[str, Any]:
    migrate(store)
    with store.transaction() as cur:
        cur.execute(f"SELECT {', '.join(RUN_COLUMNS)} FROM keel_eval_runs WHERE run_id = ?", [run_id])
        row = cur.fetchone()
    if row is None:
        raise UnknownRun(f"no evaluation run {run_id!r} (see `keel eval list`)")
    out = dict(zip(RUN_COLUMNS, row, strict=True))
    for column in ("variant_params", "thresholds", "spec"):
        out[column] = _loads(out[column])
    return out


def list_runs(store: Store, *, job: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
    """Runs, newest first, with how many case repeats are recorded, their cost and when the last was written."""
    migrate(store)
    where = " WHERE r.job = ?" if job else ""
    sql = (
        "SELECT r.run_id, r.job, r.suite, r.variant, r.variant_index, r.total, r.created_at,"
        " COUNT(c.case_id), SUM(CASE WHEN c.passed = 1 THEN 1 ELSE 0 END), SUM(c.cost_usd), MAX(c.updated_at)"
        " FROM keel_eval_runs r LEFT JOIN keel_eval_cases c ON c.run_id = r.run_id"
        f"{where} GROUP BY r.run_id, r.job, r.suite, r.variant, r.variant_index, r.total, r.created_at"
        " ORDER BY r.created_at DESC, r.variant_index LIMIT ?"
    )
    with store.transaction() as cur:
        cur.execute(sql, [*([job] if job else []), limit])
        rows = cur.fetchall()
    names = ("run_id", "job", "suite", "variant", "variant_index", "total", "created_at", "recorded", "passed",
             "cost_usd", "updated_at")  # fmt: skip
    return [dict(zip(names, r, strict=True)) for r in rows]


# --- cases -----------------------------------------------------------------------------------------------

CASE_COLUMNS = ("run_id", "case_id", "repeat", "position", "cache_key", "output", "scores", "passed", "error",
                "scorer_errors", "tags", "expected", "input", "case_data", "latency_s", "input_tokens", "output_tokens",
                "cost_usd", "trace_id", "details", "updated_at")  # fmt: skip
_JSON_CASE = {"output", "scores", "scorer_errors", "tags", "expected", "input", "case_data", "details"}


def write_case(
    store: Store,
    run_id: str,
    position: int,
    cache_key: str,
    case: CaseResult,
    case_data: Mapping[str, Any],
    output: Any = None,
) -> bool:
    """Record one case repeat (`case_data`: the dataset's case, for rescoring); False if it was recorded already
    (a re-run step). `output`, if given, is the task's output to cache under `cache_key`, in the same
    transaction (one commit a case rather than two)."""
    migrate(store)
    data = asdict(case)
    data.update(run_id=run_id, position=position, cache_key=cache_key, updated_at=time.time(), case_data=case_data,
                passed=None if case.passed is None else int(case.passed))  # fmt: skip
    values = [store.json_param(_dumps(data[c])) if c in _JSON_CASE else data[c] for c in CASE_COLUMNS]
    marks = ", ".join("?" for _ in CASE_COLUMNS)
    sql = (
        f"INSERT INTO keel_eval_cases ({', '.join(CASE_COLUMNS)}) VALUES ({marks})"
        " ON CONFLICT (run_id, case_id, repeat) DO NOTHING"
    )
    with store.transaction() as cur:
        if output is not None:
            cur.execute(_CACHE_PUT, [cache_key, store.json_param(_dumps(output)), time.time()])
        cur.execute(sql, values)
        return bool(cur.rowcount == 1)


def recorded_cases(store: Store, units: Sequence[Mapping[str, Any]]) -> set[tuple[str, str, int]]:
    """Which of these case repeats (dicts with `run`, `case` (with its `id`) and `repeat`) are recorded, as
    (run, case id, repeat): index lookups by run and case id, 500 ids a query."""
    migrate(store)
    wanted = {(u["run"], str(u["case"]["id"]), int(u["repeat"])) for u in units}
    by_run: dict[str, list[str]] = {}
    for run_id, case_id, _ in wanted:
        by_run.setdefault(run_id, []).append(case_id)
    found: set[tuple[str, str, int]] = set()
    with store.transaction() as cur:
        for run_id, ids in by_run.items():
            unique = sorted(set(ids))
            for start in range(0, len(unique), 500):
                batch = unique[start : start + 500]
                marks = ", ".join("?" for _ in batch)
                sql = f"SELECT case_id, repeat FROM keel_eval_cases WHERE run_id = ? AND case_id IN ({marks})"
                cur.execute(sql, [run_id, *batch])
                found.update((run_id, str(case_id), int(repeat)) for case_id, repeat in cur.fetchall())
    return found & wanted


def cache_get_many(store: Store, keys: Sequence[str]) -> dict[str, Any]:
    """The cached values of these keys (those that have one), 500 keys a query."""
    migrate(store)
    unique = sorted(set(keys))
    found: dict[str, Any] = {}
    with store.transaction() as cur:
        for start in range(0, len(unique), 500):
            batch = unique[start : start + 500]
            cur.execute(f"SELECT key, value FROM keel_eval_cache WHERE key IN ({', '.join('?' for _ in batch)})", batch)
            found.update((str(key), _loads(value)) for key, value in cur.fetchall())
    return found


def progress(store: Store, run_ids: Sequence[str]) -> tuple[int, int, float]:
    """(case repeats recorded, of which the task errored, their task cost) over these runs."""
    if not run_ids:
        return 0, 0, 0.0
    marks = ", ".join("?" for _ in run_ids)
    sql = (
        "SELECT COUNT(*), SUM(CASE WHEN error IS NULL THEN 0 ELSE 1 END), SUM(cost_usd)"
        f" FROM keel_eval_cases WHERE run_id IN ({marks})"
    )
    with store.transaction() as cur:
        cur.execute(sql, list(run_ids))
        done, errored, cost = cur.fetchone()
    return int(done or 0), int(errored or 0), float(cost or 0.0)


def update_scores(store: Store, run_id: str, case: CaseResult) -> None:
    sql = (
        "UPDATE keel_eval_cases SET scores = ?, passed = ?, scorer_errors = ?, updated_at = ?"
        " WHERE run_id = ? AND case_id = ? AND repeat = ?"
    )
    passed = None if case.passed is None else int(case.passed)
    errors = _dumps([asdict(e) for e in case.scorer_errors])
    with store.transaction() as cur:
        cur.execute(sql, [store.json_param(_dumps(dict(case.scores))), passed, store.json_param(errors),
                                      time.time(), run_id, case.case_id, case.repeat])  # fmt: skip


def _case(values: Sequence[Any]) -> CaseResult:
    r = dict(zip(CASE_COLUMNS, values, strict=True))
    for column in _JSON_CASE:
        r[column] = _loads(r[column])
    return CaseResult(
        case_id=r["case_id"], repeat=int(r["repeat"]), output=r["output"], scores=r["scores"] or {},
        passed=None if r["passed"] is None else bool(r["passed"]), error=r["error"],
        scorer_errors=tuple(ScorerError(**e) for e in r["scorer_errors"] or ()), tags=tuple(r["tags"] or ()),
        expected=r["expected"], input=r["input"], latency_s=r["latency_s"], input_tokens=r["input_tokens"],
        output_tokens=r["output_tokens"], cost_usd=r["cost_usd"], trace_id=r["trace_id"], details=r["details"] or {},
    )  # fmt: skip


def case_rows(store: Store, run_id: str) -> list[tuple[CaseResult, dict[str, Any]]]:
    """The recorded cases of a run in dataset order, each with the dataset's case."""
    sql = f"SELECT {', '.join(CASE_COLUMNS)} FROM keel_eval_cases WHERE run_id = ? ORDER BY position, repeat"
    with store.transaction() as cur:
        cur.execute(sql, [run_id])
        return [(_case(r), _loads(r[CASE_COLUMNS.index("case_data")])) for r in cur.fetchall()]


def load_run(store: Store, run_id: str) -> RunResult:
    """A stored run (finished or not) with its recorded cases."""
    row = get_run_row(store, run_id)
    cases = [case for case, _ in case_rows(store, run_id)]
    status = "done" if len(cases) >= int(row["total"]) else "running"
    return RunResult(
        run_id=run_id, suite=row["suite"], variant=row["variant"], variant_params=row["variant_params"],
        thresholds=row["thresholds"], cases=cases, created_at=float(row["created_at"]), status=status,
    )  # fmt: skip


# --- the cache ---------------------------------------------------------------------------------------------


def cache_get(store: Store, key: str) -> Any:
    migrate(store)
    with store.transaction() as cur:
        cur.execute("SELECT value FROM keel_eval_cache WHERE key = ?", [key])
        row = cur.fetchone()
    return None if row is None else _loads(row[0])


_CACHE_PUT = "INSERT INTO keel_eval_cache (key, value, created_at) VALUES (?, ?, ?) ON CONFLICT (key) DO NOTHING"


def cache_put(store: Store, key: str, value: Any) -> None:
    with store.transaction() as cur:
        cur.execute(_CACHE_PUT, [key, store.json_param(_dumps(value)), time.time()])


_SUMMARY_COLUMNS = ("case_id", "repeat", "scores", "passed", "error", "cost_usd", "latency_s")


def summary_cases(store: Store, run_id: str) -> list[CaseResult]:
    """A run's recorded cases with only what its summary reads (ids, scores, pass/fail, error, cost, latency):
    the dashboard's runs list decodes no input, output or details (about 3 times faster on 1,000 cases)."""
    migrate(store)
    sql = f"SELECT {', '.join(_SUMMARY_COLUMNS)} FROM keel_eval_cases WHERE run_id = ? ORDER BY position, repeat"
    with store.transaction() as cur:
        cur.execute(sql, [run_id])
        rows = cur.fetchall()
    return [_summary_case(r) for r in rows]


def _summary_case(r: Sequence[Any]) -> CaseResult:
    passed = None if r[3] is None else bool(r[3])
    return CaseResult(case_id=r[0], repeat=int(r[1]), scores=_loads(r[2]) or {}, passed=passed, error=r[4],
                      cost_usd=r[5], latency_s=r[6])  # fmt: skip
