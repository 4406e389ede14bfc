"""Named, append-only schema migrations, shared by both store backends.

Each migration is applied once and recorded in `keel_migrations`.
Spans are keyed by (trace_id, span_id): trace ids start with the time (see
`keel.trace.new_trace_id`), so inserts append at the right edge of the key
index instead of landing on a random page; that halves the cost of writing a
span on SQLite and keeps it flat as the table grows. Never edit
or reorder a migration that has shipped: append a new one. SQL is written
once with two placeholders that each backend fills in: `{json}` (TEXT on
SQLite, JSONB on PostgreSQL) and `{real}` (REAL / DOUBLE PRECISION).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["MIGRATIONS", "Migration"]


@dataclass(frozen=True)
class Migration:
    name: str
    statements: tuple[str, ...]


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
)
