"""Key budgets and rate limits shared by every process on one PostgreSQL store.

Replicas of `keel serve` and `keel worker`s on one PostgreSQL must not each
spend a key's budget, nor each take its requests per minute: what one admits,
the others see at once. So on PostgreSQL the ledgers and windows live in the
database, and every admission is one atomic statement there:

- A budget is a row per key, period and period start (`keel_budget_ledgers`:
  spent, reserved). Reserving is one conditional UPDATE (`reserved =
  reserved + worst case WHERE spent + reserved + worst case <= budget`), so of
  two replicas racing for the last dollars one gets them and the other is
  refused; a key with a daily and a monthly budget reserves both in one
  transaction. Settling is one statement that deletes the reservation and
  moves the real cost into `spent`. The overspend bound is the in-process
  one: at most what calls cost beyond their reserved worst case.
- A reservation carries a lease (`expires_at`, on the database's clock) that
  its process renews every `LEASE_S / 3` while the call runs. A process killed
  with calls in flight stops renewing; once a lease has expired, the next
  reservation refused for that key gives the dead reservations back (and a
  live process's renewer sweeps them too), so the key is blocked at most
  `LEASE_S` by a crash, never for ever. The dead calls are not charged: keel
  never learnt what they cost.
- Requests and tokens per minute are counted in buckets of 1/60 of the window
  (one second for a minute) per key, `keel_rate_buckets`. Admitting takes a
  transaction-level advisory lock on the key, then one statement sums the
  last 61 buckets and adds the call only if it fits. A bucket counts until its
  last instant is a full window old, so at most N calls are admitted in ANY
  60 s, exactly as in one process; the price is that a slot frees up to one
  bucket (1 s) later than the in-process limiter would free it.

These statements run on connections of their own (`ledger_store`) with
`synchronous_commit = off`: a commit does not wait for the WAL to reach the
disk, which took 8 to 10 ms a commit here and made a budget 16 ms and a
rate limit 10 ms of every call. Atomicity and isolation are untouched; what a
crash of the PostgreSQL server itself (not of a keel process) can lose is the
last moments of ledger writes (at most 3 x `wal_writer_delay`, 0.6 s by
default): the reservations and charges of those, while the spans, written
durably, keep every call's cost.

The SQLite store serves one process, and keeps the in-process `BudgetTracker`
and `Limiter`: nothing here runs there. The store's round trips run in the
loop's default executor; the leases, the tokens learnt after a call and a
charge whose caller left (a cancelled request) complete in the background.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from keel.config import KeyConfig
from keel.errors import BudgetExceeded, LimitsUnavailable, RateLimited
from keel.gateway import limits
from keel.gateway.budget import Reservation, budget_limits, period_starts
from keel.store.postgres import PostgresStore
from keel.types import Usage

__all__ = ["LEASE_S", "SharedBudgets", "SharedLimiter", "SharedReservation", "ledger_store"]

log = logging.getLogger("keel.gateway")

#: How long a reservation holds without renewal (seconds): what a killed process blocks at most.
LEASE_S = 30.0
#: Advisory lock class of the rate windows ("klim"), the object being the hash of the key's subject.
RATE_LOCK = 0x6B6C696D
#: Buckets per window: a slot frees up to one bucket late, never early.
BUCKETS = 60

_NOW = "EXTRACT(EPOCH FROM clock_timestamp())::float8"  # the database's clock: one for all machines

T = TypeVar("T")


def ledger_store(store: PostgresStore) -> PostgresStore:
    """Connections to the same database for the ledgers and windows, committing without waiting for the
    disk (see the module's docstring); the store's own connections keep their durable commits."""
    options = conninfo_to_dict(store.url).get("options") or ""
    url = make_conninfo(store.url, options=f"{options} -c synchronous_commit=off".strip())
    return PostgresStore(url)


@dataclass
class SharedReservation(Reservation):
    reservation_id: str = ""
    periods: list[tuple[str, float]] = field(default_factory=list)  # (period, start) of each ledger held


class _Refused(Exception):
    """A reservation did not fit one of its ledgers: the transaction rolls back."""


class SharedBudgets:
    """The `Budgets` of keys on a PostgreSQL store: one ledger for every process."""

    def __init__(self, store: PostgresStore, keys: dict[str, KeyConfig]) -> None:
        self.store = store
        self.keys = keys
        self.holder = f"{socket.gethostname()}:{os.getpid()}"
        self._ledgers: set[tuple[str, str, float]] = set()  # rows known to exist
        self._in_flight: dict[str, SharedReservation] = {}
        self._unsettled: list[tuple[SharedReservation, float]] = []  # charges the store refused: retried
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self._background: set[asyncio.Future[Any]] = set()
        self._now = time.time

    def limited(self, key: str) -> bool:
        return bool(budget_limits(self.keys, key))

    def forget(self, key: str) -> None:
        self._ledgers = {ledger for ledger in self._ledgers if ledger[0] != key}

    def close(self) -> None:
        """Stop renewing leases (reservations still in flight then expire)."""
        self._stop.set()

    async def reserve(self, key: str | None, worst_case: float | None) -> Reservation | None:
        if key is None:
            return None
        budgets = budget_limits(self.keys, key)
        if not budgets:
            return None
        starts = period_starts(self._now())
        wanted = [(period, starts[period], limit) for period, limit in budgets.items()]
        future = self._in_executor(self._reserve, key, worst_case or 0.0, wanted)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:  # the caller left: a reservation made meanwhile is given back
            future.add_done_callback(self._release_orphan)
            raise

    async def charge(self, reservation: Reservation | None, actual: float | None) -> float:
        if not isinstance(reservation, SharedReservation):
            return 0.0
        # shielded: a request cancelled while its charge is written is charged all the same
        return await asyncio.shield(self._in_executor(self._settle, reservation, actual or 0.0))

    def spent(self, key: str, period: str = "daily") -> float:
        start = period_starts(self._now())[period]
        rows = self.store.run(
            "SELECT spent FROM keel_budget_ledgers WHERE key = %s AND period = %s AND start = %s", [key, period, start]
        )
        return float(rows[0][0]) if rows else 0.0

    # --- in the executor ------------------------------------------------------------

    def _in_executor(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        future = asyncio.get_running_loop().run_in_executor(None, fn, *args)
        self._background.add(future)
        future.add_done_callback(self._background.discard)
        return future

    def _reserve(self, key: str, amount: float, wanted: list[tuple[str, float, float]]) -> SharedReservation:
        reservation = SharedReservation(key, amount, limits=[w[2] for w in wanted])
        reservation.reservation_id = secrets.token_hex(12)
        reservation.periods = [(period, start) for period, start, _ in wanted]
        try:
            self._ensure_ledgers(key, wanted)
            admitted = self._try_reserve(reservation, wanted) or (
                self._reclaim(key) and self._try_reserve(reservation, wanted)
            )
            if not admitted:
                raise self._refusal(key, amount, wanted)
        except psycopg.Error as exc:
            raise LimitsUnavailable(f"cannot check the budget of key {key!r}: the store does not answer") from exc
        with self._lock:
            self._in_flight[reservation.reservation_id] = reservation
            self._start_renewer()
        return reservation

    def _ensure_ledgers(self, key: str, wanted: list[tuple[str, float, float]]) -> None:
        """Create the period's ledger rows, starting from what the spans say the key spent (calls
        charged before the row existed: an upgrade, or the in-process ledger of an earlier run)."""
        for period, start, _ in wanted:
            if (key, period, start) in self._ledgers:
                continue
            query = "SELECT 1 FROM keel_budget_ledgers WHERE key = %s AND period = %s AND start = %s"
            if not self.store.run(query, [key, period, start]):
                self.store.run(
                    "INSERT INTO keel_budget_ledgers (key, period, start, spent, reserved) VALUES (%s, %s, %s, %s, 0)"
                    " ON CONFLICT DO NOTHING",
                    [key, period, start, self.store.spend(key, start)],
                )
            self._ledgers.add((key, period, start))

    def _try_reserve(self, reservation: SharedReservation, wanted: list[tuple[str, float, float]]) -> bool:
        values = ", ".join(f"(%(p{i})s::text, %(s{i})s::float8, %(l{i})s::float8)" for i in range(len(wanted)))
        sql = f"""
            WITH up AS (
                UPDATE keel_budget_ledgers AS l SET reserved = l.reserved + %(amount)s
                FROM (VALUES {values}) AS w(period, start, budget)
                WHERE l.key = %(key)s AND l.period = w.period AND l.start = w.start
                  AND NOT (w.budget > 0 AND l.spent >= w.budget)
                  AND l.spent + l.reserved + %(amount)s <= w.budget
                RETURNING l.period, l.start
            )
            INSERT INTO keel_budget_reservations (reservation_id, period, key, start, amount, holder, expires_at)
            SELECT %(id)s, up.period, %(key)s, up.start, %(amount)s, %(holder)s, {_NOW} + %(lease)s FROM up
            RETURNING period
        """
        params: dict[str, Any] = {
            "amount": reservation.amount, "key": reservation.key, "id": reservation.reservation_id,
            "holder": self.holder, "lease": LEASE_S,
        }  # fmt: skip
        for i, (period, start, budget) in enumerate(wanted):
            params.update({f"p{i}": period, f"s{i}": start, f"l{i}": budget})
        if len(wanted) == 1:  # one row: the statement is all or nothing on its own
            return len(self.store.run(sql, params)) == 1
        try:  # a daily and a monthly budget: both fit, or neither is touched
            with self.store.transaction() as tx:
                cur = tx.raw  # PostgreSQL's own %s placeholders
                cur.execute(sql, params)
                if len(cur.fetchall()) < len(wanted):
                    raise _Refused
        except _Refused:
            return False
        return True

    def _reclaim(self, key: str) -> bool:
        """Give the key's expired reservations (their process died) back to its ledgers; True if any."""
        sql = f"""
            WITH gone AS (
                DELETE FROM keel_budget_reservations WHERE key = %(key)s AND expires_at < {_NOW}
                RETURNING period, start, amount
            ), freed AS (SELECT period, start, SUM(amount) AS amount FROM gone GROUP BY period, start)
            UPDATE keel_budget_ledgers AS l SET reserved = GREATEST(0, l.reserved - freed.amount) FROM freed
            WHERE l.key = %(key)s AND l.period = freed.period AND l.start = freed.start
            RETURNING l.period
        """
        reclaimed = self.store.run(sql, {"key": key})
        if reclaimed:
            log.warning("key %r: gave back reservations whose process stopped renewing them", key)
        return bool(reclaimed)

    def _refusal(self, key: str, amount: float, wanted: list[tuple[str, float, float]]) -> BudgetExceeded:
        for period, start, budget in wanted:
            rows = self.store.run(
                "SELECT spent, reserved FROM keel_budget_ledgers WHERE key = %s AND period = %s AND start = %s",
                [key, period, start],
            )
            spent, reserved = (float(rows[0][0]), float(rows[0][1])) if rows else (0.0, 0.0)
            if 0 < budget <= spent:
                return BudgetExceeded(f"key {key!r} has spent its {period} budget of ${budget:.2f}: spent ${spent:.4f}")
            if spent + reserved + amount > budget:
                return BudgetExceeded(
                    f"key {key!r} would pass its {period} budget of ${budget:.2f}: spent ${spent:.4f}, "
                    f"in flight ${reserved:.4f} (all replicas), this call up to ${amount:.4f}"
                )
        period, _, budget = wanted[0]  # it fits now: another replica settled meanwhile
        return BudgetExceeded(f"key {key!r} would pass its {period} budget of ${budget:.2f}; try again")

    def _settle(self, reservation: SharedReservation, cost: float) -> float:
        pairs = ", ".join("(%s::text, %s::float8)" for _ in reservation.periods)
        sql = f"""
            WITH gone AS (
                DELETE FROM keel_budget_reservations WHERE reservation_id = %s RETURNING period, amount
            )
            UPDATE keel_budget_ledgers AS l
            SET spent = l.spent + %s,
                reserved = GREATEST(
                    0, l.reserved - COALESCE((SELECT g.amount FROM gone AS g WHERE g.period = l.period), 0)
                )
            WHERE l.key = %s AND (l.period, l.start) IN ({pairs})
            RETURNING l.period, l.spent
        """
        params: list[Any] = [reservation.reservation_id, cost, reservation.key]
        for period, start in reservation.periods:
            params += [period, start]
        try:
            rows = self.store.run(sql, params)
        except psycopg.Error:
            log.warning("key %r: could not charge $%.6f yet, the store does not answer", reservation.key, cost)
            with self._lock:  # the renewer keeps its lease and tries again
                self._unsettled.append((reservation, cost))
            return 0.0
        with self._lock:
            self._in_flight.pop(reservation.reservation_id, None)
        spent = {period: float(value) for period, value in rows}
        overrun = 0.0
        for (period, _), budget in zip(reservation.periods, reservation.limits, strict=True):
            if period in spent:
                overrun = max(overrun, min(cost, spent[period] - budget))
        return overrun

    def _release_orphan(self, future: asyncio.Future[SharedReservation]) -> None:
        if not future.cancelled() and future.exception() is None:
            self._in_executor(self._settle, future.result(), 0.0)  # the call never ran: nothing to charge

    # --- leases -----------------------------------------------------------------------

    def _start_renewer(self) -> None:
        if self._renewer is None or not self._renewer.is_alive():
            self._renewer = threading.Thread(target=self._renew_loop, name="keel-budget-leases", daemon=True)
            self._renewer.start()

    def _renew_loop(self) -> None:
        while not self._stop.wait(LEASE_S / 3):
            with self._lock:
                ids = list(self._in_flight)
                unsettled, self._unsettled = self._unsettled, []
            try:
                if ids:
                    self.store.run(
                        f"UPDATE keel_budget_reservations SET expires_at = {_NOW} + %s WHERE reservation_id = ANY(%s)",
                        [LEASE_S, ids],
                    )
            except psycopg.Error:
                log.warning("could not renew budget reservations; retrying", exc_info=True)
            for reservation, cost in unsettled:
                self._settle(reservation, cost)


class SharedLimiter:
    """A key's requests and tokens per minute, counted in the store for every process (`KeyLimiter`)."""

    def __init__(
        self, store: PostgresStore, subject: str, *, rpm: int | None = None, tpm: int | None = None,
        window_s: float | None = None,
    ) -> None:  # fmt: skip
        self.store = store
        self.subject = subject
        self.rpm = rpm or None
        self.tpm = tpm or None
        self.length = limits.WINDOW_S if window_s is None else window_s
        self.width = self.length / BUCKETS
        self._background: set[asyncio.Future[Any]] = set()

    @property
    def counts_tokens(self) -> bool:
        return self.tpm is not None

    async def acquire(self, tokens: int) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self._acquire, tokens)

    async def settle(self, estimated: int, usage: Usage) -> None:
        """Charge the tokens learnt after the call, in the background: the answer does not wait."""
        extra = max(0, usage.input_tokens - estimated) + usage.output_tokens
        if self.tpm is None or extra <= 0:
            return
        future = asyncio.get_running_loop().run_in_executor(None, self._add_tokens, extra)
        self._background.add(future)
        future.add_done_callback(self._added)

    def _added(self, future: asyncio.Future[None]) -> None:
        self._background.discard(future)
        if not future.cancelled() and future.exception() is not None:
            log.warning("%s: could not count tokens after a call", self.subject, exc_info=future.exception())

    def _acquire(self, tokens: int) -> None:
        cost = min(tokens, self.tpm) if self.tpm is not None else 0  # a huge call may enter an empty window
        checks = ["TRUE"]
        if self.rpm is not None:
            checks.append("used.requests + 1 <= %(rpm)s")
        if self.tpm is not None:
            checks.append("(%(tokens)s = 0 OR used.tokens + %(tokens)s <= %(tpm)s)")
        sql = f"""
            WITH now AS (SELECT floor({_NOW} / %(width)s)::bigint AS bucket),
            old AS (
                DELETE FROM keel_rate_buckets
                WHERE subject = %(subject)s AND bucket < (SELECT bucket FROM now) - %(span)s
            ),
            used AS (
                SELECT COALESCE(SUM(b.requests), 0) AS requests, COALESCE(SUM(b.tokens), 0) AS tokens
                FROM keel_rate_buckets AS b
                WHERE b.subject = %(subject)s AND b.bucket >= (SELECT bucket FROM now) - %(span)s
            )
            INSERT INTO keel_rate_buckets (subject, bucket, requests, tokens)
            SELECT %(subject)s, now.bucket, 1, %(tokens)s FROM now, used WHERE {" AND ".join(checks)}
            ON CONFLICT (subject, bucket) DO UPDATE
            SET requests = keel_rate_buckets.requests + 1, tokens = keel_rate_buckets.tokens + EXCLUDED.tokens
            RETURNING bucket
        """
        params = {
            "width": self.width, "subject": self.subject, "span": BUCKETS, "tokens": cost, "rpm": self.rpm,
            "tpm": self.tpm,
        }  # fmt: skip
        try:
            with self.store.transaction() as tx:
                cur = tx.raw  # PostgreSQL's own %s placeholders
                # one admission at a time per key; the statement after it sees every earlier one
                cur.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", [RATE_LOCK, self.subject])
                cur.execute(sql, params)
                if cur.fetchone() is not None:
                    return
                cur.execute(
                    f"SELECT bucket, requests, tokens, {_NOW} FROM keel_rate_buckets"
                    " WHERE subject = %s AND bucket >= floor(" + _NOW + " / %s)::bigint - %s ORDER BY bucket",
                    [self.subject, self.width, BUCKETS],
                )
                window = cur.fetchall()
        except psycopg.Error as exc:
            raise LimitsUnavailable(f"cannot check the limits of {self.subject}: the store does not answer") from exc
        raise self._refusal(window, cost, tokens)

    def _refusal(self, window: list[tuple[Any, ...]], cost: int, wanted: int) -> RateLimited:
        now = float(window[0][3]) if window else 0.0
        requests = sum(int(r[1]) for r in window)
        if self.rpm is not None and requests + 1 > self.rpm:
            wait = self._retry_after(window, now, requests + 1 - self.rpm, column=1)
            return limits.refusal(self.subject, "request", self.rpm, self.length, 1, wait)
        used = sum(int(r[2]) for r in window)
        wait = self._retry_after(window, now, used + cost - (self.tpm or 0), column=2)
        return limits.refusal(self.subject, "token", self.tpm or 0, self.length, wanted, wait)

    def _retry_after(self, window: list[tuple[Any, ...]], now: float, excess: int, *, column: int) -> float:
        """Seconds until `excess` units leave the window: a bucket leaves when its end is a window old."""
        freed = 0
        for row in window:
            freed += int(row[column])
            if freed >= excess:
                return max(0.0, (int(row[0]) + BUCKETS + 1) * self.width - now)
        return self.width

    def _add_tokens(self, tokens: int) -> None:
        self.store.run(
            f"INSERT INTO keel_rate_buckets (subject, bucket, requests, tokens)"
            f" VALUES (%s, floor({_NOW} / %s)::bigint, 0, %s) ON CONFLICT (subject, bucket)"
            " DO UPDATE SET tokens = keel_rate_buckets.tokens + EXCLUDED.tokens",
            [self.subject, self.width, tokens],
        )
