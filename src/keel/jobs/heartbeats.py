"""Worker heartbeats in the store: who is alive, who died, and who recovers the dead one's items.

Self-hosted DBOS recovers a dead executor's workflows only when some live
executor asks for it. Each `keel worker` is a DBOS executor whose id is its
row here; it moves `heartbeat_at` forward every few seconds. A row whose
heartbeat is older than the timeout belongs to a dead worker, and the first
live worker to flip its state from `alive` to `dead` (a conditional update:
exactly one wins) makes the recovery call.

Times are the database's clock, not each machine's: workers on several
machines compare heartbeats written by each other, and their clocks may
disagree by more than a heartbeat.
"""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass
from typing import Any

from keel.errors import WorkerIdInUse
from keel.jobs.schema import ensure_tables
from keel.store.base import Store

__all__ = ["WorkerRow", "beat", "claim_dead", "db_now", "leave", "list_workers", "register"]

COLUMNS = ("worker_id", "host", "pid", "incarnation", "state", "started_at", "heartbeat_at", "recovered_by")
ALIVE, DEAD, STOPPED = "alive", "dead", "stopped"


@dataclass(frozen=True)
class WorkerRow:
    worker_id: str
    host: str
    pid: int
    incarnation: str  # a fresh id per start: a restarted worker does not mistake its old row for itself
    state: str  # alive | dead (recovered by another) | stopped (left cleanly)
    started_at: float
    heartbeat_at: float
    recovered_by: str | None


def _row(values: Any) -> WorkerRow:
    r = dict(zip(COLUMNS, values, strict=True))
    return WorkerRow(
        r["worker_id"], r["host"], int(r["pid"]), r["incarnation"], r["state"], float(r["started_at"]),
        float(r["heartbeat_at"]), r["recovered_by"],
    )  # fmt: skip


def now_sql(store: Store) -> str:
    """The database's clock in epoch seconds, as SQL."""
    if store.dialect == "postgres":
        return "EXTRACT(EPOCH FROM clock_timestamp())::double precision"
    return "((julianday('now') - 2440587.5) * 86400.0)"


def db_now(store: Store) -> float:
    with store.transaction() as cur:
        cur.execute(f"SELECT {now_sql(store)}")
        return float(cur.fetchone()[0])


def list_workers(store: Store) -> list[WorkerRow]:
    with store.transaction() as cur:
        cur.execute(f"SELECT {', '.join(COLUMNS)} FROM keel_workers ORDER BY worker_id")
        return [_row(r) for r in cur.fetchall()]


def register(store: Store, worker_id: str, dead_after_s: float) -> str:
    """Claim `worker_id` for this process; its incarnation. Refused while a live worker holds the id.

    A row of the same id whose heartbeat is stale (a crashed worker restarting)
    is taken over: DBOS then recovers that executor's workflows in this process.
    """
    ensure_tables(store)  # a worker's first write: the jobs tables may not exist yet
    incarnation = uuid.uuid4().hex
    now = now_sql(store)
    host, pid = socket.gethostname(), os.getpid()
    with store.transaction() as cur:
        insert = (
            f"INSERT INTO keel_workers ({', '.join(COLUMNS)}) VALUES (?, ?, ?, ?, ?, {now}, {now}, NULL)"
            " ON CONFLICT (worker_id) DO NOTHING"
        )
        cur.execute(insert, [worker_id, host, pid, incarnation, ALIVE])
        if cur.rowcount == 1:
            return incarnation
        take_over = (
            f"UPDATE keel_workers SET host = ?, pid = ?, incarnation = ?, state = ?, started_at = {now},"
            f" heartbeat_at = {now}, recovered_by = NULL WHERE worker_id = ?"
            f" AND (state <> ? OR heartbeat_at < {now} - ?)"
        )
        cur.execute(take_over, [host, pid, incarnation, ALIVE, worker_id, ALIVE, dead_after_s])
        if cur.rowcount == 1:
            return incarnation
        cur.execute(
            f"SELECT host, pid, incarnation, {now} - heartbeat_at FROM keel_workers WHERE worker_id = ?",
            [worker_id],
        )
        other_host, other_pid, other_incarnation, age = cur.fetchone()
        if other_host == host and not _pid_alive(int(other_pid)):
            # the same machine, and that process is gone (kill -9): no need to wait for its heartbeat to age
            mine = (
                f"UPDATE keel_workers SET pid = ?, incarnation = ?, state = ?, heartbeat_at = {now}"
                " WHERE worker_id = ? AND incarnation = ?"
            )
            cur.execute(mine, [pid, incarnation, ALIVE, worker_id, other_incarnation])
            if cur.rowcount == 1:
                return incarnation
    raise WorkerIdInUse(
        f"worker id {worker_id!r} is in use by a live worker (pid {other_pid} on {other_host}, heartbeat"
        f" {float(age):.1f} s ago): give this one another --id, or stop that one first"
    )


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True  # this process: a second worker in it is refused elsewhere
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def beat(store: Store, worker_id: str, incarnation: str) -> bool:
    """Move this worker's heartbeat forward; False if its row is no longer its own (declared dead meanwhile)."""
    sql = (
        f"UPDATE keel_workers SET heartbeat_at = {now_sql(store)} WHERE worker_id = ? AND incarnation = ? AND state = ?"
    )
    with store.transaction() as cur:
        cur.execute(sql, [worker_id, incarnation, ALIVE])
        return bool(cur.rowcount == 1)


def leave(store: Store, worker_id: str, incarnation: str) -> None:
    """A clean stop: the row says stopped, so a live worker recovers whatever this one left unfinished at once."""
    sql = "UPDATE keel_workers SET state = ? WHERE worker_id = ? AND incarnation = ? AND state = ?"
    with store.transaction() as cur:
        cur.execute(sql, [STOPPED, worker_id, incarnation, ALIVE])


def claim_dead(store: Store, me: str, dead_after_s: float) -> list[str]:
    """Workers found dead (stale heartbeat) or stopped, each claimed by this one alone; their ids.

    The state flip is conditional on the row being unchanged, so of several
    live workers looking at once, exactly one claims each dead worker.
    """
    now = now_sql(store)
    find = (
        f"SELECT worker_id, incarnation FROM keel_workers WHERE worker_id <> ?"
        f" AND ((state = ? AND heartbeat_at < {now} - ?) OR state = ?)"
    )
    claim = (
        "UPDATE keel_workers SET state = ?, recovered_by = ?"
        " WHERE worker_id = ? AND incarnation = ? AND state IN (?, ?)"
    )
    claimed: list[str] = []
    with store.transaction() as cur:
        cur.execute(find, [me, ALIVE, dead_after_s, STOPPED])
        candidates = cur.fetchall()
    for worker_id, incarnation in candidates:
        with store.transaction() as cur:
            cur.execute(claim, [DEAD, me, worker_id, incarnation, ALIVE, STOPPED])
            if cur.rowcount == 1:
                claimed.append(worker_id)
    return claimed
