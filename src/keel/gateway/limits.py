"""Requests and tokens per minute, per model and per key (the `limits` library).

The sliding-window counter strategy keeps O(1) state per window, so a token
limit of 100,000 costs the same as a request limit. Before a call an
estimate of its input tokens is charged (counting exactly would cost more
than the limit check); after it, the difference to the reported input tokens
and the output tokens. A call that
would pass a limit is refused with `RateLimited` and a Retry-After, never
queued silently: the fallback chain or the caller decides what to do.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from limits import RateLimitItemPerMinute
from limits.aio.storage import MemoryStorage
from limits.aio.strategies import SlidingWindowCounterRateLimiter

from keel.errors import RateLimited
from keel.models.base import Model, StreamItem, WrapperModel
from keel.tokens import estimate
from keel.types import ChatRequest, ModelResponse, Usage

__all__ = ["Limiter", "RateLimitModel"]

_NO_CEILING = 2**62


class Limiter:
    """RPM and TPM limits of one subject (a model or a key)."""

    def __init__(self, subject: str, *, rpm: int | None = None, tpm: int | None = None) -> None:
        self.subject = subject
        self.rpm = RateLimitItemPerMinute(rpm) if rpm else None
        self.tpm = RateLimitItemPerMinute(tpm) if tpm else None
        self._storage = MemoryStorage()
        self._limiter = SlidingWindowCounterRateLimiter(self._storage)

    @property
    def active(self) -> bool:
        return self.rpm is not None or self.tpm is not None

    async def _refuse(self, item: RateLimitItemPerMinute, what: str, wanted: int) -> RateLimited:
        stats = await self._limiter.get_window_stats(item, self.subject)
        retry_after = max(0.0, stats.reset_time - time.time())
        return RateLimited(
            f"{self.subject}: {what} limit of {item.amount}/minute reached"
            + (f" (this call needs {wanted})" if what == "token" else ""),
            retry_after=round(retry_after, 3) or 1.0,
        )

    async def acquire(self, tokens: int) -> None:
        """Count one request and `tokens` input tokens, or raise RateLimited having counted nothing."""
        cost = min(tokens, self.tpm.amount) if self.tpm is not None else 0  # a huge call may enter an empty window
        if self.rpm is not None and not await self._limiter.test(self.rpm, self.subject, "requests"):
            raise await self._refuse(self.rpm, "request", 1)
        if (
            self.tpm is not None
            and cost > 0
            and not await self._limiter.test(self.tpm, self.subject, "tokens", cost=cost)
        ):
            raise await self._refuse(self.tpm, "token", tokens)
        if self.rpm is not None:
            await self._limiter.hit(self.rpm, self.subject, "requests")
        if self.tpm is not None and cost > 0:
            await self._limiter.hit(self.tpm, self.subject, "tokens", cost=cost)

    async def settle(self, estimated: int, usage: Usage) -> None:
        """After a call: charge what the estimate missed, and the output."""
        await self.add_tokens(max(0, usage.input_tokens - estimated) + usage.output_tokens)

    async def add_tokens(self, tokens: int) -> None:
        """Charge tokens learnt after the call; may push the window over its limit."""
        if self.tpm is not None and tokens > 0:
            # the storage call behind `hit`, with no ceiling: the tokens were spent, so they count
            await self._storage.acquire_sliding_window_entry(
                self.tpm.key_for(self.subject, "tokens"), _NO_CEILING, self.tpm.get_expiry(), tokens
            )


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
