"""Requests and tokens per minute, per model and per key, over a moving window.

A limit of N per minute holds over ANY 60 seconds, not per clock minute: a
window keeps one (time, amount) entry per admitted call and the running sum
of those younger than the window, so admitting costs O(1) amortised and the
memory is one entry per call in the last minute, whatever the limit. (The
`limits` library offers two strategies and neither fits: its sliding-window
counter weights the previous clock minute's count, an approximation that let
RPM 30 admit 44 calls within 60 s under 100 callers; its moving window stores
one entry per token, 171 µs a call at a TPM of 1,000,000 and 2.8 ms at
10,000,000.)

Before a call an estimate of its input tokens is charged (counting exactly
would cost more than the limit check); after it, the difference to the
reported input tokens and the output tokens. Checking both limits and
charging them happens without an await in between, so concurrent callers on
the event loop cannot all pass the same check. A call that would pass a
limit is refused with `RateLimited` and a Retry-After (when enough of the
window will have expired), never queued silently: the fallback chain or the
caller decides what to do.

`Limiter` counts in this process. A key's limits on a PostgreSQL store are
counted by `keel.gateway.shared_limits.SharedLimiter` instead, so that every
replica takes from one window; both satisfy `KeyLimiter`.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Protocol

from keel.errors import RateLimited
from keel.models.base import Model, StreamItem, WrapperModel
from keel.tokens import estimate
from keel.types import ChatRequest, ModelResponse, Usage

__all__ = ["KeyLimiter", "Limiter", "MovingWindow", "RateLimitModel", "refusal"]

#: The window of an "N per minute" limit, in seconds (tests shorten it).
WINDOW_S = 60.0


class MovingWindow:
    """At most `limit` units admitted in any `length` seconds: what was admitted less than `length`
    seconds ago, exactly."""

    def __init__(self, limit: int, length: float, clock: Callable[[], float]) -> None:
        self.limit = limit
        self.length = length
        self._clock = clock
        self._entries: deque[tuple[float, int]] = deque()
        self._used = 0

    def _expire(self, now: float) -> None:
        horizon = now - self.length
        entries = self._entries
        while entries and entries[0][0] <= horizon:
            self._used -= entries.popleft()[1]

    def room(self, now: float) -> int:
        """Units that may still be admitted now."""
        self._expire(now)
        return self.limit - self._used

    def add(self, now: float, amount: int) -> None:
        """Count `amount` units at `now` (even past the limit: units learnt after the call were spent)."""
        if amount > 0:
            self._entries.append((now, amount))
            self._used += amount

    def retry_after(self, now: float, amount: int) -> float:
        """Seconds until `amount` more units fit, as the oldest entries expire."""
        excess = self._used + amount - self.limit
        freed = 0
        for when, units in self._entries:
            freed += units
            if freed >= excess:
                return max(0.0, when + self.length - now)
        return self.length


class KeyLimiter(Protocol):
    """What the `KeyLimits` wrapper needs of a key's limits, counted in-process or shared."""

    @property
    def counts_tokens(self) -> bool:
        """Whether a TPM limit is set (else the call's tokens need not be estimated)."""
        ...

    async def acquire(self, tokens: int) -> None:
        """Count one request and `tokens` input tokens, or raise RateLimited having counted nothing."""
        ...

    async def settle(self, estimated: int, usage: Usage) -> None:
        """After a call: charge what the estimate missed, and the output."""
        ...


def refusal(subject: str, what: str, limit: int, length: float, wanted: int, retry_after: float) -> RateLimited:
    """The RateLimited of a full window (`what`: "request" or "token")."""
    per = "minute" if length == 60 else f"{length:g} s"
    needs = f" (this call needs {wanted})" if what == "token" else ""
    message = f"{subject}: {what} limit of {limit}/{per} reached{needs}"
    return RateLimited(message, retry_after=round(retry_after, 3) or 0.001)


class Limiter:
    """RPM and TPM limits of one subject (a model or a key)."""

    def __init__(
        self,
        subject: str,
        *,
        rpm: int | None = None,
        tpm: int | None = None,
        window_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.subject = subject
        length = WINDOW_S if window_s is None else window_s
        self.rpm = MovingWindow(rpm, length, clock) if rpm else None
        self.tpm = MovingWindow(tpm, length, clock) if tpm else None
        self._clock = clock

    @property
    def active(self) -> bool:
        return self.rpm is not None or self.tpm is not None

    @property
    def counts_tokens(self) -> bool:
        return self.tpm is not None

    def _refuse(self, window: MovingWindow, now: float, what: str, amount: int, wanted: int) -> RateLimited:
        wait = window.retry_after(now, amount)
        return refusal(self.subject, what, window.limit, window.length, wanted, wait)

    async def acquire(self, tokens: int) -> None:
        """Count one request and `tokens` input tokens, or raise RateLimited having counted nothing."""
        now = self._clock()
        cost = min(tokens, self.tpm.limit) if self.tpm is not None else 0  # a huge call may enter an empty window
        if self.rpm is not None and self.rpm.room(now) < 1:
            raise self._refuse(self.rpm, now, "request", 1, 1)
        if self.tpm is not None and cost > 0 and self.tpm.room(now) < cost:
            raise self._refuse(self.tpm, now, "token", cost, tokens)
        if self.rpm is not None:
            self.rpm.add(now, 1)
        if self.tpm is not None:
            self.tpm.add(now, cost)

    async def settle(self, estimated: int, usage: Usage) -> None:
        """After a call: charge what the estimate missed, and the output."""
        await self.add_tokens(max(0, usage.input_tokens - estimated) + usage.output_tokens)

    async def add_tokens(self, tokens: int) -> None:
        """Charge tokens learnt after the call; may push the window over its limit (they were spent)."""
        if self.tpm is not None:
            self.tpm.add(self._clock(), tokens)


class RateLimitModel(WrapperModel):
    def __init__(self, inner: Model, limiter: Limiter) -> None:
        super().__init__(inner)
        self.limiter = limiter

    async def complete(self, request: ChatRequest) -> ModelResponse:
        estimated = estimate(request) if self.limiter.tpm else 0
        await self.limiter.acquire(estimated)
        response = await self.inner.complete(request)
        await self.limiter.settle(estimated, response.usage)
        return response

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamItem]:
        estimated = estimate(request) if self.limiter.tpm else 0
        await self.limiter.acquire(estimated)
        async for item in self.inner.stream(request):
            if isinstance(item, ModelResponse):
                await self.limiter.settle(estimated, item.usage)
            yield item
