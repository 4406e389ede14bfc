"""Job kinds for the jobs tests, imported by the test process and by `keel worker --import jobs_app`.

`effect` is an item with a side effect keyed by its idempotency key: a row in a
SQLite file outside keel's store (JOBS_EFFECTS). Every run of a handler is also
appended to JOBS_RUNS, so a test can see that DBOS re-ran a step after a kill
while the keyed effect still happened once.
"""

from __future__ import annotations

import os
import sqlite3
import time
from typing import Any

from keel import jobs

FAIL_ONCE: set[Any] = set()  # inputs that fail until removed (in-process tests)


def _effects() -> sqlite3.Connection:
    conn = sqlite3.connect(os.environ["JOBS_EFFECTS"], timeout=30, isolation_level=None)
    conn.execute("CREATE TABLE IF NOT EXISTS effects (key TEXT PRIMARY KEY, value INTEGER)")
    return conn


@jobs.kind("test.effect")
def effect(value: int, ctx: jobs.ItemContext) -> dict[str, Any]:
    with open(os.environ["JOBS_RUNS"], "a") as runs:
        runs.write(f"{ctx.key} {os.getpid()}\n")
    time.sleep(float(os.environ.get("JOBS_ITEM_S", "0.02")))
    conn = _effects()
    conn.execute("INSERT INTO effects (key, value) VALUES (?, ?) ON CONFLICT (key) DO NOTHING", (ctx.key, value))
    conn.close()
    ctx.add_cost(0.001)
    return {"square": value * value}


@jobs.kind("test.flaky")
def flaky(value: int) -> int:
    if value in FAIL_ONCE:
        raise ValueError(f"item {value} fails")
    return value + 1


@jobs.kind("test.slow")
async def slow(value: int) -> int:
    import asyncio

    await asyncio.sleep(0.2)
    return value


UNREACHABLE: dict[Any, int] = {}  # input -> how many more runs find "the database" unreachable


@jobs.kind("test.unreachable")
def unreachable(value: int) -> int:
    """Fails like a handler whose own database connection is refused (PostgreSQL full or restarting)."""
    import psycopg

    if UNREACHABLE.get(value, 0) > 0:
        UNREACHABLE[value] -= 1
        raise psycopg.OperationalError("connection failed: FATAL:  sorry, too many clients already")
    return value * 10


@jobs.kind("test.where")
def where(value: int) -> dict[str, Any]:
    """Where a plain handler runs: its thread and the span it runs under (the item's)."""
    import threading

    from keel.trace import current_span

    span = current_span()
    return {"thread": threading.current_thread().name, "trace": span.trace_id if span else None}


@jobs.kind("test.where_async")
async def where_async(value: int) -> dict[str, Any]:
    import threading

    from keel.trace import current_span

    span = current_span()
    return {"thread": threading.current_thread().name, "trace": span.trace_id if span else None}


@jobs.kind("test.stuck")
async def stuck(value: int) -> int:
    """A coroutine handler that takes JOBS_STUCK_S seconds (a worker stopped meanwhile cancels it)."""
    import asyncio

    await asyncio.sleep(float(os.environ.get("JOBS_STUCK_S", "0.01")))
    return value


BLOCKING = {"now": 0, "most": 0}  # blocking calls of test.to_thread running at once, and the most seen
_blocking_lock = __import__("threading").Lock()


def _blocking_call() -> None:
    with _blocking_lock:
        BLOCKING["now"] += 1
        BLOCKING["most"] = max(BLOCKING["most"], BLOCKING["now"])
    time.sleep(0.3)
    with _blocking_lock:
        BLOCKING["now"] -= 1


@jobs.kind("test.to_thread")
async def to_thread(value: int) -> int:
    """A coroutine handler that hands a blocking call to a thread, as one wrapping a blocking client does."""
    import asyncio

    await asyncio.to_thread(_blocking_call)
    return value
