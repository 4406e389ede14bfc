"""The jobs app's own tables, in keel's store: `keel_jobs`, `keel_job_items`, `keel_workers`.

They were core migration `0005_jobs` until the app owned them; `replaces`
keeps a store made then from running it again (see keel.store.migrations).
`ensure_tables` is called by everything that opens the jobs of a store
(`JobRunner`, `Worker`, a worker's registration); after the first call on a
store object it costs nothing.
"""

from __future__ import annotations

from keel.store import Migration, Store

__all__ = ["JOBS_MIGRATIONS", "NAMESPACE", "ensure_tables"]

NAMESPACE = "jobs"

JOBS_MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        "0001_jobs",
        (
            # A job is a named set of items of one kind; `inputs_hash` lets a resubmission under the same
            # name be told apart from a resume. The counts and cost are kept on the row, moved in the same
            # transaction as each item's outcome, so `keel jobs list` reads one row per job.
            """
            CREATE TABLE keel_jobs (
                name TEXT PRIMARY KEY,
                kind TEXT NOT NULL,
                queue TEXT NOT NULL,
                inputs_hash TEXT NOT NULL,
                status TEXT NOT NULL,
                total INTEGER NOT NULL,
                done INTEGER NOT NULL,
                failed INTEGER NOT NULL,
                cost_usd {real} NOT NULL,
                created_at {real} NOT NULL,
                updated_at {real} NOT NULL
            )
            """,
            # One row per item. `run` is the generation of the durable workflow that owns the item
            # (retry and resume start a new one); an item's result and its `done` mark are written in
            # one transaction, conditional on it not being done yet, so a re-run item changes nothing.
            """
            CREATE TABLE keel_job_items (
                job TEXT NOT NULL,
                idempotency_key TEXT NOT NULL,
                position INTEGER NOT NULL,
                input {json},
                status TEXT NOT NULL,
                run INTEGER NOT NULL,
                attempts INTEGER NOT NULL,
                result {json},
                error TEXT,
                cost_usd {real},
                trace_id TEXT,
                updated_at {real} NOT NULL,
                PRIMARY KEY (job, idempotency_key)
            )
            """,
            "CREATE INDEX keel_job_items_status ON keel_job_items (job, status)",
            # One row per `keel worker`: its id is its DBOS executor id; a heartbeat older than the
            # configured timeout marks it dead, and one live worker claims its recovery.
            """
            CREATE TABLE keel_workers (
                worker_id TEXT PRIMARY KEY,
                host TEXT NOT NULL,
                pid INTEGER NOT NULL,
                incarnation TEXT NOT NULL,
                state TEXT NOT NULL,
                started_at {real} NOT NULL,
                heartbeat_at {real} NOT NULL,
                recovered_by TEXT
            )
            """,
        ),
        replaces="0005_jobs",  # a core migration until the jobs app owned its tables
    ),
    # A kind that submits a job per interval (online quality: up to 288 a day) is listed by kind, latest first,
    # and its kinds are listed for the filter: both read this index rather than every job.
    Migration("0002_jobs_by_kind", ("CREATE INDEX keel_jobs_kind ON keel_jobs (kind, updated_at)",)),
)


def ensure_tables(store: Store) -> None:
    """Create the jobs tables of `store` if they are not there yet."""
    store.migrate(JOBS_MIGRATIONS, namespace=NAMESPACE)
