"""Retry a model on retryable provider errors, with backoff and jitter.

Only errors that can succeed on a second try are retried (429, 408, 5xx,
timeouts, connection resets): a 400 or 401 fails at once. A Retry-After from
the provider is honoured; one longer than `max_delay` is not waited out but
raised, so a fallback model can answer instead. A stream is retried only if
it failed before its first piece reached the caller.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import replace
from typing import TypeVar

from keel.errors import KeelError, LimitError, ProviderError
from keel.models.base import Model, StreamItem, WrapperModel
from keel.types import ChatRequest, EmbeddingResult, ModelResponse

__all__ = ["RetryModel", "backoff_delay"]

_T = TypeVar("_T")


def backoff_delay(attempt: int, base: float, cap: float, rand: Callable[[], float] = random.random) -> float:
    """Full-jitter exponential backoff: uniform in [0, min(cap, base * 2**(attempt-1))]."""
    return float(rand() * min(cap, base * 2 ** (attempt - 1)))


class RetryModel(WrapperModel):
    def __init__(
        self,
        inner: Model,
        *,
        max_retries: int = 2,
        base_delay: float = 0.5,
        max_delay: float = 20.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        super().__init__(inner)
        self.max_retries = max_retries
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.sleep = sleep

    def _delay_or_raise(self, error: KeelError, attempt: int) -> float:
        """How long to wait before the next attempt; raises when there is none."""
        # a local refusal (rate limit, open circuit) means no call went out this time
        error.attempts = attempt - 1 if isinstance(error, LimitError) else attempt
        if not isinstance(error, ProviderError) or not error.retryable or attempt > self.max_retries:
            raise error
        if error.retry_after is not None:
            if error.retry_after > self.max_delay:
                raise error
            return error.retry_after + random.random() * 0.1
        return backoff_delay(attempt, self.base_delay, self.max_delay)

    async def _retrying(self, call: Callable[[], Awaitable[_T]]) -> tuple[_T, int]:
        attempt = 0
        while True:
            attempt += 1
            try:
                return await call(), attempt
            except KeelError as error:
                await self.sleep(self._delay_or_raise(error, attempt))

    async def complete(self, request: ChatRequest) -> ModelResponse:
        response, attempts = await self._retrying(lambda: self.inner.complete(request))
        return replace(response, attempts=attempts) if attempts != response.attempts else response

    async def embed(self, texts: Sequence[str]) -> EmbeddingResult:
        result, attempts = await self._retrying(lambda: self.inner.embed(texts))
        return replace(result, attempts=attempts)

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamItem]:
        attempt = 0
        while True:
            attempt += 1
            started = False
            try:
                async for item in self.inner.stream(request):
                    started = True
                    yield replace(item, attempts=attempt) if isinstance(item, ModelResponse) else item
                return
            except KeelError as error:
                if started:
                    error.attempts = attempt
                    raise
                await self.sleep(self._delay_or_raise(error, attempt))
