"""Gemini API (Google AI Studio), on the official `google-genai` SDK.

Gemini's wire shape differs from OpenAI's where callers would otherwise trip:

- the assistant role is "model" and system prompts are `system_instruction`;
- a tool result (`function_response`) must name its function, which keel's
  tool messages do not carry: it is found from the earlier assistant tool call
  with the same id;
- the API often returns function calls without an id: keel makes one up so
  the tool result can point back at its call;
- thinking models attach a `thought_signature` to function calls that must be
  sent back with them. keel's `ToolCall` has no field for it, so the adapter
  remembers signatures by call id (bounded), and for calls it has not seen
  (another process, another provider) sends Google's documented placeholder
  that skips the check;
- structured output is native (`response_mime_type` + `response_json_schema`),
  so the JSON arrives as plain text.

The SDK's retries are off (one attempt) and so is its automatic function
calling: keel's wrappers decide both. SDK and transport exceptions are
translated to `keel.errors` here and nowhere else.
"""

from __future__ import annotations

import importlib
import json
import math
import re
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pydantic
from google import genai
from google.genai import errors as genai_errors
from google.genai import types as gtypes

from keel import tokens
from keel.errors import (
    ContextWindowExceeded,
    InvalidMessages,
    KeelError,
    MalformedResponse,
)
from keel.models._http import connection_error, malformed_error, parse_retry_after, status_error, timeout_error
from keel.models.base import Model, StreamItem, usage_or_estimate
from keel.types import ChatOptions, ChatRequest, EmbeddingResult, Message, ModelResponse, StreamDelta, ToolCall, Usage

__all__ = ["GeminiModel", "translate_error"]

#: Google's documented placeholder for a function call whose signature is unknown.
SKIP_SIGNATURE = b"skip_thought_signature_validator"
_SIGNATURE_MEMORY = 4096
_EMBED_BATCH = 100  # batchEmbedContents accepts at most 100 requests

_FINISH_REASONS = {
    "STOP": "stop",
    "MAX_TOKENS": "length",
    "SAFETY": "content_filter",
    "RECITATION": "content_filter",
    "LANGUAGE": "content_filter",
    "BLOCKLIST": "content_filter",
    "PROHIBITED_CONTENT": "content_filter",
    "SPII": "content_filter",
    "IMAGE_SAFETY": "content_filter",
    "IMAGE_PROHIBITED_CONTENT": "content_filter",
    "IMAGE_RECITATION": "content_filter",
    "MODEL_ARMOR": "content_filter",
    "MALFORMED_FUNCTION_CALL": "error",
    "UNEXPECTED_TOOL_CALL": "error",
    "TOO_MANY_TOOL_CALLS": "error",
    "MISSING_THOUGHT_SIGNATURE": "error",
    "MALFORMED_RESPONSE": "error",
    "OTHER": "error",
}


# --- request ---------------------------------------------------------------------------


def _call_names(messages: Iterable[Message]) -> dict[str, str]:
    return {call.id: call.name for m in messages for call in m.tool_calls}


def _args(call: ToolCall) -> dict[str, Any]:
    try:
        value = json.loads(call.arguments or "{}")
    except json.JSONDecodeError as exc:
        raise InvalidMessages(f"tool call {call.id!r} ({call.name}) has arguments that are not JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise InvalidMessages(f"tool call {call.id!r} ({call.name}): Gemini needs a JSON object as arguments")
    return value


def _tool_result(message: Message, names: dict[str, str]) -> gtypes.Part:
    call_id = message.tool_call_id or ""
    name = names.get(call_id) or message.name
    if not name:
        raise InvalidMessages(f"tool result {call_id!r} answers no earlier tool call: Gemini needs the function name")
    # Google's convention: the function's output under "output".
    response = gtypes.FunctionResponse(id=call_id, name=name, response={"output": message.content or ""})
    return gtypes.Part(function_response=response)


@dataclass
class _Signatures:
    """Thought signatures of function calls, by call id, oldest forgotten first."""

    limit: int = _SIGNATURE_MEMORY
    by_id: OrderedDict[str, bytes] = field(default_factory=OrderedDict)

    def remember(self, call_id: str, signature: bytes | None) -> None:
        if signature:
            self.by_id[call_id] = signature
            self.by_id.move_to_end(call_id)
            while len(self.by_id) > self.limit:
                self.by_id.popitem(last=False)

    def get(self, call_id: str) -> bytes | None:
        return self.by_id.get(call_id)


def _assistant_parts(message: Message, signatures: _Signatures) -> list[gtypes.Part]:
    parts = [gtypes.Part(text=message.content)] if message.content else []
    for i, call in enumerate(message.tool_calls):
        # Only the first call of a turn carries a signature (parallel calls share it).
        signature = signatures.get(call.id) or (SKIP_SIGNATURE if i == 0 else None)
        function_call = gtypes.FunctionCall(id=call.id, name=call.name, args=_args(call))
        parts.append(gtypes.Part(function_call=function_call, thought_signature=signature))
    return parts


def map_messages(messages: Sequence[Message], signatures: _Signatures) -> tuple[str | None, list[gtypes.Content]]:
    """The system instruction and the contents for a keel conversation (same-role turns merged)."""
    names = _call_names(messages)
    system: list[str] = []
    contents: list[gtypes.Content] = []
    for message in messages:
        if message.role == "system":
            system.append(message.content or "")
            continue
        if message.role == "assistant":
            role, parts = "model", _assistant_parts(message, signatures)
        elif message.role == "tool":
            role, parts = "user", [_tool_result(message, names)]
        else:
            role, parts = "user", [gtypes.Part(text=message.content)] if message.content else []
        if not parts:
            continue
        if contents and contents[-1].role == role and contents[-1].parts is not None:
            contents[-1].parts.extend(parts)
        else:
            contents.append(gtypes.Content(role=role, parts=parts))
    return ("\n\n".join(system) if system else None), contents


def _tool_config(choice: str | None) -> gtypes.ToolConfig | None:
    if choice is None:
        return None
    modes = {
        "auto": gtypes.FunctionCallingConfigMode.AUTO,
        "required": gtypes.FunctionCallingConfigMode.ANY,
        "none": gtypes.FunctionCallingConfigMode.NONE,
    }
    if choice in modes:
        config = gtypes.FunctionCallingConfig(mode=modes[choice])
    else:
        any_mode = gtypes.FunctionCallingConfigMode.ANY
        config = gtypes.FunctionCallingConfig(mode=any_mode, allowed_function_names=[choice])
    return gtypes.ToolConfig(function_calling_config=config)


def _tools(options: ChatOptions) -> gtypes.ToolListUnion | None:
    if not options.tools:
        return None
    declarations = [
        gtypes.FunctionDeclaration(
            name=t.name, description=t.description or None, parameters_json_schema=dict(t.parameters)
        )
        for t in options.tools
    ]
    return [gtypes.Tool(function_declarations=declarations)]


def generate_config(
    request: ChatRequest, system: str | None, *, max_output_tokens: int | None
) -> gtypes.GenerateContentConfig:
    """The `GenerateContentConfig` for a keel request."""
    o = request.options
    fmt = o.response_format
    return gtypes.GenerateContentConfig(
        system_instruction=system,
        temperature=o.temperature,
        top_p=o.top_p,
        seed=o.seed,
        max_output_tokens=o.max_tokens or max_output_tokens,
        stop_sequences=list(o.stop) or None,
        tools=_tools(o),
        tool_config=_tool_config(o.tool_choice) if o.tools else None,
        response_mime_type="application/json" if fmt is not None else None,
        response_json_schema=dict(fmt.schema) if fmt is not None else None,
        automatic_function_calling=gtypes.AutomaticFunctionCallingConfig(disable=True),
        http_options=gtypes.HttpOptions(timeout=_millis(o.timeout)) if o.timeout is not None else None,
    )


def _millis(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


# --- response ----------------------------------------------------------------------------


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) else None


def usage_from(model: Model, request: ChatRequest, metadata: Any, text: str, calls: Sequence[ToolCall]) -> Usage:
    """keel usage: the prompt count already includes cached tokens; output includes thoughts.
    A count the answer left out is counted by keel (see `usage_or_estimate`)."""

    def field(name: str) -> int | None:  # None when the metadata or the count is missing
        return _count(getattr(metadata, name, None))

    prompt, answer = field("prompt_token_count"), field("candidates_token_count")
    thoughts = field("thoughts_token_count") or 0
    return usage_or_estimate(
        model, request,
        input_tokens=None if prompt is None else prompt + (field("tool_use_prompt_token_count") or 0),
        output_tokens=None if answer is None else answer + thoughts, text=text, tool_calls=calls,
        cached_input_tokens=field("cached_content_token_count") or 0, reasoning_tokens=thoughts,
    )  # fmt: skip


def _enum_name(value: Any) -> str | None:
    if value is None:
        return None
    return str(getattr(value, "value", value))


def finish_reason(raw: str | None, *, has_tool_calls: bool) -> str:
    reason = _FINISH_REASONS.get(raw or "STOP", "stop")
    return "tool_calls" if has_tool_calls and reason == "stop" else reason


@dataclass
class _Answer:
    """The parts of one answer (or of all chunks of a stream) folded together."""

    text: list[str] = field(default_factory=list)
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish: str | None = None
    blocked: bool = False
    answered: bool = False  # a candidate or a prompt block seen: a real answer has one
    usage: Any = None
    model: str = ""

    def add_chunk(self, chunk: gtypes.GenerateContentResponse, signatures: _Signatures) -> list[StreamDelta]:
        """Fold one response (or stream chunk) in; return the deltas it adds."""
        self.usage = chunk.usage_metadata or self.usage
        self.model = chunk.model_version or self.model
        if not chunk.candidates:
            feedback = chunk.prompt_feedback
            self.blocked = self.blocked or bool(feedback is not None and feedback.block_reason)
            self.answered = self.answered or self.blocked
            return []
        candidate = chunk.candidates[0]
        self.answered = self.answered or candidate.content is not None or candidate.finish_reason is not None
        self.finish = _enum_name(candidate.finish_reason) or self.finish
        parts = candidate.content.parts if candidate.content is not None else None
        return [d for part in parts or () if (d := self._add_part(part, signatures)) is not None]

    def _add_part(self, part: gtypes.Part, signatures: _Signatures) -> StreamDelta | None:
        if part.function_call is not None:
            call = part.function_call
            call_id = call.id or f"call_{uuid.uuid4().hex[:24]}"
            signatures.remember(call_id, part.thought_signature)
            tool_call = ToolCall(call_id, call.name or "", json.dumps(call.args or {}))
            self.tool_calls.append(tool_call)
            return StreamDelta(
                tool_call_index=len(self.tool_calls) - 1,
                tool_call_id=call_id,
                tool_name=tool_call.name,
                tool_arguments=tool_call.arguments,
            )
        if part.text and not part.thought:
            self.text.append(part.text)
            return StreamDelta(text=part.text)
        return None

    def response(self, model: Model, request: ChatRequest) -> ModelResponse:
        reason = "content_filter" if self.blocked and not self.finish else None
        text, calls = "".join(self.text), tuple(self.tool_calls)
        return ModelResponse(
            text=text,
            tool_calls=calls,
            finish_reason=reason or finish_reason(self.finish, has_tool_calls=bool(self.tool_calls)),
            usage=usage_from(model, request, self.usage, text, calls),
            model=self.model or request.model,
            provider=model.provider,
        )


# --- errors ------------------------------------------------------------------------------


# The SDK sends through aiohttp when it is installed, else httpx2 or httpx, and
# lets their exceptions through: (module, timeout classes, other transport failures).
_TRANSPORT_CLASSES = (
    ("httpx", ("TimeoutException",), ("TransportError",)),
    ("httpx2", ("TimeoutException",), ("TransportError",)),
    ("aiohttp", ("ServerTimeoutError",), ("ClientConnectionError", "ClientPayloadError")),
)


def _transport_errors() -> tuple[tuple[type[BaseException], ...], tuple[type[BaseException], ...]]:
    """(timeouts, other transport failures) of the HTTP libraries installed."""
    timeouts: list[type[BaseException]] = [TimeoutError]
    transport: list[type[BaseException]] = [ConnectionError]
    for name, timeout_names, transport_names in _TRANSPORT_CLASSES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        timeouts += [getattr(module, n) for n in timeout_names]
        transport += [getattr(module, n) for n in transport_names]
    return tuple(timeouts), tuple(transport)


_TIMEOUTS, _TRANSPORT = _transport_errors()
_MALFORMED = (genai_errors.UnknownApiResponseError, json.JSONDecodeError, pydantic.ValidationError)

_CONTEXT_OVERFLOW = re.compile(
    r"input token count.*exceeds|exceeds the maximum number of tokens|context (window|length)", re.I | re.S
)
_TOKEN_COUNTS = re.compile(r"\((\d+)\) exceeds the maximum number of tokens allowed \((\d+)\)")
_DELAY = re.compile(r"^(\d+(?:\.\d+)?)s$")


def _retry_delay(details: Any) -> float | None:
    """`RetryInfo.retryDelay` ("30s") from a google.rpc error body."""
    error = details.get("error", details) if isinstance(details, dict) else None
    for item in (error or {}).get("details") or ():
        if isinstance(item, dict) and str(item.get("@type", "")).endswith("RetryInfo"):
            match = _DELAY.match(str(item.get("retryDelay", "")))
            if match:
                return float(match[1])
    return None


def _context_overflow(message: str) -> ContextWindowExceeded:
    counts = _TOKEN_COUNTS.search(message)
    tokens_, window = (int(counts[1]), int(counts[2])) if counts else (None, None)
    return ContextWindowExceeded(f"gcp.gemini: {message}", tokens=tokens_, context_window=window)


def _api_error(exc: genai_errors.APIError, provider: str, model: str) -> KeelError:
    status = exc.code if isinstance(exc.code, int) else 500
    message = exc.message or str(exc)
    if status == 400 and _CONTEXT_OVERFLOW.search(message):
        return _context_overflow(message)
    headers = getattr(exc.response, "headers", None)
    retry_after = parse_retry_after(headers) if headers is not None else None
    if retry_after is None:
        retry_after = _retry_delay(exc.details)
    return status_error(provider, model, status, message, retry_after=retry_after, body=exc.details)


def translate_error(exc: Exception, provider: str, model: str) -> KeelError:
    """A `google-genai` SDK (or transport) exception as a keel error."""
    if isinstance(exc, genai_errors.APIError):
        return _api_error(exc, provider, model)
    if isinstance(exc, _TIMEOUTS):
        return timeout_error(provider, model)
    if isinstance(exc, _TRANSPORT):
        return connection_error(provider, model, repr(exc))
    if isinstance(exc, _MALFORMED):
        return malformed_error(provider, model, exc)
    raise exc


# --- the adapter ---------------------------------------------------------------------------


class GeminiModel(Model):
    """Gemini chat and embedding models through the Gemini API."""

    provider = "gcp.gemini"

    def __init__(
        self,
        model_id: str,
        *,
        api_key: str,
        base_url: str | None = None,
        timeout: float = 60,
        context_window: int | None = None,
        max_output_tokens: int | None = None,
        api_version: str | None = None,
    ) -> None:
        super().__init__(model_id, context_window=context_window)
        self.max_output_tokens = max_output_tokens
        self._signatures = _Signatures()
        # api_version None: the SDK's default ("v1" in google-genai 3.x, or $GOOGLE_GENAI_API_VERSION).
        http_options = gtypes.HttpOptions(
            base_url=base_url,
            api_version=api_version,
            timeout=_millis(timeout),
            retry_options=gtypes.HttpRetryOptions(attempts=1),
        )
        self.client = genai.Client(api_key=api_key, vertexai=False, http_options=http_options)

    def forget_signatures(self) -> None:
        """Drop the remembered thought signatures (later calls send the placeholder)."""
        self._signatures = _Signatures()

    def _call(self, request: ChatRequest) -> dict[str, Any]:
        system, contents = map_messages(request.messages, self._signatures)
        config = generate_config(request, system, max_output_tokens=self.max_output_tokens)
        return {"model": request.model, "contents": contents, "config": config}

    async def complete(self, request: ChatRequest) -> ModelResponse:
        answer = _Answer()
        try:
            raw = await self.client.aio.models.generate_content(**self._call(request))
            self._fold(answer, raw, request.model)
        except KeelError:
            raise
        except Exception as exc:
            raise translate_error(exc, self.provider, request.model) from exc
        return self._final(answer, request)

    def _final(self, answer: _Answer, request: ChatRequest) -> ModelResponse:
        if not answer.answered:
            raise MalformedResponse(
                f"{self.provider} answered with neither a candidate nor a prompt block",
                provider=self.provider,
                model=request.model,
            )
        return answer.response(self, request)

    def _fold(self, answer: _Answer, chunk: Any, model: str) -> list[StreamDelta]:
        if not isinstance(chunk, gtypes.GenerateContentResponse):
            raise MalformedResponse(f"{self.provider} sent {type(chunk).__name__}", provider=self.provider, model=model)
        try:
            return answer.add_chunk(chunk, self._signatures)
        except (AttributeError, TypeError, ValueError) as exc:
            raise MalformedResponse(
                f"{self.provider} sent an answer keel cannot read: {exc}", provider=self.provider, model=model
            ) from exc

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamItem]:
        answer = _Answer()
        try:
            chunks = await self.client.aio.models.generate_content_stream(**self._call(request))
            async for chunk in chunks:
                for delta in self._fold(answer, chunk, request.model):
                    yield delta
        except KeelError:
            raise
        except Exception as exc:
            raise translate_error(exc, self.provider, request.model) from exc
        if answer.finish is None and not answer.blocked:  # cut short: never pass a partial answer off as whole
            raise MalformedResponse(
                f"{self.provider} ended the stream without a finish reason: the answer is incomplete "
                f"({sum(map(len, answer.text))} characters received)",
                provider=self.provider,
                model=request.model,
            )
        yield self._final(answer, request)

    async def embed(self, texts: Sequence[str]) -> EmbeddingResult:
        vectors: list[list[float]] = []
        counts: list[int | None] = []
        for start in range(0, len(texts), _EMBED_BATCH):
            batch = list(texts[start : start + _EMBED_BATCH])
            # One Content per text: for multimodal embedding models the SDK joins
            # a list of plain strings into a single content (one vector for all).
            contents = [gtypes.Content(role="user", parts=[gtypes.Part(text=t)]) for t in batch]
            try:
                raw = await self.client.aio.models.embed_content(model=self.model_id, contents=contents)
            except Exception as exc:
                raise translate_error(exc, self.provider, self.model_id) from exc
            vectors += self._vectors(raw, len(batch))
            counts.append(raw.usage_metadata.prompt_token_count if raw.usage_metadata is not None else None)
        reported = [c for c in counts if c is not None]
        used = sum(reported) if counts and len(reported) == len(counts) else _approx_tokens(texts)
        return EmbeddingResult(vectors, Usage(input_tokens=used), self.model_id, self.provider)

    def _vectors(self, raw: gtypes.EmbedContentResponse, expected: int) -> list[list[float]]:
        embeddings = raw.embeddings or []
        if len(embeddings) != expected or any(e.values is None for e in embeddings):
            raise MalformedResponse(
                f"{self.provider} returned {len(embeddings)} embeddings for {expected} texts",
                provider=self.provider,
                model=self.model_id,
            )
        return [list(e.values or ()) for e in embeddings]

    async def aclose(self) -> None:
        await self.client.aio.aclose()


def _approx_tokens(texts: Sequence[str]) -> int:
    """The documented approximation (o200k count plus the margin) when the API reports none."""
    return math.ceil(sum(tokens.count_text(t) for t in texts) * tokens.APPROX_MARGIN)
