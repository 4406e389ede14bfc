"""The store interface, and the SQL both backends share.

A backend supplies connections and its dialect (placeholder style, column
types); queries are written once here. Writes happen in one transaction per
batch, so a crash leaves either the whole span or nothing.

Apps (RAG, jobs, evals...) keep their own tables in the same store through the
public part of this interface, never through its private helpers: namespaced
migrations (`migrate(namespace=..., migrations=...)`), `transaction()` (a
cursor that takes `?` placeholders on both backends), `query()` and `execute()`,
`json_param()` for JSON columns, `dialect` and `integrity_errors`. See
docs/architecture.md, "Apps' own tables".
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

from keel.errors import InputError
from keel.store.migrations import MIGRATIONS, Migration
from keel.trace import Span, dumps

__all__ = ["UNKNOWN_MODEL", "Cursor", "SpanFilter", "StatsRow", "Store", "model_expr"]

#: An app's migration namespace: a short lower-case name ("rag", "jobs", "evals").
_NAMESPACE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")

SPAN_COLUMNS = (
    "span_id", "trace_id", "parent_id", "name", "operation", "start_time", "end_time", "duration_ms", "day",
    "status", "error_type", "error_message", "provider", "model", "request_model", "response_model",
    "input_tokens", "output_tokens", "cached_input_tokens", "reasoning_tokens", "cost_usd", "attempts",
    "api_key", "attributes", "input", "output",
)  # fmt: skip


@dataclass(frozen=True)
class SpanFilter:
    trace_id: str | None = None
    model: str | None = None
    status: str | None = None  # "ok" | "error"
    api_key: str | None = None
    operation: str | None = None
    since: float | None = None  # epoch seconds
    until: float | None = None
    text: str | None = None  # substring of input, output, error, the call's context or a `keel.metadata.*` value
    session: str | None = None  # `keel.session`, exactly
    user: str | None = None  # `keel.user`, exactly
    tag: str | None = None  # one of `keel.tags`
    #: The configured model names: any other (a name a client made up) counts as UNKNOWN_MODEL, so
    #: `model="unknown"` matches them all and breakdowns group them in one row. None: names as stored.
    known_models: frozenset[str] | None = None
    roots_only: bool = False
    limit: int = 50


@dataclass(frozen=True)
class StatsRow:
    model: str
    day: str
    calls: int
    errors: int
    p50_ms: float | None
    p95_ms: float | None
    input_tokens: int
    output_tokens: int
    cost_usd: float | None  # None when no call of the group had a known price

    @property
    def error_rate(self) -> float:
        return self.errors / self.calls if self.calls else 0.0


#: The model a span is counted under: the configured model that answered, else the one asked for
#: (a call refused before routing has only that). Filters and group-bys use the same expression.
MODEL = "COALESCE(model, request_model)"
#: What a model outside `SpanFilter.known_models` (or no model at all) is counted as.
UNKNOWN_MODEL = "unknown"
#: Where the server puts a call's attribution (docs/server.md, Attribution).
SESSION_ATTRIBUTE = "keel.session"
USER_ATTRIBUTE = "keel.user"
TAGS_ATTRIBUTE = "keel.tags"
METADATA_PREFIX = "keel.metadata."
#: The call context's attributes (see keel.CallContext) that free-text search also looks in.
CONTEXT_KEYS = "('keel.tenant', 'keel.user', 'keel.session', 'keel.tags')"


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def model_expr(known: frozenset[str] | None) -> str:
    """The model a span is grouped under: MODEL, or with `known` set, UNKNOWN_MODEL for any other name.

    The names go into the SQL as literals (they come from the configuration, not from a caller), so the
    expression can appear in SELECT and GROUP BY alike without placeholders to keep in order.
    """
    if known is None:
        return f"COALESCE({MODEL}, '{UNKNOWN_MODEL}')"
    names = sorted(n for n in known if "\x00" not in n)  # PostgreSQL refuses NUL in text
    if not names:  # an expression, not a bare literal: PostgreSQL refuses GROUP BY 'constant'
        return f"COALESCE(NULL, '{UNKNOWN_MODEL}')"
    return f"CASE WHEN {MODEL} IN ({', '.join(map(_literal, names))}) THEN {MODEL} ELSE '{UNKNOWN_MODEL}' END"


def like_escape(text: str) -> str:
    """Text for LIKE ... ESCAPE '\\': its own %, _ and \\ match themselves."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def span_row(span: Span) -> tuple[Any, ...]:
    a = span.attributes
    return (
        span.span_id, span.trace_id, span.parent_id, span.name, a.get("gen_ai.operation.name"),
        span.start_time, span.end_time, span.duration_ms, span.day, span.status, span.error_type,
        span.error_message, a.get("gen_ai.provider.name"), a.get("keel.model"), a.get("gen_ai.request.model"),
        a.get("gen_ai.response.model"), a.get("gen_ai.usage.input_tokens"), a.get("gen_ai.usage.output_tokens"),
        a.get("keel.usage.cached_input_tokens"), a.get("keel.usage.reasoning_tokens"), a.get("keel.cost_usd"),
        a.get("keel.attempts"), a.get("keel.api_key"), dumps(span.attributes), dumps(span.input), dumps(span.output),
    )  # fmt: skip


def _json(value: Any) -> Any:
    if value is None or not isinstance(value, str):
        return value  # PostgreSQL JSONB arrives decoded
    return json.loads(value)


def span_from_row(row: Sequence[Any]) -> Span:
    r = dict(zip(SPAN_COLUMNS, row, strict=True))
    return Span(
        trace_id=r["trace_id"], span_id=r["span_id"], parent_id=r["parent_id"], name=r["name"],
        start_time=r["start_time"], end_time=r["end_time"], status=r["status"], error_type=r["error_type"],
        error_message=r["error_message"], attributes=_json(r["attributes"]) or {},
        input=_json(r["input"]), output=_json(r["output"]),
    )  # fmt: skip


class Cursor:
    """The cursor `Store.transaction()` yields: `?` placeholders on every backend.

    SQL with parameters has its `?` turned into the backend's placeholder (outside
    quoted literals); SQL without parameters goes to the driver as written. `raw`
    is the driver's own cursor (sqlite3 or psycopg, with its own placeholders), for
    what only one backend has.
    """

    __slots__ = ("_translate", "raw")

    def __init__(self, raw: Any, translate: Callable[[str], str]) -> None:
        self.raw = raw
        self._translate = translate

    def execute(self, sql: str, params: Sequence[Any] | None = None) -> Cursor:
        if params is None:
            self.raw.execute(sql)
        else:
            self.raw.execute(self._translate(sql), params)
        return self

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        self.raw.executemany(self._translate(sql), rows)

    def fetchone(self) -> Any:
        return self.raw.fetchone()

    def fetchall(self) -> list[Any]:
        return list(self.raw.fetchall())

    @property
    def rowcount(self) -> int:
        """Rows the last statement changed (or -1 when the driver cannot tell)."""
        return int(self.raw.rowcount)


class Store(ABC):
    """Where spans (and later: keys, jobs, collections) live."""

    #: "sqlite" or "postgres": which dialect-only migration statements apply.
    dialect: ClassVar[str] = "sqlite"
    #: DB-API placeholder of the backend: "?" or "%s".
    placeholder: ClassVar[str] = "?"
    #: Column types substituted into migrations.
    types: ClassVar[dict[str, str]] = {
        "json": "TEXT", "real": "REAL", "serial": "INTEGER PRIMARY KEY AUTOINCREMENT", "blob": "BLOB",
    }  # fmt: skip
    #: What the driver raises when a unique index refuses a row.
    integrity_errors: ClassVar[tuple[type[Exception], ...]] = ()

    def __init__(self, url: str) -> None:
        self.url = url
        self._migrated: set[tuple[str, tuple[str, ...]]] = set()  # migration lists applied through this object

    # --- what a backend provides --------------------------------------------

    @abstractmethod
    def _transaction(self, *, immediate: bool = False) -> AbstractContextManager[Any]:
        """The driver's cursor inside one transaction: committed on success, rolled back on error.

        `immediate`: take the write lock at BEGIN (SQLite, under its busy timeout);
        PostgreSQL locks rows as it writes and ignores it.
        """

    def close(self) -> None:  # noqa: B027 - optional
        """Release connections."""

    def json_param(self, value: str | None) -> Any:
        """How a JSON text is passed as a parameter (PostgreSQL wraps it)."""
        return value

    # --- the public query API (apps' own tables) --------------------------------

    @contextmanager
    def transaction(self, *, immediate: bool = False) -> Iterator[Cursor]:
        """A `Cursor` (`?` placeholders) inside one transaction: committed on success, rolled back on error.

        `immediate`: this transaction will write; take the write lock now, waiting
        for it under the busy timeout, rather than fail when a read turns into a
        write (SQLite; PostgreSQL locks rows as it writes and ignores it).
        """
        with self._transaction(immediate=immediate) as raw:
            yield Cursor(raw, self._sql)

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """The rows of one SELECT (`?` placeholders), in a transaction of its own."""
        with self.transaction() as cur:
            return cur.execute(sql, params).fetchall()

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run one statement (`?` placeholders) in a transaction of its own; the rows it changed."""
        with self.transaction() as cur:
            return cur.execute(sql, params).rowcount

    # --- migrations -----------------------------------------------------------

    def migrate(self, migrations: Sequence[Migration] = MIGRATIONS, *, namespace: str = "") -> list[str]:
        """Apply pending migrations; returns the names recorded now.

        Without a namespace: keel's core schema. An app passes its own `namespace`
        and list: each migration is recorded as `namespace/name`, once, so an app's
        list grows by appending, like the core one. A migration that moved out of the
        core list says so with `replaces`: a store that has the old name counts it
        as applied (and records the new name), so an old database is never migrated twice.

        Safe when several processes start at once: each step holds the backend's
        migration lock and re-reads what is applied under it. Repeated calls with
        the same list on the same store object cost nothing after the first.
        """
        names = _recorded_names(migrations, namespace)
        memo = (namespace, tuple(names))
        if memo in self._migrated:
            return []
        with self._transaction() as cur:
            self._lock_migrations(cur)
            cur.execute("CREATE TABLE IF NOT EXISTS keel_migrations (name TEXT PRIMARY KEY, applied_at TEXT NOT NULL)")
        done = set(self.applied_migrations())
        applied_now: list[str] = []
        for name, migration in zip(names, migrations, strict=True):
            if name not in done and self._apply_migration(name, migration):
                applied_now.append(name)
        self._migrated.add(memo)
        return applied_now

    def _apply_migration(self, name: str, migration: Migration) -> bool:
        """Apply one migration unless another process just did (or it was applied under its old name)."""
        with self._transaction() as raw:
            self._lock_migrations(raw)
            cur = Cursor(raw, self._sql)
            cur.execute(
                "SELECT name FROM keel_migrations WHERE name = ? OR name = ?", [name, migration.replaces or name]
            )
            found = {row[0] for row in cur.fetchall()}
            if name in found:
                return False
            if not found:  # neither name: the tables are not there yet
                for statement in migration.for_dialect(self.dialect):
                    raw.execute(statement.format(**self.types))
            cur.execute("INSERT INTO keel_migrations (name, applied_at) VALUES (?, CURRENT_TIMESTAMP)", [name])
        return not found

    def _lock_migrations(self, cur: Any) -> None:  # noqa: B027 - optional
        """Hold a lock that serialises migrate() across processes until the transaction ends.

        PostgreSQL takes an advisory lock; the default (SQLite) takes none.
        """

    def ping(self) -> None:
        """Raise if the store cannot be reached."""
        with self.transaction() as cur:
            cur.execute("SELECT 1")
            cur.fetchone()

    def applied_migrations(self) -> list[str]:
        """The names recorded in `keel_migrations` (an app's as `namespace/name`), sorted."""
        with self.transaction() as cur:
            cur.execute("SELECT name FROM keel_migrations ORDER BY name")
            return [row[0] for row in cur.fetchall()]

    # --- spans ----------------------------------------------------------------

    def _sql(self, sql: str) -> str:
        return sql if self.placeholder == "?" else sql.replace("?", self.placeholder)

    def write_spans(self, spans: Sequence[Span]) -> None:
        if not spans:
            return
        marks = ", ".join("?" for _ in SPAN_COLUMNS)
        sql = f"INSERT INTO spans ({', '.join(SPAN_COLUMNS)}) VALUES ({marks})"
        with self.transaction() as cur:
            # A generator, not a list: the driver releases the GIL for every row it inserts, so the
            # JSON encoding of a large batch never holds the request path's event loop for long.
            cur.executemany(sql, (self._row(span) for span in spans))

    def _row(self, span: Span) -> tuple[Any, ...]:
        row = list(span_row(span))
        for i in (-3, -2, -1):
            row[i] = self.json_param(row[i])
        return tuple(row)

    def _where(self, f: SpanFilter) -> tuple[str, list[Any]]:
        clauses: list[str] = []
        params: list[Any] = []
        for column, value in (
            ("trace_id", f.trace_id), (self._model_column(f), f.model), ("status", f.status),
            ("api_key", f.api_key), ("operation", f.operation),
            (self._attribute(SESSION_ATTRIBUTE), f.session), (self._attribute(USER_ATTRIBUTE), f.user),
        ):  # fmt: skip
            if value is not None:
                clauses.append(f"{column} = ?")
                params.append(value)
        if f.since is not None:
            clauses.append("start_time >= ?")
            params.append(f.since)
        if f.until is not None:
            clauses.append("start_time < ?")
            params.append(f.until)
        if f.tag is not None:
            clauses.append(self._has_tag())
            params.append(f.tag)
        if f.roots_only:
            clauses.append("parent_id IS NULL")
        if f.text:
            texts = (self._text("input"), self._text("output"), "COALESCE(error_message, '')")
            likes = [f"LOWER({t}) LIKE ? ESCAPE '\\'" for t in texts] + [self._metadata_like()]
            clauses.append("(" + " OR ".join(likes) + ")")
            params += [f"%{like_escape(f.text.lower())}%"] * len(likes)
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", params

    def _model_column(self, f: SpanFilter) -> str:
        known = f.known_models
        if known is None or (f.model is not None and f.model in known):
            return MODEL  # a configured name stands for itself: the plain column keeps the comparison simple
        # a span with no model at all (an agent's root, a tool call) is not a call to an unknown model
        return f"CASE WHEN {MODEL} IS NULL THEN NULL ELSE {model_expr(known)} END"

    # --- dialect: JSON attributes (SQLite's JSON1 here; PostgreSQL overrides) ---------

    def _text(self, column: str) -> str:
        """A JSON column as text, for LIKE."""
        return f"COALESCE({column}, '')"

    def _attribute(self, name: str) -> str:
        """One span attribute as text (NULL when absent). `name` is a constant, never a caller's text."""
        return f"CAST(json_extract(attributes, '$.\"{name}\"') AS TEXT)"

    def _has_tag(self) -> str:
        """True when one `keel.tags` value (a list, or a single string) equals the parameter."""
        return f"EXISTS (SELECT 1 FROM json_each(attributes, '$.\"{TAGS_ATTRIBUTE}\"') AS t WHERE t.value = ?)"

    def _metadata_like(self) -> str:
        """True when a context or `keel.metadata.*` value (lists as their JSON text), lower-cased, is LIKE
        the parameter."""
        return (
            "EXISTS (SELECT 1 FROM json_each(attributes) AS m"
            f" WHERE (m.key IN {CONTEXT_KEYS} OR m.key LIKE '{METADATA_PREFIX}%')"
            " AND LOWER(m.value) LIKE ? ESCAPE '\\')"
        )

    def list_spans(self, f: SpanFilter = SpanFilter()) -> list[Span]:
        where, params = self._where(f)
        sql = f"SELECT {', '.join(SPAN_COLUMNS)} FROM spans{where} ORDER BY start_time DESC LIMIT ?"
        with self.transaction() as cur:
            cur.execute(sql, [*params, f.limit])
            return [span_from_row(r) for r in cur.fetchall()]

    def get_trace(self, trace_id: str) -> list[Span]:
        """All spans of a trace, oldest first."""
        sql = f"SELECT {', '.join(SPAN_COLUMNS)} FROM spans WHERE trace_id = ? ORDER BY start_time"
        with self.transaction() as cur:
            cur.execute(sql, [trace_id])
            return [span_from_row(r) for r in cur.fetchall()]

    def find_trace_ids(self, fragment: str, limit: int = 5) -> list[str]:
        """Trace ids that start or end with `fragment` (or whose span id starts with it).

        The CLI shows a trace id's last characters: its first ones are a timestamp,
        shared by every trace of the same moment.
        """
        sql = "SELECT DISTINCT trace_id FROM spans WHERE trace_id LIKE ? OR trace_id LIKE ? OR span_id LIKE ? LIMIT ?"
        with self.transaction() as cur:
            cur.execute(sql, [f"{fragment}%", f"%{fragment}", f"{fragment}%", limit])
            return [r[0] for r in cur.fetchall()]

    def stats(
        self, *, since: float | None = None, operation: str | None = "chat", known_models: frozenset[str] | None = None
    ) -> list[StatsRow]:
        """Calls, error rate, nearest-rank p50/p95 latency, tokens and cost by model and day. With
        `known_models`, every other name (one a client made up) is the one row "unknown"."""
        where, params = self._where(SpanFilter(since=since, operation=operation))
        m = "COALESCE(model, request_model, '?')" if known_models is None else model_expr(known_models)
        sql = f"""
            WITH r AS (
                SELECT {m} AS m, day, status, duration_ms, input_tokens,
                       output_tokens, cost_usd,
                       ROW_NUMBER() OVER (
                           PARTITION BY {m}, day ORDER BY duration_ms
                       ) AS rn,
                       COUNT(*) OVER (PARTITION BY {m}, day) AS n
                FROM spans{where}
            )
            SELECT m, day, COUNT(*), SUM(CASE WHEN status = 'error' THEN 1 ELSE 0 END),
                   MIN(CASE WHEN rn >= 0.50 * n THEN duration_ms END),
                   MIN(CASE WHEN rn >= 0.95 * n THEN duration_ms END),
                   COALESCE(SUM(input_tokens), 0), COALESCE(SUM(output_tokens), 0), SUM(cost_usd)
            FROM r GROUP BY m, day ORDER BY day DESC, m
        """
        with self.transaction() as cur:
            cur.execute(sql, params)
            return [
                StatsRow(
                    r[0], r[1], int(r[2]), int(r[3]), _float(r[4]), _float(r[5]), int(r[6]), int(r[7]), _float(r[8])
                )
                for r in cur.fetchall()
            ]

    def spend(self, api_key: str, since: float) -> float:
        """USD spent by a key since a time (budgets read this at start-up).

        Model calls (chat and embeddings spans) carry the cost, wherever they sit in
        a trace; spans around them (a RAG request, an agent step) do not add to it.
        """
        sql = (
            "SELECT COALESCE(SUM(cost_usd), 0) FROM spans WHERE api_key = ? AND start_time >= ?"
            " AND operation IN ('chat', 'embeddings')"
        )
        with self.transaction() as cur:
            cur.execute(sql, [api_key, since])
            return float(cur.fetchone()[0])


def _recorded_names(migrations: Sequence[Migration], namespace: str) -> list[str]:
    """The names `migrations` are recorded under; an app's list without a namespace, or names twice, are refused."""
    if namespace and not _NAMESPACE.match(namespace):
        raise InputError(f"migration namespace {namespace!r} must be 1 to 32 lower-case letters, digits or '_'")
    if not namespace and migrations is not MIGRATIONS:
        raise InputError("an app's migrations need a namespace: store.migrate(migrations, namespace='myapp')")
    names = [f"{namespace}/{m.name}" if namespace else m.name for m in migrations]
    if any(not m.name or "/" in m.name for m in migrations):
        raise InputError("a migration needs a name without '/'")
    if len(set(names)) != len(names):
        raise InputError(f"migration names repeat in namespace {namespace!r}")
    return names


def _float(value: Any) -> float | None:
    return None if value is None else float(value)
