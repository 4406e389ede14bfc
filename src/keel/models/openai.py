"""OpenAI Chat Completions, and every server that speaks it (vLLM, Ollama,
llama.cpp server, Groq, Together, keel itself): set `base_url`.

The SDK's own retries are off: keel's retry wrapper decides, so that attempts
are counted and traced in one place.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

import openai

from keel import tokens
from keel.errors import ContextWindowExceeded, MalformedResponse, ProviderError
from keel.models._http import connection_error, malformed_error, parse_retry_after, status_error, timeout_error
from keel.models.base import Model, StreamItem
from keel.types import ChatRequest, EmbeddingResult, ModelResponse, StreamDelta, ToolCall, Usage

__all__ = ["OpenAIModel", "request_body", "translate_error"]


def _tool_choice(choice: str | None) -> Any:
    if choice is None or choice in ("auto", "none", "required"):
        return choice
    return {"type": "function", "function": {"name": choice}}


def request_body(request: ChatRequest) -> dict[str, Any]:
    """The Chat Completions body for a keel request (also used by the server tests)."""
    o = request.options
    body: dict[str, Any] = {"model": request.model, "messages": [m.to_openai() for m in request.messages]}
    optional = {
        "temperature": o.temperature,
        "max_tokens": o.max_tokens,
        "seed": o.seed,
        "top_p": o.top_p,
        "stop": list(o.stop) or None,
        "tools": [t.to_openai() for t in o.tools] or None,
        "tool_choice": _tool_choice(o.tool_choice),
    }
    body.update({k: v for k, v in optional.items() if v is not None})
    if o.response_format is not None:
        fmt = o.response_format
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": fmt.name, "schema": dict(fmt.schema), "strict": fmt.strict},
        }
    return body


def _usage(raw: Any) -> Usage:
    if raw is None:
        return Usage()
    prompt_details = getattr(raw, "prompt_tokens_details", None)
    completion_details = getattr(raw, "completion_tokens_details", None)
    return Usage(
        input_tokens=raw.prompt_tokens or 0,
        output_tokens=raw.completion_tokens or 0,
        cached_input_tokens=(getattr(prompt_details, "cached_tokens", None) or 0),
        reasoning_tokens=(getattr(completion_details, "reasoning_tokens", None) or 0),
    )


def _is_context_overflow(exc: openai.APIStatusError) -> bool:
    body = exc.body if isinstance(exc.body, dict) else {}
    code = body.get("code") or (body.get("error") or {}).get("code") if isinstance(body, dict) else None
    text = str(exc.message).lower()
    return code == "context_length_exceeded" or "context length" in text or "context_length_exceeded" in text


def translate_error(exc: Exception, provider: str, model: str) -> ProviderError | ContextWindowExceeded:
    """An openai SDK exception as a keel error."""
    if isinstance(exc, openai.APITimeoutError):
        return timeout_error(provider, model)
    if isinstance(exc, openai.APIConnectionError):
        return connection_error(provider, model, exc.__cause__ or exc)
    if isinstance(exc, openai.APIStatusError):
        if exc.status_code == 400 and _is_context_overflow(exc):
            return ContextWindowExceeded(f"{provider} {model}: {exc.message}")
        retry_after = parse_retry_after(exc.response.headers)
        return status_error(provider, model, exc.status_code, exc.message, retry_after=retry_after, body=exc.body)
    if isinstance(exc, (openai.APIResponseValidationError, json.JSONDecodeError, ValueError, KeyError, TypeError)):
        return malformed_error(provider, model, exc)
    raise exc


class OpenAIModel(Model):
    provider = "openai"

    def __init__(
        self,
        model_id: str,
        *,
        api_key: str,
        base_url: str | None = None,
        timeout: float = 60.0,
        context_window: int | None = None,
        provider_name: str | None = None,
    ) -> None:
        super().__init__(model_id, context_window=context_window)
        if provider_name:
            self.provider = provider_name
        self.client = openai.AsyncOpenAI(api_key=api_key, base_url=base_url, max_retries=0, timeout=timeout)
        self._encoding = tokens.encoding_for(model_id)

    def _create_kwargs(self, request: ChatRequest) -> dict[str, Any]:
        kwargs = request_body(request)
        if request.options.timeout is not None:
            kwargs["timeout"] = request.options.timeout
        return kwargs

    async def complete(self, request: ChatRequest) -> ModelResponse:
        try:
            raw = await self.client.chat.completions.create(**self._create_kwargs(request))
            return self._response(raw)
        except Exception as exc:
            raise translate_error(exc, self.provider, request.model) from exc

    def _response(self, raw: Any) -> ModelResponse:
        if not raw.choices:
            raise MalformedResponse("the answer has no choices", provider=self.provider, model=raw.model)
        choice = raw.choices[0]
        calls = tuple(
            ToolCall(c.id, c.function.name, c.function.arguments or "{}") for c in (choice.message.tool_calls or [])
        )
        return ModelResponse(
            text=choice.message.content or "",
            tool_calls=calls,
            finish_reason=choice.finish_reason or "stop",
            usage=_usage(raw.usage),
            model=raw.model or "",
            provider=self.provider,
        )

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamItem]:
        kwargs = self._create_kwargs(request)
        kwargs["stream"] = True
        kwargs["stream_options"] = {"include_usage": True}
        try:
            stream = await self.client.chat.completions.create(**kwargs)
            async for item in self._stream_items(stream):
                yield item
        except ProviderError:
            raise
        except Exception as exc:
            raise translate_error(exc, self.provider, request.model) from exc

    async def _stream_items(self, stream: Any) -> AsyncIterator[StreamItem]:
        text: list[str] = []
        calls: dict[int, dict[str, str]] = {}
        usage = Usage()
        finish = "stop"
        model = ""
        async for chunk in stream:
            model = chunk.model or model
            if chunk.usage is not None:
                usage = _usage(chunk.usage)
            for choice in chunk.choices:
                finish = choice.finish_reason or finish
                delta = choice.delta
                if delta.content:
                    text.append(delta.content)
                    yield StreamDelta(text=delta.content)
                for piece in delta.tool_calls or []:
                    call = calls.setdefault(piece.index, {"id": "", "name": "", "arguments": ""})
                    fn = piece.function
                    call["id"] = piece.id or call["id"]
                    call["name"] = (fn.name if fn and fn.name else "") or call["name"]
                    call["arguments"] += (fn.arguments if fn and fn.arguments else "") or ""
                    yield StreamDelta(
                        tool_call_index=piece.index,
                        tool_call_id=piece.id,
                        tool_name=fn.name if fn else None,
                        tool_arguments=(fn.arguments if fn else "") or "",
                    )
        tool_calls = tuple(ToolCall(c["id"], c["name"], c["arguments"] or "{}") for _, c in sorted(calls.items()))
        yield ModelResponse("".join(text), tool_calls, finish, usage, model, self.provider)

    async def embed(self, texts: Sequence[str]) -> EmbeddingResult:
        try:
            raw = await self.client.embeddings.create(model=self.model_id, input=list(texts))
        except Exception as exc:
            raise translate_error(exc, self.provider, self.model_id) from exc
        vectors = [list(d.embedding) for d in sorted(raw.data, key=lambda d: d.index)]
        usage = Usage(input_tokens=raw.usage.prompt_tokens if raw.usage else 0)
        return EmbeddingResult(vectors, usage, raw.model or self.model_id, self.provider)

    def count_tokens(self, request: ChatRequest) -> int:
        if self._encoding is None:
            return tokens.approx_request_tokens(request)
        return tokens.request_tokens(request, self._encoding)

    @property
    def exact_token_count(self) -> bool:
        return self._encoding is not None

    async def aclose(self) -> None:
        await self.client.close()
