"""The one interface every model adapter and every wrapper implements.

An adapter needs only `complete`. Streaming, embeddings and exact token
counting are optional: the defaults here stream a completed answer as one
piece, refuse embeddings, and count tokens with the documented
approximation in `keel.tokens`.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Sequence

from keel import tokens
from keel.types import ChatRequest, EmbeddingResult, ModelResponse, StreamDelta, ToolCall, Usage

__all__ = ["Model", "StreamItem", "WrapperModel", "usage_or_estimate"]

log = logging.getLogger("keel.models")

StreamItem = StreamDelta | ModelResponse
"""A stream yields deltas and ends with exactly one ModelResponse."""


class Model(ABC):
    """One deployment: a provider client plus the model id it calls."""

    #: `gen_ai.provider.name` (OpenTelemetry GenAI): openai, anthropic, gcp.gemini, local, test...
    provider: str = "unknown"
    #: Whether answers can carry per-token log-probabilities (`ChatOptions.logprobs`).
    supports_logprobs: bool = False

    def __init__(self, model_id: str, *, context_window: int | None = None) -> None:
        self.model_id = model_id
        self.context_window = context_window

    @abstractmethod
    async def complete(self, request: ChatRequest) -> ModelResponse:
        """Make one provider call. Raise `keel.errors.ProviderError` subclasses."""

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamItem]:
        response = await self.complete(request)
        if response.text:
            yield StreamDelta(text=response.text)
        yield response

    async def embed(self, texts: Sequence[str]) -> EmbeddingResult:
        raise NotImplementedError(f"{self.provider} model {self.model_id!r} does not embed")

    def count_tokens(self, request: ChatRequest) -> int:
        """Input tokens of `request` before it is sent (approximate by default)."""
        return tokens.approx_request_tokens(request)

    @property
    def exact_token_count(self) -> bool:
        return False

    async def aclose(self) -> None:  # noqa: B027 - optional, most adapters hold nothing
        """Release connections; the default has none."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.model_id!r})"


class WrapperModel(Model):
    """A model that adds behaviour around another one (retry, limits, ...)."""

    def __init__(self, inner: Model) -> None:
        super().__init__(inner.model_id, context_window=inner.context_window)
        self.inner = inner
        self.provider = inner.provider
        self.supports_logprobs = inner.supports_logprobs

    async def complete(self, request: ChatRequest) -> ModelResponse:
        return await self.inner.complete(request)

    def stream(self, request: ChatRequest) -> AsyncIterator[StreamItem]:
        return self.inner.stream(request)

    async def embed(self, texts: Sequence[str]) -> EmbeddingResult:
        return await self.inner.embed(texts)

    def count_tokens(self, request: ChatRequest) -> int:
        return self.inner.count_tokens(request)

    @property
    def exact_token_count(self) -> bool:
        return self.inner.exact_token_count

    async def aclose(self) -> None:
        await self.inner.aclose()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.inner!r})"


def usage_or_estimate(
    model: Model,
    request: ChatRequest,
    *,
    input_tokens: int | None,
    output_tokens: int | None,
    text: str,
    tool_calls: Sequence[ToolCall] = (),
    cached_input_tokens: int = 0,
    reasoning_tokens: int = 0,
    encoding: str | None = None,
) -> Usage:
    """The usage the provider reported; a count it left out (None) is counted here and the usage marked
    `estimated`. So is a zero where there must be tokens (a prompt; an answer with text).

    A call must never cost nothing because an upstream sent no usage: its cost would be taken as zero
    and any budget passed. The prompt is counted as before the call (`model.count_tokens`), the answer
    under `encoding` (None: the approximation of keel.tokens). Should counting itself fail, the usage is
    estimated with no tokens at all, and the gateway keeps the call's reserved worst case instead.
    """
    answered = bool(text or tool_calls)
    # Zero is no count where there must be tokens: some servers send zeros instead of leaving usage out.
    input_tokens = input_tokens or None
    output_tokens = None if output_tokens == 0 and answered else output_tokens
    if output_tokens is None and not answered:
        output_tokens = 0  # nothing came back: zero is exact (Gemini omits the count of an empty answer)
    if input_tokens is not None and output_tokens is not None:
        return Usage(input_tokens, output_tokens, cached_input_tokens, reasoning_tokens)
    try:
        if input_tokens is None:
            input_tokens = model.count_tokens(request)
        if output_tokens is None:
            answer = " ".join([text, *(part for call in tool_calls for part in (call.name, call.arguments))])
            output_tokens = tokens.completion_tokens(answer.strip(), encoding)
    except Exception:
        log.exception("%s sent no usage and counting the tokens failed: the reserved worst case is kept", model)
        return Usage(estimated=True)
    return Usage(input_tokens, output_tokens, cached_input_tokens, reasoning_tokens, estimated=True)
