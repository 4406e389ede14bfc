"""OpenAI Chat Completions, and every server that speaks it (vLLM, Ollama,
llama.cpp server, Groq, Together, keel itself): set `base_url`.

The SDK's own retries are off: keel's retry wrapper decides, so that attempts
are counted and traced in one place.

A non-streamed call goes through the SDK's transport (auth, base URL, timeouts,
its status errors) but not its typed layer: keel builds the JSON body itself and
reads the JSON answer as a dict, which costs a fraction of the SDK's parameter
transform and response models (about 0.9 ms of CPU less per call, measured in
benchmarks/proxy_throughput.py), and the SDK's aiohttp transport, its documented
choice for concurrency (`openai[aiohttp]`; another 0.7 ms).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx2
import openai

from keel import tokens
from keel.errors import ContextWindowExceeded, MalformedResponse, ProviderError
from keel.models._http import connection_error, malformed_error, parse_retry_after, status_error, timeout_error
from keel.models.base import Model, StreamItem
from keel.types import (
    ChatRequest,
    EmbeddingResult,
    ModelResponse,
    StreamDelta,
    TokenLogprob,
    ToolCall,
    TopLogprob,
    Usage,
)

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
        "logprobs": o.logprobs or None,
        "top_logprobs": o.top_logprobs if o.logprobs else None,
    }
    body.update({k: v for k, v in optional.items() if v is not None})
    if o.response_format is not None:
        fmt = o.response_format
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": fmt.name, "schema": dict(fmt.schema), "strict": fmt.strict},
        }
    return body


def _token_bytes(raw: Any) -> tuple[int, ...] | None:
    return tuple(int(b) for b in raw) if isinstance(raw, list) else None


def logprobs_from_openai(raw: Any) -> tuple[TokenLogprob, ...] | None:
    """`choices[i].logprobs` of an OpenAI answer (a dict, or the SDK's object) as keel values; None when absent."""
    if raw is None:
        return None
    content = raw.get("content") if isinstance(raw, dict) else getattr(raw, "content", None)
    if content is None:
        return None
    out = []
    for item in content:
        entry = item if isinstance(item, dict) else item.model_dump()
        tops = tuple(
            TopLogprob(t["token"], float(t["logprob"]), _token_bytes(t.get("bytes")))
            for t in entry.get("top_logprobs") or []
        )
        out.append(TokenLogprob(entry["token"], float(entry["logprob"]), _token_bytes(entry.get("bytes")), tops))
    return tuple(out)


def _usage_dict(raw: dict[str, Any] | None) -> Usage:
    if not raw:
        return Usage()
    return Usage(
        input_tokens=raw.get("prompt_tokens") or 0,
        output_tokens=raw.get("completion_tokens") or 0,
        cached_input_tokens=(raw.get("prompt_tokens_details") or {}).get("cached_tokens") or 0,
        reasoning_tokens=(raw.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0,
    )


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


def _refused(exc: Exception) -> bool:
    """The aiohttp transport reports a refused connection as a connect timeout; it is not one."""
    return "Connect call failed" in str(exc.__cause__ or "")


def translate_error(exc: Exception, provider: str, model: str) -> ProviderError | ContextWindowExceeded:
    """An openai SDK exception as a keel error."""
    if isinstance(exc, openai.APITimeoutError) and not _refused(exc):
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
    supports_logprobs = True  # passed through; an upstream that gives none answers without them

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
        self.client = openai.AsyncOpenAI(
            api_key=api_key,
            base_url=base_url,
            max_retries=0,
            timeout=timeout,
            http_client=openai.DefaultAioHttpClient(),
        )
        self._encoding = tokens.encoding_for(model_id)

    def _create_kwargs(self, request: ChatRequest) -> dict[str, Any]:
        kwargs = request_body(request)
        if request.options.timeout is not None:
            kwargs["timeout"] = request.options.timeout
        return kwargs

    async def complete(self, request: ChatRequest) -> ModelResponse:
        options: dict[str, Any] = {}
        if request.options.timeout is not None:
            options["timeout"] = request.options.timeout
        try:
            raw = await self.client.post(  # type: ignore[call-overload]
                "/chat/completions", body=request_body(request), options=options, cast_to=httpx2.Response
            )
            return self._response(json.loads(raw.content))
        except ProviderError:
            raise
        except Exception as exc:
            raise translate_error(exc, self.provider, request.model) from exc

    def _response(self, raw: Any) -> ModelResponse:
        if not isinstance(raw, dict) or not raw.get("choices"):
            model = raw.get("model") if isinstance(raw, dict) else None
            raise MalformedResponse("the answer has no choices", provider=self.provider, model=model)
        choice = raw["choices"][0]
        message = choice.get("message") or {}
        calls = tuple(
            ToolCall(c["id"], c["function"]["name"], c["function"].get("arguments") or "{}")
            for c in (message.get("tool_calls") or [])
        )
        return ModelResponse(
            text=message.get("content") or "",
            tool_calls=calls,
            finish_reason=choice.get("finish_reason") or "stop",
            usage=_usage_dict(raw.get("usage")),
            model=raw.get("model") or "",
            provider=self.provider,
            logprobs=logprobs_from_openai(choice.get("logprobs")),
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
        logprobs: list[TokenLogprob] | None = None
        async for chunk in stream:
            model = chunk.model or model
            if chunk.usage is not None:
                usage = _usage(chunk.usage)
            for choice in chunk.choices:
                finish = choice.finish_reason or finish
                delta = choice.delta
                pieces = logprobs_from_openai(choice.logprobs) or ()
                if pieces:
                    logprobs = logprobs or []
                    logprobs.extend(pieces)
                if delta.content or pieces:
                    text.append(delta.content or "")
                    yield StreamDelta(text=delta.content or "", logprobs=pieces)
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
        lps = None if logprobs is None else tuple(logprobs)
        yield ModelResponse("".join(text), tool_calls, finish, usage, model, self.provider, logprobs=lps)

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
