"""Alert rules: conditions on recent model calls, evaluated continuously.

Each `[alerts.NAME]` rule of keel.toml is measured over the model calls in the
store every `[alerting].interval_s` seconds (by `keel serve`, or once by
`keel alerts check`). A rule moves through

    ok ──condition holds──▶ pending ──held for `for_s`──▶ firing ──condition clears──▶ ok

(with `for_s = 0`, the default, it fires at once). Firing and resolving are
logged as one line on the `keel.alerts` logger, such as

    alert high-errors FIRING: error rate of gpt-4o-mini 12.5% > 5% over 10m (8 of 64 calls)

and POSTed as JSON to the rule's webhook. The state lives in the store, so
`keel alerts list` in another process shows what the server sees, a restart
does not fire an alert twice, and a webhook that was down receives the
notification at a later evaluation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import operator
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import httpx

from keel.config import AlertRule, Config
from keel.store.alerts import AlertRow, CallStats, CallWindow, claim_delivery, mark_notified, measure, read_alerts, save
from keel.store.base import Store

__all__ = [
    "AlertEvaluator",
    "Evaluation",
    "describe",
    "evaluate",
    "format_value",
    "measure_rule",
    "payload",
    "start_alerts",
]

log = logging.getLogger("keel.alerts")

#: A state the webhook has not received is sent again at each evaluation, this many times at most.
MAX_DELIVERY_ATTEMPTS = 5

_METRIC_NAMES = {
    "error_rate": "error rate",
    "p95_latency_ms": "p95 latency",
    "p99_latency_ms": "p99 latency",
    "cost_usd": "cost",
    "budget_overrun_usd": "budget overrun",  # USD charged past keys' budgets (see keel.gateway.budget)
    "requests": "requests",
    "errors": "errors",
    "quality_drop": "drop of",  # an [evals.online] scorer's mean after a model or prompt change (keel.evals.online)
}
_PERCENTILES = {"p95_latency_ms": 0.95, "p99_latency_ms": 0.99}
#: Error rates and latencies of a handful of calls are noise; counts and cost are not.
_NEEDS_MIN_REQUESTS = ("error_rate", "p95_latency_ms", "p99_latency_ms")
_OPS: dict[str, Callable[[float, float], bool]] = {
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
}
_NEGATED = {">": "<=", ">=": "<", "<": ">=", "<=": ">"}


@dataclass(frozen=True)
class Evaluation:
    """One rule measured at one moment."""

    value: float | None  # None: too few calls to judge
    holds: bool
    message: str


# --- rules in words ----------------------------------------------------------------


def format_value(metric: str, value: float) -> str:
    if metric == "error_rate":
        return f"{value * 100:.3g}%"
    if metric in _PERCENTILES:
        return f"{value:,.0f} ms"
    if metric == "quality_drop":
        return f"{value:.3g}"
    if metric in ("cost_usd", "budget_overrun_usd"):
        return f"${value:,.2f}" if value >= 1 else f"${value:.4g}"
    return f"{value:,.0f}"


def _subject(rule: AlertRule) -> str:
    if rule.metric == "quality_drop":
        whose = f" of {rule.model}" if rule.model else ""
        return f"drop of {rule.scorer}{whose} after the latest model or prompt change"
    whose = f"of {rule.model}" if rule.model else "of all models"
    return f"{_METRIC_NAMES[rule.metric]} {whose}" + (f" for key {rule.key}" if rule.key else "")


def _window_text(rule: AlertRule) -> str:
    return "today (UTC)" if rule.window == "today" else f"over {rule.window}"


def describe(rule: AlertRule) -> str:
    """The condition in words: `error rate of gpt-4o-mini > 5% over 10m`."""
    text = f"{_subject(rule)} {rule.op} {format_value(rule.metric, rule.threshold)} {_window_text(rule)}"
    if rule.metric == "quality_drop":
        text += f" (one-sided Welch t-test, p < {rule.alpha:g}, at least {rule.min_n} scores on each side)"
    return text


def _counts(rule: AlertRule, stats: CallStats) -> str:
    if rule.metric == "error_rate":
        return f" ({stats.errors} of {stats.calls} calls)"
    if rule.metric == "errors":
        return f" (of {stats.calls} calls)"
    return "" if rule.metric == "requests" else f" ({stats.calls} calls)"


# --- measuring ---------------------------------------------------------------------


def window_start(rule: AlertRule, now: float) -> float:
    seconds = rule.window_s
    if seconds is not None:
        return now - seconds
    return datetime.fromtimestamp(now, UTC).replace(hour=0, minute=0, second=0, microsecond=0).timestamp()


def _value(rule: AlertRule, stats: CallStats) -> float | None:
    if rule.metric in _NEEDS_MIN_REQUESTS and stats.calls < max(rule.min_requests, 1):
        return None
    if rule.metric == "error_rate":
        return stats.error_rate
    if rule.metric in _PERCENTILES:
        return stats.latency_ms
    if rule.metric == "cost_usd":
        return stats.cost_usd
    if rule.metric == "budget_overrun_usd":
        return stats.budget_overrun_usd
    return float(stats.errors if rule.metric == "errors" else stats.calls)


def evaluate(rule: AlertRule, stats: CallStats) -> Evaluation:
    """Whether the rule's condition holds for these calls, and a sentence saying why."""
    value = _value(rule, stats)
    if value is None:
        reason = f"{stats.calls} calls (min_requests = {rule.min_requests})"
        return Evaluation(None, False, f"{_subject(rule)} not judged {_window_text(rule)}: {reason}")
    holds = _OPS[rule.op](value, rule.threshold)
    shown_op = rule.op if holds else _NEGATED[rule.op]
    measured = f"{format_value(rule.metric, value)} {shown_op} {format_value(rule.metric, rule.threshold)}"
    return Evaluation(value, holds, f"{_subject(rule)} {measured} {_window_text(rule)}{_counts(rule, stats)}")


def measure_rule(config: Config, rule: AlertRule, store: Store, now: float) -> Evaluation:
    """Evaluate one rule over the calls in its window ending at `now` (blocking: it queries the store)."""
    if rule.metric == "quality_drop":
        # Measured on the evals app's scores; imported here so the core never loads the app otherwise.
        from keel.evals.online import measure_alert

        return measure_alert(config, rule, store, now)
    model = (config.resolve_name(rule.model) or rule.model) if rule.model else None
    window = CallWindow(
        window_start(rule, now), now, model, rule.key, _PERCENTILES.get(rule.metric),
        overrun=rule.metric == "budget_overrun_usd",
    )  # fmt: skip
    return evaluate(rule, measure(store, window))


# --- the state machine and notifications ---------------------------------------------


def next_state(state: str, since: float, holds: bool, now: float, for_s: float) -> str:
    """ok → pending → firing while the condition holds (pending lasts `for_s`); ok as soon as it clears."""
    if not holds:
        return "ok"
    if state == "firing" or for_s == 0 or (state == "pending" and now - since >= for_s):
        return "firing"
    return "pending"


def headline(name: str, row: AlertRow) -> str:
    """The log line and the webhook's `text`: `alert NAME FIRING: message`."""
    return f"alert {name} {'FIRING' if row.state == 'firing' else 'RESOLVED'}: {row.message}"


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


def payload(name: str, rule: AlertRule, row: AlertRow) -> dict[str, Any]:
    """The JSON body POSTed to a webhook. `text` is what Slack and Mattermost incoming webhooks display."""
    return {
        "text": headline(name, row), "alert": name, "status": "firing" if row.state == "firing" else "resolved",
        "message": row.message, "condition": row.condition, "description": rule.description,
        "metric": rule.metric, "value": row.value, "op": rule.op, "threshold": rule.threshold, "window": rule.window,
        "model": rule.model, "key": rule.key, "since": _iso(row.since), "evaluated_at": _iso(row.last_evaluated),
        **({"scorer": rule.scorer, "min_n": rule.min_n, "alpha": rule.alpha} if rule.metric == "quality_drop" else {}),
    }  # fmt: skip


def _origin(url: str) -> str:
    """Scheme and host only: webhook URLs often carry a secret in their path."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


class AlertEvaluator:
    """Evaluates a configuration's alert rules against a store: `evaluate_once()`, or `start()` a loop.

    `clock` (epoch seconds) is injectable so tests can move the windows; `transport` reaches webhooks.
    """

    def __init__(
        self,
        config: Config,
        store: Store,
        *,
        clock: Callable[[], float] = time.time,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.clock = clock
        self._http = httpx.AsyncClient(timeout=config.alerting.webhook_timeout_s, transport=transport)
        self._task: asyncio.Task[None] | None = None

    async def evaluate_once(self) -> list[AlertRow]:
        """Measure every rule now, record its state, log and notify what changed; the rules' rows after."""
        now = self.clock()
        previous = await asyncio.to_thread(read_alerts, self.store)
        for name, rule in self.config.alerts.items():
            await self._evaluate(name, rule, previous.get(name), now)
        rows = await asyncio.to_thread(read_alerts, self.store)
        return [rows[name] for name in self.config.alerts if name in rows]

    async def _evaluate(self, name: str, rule: AlertRule, previous: AlertRow | None, now: float) -> None:
        evaluation = await asyncio.to_thread(measure_rule, self.config, rule, self.store, now)
        row = await asyncio.to_thread(save, self.store, _next_row(name, rule, evaluation, previous, now), previous)
        if row is None:
            return  # another process evaluating the same rules wrote first: this round is theirs
        old_state = previous.state if previous is not None else "ok"
        if row.state != old_state:
            _log_transition(name, old_state, row)
        if row.state != "pending" and row.notified != row.state:
            await self._deliver(name, rule, row)

    async def _deliver(self, name: str, rule: AlertRule, row: AlertRow) -> None:
        url = rule.webhook or self.config.alerting.webhook
        if url is None:  # the log line was the notification
            await asyncio.to_thread(mark_notified, self.store, name, row.state)
            return
        if not await asyncio.to_thread(claim_delivery, self.store, row):
            return  # another process is delivering it
        problem = await self._post(url, payload(name, rule, row))
        attempt = row.delivery_attempts + 1
        if problem is None or attempt >= MAX_DELIVERY_ATTEMPTS:
            # Given up counts as notified too, or the next time this state comes it would not be sent.
            await asyncio.to_thread(mark_notified, self.store, name, row.state)
        if problem is None:
            return
        if attempt < MAX_DELIVERY_ATTEMPTS:
            log.warning(
                "alert %s: webhook %s failed (%s); attempt %d of %d, the next at the next evaluation",
                name, _origin(url), problem, attempt, MAX_DELIVERY_ATTEMPTS,
            )  # fmt: skip
        else:
            log.error(
                "alert %s: webhook %s failed (%s); giving up after %d attempts", name, _origin(url), problem, attempt
            )

    async def _post(self, url: str, body: dict[str, Any]) -> str | None:
        """None when the webhook accepted the body, else what went wrong."""
        try:
            response = await self._http.post(url, json=body)
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        return None if response.status_code < 300 else f"HTTP {response.status_code}"

    async def run(self) -> None:
        """Evaluate every `interval_s` seconds until cancelled; a failed round is logged, not fatal."""
        interval = self.config.alerting.interval_s
        log.info("keel: %d alert rules, evaluated every %g s", len(self.config.alerts), interval)
        while True:
            try:
                await self.evaluate_once()
            except Exception:  # the store may be unreachable for a while: keep trying
                log.exception("alert evaluation failed; trying again in %g s", interval)
            await asyncio.sleep(interval)

    def start(self) -> None:
        """Run the loop as a background task of the running event loop."""
        self._task = asyncio.get_running_loop().create_task(self.run(), name="keel-alerts")

    async def aclose(self) -> None:
        """Stop the loop (if started) and close the webhook client."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._http.aclose()


def _next_row(name: str, rule: AlertRule, evaluation: Evaluation, previous: AlertRow | None, now: float) -> AlertRow:
    old_state, old_since = (previous.state, previous.since) if previous is not None else ("ok", now)
    state = next_state(old_state, old_since, evaluation.holds, now, rule.for_s)
    changed = previous is None or state != previous.state
    return AlertRow(
        name=name, state=state, since=now if changed else old_since, value=evaluation.value,
        message=evaluation.message, condition=describe(rule), last_evaluated=now,
        notified=previous.notified if previous is not None else "ok",
        delivery_attempts=0 if changed or previous is None else previous.delivery_attempts,
    )  # fmt: skip


def _log_transition(name: str, old_state: str, row: AlertRow) -> None:
    # Both at WARNING: an operator who saw an alert fire must see it resolve, whatever the log level.
    if row.state == "firing" or old_state == "firing":
        log.warning("%s", headline(name, row))
    else:
        log.info("alert %s %s: %s", name, row.state, row.message)


def start_alerts(config: Config, store: Store | None) -> AlertEvaluator | None:
    """A started evaluator for a server, or None without rules or a store; `await aclose()` it on shutdown."""
    if not config.alerts or store is None:
        return None
    evaluator = AlertEvaluator(config, store)
    evaluator.start()
    return evaluator
