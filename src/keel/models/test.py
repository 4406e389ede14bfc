"""Scripted models for tests, shipped in the library for users' own tests.

`TestModel` answers from a script: each call takes the next item (text, a
ready `ModelResponse`, or an exception to raise); the last item repeats.
`FunctionModel` answers with a function of the request. Both record every
request they receive, stream in small pieces, and count usage with the
o200k tokenizer, so cost, limits and traces behave as with a real model.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import replace

from keel import tokens
from keel.models.base import Model, StreamItem
from keel.types import ChatRequest, EmbeddingResult, ModelResponse, StreamDelta, ToolCall, Usage

__all__ = ["FunctionModel", "ScriptItem", "TestModel"]

ScriptItem = str | ModelResponse | BaseException


class _RecordingModel(Model):
    provider = "test"

    def __init__(self, model_id: str, *, context_window: int | None, delay: float, chunk_chars: int) -> None:
        super().__init__(model_id, context_window=context_window)
        self.requests: list[ChatRequest] = []
        self.delay = delay
        self.chunk_chars = chunk_chars

    async def _answer(self, request: ChatRequest) -> ModelResponse:
        raise NotImplementedError

    async def complete(self, request: ChatRequest) -> ModelResponse:
        self.requests.append(request)
        if self.delay:
            await asyncio.sleep(self.delay)
        return self._fill(request, await self._answer(request))

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamItem]:
        response = await self.complete(request)
        for start in range(0, len(response.text), self.chunk_chars):
            yield StreamDelta(text=response.text[start : start + self.chunk_chars])
        for index, call in enumerate(response.tool_calls):
            yield StreamDelta(
                tool_call_index=index, tool_call_id=call.id, tool_name=call.name, tool_arguments=call.arguments
            )
        yield response

    async def embed(self, texts: Sequence[str]) -> EmbeddingResult:
        """Deterministic 8-dimensional vectors from character statistics."""
        vectors = [[float((sum(map(ord, t)) * (i + 1)) % 97) / 97 for i in range(8)] for t in texts]
        used = sum(tokens.count_text(t) for t in texts)
        return EmbeddingResult(vectors, Usage(input_tokens=used), self.model_id, self.provider)

    def _fill(self, request: ChatRequest, response: ModelResponse) -> ModelResponse:
        usage = response.usage
        if usage == Usage():
            out = tokens.count_text(response.text) + sum(tokens.count_text(c.arguments) for c in response.tool_calls)
            usage = Usage(input_tokens=tokens.request_tokens(request), output_tokens=out)
        return replace(response, usage=usage, model=response.model or self.model_id, provider=self.provider)

    def count_tokens(self, request: ChatRequest) -> int:
        return tokens.request_tokens(request)

    @property
    def exact_token_count(self) -> bool:
        return True


class TestModel(_RecordingModel):
    """Answers from a script; exceptions in the script are raised."""

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        script: ScriptItem | Sequence[ScriptItem] = "ok",
        *,
        model_id: str = "test",
        context_window: int | None = None,
        delay: float = 0.0,
        chunk_chars: int = 4,
    ) -> None:
        super().__init__(model_id, context_window=context_window, delay=delay, chunk_chars=chunk_chars)
        items = [script] if isinstance(script, (str, ModelResponse, BaseException)) else list(script)
        if not items:
            raise ValueError("TestModel needs at least one script item")
        self.script: list[ScriptItem] = items
        self.calls = 0

    async def _answer(self, request: ChatRequest) -> ModelResponse:
        item = self.script[min(self.calls, len(self.script) - 1)]
        self.calls += 1
        if isinstance(item, BaseException):
            raise item
        if isinstance(item, str):
            return ModelResponse(text=item)
        return item

    @staticmethod
    def tool_call(name: str, arguments: str, call_id: str = "call_1") -> ModelResponse:
        """A scripted answer that calls one tool."""
        return ModelResponse(text="", tool_calls=(ToolCall(call_id, name, arguments),), finish_reason="tool_calls")


Responder = Callable[[ChatRequest], "str | ModelResponse | Awaitable[str | ModelResponse]"]


class FunctionModel(_RecordingModel):
    """Answers with `function(request)` (sync or async)."""

    def __init__(
        self,
        function: Responder,
        *,
        model_id: str = "function",
        context_window: int | None = None,
        delay: float = 0.0,
        chunk_chars: int = 4,
    ) -> None:
        super().__init__(model_id, context_window=context_window, delay=delay, chunk_chars=chunk_chars)
        self.function = function

    async def _answer(self, request: ChatRequest) -> ModelResponse:
        result = self.function(request)
        if inspect.isawaitable(result):
            result = await result
        return ModelResponse(text=result) if isinstance(result, str) else result
