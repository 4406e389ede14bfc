"""Named, append-only schema migrations, shared by both store backends.

Each migration is applied once and recorded in `keel_migrations`.
Spans are keyed by (trace_id, span_id): trace ids start with the time (see
`keel.trace.new_trace_id`), so inserts append at the right edge of the key
index instead of landing on a random page; that halves the cost of writing a
span on SQLite and keeps it flat as the table grows. Never edit
or reorder a migration that has shipped: append a new one. SQL is written
once with placeholders that each backend fills in: `{json}` (TEXT on
SQLite, JSONB on PostgreSQL), `{real}` (REAL / DOUBLE PRECISION), `{serial}`
(an auto-numbered integer primary key) and `{blob}` (BLOB / BYTEA); what only
one dialect has (PostgreSQL's full-text search and pgvector, say) goes in
`sqlite` or `postgres`, applied after the shared statements.

An app that owns tables (RAG, jobs) keeps its own list and applies it with
`store.migrate(ITS_MIGRATIONS, namespace="app")` when it is first used, so a
gateway-only deployment never needs, say, the pgvector extension. Its
migrations are recorded as `app/name`. One that used to live here names its
old record in `replaces` (`0005_jobs` is now `jobs/0001_jobs`): a store that
has the old name is not migrated again. Core names stay unique for ever: the
next core migration is `0006_...`, never a reused `0005`.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["MIGRATIONS", "Migration"]


@dataclass(frozen=True)
class Migration:
    name: str
    statements: tuple[str, ...]
    sqlite: tuple[str, ...] = ()  # only on SQLite, after `statements`
    postgres: tuple[str, ...] = ()  # only on PostgreSQL, after `statements`
    #: The name it was recorded under before it moved to an app's namespace: a store that has it
    #: counts this migration as applied (and records the new name) instead of running it again.
    replaces: str | None = None

    def for_dialect(self, dialect: str) -> tuple[str, ...]:
        return self.statements + (self.sqlite if dialect == "sqlite" else self.postgres)


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        "0001_spans",
        (
            """
            CREATE TABLE spans (
                span_id TEXT NOT NULL,
                trace_id TEXT NOT NULL,
                parent_id TEXT,
                name TEXT NOT NULL,
                operation TEXT,
                start_time {real} NOT NULL,
                end_time {real} NOT NULL,
                duration_ms {real} NOT NULL,
                day TEXT NOT NULL,
                status TEXT NOT NULL,
                error_type TEXT,
                error_message TEXT,
                provider TEXT,
                model TEXT,
                request_model TEXT,
                response_model TEXT,
                input_tokens INTEGER,
                output_tokens INTEGER,
                cached_input_tokens INTEGER,
                reasoning_tokens INTEGER,
                cost_usd {real},
                attempts INTEGER,
                api_key TEXT,
                attributes {json} NOT NULL,
                input {json},
                output {json},
                PRIMARY KEY (trace_id, span_id)
            )
            """,
            "CREATE INDEX spans_start ON spans (start_time)",
            "CREATE INDEX spans_model_day ON spans (model, day)",
            "CREATE INDEX spans_key_day ON spans (api_key, day)",
        ),
    ),
    Migration(
        "0002_keys",
        (
            """
            CREATE TABLE keel_keys (
                key_id TEXT PRIMARY KEY,
                name TEXT NOT NULL,
                key_hash TEXT NOT NULL UNIQUE,
                key_prefix TEXT NOT NULL,
                created_at {real} NOT NULL,
                revoked_at {real},
                rpm INTEGER,
                tpm INTEGER,
                daily_budget_usd {real},
                monthly_budget_usd {real},
                models {json},
                metadata {json}
            )
            """,
            # one active key per name: a name is what traces, limits and budgets are attributed to
            "CREATE UNIQUE INDEX keel_keys_active_name ON keel_keys (name) WHERE revoked_at IS NULL",
        ),
    ),
    Migration(
        "0003_alerts",
        (
            # One row per alert rule, so `keel alerts list` in any process sees what the server sees.
            # `revision` makes every write a compare-and-set: of several replicas evaluating the same
            # rule, one wins each transition (and logs it); `notified` is the state the webhook last
            # received, so a failed delivery is retried on the next evaluation.
            """
            CREATE TABLE keel_alerts (
                name TEXT PRIMARY KEY,
                state TEXT NOT NULL,
                since {real} NOT NULL,
                value {real},
                message TEXT NOT NULL,
                condition TEXT NOT NULL,
                last_evaluated {real} NOT NULL,
                notified TEXT NOT NULL,
                delivery_attempts INTEGER NOT NULL,
                revision INTEGER NOT NULL
            )
            """,
        ),
    ),
    Migration(
        "0004_key_collections",
        (
            # Which RAG collections a key may read and write (JSON lists; NULL: read all, write none).
            "ALTER TABLE keel_keys ADD COLUMN collections {json}",
            "ALTER TABLE keel_keys ADD COLUMN collections_write {json}",
        ),
    ),
    Migration(
        "0006_shared_limits",
        (
            # Budgets shared by every process on one store (used on PostgreSQL; see
            # keel.gateway.shared_limits). One ledger row per key, period and period start; a
            # reservation is admitted by one conditional UPDATE of `reserved`, so concurrent replicas
            # cannot both take the last dollars, and settled by one statement that moves it to `spent`.
            """
            CREATE TABLE keel_budget_ledgers (
                key TEXT NOT NULL,
                period TEXT NOT NULL,
                start {real} NOT NULL,
                spent {real} NOT NULL,
                reserved {real} NOT NULL,
                PRIMARY KEY (key, period, start)
            )
            """,
            # The reservations in flight, one row per ledger they hold. A live process renews
            # `expires_at` (store clock, epoch seconds); one killed with reservations in flight stops
            # renewing, and any process gives them back to the ledger once they expire.
            """
            CREATE TABLE keel_budget_reservations (
                reservation_id TEXT NOT NULL,
                period TEXT NOT NULL,
                key TEXT NOT NULL,
                start {real} NOT NULL,
                amount {real} NOT NULL,
                holder TEXT NOT NULL,
                expires_at {real} NOT NULL,
                PRIMARY KEY (reservation_id, period)
            )
            """,
            "CREATE INDEX keel_budget_reservations_key ON keel_budget_reservations (key, expires_at)",
            # Requests and tokens per key and time bucket (1/60 of the window): the shared moving window.
            """
            CREATE TABLE keel_rate_buckets (
                subject TEXT NOT NULL,
                bucket BIGINT NOT NULL,
                requests BIGINT NOT NULL,
                tokens BIGINT NOT NULL,
                PRIMARY KEY (subject, bucket)
            )
            """,
            # A counter per kind of shared setting ("keys"), bumped in the transaction of every change:
            # replicas poll it (one indexed row) and reload only when it moved.
            "CREATE TABLE keel_revisions (name TEXT PRIMARY KEY, revision BIGINT NOT NULL)",
        ),
    ),
)
