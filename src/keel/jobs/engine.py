"""The DBOS side of jobs: the item workflow, and where DBOS keeps its own tables.

Each item is one DBOS workflow (id: job, item key, run) enqueued on a DBOS
queue, so queues bound concurrency and rate across every worker, and a worker
that dies leaves its items PENDING under its executor id for another to
recover. The workflow does the item's work and records its outcome in keel's
store (`records.finish_item`, conditional on the item not being done: a run
DBOS repeats after a crash changes nothing).

The workflow has no DBOS step of its own. A step's record (its output, read
back before it runs, written after) lets a workflow of several steps resume
after the last one done; an item is one unit of work whose record is keel's
own item row, written in the transaction that marks it done. DBOS's step
record said the same thing a second time and cost two of its three
transactions per item; without it, a workflow DBOS recovers runs again from
the start, finds its item done (`start_item`) and does nothing, which is what
the replayed step did. The workflow body holds no decision DBOS replays, so
the time and ids it makes cannot diverge between runs.

Store writes wait out an unreachable database (PostgreSQL restarting, a
network cut) instead of failing the item: the work is kept and written when
the store is back.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import sqlite3
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from dbos import DBOS

from keel.config import Config
from keel.jobs import records
from keel.jobs.kinds import ItemContext, Kind, get_kind
from keel.store.base import Store
from keel.trace import Span, enter_span, exit_span, new_id, new_trace_id

__all__ = [
    "APP_NAME",
    "APP_VERSION",
    "ItemExecutor",
    "WorkerStopped",
    "sqlite_system_engine",
    "system_database_url",
    "workflow_id",
]

log = logging.getLogger("keel.jobs")

#: DBOS application name and version of every keel worker and client. The version is fixed (not DBOS's
#: hash of the registered code) so that a worker recovers, and dequeues, items enqueued by any keel process.
APP_NAME = "keel"
APP_VERSION = "keel-jobs-1"
ITEM_WORKFLOW = "keel.jobs.item"
#: Threads for the `asyncio.to_thread` calls of coroutine handlers in one worker (started as needed).
IO_THREADS = 256
T = TypeVar("T")


def system_database_url(config: Config) -> str:
    """DBOS's system database: configured, else the store's PostgreSQL database, else a SQLite file beside the store."""
    if config.jobs.system_database_url:
        return config.jobs.system_database_url
    url = config.store_url
    if url.startswith(("postgresql://", "postgres://")):
        return "postgresql://" + url.split("://", 1)[1]
    path = Path(url).expanduser().resolve()
    return f"sqlite:///{path.with_name(path.stem + '-dbos.sqlite')}"


def sqlite_system_engine(url: str) -> sa.Engine:
    """DBOS's SQLite system database as a worker uses it: WAL, synchronous=NORMAL, one connection per process.

    DBOS's own SQLite engine keeps the rollback journal with a sync to disk per
    commit and a pool of 20 connections, so the 5-7 commits of each item's
    workflow wait on each other inside SQLite's busy handler, which sleeps up
    to 100 ms between tries (37 ms per no-op item measured). SQLite has one
    writer anyway: one pooled connection queues the process's writers on a lock
    that wakes the next at once. WAL with synchronous=NORMAL (keel's store does
    the same) survives kill -9; only a power cut may lose the last commits.
    """
    engine = sa.create_engine(url, pool_size=1, max_overflow=0, pool_timeout=120)

    @sa.event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = "IMMEDIATE"  # as DBOS's engine: writers take the lock at BEGIN
        dbapi_conn.execute("PRAGMA busy_timeout=30000")  # other processes (a CLI enqueueing) still contend
        dbapi_conn.execute("PRAGMA foreign_keys=ON")
        dbapi_conn.execute("PRAGMA journal_mode=WAL")
        dbapi_conn.execute("PRAGMA synchronous=NORMAL")

    return engine


def workflow_id(job: str, key: str, run: int) -> str:
    """The workflow of one run of one item; the job name's length makes the id unambiguous."""
    return f"keel-job:{len(job)}:{job}:{key}:{run}"


def _transient(exc: BaseException) -> bool:
    """An error of an unreachable or busy store, which passes: wait and try again."""
    if isinstance(exc, (sqlite3.OperationalError, TimeoutError, ConnectionError)):
        return True
    try:
        import psycopg
    except ImportError:  # pragma: no cover - the postgres extra is not installed
        return False
    return isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError))


def _database_unreachable(exc: BaseException) -> bool:
    """A handler's error that says its database is out of reach for now (refused, full, restarting, locked).

    Such an error is the environment's, not the item's: the item waits and runs
    again instead of spending its attempts (a killed worker's connections, held
    until the server notices, can fill PostgreSQL's `max_connections` for a moment).
    """
    if isinstance(exc, sqlite3.OperationalError):
        return any(word in str(exc) for word in ("database is locked", "database is busy", "unable to open"))
    try:
        import psycopg
    except ImportError:  # pragma: no cover - the postgres extra is not installed
        return False
    return isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError))


class ItemExecutor:
    """Runs items in a worker process: the state the item workflow needs (the store, kinds, job rows).

    An item runs start to end on the DBOS executor thread that runs its
    workflow: its store writes, a plain handler and DBOS's own records, with no
    hop between threads (a coroutine workflow made 9 per item, about 2.4 ms of
    CPU of the 5.3 a no-op item cost). A coroutine handler runs on the
    executor's event loop while that thread waits.
    """

    def __init__(self, store: Store, *, max_wait_s: float = 24 * 3600.0) -> None:
        self.store = store
        self.max_wait_s = max_wait_s
        self._kinds: dict[str, str] = {}  # job name -> kind: a job's kind never changes
        self._kinds_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._loop_lock = threading.Lock()
        self._stopping = threading.Event()
        self._running = 0  # items in `run_item` now
        self._closed = False  # a stopping worker found idle: items DBOS hands over now are left for recovery
        self._count_lock = threading.Lock()
        # SQLite has one writer: the items' threads take turns on a lock that wakes the next at once, where
        # SQLite's busy handler would have them sleep up to 100 ms between tries (most of the time per item)
        self._writes = threading.Lock() if store.dialect == "sqlite" else contextlib.nullcontext()

    def db(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """A store call, retried while the store is away (the item's work is kept meanwhile)."""
        delay, waited = 0.1, 0.0
        while True:
            try:
                with self._writes:
                    return fn(self.store, *args, **kwargs)
            except Exception as exc:
                if not _transient(exc) or waited >= self.max_wait_s:
                    raise
                log.warning("store unavailable (%s); retrying in %.1f s", exc, delay)
                self._pause(delay)
                waited += delay
                delay = min(delay * 2, 5.0)

    def kind_of(self, job: str) -> str:
        with self._kinds_lock:  # one lookup per job, not one per item thread that starts before it is known
            if job not in self._kinds:
                self._kinds[job] = self.db(records.get_job, job).kind
            return self._kinds[job]

    def run_item(self, job: str, key: str, run: int) -> str:
        """Run one item unless it is done, superseded or its job cancelled; "done", "failed" or "skipped"."""
        with self._count_lock:
            if self._closed:
                raise WorkerStopped
            self._running += 1
        try:
            return self._run_item(job, key, run)
        finally:
            with self._count_lock:
                self._running -= 1

    @property
    def running(self) -> int:
        """Items in `run_item` now."""
        return self._running

    def close_if_idle(self) -> bool:
        """Whether no item runs now; if so, none starts from now on (DBOS may still hand one over before it
        stops: it is left unrecorded, for recovery). A worker that is busy is left as it was."""
        with self._count_lock:
            self._closed = self._running == 0
            return self._closed

    def _run_item(self, job: str, key: str, run: int) -> str:
        trace_id = new_trace_id()
        item = self.db(records.start_item, job, key, run, trace_id)
        if item is None:
            return "skipped"
        ctx = ItemContext(job=job, key=key, attempt=item.attempts, trace_id=trace_id, store=self.store)
        span = Span(trace_id, new_id(8), None, "job.item", time.time(), attributes={
            "keel.job": job, "keel.job.item": key, "keel.job.attempt": item.attempts,
        })  # fmt: skip
        result, error = self._attempts(self.kind_of(job), item.input, ctx, span)
        span.end_time = time.time()
        span.set(keel__cost_usd=ctx.cost_usd or None, keel__job__kind=self._kinds.get(job))
        # the item's span goes in the transaction of its outcome: one commit, not two
        self.db(records.finish_item, job, key, run, result=result, error=error, cost_usd=ctx.cost_usd, span=span)
        return "failed" if error is not None else "done"

    def _attempts(self, kind_name: str, value: Any, ctx: ItemContext, span: Span) -> tuple[Any, str | None]:
        """The handler's JSON result, or the error of its last attempt."""
        error: str | None = None
        try:
            kind = get_kind(kind_name)
        except Exception as exc:
            span.fail(exc)
            return None, f"{type(exc).__name__}: {exc}"
        token = enter_span(span)  # a coroutine handler sees it too: its task copies this thread's context
        delay, waited = 0.1, 0.0
        try:
            attempt = 0
            while attempt < kind.attempts:
                try:
                    result = self._call(kind, value, ctx)
                    json.dumps(result)  # a result that cannot be stored is the handler's failure, not the store's
                    return result, None
                except Exception as exc:
                    error = f"{type(exc).__name__}: {exc}"
                    if _database_unreachable(exc) and waited < self.max_wait_s:
                        log.warning("item %s of %s: database unreachable (%s); again in %.1f s", ctx.key, ctx.job,
                                    exc, delay)  # fmt: skip
                        self._pause(delay)
                        waited += delay
                        delay = min(delay * 2, 5.0)
                        continue
                    attempt += 1
                    log.debug("item %s of %s failed: %s", ctx.key, ctx.job, "".join(traceback.format_exception(exc)))
                    span.fail(exc)
                    if attempt < kind.attempts:
                        self._pause(min(0.5 * 2 ** (attempt - 1), 30.0))
        finally:
            exit_span(token)
        return None, error

    def _call(self, kind: Kind, value: Any, ctx: ItemContext) -> Any:
        """The handler's result: a plain function in this thread, a coroutine function on the event loop."""
        if not kind.is_async:
            return kind.call(value, ctx)
        with self._loop_lock:  # `close` cancels every task submitted before it: none slips in after
            if self._stopping.is_set():
                raise WorkerStopped
            future = asyncio.run_coroutine_threadsafe(kind.run(value, ctx), self._event_loop())
        try:
            return future.result()
        except concurrent.futures.CancelledError:
            if self._stopping.is_set():
                raise WorkerStopped from None
            raise

    def _pause(self, seconds: float) -> None:
        """Wait before trying again, unless the worker stops meanwhile."""
        if self._stopping.wait(seconds):
            raise WorkerStopped

    def _event_loop(self) -> asyncio.AbstractEventLoop:
        """The loop of coroutine handlers, started at the first one (under `_loop_lock`): one loop for the
        process's items, so clients a handler keeps (HTTP, the gateway's) stay on the loop they were made on."""
        if self._loop is None:
            loop = asyncio.new_event_loop()
            # asyncio's own pool has cpu_count + 4 threads, too few for handlers that await `to_thread` (a
            # blocking client, a store write) at a worker_concurrency of dozens; threads start only as needed
            loop.set_default_executor(ThreadPoolExecutor(max_workers=IO_THREADS, thread_name_prefix="keel-jobs-io"))
            self._loop_thread = threading.Thread(target=loop.run_forever, name="keel-jobs-loop", daemon=True)
            self._loop_thread.start()
            self._loop = loop
        return self._loop

    def close(self) -> None:
        """Stop: coroutine handlers still running are cancelled, and items waiting to try again give up; all
        of them are left unrecorded, to run again when DBOS recovers them. A plain handler runs to its end."""
        with self._loop_lock:
            self._stopping.set()
            loop, thread, self._loop, self._loop_thread = self._loop, self._loop_thread, None, None
        if loop is None or thread is None:
            return
        asyncio.run_coroutine_threadsafe(_cancel_all(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        if not thread.is_alive():
            loop.close()  # also shuts its thread pool down, without waiting for a blocking call to return


class WorkerStopped(BaseException):
    """The worker stopped while an item ran: the item is left unrecorded, to run again when DBOS recovers it.

    A BaseException, as asyncio's CancelledError: neither the item's attempts
    nor DBOS's record of the workflow's outcome take it for the item failing.
    """


async def _cancel_all() -> None:
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


_active: ItemExecutor | None = None


def set_executor(executor: ItemExecutor | None) -> None:
    """The executor of this process's worker (DBOS calls the workflow by name, so it finds it here)."""
    global _active
    _active = executor


# A plain function, not a coroutine: DBOS runs a plain workflow on one executor thread, where a coroutine
# workflow hops between its event loop and the thread pool around each of its records (9 hops an item).
@DBOS.workflow(name=ITEM_WORKFLOW)
def item_workflow(job: str, key: str, run: int) -> str:
    if _active is None:
        raise RuntimeError("a keel job item ran in a process without a started keel worker")
    return _active.run_item(job, key, run)
