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

A stream is an answer only when it ends with a finish reason: a stream cut
short, a 200 that is not server-sent events, and an error event inside the
stream are provider errors, so that the wrappers retry or fall back before
the first piece reaches the caller and report an error after it.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx2
import openai

from keel import tokens
from keel.errors import ContextWindowExceeded, MalformedResponse, ProviderError, error_for_status
from keel.models._http import connection_error, malformed_error, parse_retry_after, status_error, timeout_error
from keel.models.base import Model, StreamItem, usage_or_estimate
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


def _field(raw: Any, name: str) -> Any:
    return raw.get(name) if isinstance(raw, dict) else getattr(raw, name, None)


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


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _usage(
    model: Model, request: ChatRequest, raw: Any, text: str, calls: Sequence[ToolCall], encoding: str | None
) -> Usage:
    """The answer's `usage` (a dict, or the SDK's object in a stream); the counts it lacks are counted here."""
    return usage_or_estimate(
        model, request,
        input_tokens=_count(_field(raw, "prompt_tokens")), output_tokens=_count(_field(raw, "completion_tokens")),
        text=text, tool_calls=calls, encoding=encoding,
        cached_input_tokens=_count(_field(_field(raw, "prompt_tokens_details"), "cached_tokens")) or 0,
        reasoning_tokens=_count(_field(_field(raw, "completion_tokens_details"), "reasoning_tokens")) or 0,
    )  # fmt: skip


def _is_context_overflow(exc: openai.APIStatusError) -> bool:
    body = exc.body if isinstance(exc.body, dict) else {}
    code = body.get("code") or (body.get("error") or {}).get("code") if isinstance(body, dict) else None
    text = str(exc.message).lower()
    return code == "context_length_exceeded" or "context length" in text or "context_length_exceeded" in text


# The HTTP status an error *event* inside a 200 stream stands for, by its `type` or `code`.
_ERROR_TYPE_STATUS = {
    "invalid_request_error": 400,
    "context_length_exceeded": 400,
    "authentication_error": 401,
    "invalid_api_key": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "model_not_found": 404,
    "timeout": 408,
    "rate_limit_error": 429,
    "rate_limit_exceeded": 429,
    "insufficient_quota": 429,
    "server_error": 500,
    "api_error": 500,
    "service_unavailable": 503,
    "overloaded_error": 529,
}


def _event_status(body: dict[str, Any]) -> int:
    """The status of an error event: vLLM, TGI and LiteLLM put the HTTP status in `code`, OpenAI a name."""
    for key in ("status", "code"):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and 400 <= value <= 599:
            return value
    for key in ("code", "type"):
        status = _ERROR_TYPE_STATUS.get(str(body.get(key)))
        if status is not None:
            return status
    return 500  # an upstream that gives up mid-answer without saying why: its own failure


def event_error(body: object, message: str, provider: str, model: str) -> ProviderError | ContextWindowExceeded:
    """An error event inside a 200 stream (or a 200 JSON error body) as the keel error of its status."""
    fields = body if isinstance(body, dict) else {}
    if fields.get("code") == "context_length_exceeded":
        return ContextWindowExceeded(f"{provider} {model}: {message}")
    status = _event_status(fields)
    return error_for_status(status)(
        f"{provider} sent an error event ({status}): {message}",
        provider=provider,
        model=model,
        status=status,
        body=body,
    )


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
    if isinstance(exc, openai.APIError):  # the SDK raises the bare class for an error event in a stream
        return event_error(exc.body, exc.message, provider, model)
    raise exc


def _is_event_stream(response: Any) -> bool:
    return "text/event-stream" in (response.headers.get("content-type") or "")


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
            return self._response(json.loads(raw.content), request)
        except ProviderError:
            raise
        except Exception as exc:
            raise translate_error(exc, self.provider, request.model) from exc

    def _response(self, raw: Any, request: ChatRequest) -> ModelResponse:
        if not isinstance(raw, dict) or not raw.get("choices"):
            model = raw.get("model") if isinstance(raw, dict) else None
            raise MalformedResponse("the answer has no choices", provider=self.provider, model=model)
        choice = raw["choices"][0]
        message = choice.get("message") or {}
        calls = tuple(
            ToolCall(c["id"], c["function"]["name"], c["function"].get("arguments") or "{}")
            for c in (message.get("tool_calls") or [])
        )
        text = message.get("content") or ""
        return ModelResponse(
            text=text,
            tool_calls=calls,
            finish_reason=choice.get("finish_reason") or "stop",
            usage=_usage(self, request, raw.get("usage"), text, calls, self._encoding),
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
            events = _is_event_stream(stream.response)
            items = self._stream_items(stream, request) if events else self._whole(stream, request)
            async for item in items:
                yield item
        except (ProviderError, ContextWindowExceeded):
            raise
        except AttributeError as exc:  # a chunk whose shape surprises the reader: the provider's, not keel's, fault
            raise malformed_error(self.provider, request.model, repr(exc)) from exc
        except Exception as exc:
            raise translate_error(exc, self.provider, request.model) from exc

    async def _whole(self, stream: Any, request: ChatRequest) -> AsyncIterator[StreamItem]:
        """A stream request answered without server-sent events. A whole completion is still an answer
        (some compatible servers ignore `stream`); an error body is that error; anything else is malformed."""
        response = stream.response
        body = await response.aread()
        await response.aclose()
        try:
            raw = json.loads(body)
        except ValueError:
            kind = response.headers.get("content-type") or "no content type"
            raise MalformedResponse(
                f"{self.provider} answered a stream request with {kind}, not server-sent events: {body[:200]!r}",
                provider=self.provider,
                model=request.model,
            ) from None
        if isinstance(raw, dict) and isinstance(raw.get("error"), dict):
            error = raw["error"]
            raise event_error(error, str(error.get("message") or "no message"), self.provider, request.model)
        answer = self._response(raw, request)
        if answer.text:
            yield StreamDelta(text=answer.text)
        for i, call in enumerate(answer.tool_calls):
            yield StreamDelta(
                tool_call_index=i, tool_call_id=call.id, tool_name=call.name, tool_arguments=call.arguments
            )
        yield answer

    async def _stream_items(self, stream: Any, request: ChatRequest) -> AsyncIterator[StreamItem]:
        text: list[str] = []
        calls: dict[int, dict[str, str]] = {}
        usage: Any = None
        finish: str | None = None
        model = ""
        logprobs: list[TokenLogprob] | None = None
        async for chunk in stream:
            model = chunk.model or model
            if chunk.usage is not None:
                usage = chunk.usage
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
        if finish is None:  # the upstream stopped without finishing: never pass a partial answer off as whole
            raise MalformedResponse(
                f"{self.provider} ended the stream without a finish reason: the answer is incomplete "
                f"({sum(map(len, text))} characters received)",
                provider=self.provider,
                model=model or None,
            )
        tool_calls = tuple(ToolCall(c["id"], c["name"], c["arguments"] or "{}") for _, c in sorted(calls.items()))
        answer = "".join(text)
        usage_out = _usage(self, request, usage, answer, tool_calls, self._encoding)
        lps = None if logprobs is None else tuple(logprobs)
        yield ModelResponse(answer, tool_calls, finish, usage_out, model, self.provider, logprobs=lps)

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
