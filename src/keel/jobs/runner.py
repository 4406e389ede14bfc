"""`JobRunner`: submit jobs and watch, cancel, resume and retry them, from any process.

The runner does not run items: `keel worker` processes do (or a `Worker`
started in this process). It writes the job's rows to keel's store and
enqueues one DBOS workflow per item through a DBOS client, which needs only
the system database, so the CLI and a web request can submit and manage
jobs without becoming workers.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dbos import DBOS, DBOSClient, EnqueueOptions

from keel.config import Config, load_config
from keel.errors import InputError, JobConflict
from keel.jobs import records
from keel.jobs.engine import APP_NAME, APP_VERSION, ITEM_WORKFLOW, system_database_url, workflow_id
from keel.jobs.kinds import declared_queues, get_kind, queue_limits
from keel.jobs.records import ItemRow, JobRow
from keel.jobs.schema import ensure_tables
from keel.jobs.settings import JobQueueConfig
from keel.store import Store, open_store

__all__ = ["JobRunner", "JobStatus", "check_job_name"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-/:@]{0,199}$")
_migrated: set[str] = set()  # system databases this process has created or checked


@dataclass(frozen=True)
class JobStatus:
    """A job's row with its items by status (running ones too) and its most recent errors."""

    job: JobRow
    counts: dict[str, int]
    errors: list[ItemRow]


def check_job_name(name: str) -> str:
    """The name, if a job may have it (a command checks it before doing work for the job); else InputError."""
    if not _NAME.match(name):
        raise InputError(
            f"job name {name[:60]!r} must be 1-200 characters of letters, digits and . _ - / : @, starting with a"
            " letter or digit"
        )
    return name


def _keyed(items: Sequence[Any] | Mapping[str, Any]) -> list[tuple[str, Any]]:
    """(idempotency key, input) pairs: a mapping's keys, else each item's position."""
    pairs = (
        [(str(k), v) for k, v in items.items()]
        if isinstance(items, Mapping)
        else [(str(i), v) for i, v in enumerate(items)]
    )
    if not pairs:
        raise InputError("a job needs at least one item")
    for key, _ in pairs:
        if not key or len(key) > 500:
            raise InputError(f"item key {key[:40]!r} must be 1-500 characters")
    return pairs


class JobRunner:
    """Jobs in keel's store, run by DBOS workers.

    runner = JobRunner()
    runner.submit("ingest-2026-12", "rag.ingest", [{"path": p} for p in paths])
    runner.wait("ingest-2026-12")
    """

    def __init__(self, config: Config | None = None, *, store: Store | None = None) -> None:
        self.config = config or load_config()
        self._own_store = store is None
        self.store = store or open_store(self.config.store_url)
        ensure_tables(self.store)
        self.system_database_url = system_database_url(self.config)
        self._client: DBOSClient | None = None

    # --- the DBOS client -------------------------------------------------------

    def _dbos(self) -> DBOSClient:
        if self._client is None:
            url = self.system_database_url
            if url not in _migrated:
                DBOS.migrate(url)  # the client never creates DBOS's tables; a worker may not have run yet
                _migrated.add(url)
            self._client = DBOSClient(system_database_url=url, application_name=APP_NAME)
        return self._client

    def _queue(self, name: str, limits: JobQueueConfig, poll_s: float | None = None) -> None:
        """Create or update a DBOS queue with these limits (every worker polls every keel queue)."""
        self._dbos().register_queue(
            name, worker_concurrency=limits.worker_concurrency, global_concurrency=limits.concurrency,
            limiter={"limit": limits.rpm, "period": 60.0} if limits.rpm else None,
            polling_interval_sec=poll_s or self.config.jobs.poll_s, on_conflict="always_update",
        )  # fmt: skip

    def _enqueue(self, job: JobRow, items: Sequence[ItemRow], *, fresh: bool = True) -> None:
        """One workflow per item. `fresh` (ids never enqueued): 500 per transaction, not one commit each
        (on SQLite each commit is a sync to disk); otherwise one by one, each attaching to an existing id."""
        client = self._dbos()

        def options(item: ItemRow) -> EnqueueOptions:
            return {
                "workflow_name": ITEM_WORKFLOW, "queue_name": job.queue, "app_version": APP_VERSION,
                "workflow_id": workflow_id(job.name, item.key, item.run),
            }  # fmt: skip

        if not fresh:
            for item in items:
                client.enqueue(options(item), job.name, item.key, item.run)
            return
        for start in range(0, len(items), 500):
            # DBOSClient has no bulk enqueue; its engine is the system database's (private in DBOS 3.4)
            with client._sys_db.engine.begin() as conn:
                for item in items[start : start + 500]:
                    client.enqueue_in_transaction(conn, options(item), job.name, item.key, item.run)

    # --- jobs ------------------------------------------------------------------

    def submit(
        self,
        name: str,
        kind: str,
        items: Sequence[Any] | Mapping[str, Any],
        *,
        queue: str | None = None,
        concurrency: int | None = None,
        rpm: int | None = None,
        poll_s: float | None = None,
    ) -> JobRow:
        """Start job `name`: one item per element of `items` (a mapping's keys become the idempotency keys).

        The queue is `queue`, else the kind's, else `[jobs] default_queue`;
        `concurrency` or `rpm` give this job a queue of its own with those
        limits, which workers poll every `poll_s` seconds (default `[jobs]
        poll_s`). Submitting an existing name with the same inputs resumes it;
        with other inputs it is refused (JobConflict).

        A worker starts a queue's items only when it polls, so a queue of C
        items that each take L seconds runs at most C items per max(L, poll_s):
        short items (model calls) want a short poll. Call `settle` when the job
        is over to put its queue back on the default poll.
        """
        check_job_name(name)
        if poll_s is not None and not (0 < poll_s <= 60):
            raise InputError(f"poll_s must be in (0, 60] seconds, not {poll_s!r}")
        if poll_s is not None and concurrency is None and rpm is None:
            raise InputError("poll_s is for a job with a queue of its own: give concurrency or rpm too")
        handler = get_kind(kind)
        pairs = _keyed(items)
        queue_name = self._pick_queue(name, queue or handler.queue, concurrency, rpm, poll_s)
        if not records.create_job(self.store, name, kind, queue_name, pairs):
            return self._continue(name)
        job = records.get_job(self.store, name)
        self._enqueue(job, records.list_items(self.store, name))
        return job

    def _pick_queue(
        self, job: str, queue: str | None, concurrency: int | None, rpm: int | None, poll_s: float | None = None
    ) -> str:
        jobs = self.config.jobs
        if concurrency is not None or rpm is not None:
            own = f"job:{job}"
            self._queue(own, JobQueueConfig(concurrency=concurrency, rpm=rpm), poll_s)
            return own
        name = queue or jobs.default_queue
        limits = queue_limits(self.config, name)
        if limits is None and name != jobs.default_queue:
            known = ", ".join(sorted({*jobs.queues, *declared_queues()})) or "none"
            raise InputError(f"unknown job queue {name!r}; configured in [jobs.queues] or declared by a kind: {known}")
        self._queue(name, limits or JobQueueConfig())
        return name

    def _continue(self, name: str) -> JobRow:
        """A resubmitted job: resume it if cancelled, else make sure its unfinished items are enqueued."""
        job = records.get_job(self.store, name)
        if job.status == records.CANCELLED:
            return self.resume(name)
        if job.status == records.RUNNING:
            # the submitter may have died between writing the items and enqueuing them; existing ids are kept
            unfinished = records.list_items(self.store, name, status=[records.PENDING, records.ITEM_RUNNING])
            self._enqueue(job, unfinished, fresh=False)
        return job

    def settle(self, name: str) -> None:
        """Put a job's own queue back on `[jobs] poll_s` once the job is over (done, failed or cancelled).

        Every worker polls every queue for as long as it exists, so the short
        poll of a job that is over would cost each of them a query every few
        milliseconds for nothing. A job still running, or on a shared queue, is
        left alone.
        """
        job = records.get_job(self.store, name)
        if not job.queue.startswith("job:") or not (job.finished or job.status == records.CANCELLED):
            return
        found = self._dbos().retrieve_queue(job.queue)
        if found is not None and found.polling_interval_sec != self.config.jobs.poll_s:
            found.set_polling_interval_sec(self.config.jobs.poll_s)

    def get(self, name: str) -> JobRow:
        return records.get_job(self.store, name)

    def status(self, name: str, *, errors: int = 10) -> JobStatus:
        job = records.get_job(self.store, name)
        failed = records.list_items(self.store, name, status=records.ITEM_FAILED, limit=errors)
        return JobStatus(job, records.item_counts(self.store, name), failed)

    def jobs(self, *, status: str | None = None, kind: str | None = None, limit: int = 50) -> list[JobRow]:
        """The most recently active jobs, of one status and one kind if given."""
        return records.list_jobs(self.store, status=status, kind=kind, limit=limit)

    def kinds(self) -> list[str]:
        """The kinds of the jobs in the store (what `jobs(kind=...)` may filter on)."""
        return records.job_kinds(self.store)

    def items(self, name: str, *, status: str | None = None, limit: int | None = None) -> list[ItemRow]:
        records.get_job(self.store, name)  # UnknownJob rather than an empty list
        return records.list_items(self.store, name, status=status, limit=limit)

    def cancel(self, name: str) -> JobRow:
        """Stop starting items of a running job; items already running finish. `resume` continues it."""
        job = records.get_job(self.store, name)
        if not records.set_job_status(self.store, name, records.CANCELLED, only_from=[records.RUNNING]):
            raise JobConflict(f"job {name!r} is {job.status}: only a running job can be cancelled")
        unfinished = records.list_items(self.store, name, status=[records.PENDING, records.ITEM_RUNNING])
        ids = [workflow_id(name, item.key, item.run) for item in unfinished]
        for start in range(0, len(ids), 500):
            self._dbos().cancel_workflows(ids[start : start + 500])
        return records.get_job(self.store, name)

    def resume(self, name: str) -> JobRow:
        """Continue a cancelled job: its unfinished items run again (as a new run of each)."""
        job = records.get_job(self.store, name)
        if job.status == records.RUNNING:
            return self._continue(name)
        if not records.set_job_status(self.store, name, records.RUNNING, only_from=[records.CANCELLED]):
            raise JobConflict(
                f"job {name!r} is {job.status}: only a cancelled job can be resumed (failed items: retry)"
            )
        renewed = records.renew_items(self.store, name, [records.PENDING, records.ITEM_RUNNING])
        self._enqueue(records.get_job(self.store, name), renewed)
        return records.get_job(self.store, name)

    def retry_failed(self, name: str) -> int:
        """Run a job's failed items again; how many. A cancelled job stays cancelled until resumed."""
        job = records.get_job(self.store, name)
        if job.status == records.CANCELLED:
            raise JobConflict(f"job {name!r} is cancelled: resume it first")
        renewed = records.renew_items(self.store, name, [records.ITEM_FAILED])
        self._enqueue(job, renewed)
        return len(renewed)

    def wait(self, name: str, *, timeout: float | None = None, poll_s: float = 0.2) -> JobRow:
        """Block until the job is finished (done or failed) or cancelled; its row. TimeoutError after `timeout`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = records.get_job(self.store, name)
            if job.finished or job.status == records.CANCELLED:
                return job
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"job {name!r} still {job.status} after {timeout:g} s ({job.remaining} items left)")
            time.sleep(poll_s)

    def close(self) -> None:
        if self._client is not None:
            self._client.destroy()
            self._client = None
        if self._own_store:
            self.store.close()

    def __enter__(self) -> JobRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
