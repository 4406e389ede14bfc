"""A time limit on each attempt, whatever the adapter does with its own.

For a stream the limit applies to the first piece and to every gap between
pieces, so a long answer that keeps flowing is not cut off.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

from keel.errors import ProviderTimeout
from keel.models.base import Model, StreamItem, WrapperModel
from keel.types import ChatRequest, EmbeddingResult, ModelResponse

__all__ = ["TimeoutModel"]


class TimeoutModel(WrapperModel):
    def __init__(self, inner: Model, *, timeout: float) -> None:
        super().__init__(inner)
        self.timeout = timeout

    def _limit(self, request: ChatRequest) -> float:
        return request.options.timeout or self.timeout

    def _error(self, request: ChatRequest, limit: float) -> ProviderTimeout:
        return ProviderTimeout(
            f"{self.provider} {request.model} did not answer within {limit:g}s",
            provider=self.provider,
            model=request.model,
        )

    async def complete(self, request: ChatRequest) -> ModelResponse:
        limit = self._limit(request)
        try:
            async with asyncio.timeout(limit):
                return await self.inner.complete(request)
        except TimeoutError:
            raise self._error(request, limit) from None

    async def embed(self, texts: Sequence[str]) -> EmbeddingResult:
        try:
            async with asyncio.timeout(self.timeout):
                return await self.inner.embed(texts)
        except TimeoutError:
            raise ProviderTimeout(
                f"{self.provider} {self.model_id} did not embed within {self.timeout:g}s",
                provider=self.provider,
                model=self.model_id,
            ) from None

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamItem]:
        limit = self._limit(request)
        iterator = aiter(self.inner.stream(request))
        try:
            while True:
                try:
                    async with asyncio.timeout(limit):
                        item = await anext(iterator)
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    raise self._error(request, limit) from None
                yield item
        finally:
            aclose = getattr(iterator, "aclose", None)
            if aclose is not None:
                await aclose()
