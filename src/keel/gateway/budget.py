"""Daily and monthly budgets per key, checked before the call is made.

Before a call, its worst-case cost (prompt tokens at the input price plus
max_tokens, or the model's max output, at the output price) is reserved; a
reservation that would pass the budget refuses the call with
`BudgetExceeded`. After the call the reservation is replaced by the real
cost, whatever it is: an upstream that bills beyond `max_tokens`, or a
prompt counted short by an approximate tokenizer, can cost more than was
reserved. That excess is charged all the same, `settle` returns how far it
took the key past its budget (the gateway records it as
`keel.budget.overrun_usd`), and a key whose spend has reached its budget is
refused every later call, priced or not. Spend survives restarts: a key's
spend for the current day and month is read from the store the first time
the key is seen in that period. A call whose price is unknown cannot be
priced and is let through while the budget is not exhausted (its cost is
also unknown).

`BudgetTracker` keeps the ledgers in this process: right for one process
(the SQLite store). Replicas on one PostgreSQL share them through
`keel.gateway.shared_limits.SharedBudgets` instead; both satisfy `Budgets`,
which is all the `KeyBudget` wrapper uses.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

from keel.config import KeyConfig
from keel.errors import BudgetExceeded
from keel.store.base import Store

__all__ = ["BudgetTracker", "Budgets", "Reservation", "budget_limits"]


def period_starts(now: float) -> dict[str, float]:
    day = datetime.fromtimestamp(now, UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return {"daily": day.timestamp(), "monthly": day.replace(day=1).timestamp()}


def budget_limits(keys: dict[str, KeyConfig], key: str) -> dict[str, float]:
    """A key's budgets by period ("daily", "monthly"), those it has."""
    config = keys.get(key)
    if config is None:
        return {}
    limits = {"daily": config.daily_budget_usd, "monthly": config.monthly_budget_usd}
    return {period: value for period, value in limits.items() if value is not None}


@dataclass
class _Ledger:
    start: float
    spent: float
    reserved: float = 0.0


@dataclass
class Reservation:
    key: str
    amount: float
    ledgers: list[_Ledger] = field(default_factory=list)
    limits: list[float] = field(default_factory=list)  # each ledger's budget when reserved


class Budgets(Protocol):
    """What the `KeyBudget` wrapper needs of a ledger of key budgets, in-process or shared."""

    def limited(self, key: str) -> bool:
        """Whether the key has a daily or monthly budget."""
        ...

    def forget(self, key: str) -> None:
        """The key's budget changed: drop what is cached of it."""
        ...

    async def reserve(self, key: str | None, worst_case: float | None) -> Reservation | None:
        """Reserve the worst case of a call, or raise BudgetExceeded."""
        ...

    async def charge(self, reservation: Reservation | None, actual: float | None) -> float:
        """Replace a reservation by what the call cost; return the part beyond the budget (USD)."""
        ...

    def spent(self, key: str, period: str = "daily") -> float:
        """What the key spent in the current period."""
        ...

    def close(self) -> None:
        """Stop any background work (the gateway is closing)."""
        ...


class BudgetTracker:
    def __init__(self, store: Store | None, keys: dict[str, KeyConfig]) -> None:
        self.store = store
        self.keys = keys
        self._ledgers: dict[tuple[str, str], _Ledger] = {}
        self._lock = asyncio.Lock()
        self._now = time.time

    def _limits(self, key: str) -> dict[str, float]:
        return budget_limits(self.keys, key)

    def limited(self, key: str) -> bool:
        """Whether the key has a daily or monthly budget."""
        return bool(self._limits(key))

    async def _ledger(self, key: str, period: str, start: float) -> _Ledger:
        ledger = self._ledgers.get((key, period))
        if ledger is None or ledger.start != start:
            spent = await asyncio.to_thread(self.store.spend, key, start) if self.store else 0.0
            ledger = self._ledgers[(key, period)] = _Ledger(start, spent)
        return ledger

    def forget(self, key: str) -> None:
        """Drop a key's cached spend: its next call re-reads it from the store (the key's budget changed,
        or it was spent elsewhere meanwhile). Reservations in flight settle against the ledgers they hold."""
        for period in ("daily", "monthly"):
            self._ledgers.pop((key, period), None)

    async def reserve(self, key: str | None, worst_case: float | None) -> Reservation | None:
        """Reserve the worst case of a call, or raise BudgetExceeded."""
        if key is None:
            return None
        limits = self._limits(key)
        if not limits:
            return None
        amount = worst_case or 0.0
        async with self._lock:
            starts = period_starts(self._now())
            reservation = Reservation(key, amount)
            for period, limit in limits.items():
                ledger = await self._ledger(key, period, starts[period])
                if 0 < limit <= ledger.spent:  # spent (an overrun may pass it): not even an unpriced call
                    raise BudgetExceeded(
                        f"key {key!r} has spent its {period} budget of ${limit:.2f}: spent ${ledger.spent:.4f}"
                    )
                if ledger.spent + ledger.reserved + amount > limit:
                    raise BudgetExceeded(
                        f"key {key!r} would pass its {period} budget of ${limit:.2f}: spent ${ledger.spent:.4f}, "
                        f"in flight ${ledger.reserved:.4f}, this call up to ${amount:.4f}"
                    )
                reservation.ledgers.append(ledger)
                reservation.limits.append(limit)
            for ledger in reservation.ledgers:
                ledger.reserved += amount
            return reservation

    def settle(self, reservation: Reservation | None, actual: float | None) -> float:
        """Replace a reservation by what the call really cost; return the part of that cost which
        landed beyond the key's budget (USD; 0.0 within it), the largest over its periods."""
        if reservation is None:
            return 0.0
        overrun = 0.0
        cost = actual or 0.0
        for ledger, limit in zip(reservation.ledgers, reservation.limits, strict=True):
            ledger.reserved = max(0.0, ledger.reserved - reservation.amount)
            ledger.spent += cost
            overrun = max(overrun, min(cost, ledger.spent - limit))
        return overrun

    async def charge(self, reservation: Reservation | None, actual: float | None) -> float:
        """`settle`, as `Budgets` has it (a shared ledger writes to the store)."""
        return self.settle(reservation, actual)

    def close(self) -> None:
        """Nothing runs in the background here."""

    def spent(self, key: str, period: str = "daily") -> float:
        ledger = self._ledgers.get((key, period))
        return ledger.spent if ledger else 0.0
