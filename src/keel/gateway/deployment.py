"""The outermost wrapper of one configured model: its name, its model id, its cost.

Everything inside (retry, circuit breaker, limits, timeout, adapter) sees a
request carrying the provider's model id; everything outside sees responses
stamped with the configured name and their cost in USD.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import replace

from keel import tokens
from keel.errors import InputError
from keel.models.base import Model, StreamItem, WrapperModel
from keel.pricing import Price, cost_usd
from keel.types import ChatRequest, EmbeddingResult, ModelResponse

__all__ = ["Deployment"]


class Deployment(WrapperModel):
    def __init__(self, inner: Model, *, name: str, price: Price | None, max_output_tokens: int | None = None) -> None:
        super().__init__(inner)
        self.name = name
        self.price = price
        self.max_output_tokens = max_output_tokens

    def _finish(self, response: ModelResponse) -> ModelResponse:
        return replace(response, cost_usd=cost_usd(self.name, self.price, response.usage), deployment=self.name)

    def _request(self, request: ChatRequest) -> ChatRequest:
        if request.options.logprobs and not self.supports_logprobs:  # refused, never silently dropped
            raise InputError(
                f"model {self.name!r} ({self.provider}) does not return log-probabilities: "
                "ask without logprobs, or use an OpenAI-compatible or local model"
            )
        return request if request.model == self.model_id else request.with_model(self.model_id)

    async def complete(self, request: ChatRequest) -> ModelResponse:
        return self._finish(await self.inner.complete(self._request(request)))

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamItem]:
        async for item in self.inner.stream(self._request(request)):
            yield self._finish(item) if isinstance(item, ModelResponse) else item

    async def embed(self, texts: Sequence[str]) -> EmbeddingResult:
        result = await self.inner.embed(texts)
        return replace(result, cost_usd=cost_usd(self.name, self.price, result.usage))

    def count_tokens(self, request: ChatRequest) -> int:
        return self.inner.count_tokens(self._request(request))

    def fits(self, request: ChatRequest) -> tuple[bool, int | None]:
        """Whether prompt plus requested output fit the context window, and the prompt's tokens if counted.

        Counting is skipped when even the byte bound fits (the usual case).
        """
        if self.context_window is None:
            return True, None
        room = self.context_window - (request.options.max_tokens or 0)
        if tokens.upper_bound(request) <= room:
            return True, None
        prompt = self.count_tokens(request)
        return prompt <= room, prompt
