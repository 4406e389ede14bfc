"""The SQL of jobs: the `keel_jobs` and `keel_job_items` rows that say what is done, failed and spent.

DBOS records which item workflows are queued, running and over; these rows
record what the items produced, in keel's own store, so `keel jobs show` and
the dashboard read progress and cost without touching DBOS's tables. The one
write that matters for exactly-once effects is `finish_item`: the item's
result, its `done` mark and the job's counters move in one transaction, and
only if the item was not done already (an item DBOS runs again after a crash
finds it done and changes nothing). It is also the item's only record of
having run: its workflow has no DBOS step (see keel.jobs.engine).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from keel.errors import JobConflict, UnknownJob
from keel.store.base import SPAN_COLUMNS, Store, span_row
from keel.trace import Span

__all__ = [
    "ItemRow",
    "JobRow",
    "create_job",
    "finish_item",
    "get_job",
    "inputs_hash",
    "list_items",
    "list_jobs",
    "start_item",
]

JOB_COLUMNS = ("name", "kind", "queue", "inputs_hash", "status", "total", "done", "failed", "cost_usd",
               "created_at", "updated_at")  # fmt: skip
ITEM_COLUMNS = ("job", "idempotency_key", "position", "input", "status", "run", "attempts", "result", "error",
                "cost_usd", "trace_id", "updated_at")  # fmt: skip
#: Job states; a job is finished in the last three.
RUNNING, CANCELLED, DONE, FAILED = "running", "cancelled", "done", "failed"
#: Item states.
PENDING, ITEM_RUNNING, ITEM_DONE, ITEM_FAILED = "pending", "running", "done", "failed"


@dataclass(frozen=True)
class JobRow:
    name: str
    kind: str
    queue: str
    inputs_hash: str
    status: str  # running | cancelled | done | failed (finished with failed items)
    total: int
    done: int
    failed: int
    cost_usd: float
    created_at: float
    updated_at: float

    @property
    def finished(self) -> bool:
        return self.status in (DONE, FAILED)

    @property
    def remaining(self) -> int:
        return self.total - self.done - self.failed


@dataclass(frozen=True)
class ItemRow:
    job: str
    key: str  # the idempotency key: unique within the job, stable across retries
    position: int
    input: Any
    status: str  # pending | running | done | failed
    run: int  # generation of the workflow that owns the item
    attempts: int
    result: Any
    error: str | None
    cost_usd: float | None
    trace_id: str | None
    updated_at: float


def inputs_hash(kind: str, items: Sequence[tuple[str, Any]]) -> str:
    """A digest of a job's kind and (key, input) pairs: what "the same job" means on resubmission."""
    digest = hashlib.sha256(kind.encode())
    for key, value in items:
        digest.update(b"\0" + key.encode() + b"\0")
        digest.update(json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode())
    return digest.hexdigest()


def _decode(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def _job(values: Sequence[Any]) -> JobRow:
    r = dict(zip(JOB_COLUMNS, values, strict=True))
    return JobRow(
        r["name"], r["kind"], r["queue"], r["inputs_hash"], r["status"], int(r["total"]), int(r["done"]),
        int(r["failed"]), float(r["cost_usd"]), float(r["created_at"]), float(r["updated_at"]),
    )  # fmt: skip


def _item(values: Sequence[Any]) -> ItemRow:
    r = dict(zip(ITEM_COLUMNS, values, strict=True))
    cost = None if r["cost_usd"] is None else float(r["cost_usd"])
    return ItemRow(
        r["job"], r["idempotency_key"], int(r["position"]), _decode(r["input"]), r["status"], int(r["run"]),
        int(r["attempts"]), _decode(r["result"]), r["error"], cost, r["trace_id"], float(r["updated_at"]),
    )  # fmt: skip


def create_job(store: Store, name: str, kind: str, queue: str, items: Sequence[tuple[str, Any]]) -> bool:
    """Record a new job and its items; False if a job of that name and the same inputs exists (a resume).

    A job of that name with another kind or other inputs is refused: silently
    mixing two item sets under one name would make its counts meaningless.
    """
    digest = inputs_hash(kind, items)
    now = time.time()
    with store.transaction() as cur:
        insert = (
            f"INSERT INTO keel_jobs ({', '.join(JOB_COLUMNS)}) VALUES ({', '.join('?' for _ in JOB_COLUMNS)})"
            " ON CONFLICT (name) DO NOTHING"
        )
        cur.execute(insert, [name, kind, queue, digest, RUNNING, len(items), 0, 0, 0.0, now, now])
        if cur.rowcount == 1:
            marks = ", ".join("?" for _ in range(8))
            sql = (
                "INSERT INTO keel_job_items (job, idempotency_key, position, input, status, run, attempts,"
                f" updated_at) VALUES ({marks})"
            )
            rows = ((name, key, i, store.json_param(json.dumps(value)), PENDING, 0, 0, now)
                    for i, (key, value) in enumerate(items))  # fmt: skip
            cur.executemany(sql, rows)
            return True
        cur.execute("SELECT kind, inputs_hash FROM keel_jobs WHERE name = ?", [name])
        old_kind, old_hash = cur.fetchone()
    if old_kind != kind:
        raise JobConflict(f"job {name!r} exists with kind {old_kind!r}, not {kind!r}: choose another name")
    if old_hash != digest:
        raise JobConflict(
            f"job {name!r} exists with different inputs: resubmitting a name resumes that job, so its items"
            " must be the same; choose another name for new inputs"
        )
    return False


def get_job(store: Store, name: str) -> JobRow:
    with store.transaction() as cur:
        cur.execute(f"SELECT {', '.join(JOB_COLUMNS)} FROM keel_jobs WHERE name = ?", [name])
        row = cur.fetchone()
    if row is None:
        raise UnknownJob(f"no job named {name!r} (see `keel jobs list`)")
    return _job(row)


def list_jobs(store: Store, *, status: str | None = None, kind: str | None = None, limit: int = 50) -> list[JobRow]:
    """The most recently updated jobs first (of this status and kind if given)."""
    filters = [(column, value) for column, value in (("status", status), ("kind", kind)) if value]
    where = " WHERE " + " AND ".join(f"{column} = ?" for column, _ in filters) if filters else ""
    sql = f"SELECT {', '.join(JOB_COLUMNS)} FROM keel_jobs{where} ORDER BY updated_at DESC LIMIT ?"
    with store.transaction() as cur:
        cur.execute(sql, [*(value for _, value in filters), limit])
        return [_job(r) for r in cur.fetchall()]


def job_kinds(store: Store) -> list[str]:
    """The kinds of the jobs in the store, by name."""
    with store.transaction() as cur:
        cur.execute("SELECT DISTINCT kind FROM keel_jobs ORDER BY kind")
        return [str(r[0]) for r in cur.fetchall()]


def list_items(
    store: Store, job: str, *, status: str | Sequence[str] | None = None, limit: int | None = None
) -> list[ItemRow]:
    statuses = [status] if isinstance(status, str) else list(status or ())
    where = f" AND status IN ({', '.join('?' for _ in statuses)})" if statuses else ""
    sql = f"SELECT {', '.join(ITEM_COLUMNS)} FROM keel_job_items WHERE job = ?{where} ORDER BY position"
    params: list[Any] = [job, *statuses]
    if limit is not None:
        sql += " LIMIT ?"
        params.append(limit)
    with store.transaction() as cur:
        cur.execute(sql, params)
        return [_item(r) for r in cur.fetchall()]


def item_counts(store: Store, job: str) -> dict[str, int]:
    """Items of a job by status (running ones included, which the job row does not count)."""
    sql = "SELECT status, COUNT(*) FROM keel_job_items WHERE job = ? GROUP BY status"
    with store.transaction() as cur:
        cur.execute(sql, [job])
        return {status: int(n) for status, n in cur.fetchall()}


def start_item(store: Store, job: str, key: str, run: int, trace_id: str) -> ItemRow | None:
    """Mark an item running (one more attempt) and return it; None when it must not run.

    It must not run when it is done or failed already (a workflow run again), when a
    newer run owns it (retry or resume started another workflow), or when its
    job is cancelled.
    """
    sql = (
        "UPDATE keel_job_items SET status = ?, attempts = attempts + 1, trace_id = ?, updated_at = ?"
        " WHERE job = ? AND idempotency_key = ? AND run = ? AND status IN (?, ?)"
        " AND EXISTS (SELECT 1 FROM keel_jobs WHERE name = ? AND status = ?)"
    )
    # RETURNING (SQLite 3.35+, PostgreSQL): the row as updated, without a second statement to read it
    rows = _statement(
        store,
        f"{sql} RETURNING {', '.join(ITEM_COLUMNS)}",
        [ITEM_RUNNING, trace_id, time.time(), job, key, run, PENDING, ITEM_RUNNING, job, RUNNING],
    )
    return _item(rows[0]) if rows else None


def finish_item(
    store: Store,
    job: str,
    key: str,
    run: int,
    *,
    result: Any = None,
    error: str | None = None,
    cost_usd: float = 0.0,
    span: Span | None = None,
) -> bool:
    """Record an item's outcome (a result, or an error when it failed for good); False if it was already recorded.

    One transaction: the span of this run of the item (if given, written even
    when the outcome was recorded before: the run happened), the item's row,
    then the job's counters, cost and status (finished when nothing is left).
    The item's update is conditional on it not being done or failed, so a
    second call for the same item changes nothing.
    """
    status = ITEM_FAILED if error is not None else ITEM_DONE
    now = time.time()
    sql = (
        "UPDATE keel_job_items SET status = ?, result = ?, error = ?, cost_usd = ?, updated_at = ?"
        " WHERE job = ? AND idempotency_key = ? AND run = ? AND status IN (?, ?)"
    )
    counter = "failed" if error is not None else "done"
    job_sql = (
        f"UPDATE keel_jobs SET {counter} = {counter} + 1, cost_usd = cost_usd + ?, updated_at = ?,"
        " status = CASE WHEN status = ? AND done + failed + 1 >= total"
        " THEN (CASE WHEN failed + ? > 0 THEN ? ELSE ? END) ELSE status END WHERE name = ?"
    )
    encoded = None if error is not None else store.json_param(json.dumps(result))
    item_params = [status, encoded, error, cost_usd, now, job, key, run, PENDING, ITEM_RUNNING]
    job_params = [cost_usd, now, RUNNING, int(error is not None), FAILED, DONE, job]
    if store.dialect == "postgres":
        # One statement, so one round trip instead of five (BEGIN, three writes, COMMIT): the span and the
        # item's update as data-modifying WITH clauses, the job's counters moved only if the item's row was.
        spans = f"span AS ({_SPAN_INSERT}), " if span is not None else ""
        statement = f"WITH {spans}item AS ({sql} RETURNING 1) {job_sql} AND EXISTS (SELECT 1 FROM item) RETURNING 1"
        span_params = _span_params(store, span) if span is not None else []
        return bool(_statement(store, statement, [*span_params, *item_params, *job_params]))
    with store.transaction() as cur:
        if span is not None:
            cur.execute(_SPAN_INSERT, _span_params(store, span))
        cur.execute(sql, item_params)
        if cur.rowcount != 1:
            return False
        cur.execute(job_sql, job_params)
    return True


def _statement(store: Store, sql: str, params: Sequence[Any]) -> list[Any]:
    """The rows of one statement that is atomic on its own: on PostgreSQL sent alone, without the BEGIN and
    COMMIT round trips of a transaction (an item's start and outcome are two of a worker's hottest writes)."""
    if store.dialect == "postgres":
        from keel.store.postgres import PostgresStore

        if isinstance(store, PostgresStore):
            return store.run(sql.replace("?", "%s"), params)  # keel's SQL here has no `?` or `%` in literals
    with store.transaction() as cur:
        cur.execute(sql, params)
        return cur.fetchall()


_SPAN_INSERT = f"INSERT INTO spans ({', '.join(SPAN_COLUMNS)}) VALUES ({', '.join('?' for _ in SPAN_COLUMNS)})"


def _span_params(store: Store, span: Span) -> list[Any]:
    """The span's row as `Store.write_spans` writes it (its last three columns are JSON)."""
    row = list(span_row(span))
    row[-3:] = [store.json_param(v) for v in row[-3:]]
    return row


def set_job_status(store: Store, name: str, status: str, *, only_from: Sequence[str]) -> bool:
    """Move a job to `status` if it is in one of `only_from`; False if it was not."""
    sql = (
        f"UPDATE keel_jobs SET status = ?, updated_at = ? WHERE name = ?"
        f" AND status IN ({', '.join('?' for _ in only_from)})"
    )
    with store.transaction() as cur:
        cur.execute(sql, [status, time.time(), name, *only_from])
        return bool(cur.rowcount == 1)


def renew_items(store: Store, job: str, statuses: Sequence[str]) -> list[ItemRow]:
    """Give the job's items in `statuses` a new run (pending again), for retry and resume; the renewed items.

    Failed items leave the job's failed count; the job runs again. A new run
    means a new workflow id, so DBOS starts each item afresh, and a leftover
    workflow of an older run finds the item no longer its own.
    """
    marks = ", ".join("?" for _ in statuses)
    now = time.time()
    with store.transaction() as cur:
        cur.execute("SELECT COUNT(*) FROM keel_job_items WHERE job = ? AND status = ?", [job, ITEM_FAILED])
        failed_before = int(cur.fetchone()[0]) if ITEM_FAILED in statuses else 0
        cur.execute(
            f"UPDATE keel_job_items SET status = ?, run = run + 1, error = NULL, updated_at = ?"
            f" WHERE job = ? AND status IN ({marks})",
            [PENDING, now, job, *statuses],
        )
        cur.execute(
            "UPDATE keel_jobs SET failed = failed - ?, status = ?, updated_at = ? WHERE name = ?",
            [failed_before, RUNNING, now, job],
        )
        cur.execute(
            f"SELECT {', '.join(ITEM_COLUMNS)} FROM keel_job_items WHERE job = ? AND status = ? ORDER BY position",
            [job, PENDING],
        )
        return [_item(r) for r in cur.fetchall()]
