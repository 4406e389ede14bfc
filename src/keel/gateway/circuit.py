"""Circuit breaker: stop sending to a deployment that keeps failing.

After `failures` consecutive provider failures (the retryable kind: 429,
5xx, timeouts, connection errors) the circuit opens and calls fail at once
with `CircuitOpen` for `cooldown` seconds, so a fallback answers without
waiting on a dead upstream. Then one probe call is let through (half-open):
success closes the circuit, failure opens it for another cool-down.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable

from keel.errors import CircuitOpen, ProviderError
from keel.models.base import Model, StreamItem, WrapperModel
from keel.types import ChatRequest, ModelResponse

__all__ = ["CircuitBreakerModel"]


class CircuitBreakerModel(WrapperModel):
    def __init__(
        self,
        inner: Model,
        *,
        name: str,
        failures: int = 5,
        cooldown: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(inner)
        self.name = name
        self.threshold = failures
        self.cooldown = cooldown
        self.clock = clock
        self.consecutive_failures = 0
        self.opened_at: float | None = None
        self._probing = False

    @property
    def state(self) -> str:
        if self.opened_at is None:
            return "closed"
        return "half-open" if self.clock() - self.opened_at >= self.cooldown else "open"

    def _before(self) -> None:
        state = self.state
        if state == "open" or (state == "half-open" and self._probing):
            assert self.opened_at is not None
            remaining = max(0.0, self.cooldown - (self.clock() - self.opened_at))
            raise CircuitOpen(
                f"model {self.name!r} is cooling down after {self.consecutive_failures} failures in a row",
                retry_after=remaining or None,
            )
        self._probing = state == "half-open"

    def _success(self) -> None:
        self.consecutive_failures = 0
        self.opened_at = None
        self._probing = False

    def _failure(self, error: Exception) -> None:
        self._probing = False
        if not (isinstance(error, ProviderError) and error.retryable):
            return
        self.consecutive_failures += 1
        if self.consecutive_failures >= self.threshold:
            self.opened_at = self.clock()

    async def complete(self, request: ChatRequest) -> ModelResponse:
        self._before()
        try:
            response = await self.inner.complete(request)
        except Exception as error:
            self._failure(error)
            raise
        except BaseException:  # cancelled: no verdict on the deployment, and the probe slot is free again
            self._probing = False
            raise
        self._success()
        return response

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamItem]:
        self._before()
        try:
            async for item in self.inner.stream(request):
                yield item
        except Exception as error:
            self._failure(error)
            raise
        except BaseException:  # the caller stopped reading: no verdict on the deployment
            self._probing = False
            raise
        self._success()
