"""The SQL of alerting: what recent model calls measure, and the state of each alert rule.

Kept apart from `Store` because only the alert evaluator and `keel alerts` need
it; the queries still go through the store's transactions and placeholder
style, so they run unchanged on SQLite and PostgreSQL.

Every write of an alert row is a compare-and-set on its `revision`: when
several server replicas evaluate the same rules, exactly one of them wins each
transition (and logs it, and notifies), and one claims each webhook delivery.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from keel.store.base import MODEL as BY_MODEL
from keel.store.base import Store

__all__ = ["AlertRow", "CallStats", "CallWindow", "claim_delivery", "mark_notified", "measure", "read_alerts", "save"]

#: Spans that are model calls; spans around them (a RAG request, an agent step) are not counted.
MODEL_CALLS = "operation IN ('chat', 'embeddings')"
ALERT_COLUMNS = (
    "name", "state", "since", "value", "message", "condition", "last_evaluated", "notified", "delivery_attempts",
    "revision",
)  # fmt: skip


@dataclass(frozen=True)
class CallWindow:
    """Which model calls a rule looks at: started in [since, until), of one model and key if given."""

    since: float
    until: float
    model: str | None = None
    api_key: str | None = None
    percentile: float | None = None  # also measure this latency percentile (0.95 for p95)
    overrun: bool = False  # also sum `keel.budget.overrun_usd` (read from the attributes: only when asked)


@dataclass(frozen=True)
class CallStats:
    calls: int
    errors: int
    cost_usd: float  # calls without a known price add nothing
    latency_ms: float | None = None  # the window's percentile latency (nearest rank), when asked and any calls
    budget_overrun_usd: float = 0.0  # charged beyond keys' budgets, when asked

    @property
    def error_rate(self) -> float:
        return self.errors / self.calls if self.calls else 0.0


@dataclass(frozen=True)
class AlertRow:
    name: str
    state: str  # "ok" | "pending" | "firing"
    since: float  # when the rule entered this state (epoch seconds)
    value: float | None  # the measured value at the last evaluation (None: not enough calls to judge)
    message: str  # the last evaluation, in words
    condition: str  # the rule, in words, as the evaluating process had it
    last_evaluated: float
    notified: str  # the state the webhook last received (or keel gave up sending): "ok" | "firing"
    delivery_attempts: int  # failed deliveries of the current state
    revision: int = 0


def _window_where(store: Store, window: CallWindow) -> tuple[str, list[Any]]:
    clauses = [MODEL_CALLS, "start_time >= ?", "start_time < ?"]
    params: list[Any] = [window.since, window.until]
    for column, value in ((BY_MODEL, window.model), ("api_key", window.api_key)):
        if value is not None:
            clauses.append(f"{column} = ?")
            params.append(value)
    return " WHERE " + " AND ".join(clauses), params


def _overrun(store: Store) -> str:
    """The span's `keel.budget.overrun_usd` attribute as a number, in the store's SQL."""
    if store.dialect == "postgres":
        return "(attributes->>'keel.budget.overrun_usd')::double precision"
    return """json_extract(attributes, '$."keel.budget.overrun_usd"')"""


def measure(store: Store, window: CallWindow) -> CallStats:
    """Calls, errors, cost and (if asked) one latency percentile and the overruns of the model calls in a window."""
    where, params = _window_where(store, window)
    overrun = f"COALESCE(SUM({_overrun(store)}), 0)" if window.overrun else "0"
    totals = (
        "SELECT COUNT(*), COALESCE(SUM(CASE WHEN status = 'error' THEN 1 ELSE 0 END), 0),"
        f" COALESCE(SUM(cost_usd), 0), {overrun} FROM spans{where}"
    )
    with store.transaction() as cur:
        cur.execute(totals, params)
        calls, errors, cost, overran = cur.fetchone()
        latency = None
        if window.percentile is not None and calls:
            # Nearest rank, as `Store.stats` computes it: the smallest duration whose rank is at least p·n.
            rank = max(1, math.ceil(window.percentile * int(calls) - 1e-9))
            cur.execute(
                f"SELECT duration_ms FROM spans{where} ORDER BY duration_ms LIMIT 1 OFFSET ?",
                [*params, rank - 1],
            )
            latency = float(cur.fetchone()[0])
    return CallStats(int(calls), int(errors), float(cost), latency, float(overran))


def _row(values: Any) -> AlertRow:
    r = dict(zip(ALERT_COLUMNS, values, strict=True))
    value = None if r["value"] is None else float(r["value"])
    return AlertRow(
        r["name"], r["state"], float(r["since"]), value, r["message"], r["condition"], float(r["last_evaluated"]),
        r["notified"], int(r["delivery_attempts"]), int(r["revision"]),
    )  # fmt: skip


def read_alerts(store: Store) -> dict[str, AlertRow]:
    """The state of every rule ever evaluated in this store, by name."""
    with store.transaction() as cur:
        cur.execute(f"SELECT {', '.join(ALERT_COLUMNS)} FROM keel_alerts ORDER BY name")
        return {row.name: row for row in map(_row, cur.fetchall())}


def save(store: Store, row: AlertRow, previous: AlertRow | None) -> AlertRow | None:
    """Write `row` if the stored one is still `previous` (None: no row yet); the written row, or None if beaten."""
    new = replace(row, revision=0 if previous is None else previous.revision + 1)
    values = [getattr(new, c) for c in ALERT_COLUMNS]
    with store.transaction() as cur:
        if previous is None:
            marks = ", ".join("?" for _ in ALERT_COLUMNS)
            sql = f"INSERT INTO keel_alerts ({', '.join(ALERT_COLUMNS)}) VALUES ({marks}) ON CONFLICT (name) DO NOTHING"
            cur.execute(sql, values)
        else:
            assignments = ", ".join(f"{c} = ?" for c in ALERT_COLUMNS[1:])
            sql = f"UPDATE keel_alerts SET {assignments} WHERE name = ? AND revision = ?"
            cur.execute(sql, [*values[1:], new.name, previous.revision])
        return new if cur.rowcount == 1 else None


def claim_delivery(store: Store, row: AlertRow) -> bool:
    """Count one more delivery attempt of the row's state; True if this process got to make it.

    Like the delivery bookkeeping below, it moves the revision on, so an evaluation that read the
    row before cannot write back an older `notified` or attempt count.
    """
    sql = (
        "UPDATE keel_alerts SET delivery_attempts = delivery_attempts + 1, revision = revision + 1"
        " WHERE name = ? AND state = ? AND notified <> state AND delivery_attempts = ?"
    )
    with store.transaction() as cur:
        cur.execute(sql, [row.name, row.state, row.delivery_attempts])
        return bool(cur.rowcount == 1)


def mark_notified(store: Store, name: str, state: str) -> None:
    """The webhook received `state`, or keel gave up sending it (unless the rule has moved on since)."""
    sql = (
        "UPDATE keel_alerts SET notified = ?, delivery_attempts = 0, revision = revision + 1"
        " WHERE name = ? AND state = ?"
    )
    with store.transaction() as cur:
        cur.execute(sql, [state, name, state])
