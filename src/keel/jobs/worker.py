"""`Worker`: a process that runs job items, keeps its heartbeat, and recovers dead workers' items.

A worker is a launched DBOS executor whose executor id is the worker id.
DBOS recovers the worker's own pending items when it starts again under the
same id (kill -9, restart); items of a worker that never comes back are
recovered by a live worker once its heartbeat is older than
`[jobs] dead_after_s` (see `heartbeats`). One DBOS instance per process: a
process runs at most one worker.
"""

from __future__ import annotations

import importlib
import logging
import os
import socket
import threading
import time
from typing import Any

import sqlalchemy as sa
from dbos import DBOS, DBOSConfig

from keel.config import Config, load_config
from keel.errors import ConfigError
from keel.jobs import heartbeats
from keel.jobs.engine import (
    APP_NAME,
    APP_VERSION,
    ItemExecutor,
    set_executor,
    sqlite_system_engine,
    system_database_url,
)
from keel.jobs.kinds import declared_queues
from keel.jobs.settings import JobQueueConfig
from keel.store import Store, open_store

__all__ = ["Worker", "current_worker", "default_worker_id"]

log = logging.getLogger("keel.jobs")
_running: Worker | None = None


def default_worker_id() -> str:
    """The host name: a worker restarted on the same machine takes its own unfinished items back at once."""
    return socket.gethostname()


def current_worker() -> Worker | None:
    """The worker this process runs, if started (one per process: a command that would start its own uses it)."""
    return _running


def import_kinds(modules: list[str] | tuple[str, ...]) -> None:
    """Import the modules whose `@kind` decorators register the handlers this worker runs."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ConfigError(f"cannot import job kinds module {module!r}: {exc}", field="jobs.imports") from exc


class Worker:
    """Runs items of every keel queue until stopped.

    with Worker(worker_id="w1"):
        runner.wait("my-job")
    """

    def __init__(
        self,
        config: Config | None = None,
        *,
        worker_id: str | None = None,
        store: Store | None = None,
        queues: list[str] | None = None,
    ) -> None:
        self.config = config or load_config()
        # None: every queue in the system database; else only these (a command that runs its own job's items)
        self.queues = queues
        self.worker_id = worker_id or default_worker_id()
        if not self.worker_id.strip() or len(self.worker_id) > 200:
            raise ConfigError(f"worker id {self.worker_id[:40]!r} must be 1-200 characters")
        self._own_store = store is None
        self.store = store or open_store(self.config.store_url)
        self.incarnation: str | None = None
        self.recovered: list[str] = []  # ids of dead workers whose items this one recovered
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lost_store_at: float | None = None
        self._engine: sa.Engine | None = None  # keel's engine for a SQLite system database
        self._executor: ItemExecutor | None = None
        # workflow id -> when DBOS dequeued it, for this worker's PENDING workflows no thread here ran at the last
        # look: one still so at the next look is an orphan (see `recover_orphans`)
        self._unrun: dict[str, int | None] = {}
        self.orphans_recovered = 0  # workflows of its own this worker handed back to the queue

    def start(self) -> Worker:
        global _running
        if _running is not None:
            raise ConfigError(f"this process already runs worker {_running.worker_id!r}: one worker per process")
        import_kinds(self.config.jobs.imports)
        jobs = self.config.jobs
        self.incarnation = heartbeats.register(self.store, self.worker_id, jobs.dead_after_s)
        _running = self
        try:
            self._executor = ItemExecutor(self.store)
            set_executor(self._executor)
            DBOS(config=self._dbos_config())
            if self.queues is not None:
                DBOS.listen_queues(self.queues)
            DBOS.launch()
            # the queues kinds declare, then the configured ones, which override a kind's limits
            for name, limits in {jobs.default_queue: JobQueueConfig(), **declared_queues(), **jobs.queues}.items():
                DBOS.register_queue(
                    name, worker_concurrency=limits.worker_concurrency, global_concurrency=limits.concurrency,
                    limiter={"limit": limits.rpm, "period": 60.0} if limits.rpm else None,
                    polling_interval_sec=jobs.poll_s, on_conflict="always_update",
                )  # fmt: skip
        except BaseException:
            DBOS.destroy()
            heartbeats.leave(self.store, self.worker_id, self.incarnation)
            self._teardown()
            raise
        self._thread = threading.Thread(target=self._heartbeat_loop, name="keel-worker-heartbeat", daemon=True)
        self._thread.start()
        log.info("worker %s started (pid %d)", self.worker_id, os.getpid())
        return self

    def _dbos_config(self) -> DBOSConfig:
        url = system_database_url(self.config)
        if url.startswith("sqlite") and self._engine is None:
            self._engine = sqlite_system_engine(url)
        return {
            "name": APP_NAME,
            "system_database_url": url,
            "system_database_engine": self._engine,
            "executor_id": self.worker_id,
            "application_version": APP_VERSION,
            "log_level": os.environ.get("KEEL_DBOS_LOG_LEVEL", "WARNING"),
            "notification_listener_polling_interval_sec": 0.1,
        }

    # --- heartbeat and recovery --------------------------------------------------------

    def _heartbeat_loop(self) -> None:
        jobs = self.config.jobs
        while not self._stop.wait(jobs.heartbeat_s):
            try:
                self.tick()
            except Exception as exc:  # the store is away: keep running items, try again next beat
                log.warning("worker %s: heartbeat failed: %s", self.worker_id, exc)
                self._lost_store_at = self._lost_store_at or time.monotonic()

    def tick(self) -> list[str]:
        """One heartbeat, a look for this worker's orphaned items, then recovery of dead workers; their ids."""
        if self.incarnation is None:
            raise ConfigError(f"worker {self.worker_id!r} is not started")
        if not heartbeats.beat(self.store, self.worker_id, self.incarnation):
            # another worker declared this one dead (a long pause) and recovered its items; it is alive after
            # all, so it registers again: what it still runs is finished by whichever run writes first
            self.incarnation = heartbeats.register(self.store, self.worker_id, self.config.jobs.dead_after_s)
        self.recover_orphans()
        if self._lost_store_at is not None:
            # After an outage every heartbeat is stale, the live workers' too: wait one timeout for them to beat.
            if time.monotonic() - self._lost_store_at < self.config.jobs.dead_after_s:
                return []
            self._lost_store_at = None
        if self.queues is not None:
            return []  # a worker of some queues only could not run a dead worker's other items: full workers do
        dead = heartbeats.claim_dead(self.store, self.worker_id, self.config.jobs.dead_after_s)
        if dead:
            handles = DBOS._recover_pending_workflows(dead)
            log.warning("worker %s recovered %d items of dead workers %s", self.worker_id, len(handles), dead)
            self.recovered.extend(dead)
        return dead

    def recover_orphans(self) -> list[str]:
        """Hand back to the queue this worker's own items that DBOS claimed for it but no thread here runs; their ids.

        DBOS claims a queued workflow for this executor (PENDING, in one commit)
        and only then reads its status back and starts a thread for it. When
        the system database goes away between the two (PostgreSQL restarting,
        a network cut), DBOS logs the error and drops the dispatch: the
        workflow stays PENDING under a live executor, which no recovery looks
        at (DBOS recovers an executor's workflows when it starts, keel when its
        heartbeat is stale), and its item never runs. (DBOS's write of an
        outcome, after keel recorded the item, is dropped the same way: the
        item is done, its workflow PENDING.) A workflow seen PENDING
        here, outside DBOS's running set, at two looks a heartbeat apart with
        the same dequeue time is such an orphan (a dispatch takes milliseconds;
        a new claim changes the time): it goes back on its queue. At worst
        one still being dispatched runs twice, which an item allows (its start
        and outcome are conditional: the second run finds it done).
        """
        if self._executor is None:
            return []
        try:
            pending = DBOS.list_workflows(executor_id=self.worker_id, status="PENDING", load_input=False,
                                          load_output=False)  # fmt: skip
        except Exception as exc:  # the system database is away: look again next beat
            log.warning("worker %s: could not list its workflows: %s", self.worker_id, exc)
            return []
        running = set(_dbos_running())
        unrun = {w.workflow_id: w.dequeued_at for w in pending if w.workflow_id not in running}
        orphans = [wf for wf, at in unrun.items() if wf in self._unrun and self._unrun[wf] == at]
        self._unrun = {wf: at for wf, at in unrun.items() if wf not in orphans}
        recovered = [wf for wf in orphans if _requeue(wf, self.worker_id)]
        if recovered:
            log.warning("worker %s: %d of its items PENDING in DBOS but not running here (%s); queued again",
                        self.worker_id, len(recovered), ", ".join(recovered[:5]))  # fmt: skip
            self.orphans_recovered += len(recovered)
        return recovered

    # --- stopping ------------------------------------------------------------------------

    def stop(self, *, drain_s: int = 10) -> None:
        """Stop: items running now get `drain_s` seconds to finish; what is left goes to a live worker.

        An idle worker stops at once: DBOS's drain sleeps a second before it first looks (DBOS 3.4)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        # idle: no item runs (and none may start now) and DBOS has recorded the end of each workflow it ran
        quiet = self._executor is not None and self._executor.close_if_idle() and self.idle(settle_s=1.0)
        DBOS.destroy(workflow_completion_timeout_sec=0 if quiet else drain_s)
        if self.incarnation is not None:
            try:
                heartbeats.leave(self.store, self.worker_id, self.incarnation)
            except Exception as exc:
                log.warning("worker %s: could not record its stop: %s", self.worker_id, exc)
        self._teardown()

    def idle(self, *, settle_s: float = 0.0) -> bool:
        """Whether no item runs in this worker and DBOS has recorded the end of every workflow it ran. An item's
        outcome is in keel's store a moment before its workflow's is in DBOS's: `settle_s` waits that out."""
        if self._executor is None or self._executor.running:
            return False
        deadline = time.monotonic() + settle_s
        while True:
            try:
                left = DBOS.list_workflows(executor_id=self.worker_id, status="PENDING", limit=1, load_input=False,
                                           load_output=False)  # fmt: skip
            except Exception as exc:  # the system database is away: let DBOS's drain decide
                log.warning("worker %s: could not list its workflows: %s", self.worker_id, exc)
                return False
            if not left or time.monotonic() >= deadline:
                return not left
            time.sleep(0.01)

    def _teardown(self) -> None:
        global _running
        set_executor(None)
        if self._executor is not None:
            self._executor.close()  # after DBOS's drain: what still runs on its loop is cancelled
            self._executor = None
        if self._engine is not None:
            self._engine.dispose()  # DBOS disposes only the engines it created
            self._engine = None
        if _running is self:
            _running = None
        if self._own_store:
            self.store.close()

    def __enter__(self) -> Worker:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def _dbos_running() -> list[str]:
    """Ids of the workflows this process's DBOS runs now (from its dispatch to the record of its outcome)."""
    from dbos._dbos import _get_dbos_instance

    return _get_dbos_instance()._active_workflows_set.activeList()


def _requeue(workflow_id: str, executor_id: str) -> bool:
    """Put a PENDING workflow of `executor_id` back on its queue, as DBOS's recovery does; False if it moved on."""
    from dbos._dbos import _get_dbos_instance
    from dbos._utils import INTERNAL_QUEUE_NAME

    try:
        return _get_dbos_instance()._sys_db.reenqueue_for_recovery(workflow_id, [executor_id], INTERNAL_QUEUE_NAME)
    except Exception as exc:  # the system database is away again: the next looks find it once more
        log.warning("worker %s: could not queue %s again: %s", executor_id, workflow_id, exc)
        return False
