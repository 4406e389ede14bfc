"""Anthropic Messages API, on the official `anthropic` SDK.

The Messages API differs from OpenAI's chat shape in ways every caller would
otherwise trip over, so this adapter absorbs them once:

- system prompts are a top-level `system` parameter, not messages;
- roles must alternate, so consecutive same-role messages are merged, and
  tool results travel as `tool_result` blocks inside a user message;
- `max_tokens` is required (defaults to the adapter's `max_output_tokens`);
- there is no JSON-schema response format on every model, so structured
  output forces a tool whose input schema is the format, and the tool input
  comes back as the answer text;
- the installed SDK no longer declares `temperature`/`top_p`, so they are sent
  through `extra_body` when the caller sets them.

The SDK's own retries are off (`max_retries=0`): keel's retry wrapper decides,
so attempts are counted and traced in one place. SDK exceptions are translated
to `keel.errors` here and nowhere else.
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import anthropic
import pydantic

from keel.errors import (
    ContextWindowExceeded,
    InvalidMessages,
    KeelError,
    MalformedResponse,
)
from keel.models._http import connection_error, malformed_error, parse_retry_after, status_error, timeout_error
from keel.models.base import Model, StreamItem, usage_or_estimate
from keel.types import ChatOptions, ChatRequest, Message, ModelResponse, ResponseFormat, StreamDelta, ToolCall, Usage

__all__ = ["AnthropicModel", "request_params", "translate_error"]

_FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}

# The status an error *event* inside a 200 stream stands for.
_ERROR_TYPE_STATUS = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "billing_error": 402,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "timeout_error": 504,
    "api_error": 500,
    "overloaded_error": 529,
}

_WRAPPED_KEY = "value"  # a non-object output schema is wrapped in {"value": ...}


# --- request ---------------------------------------------------------------------------


def _tool_input(call: ToolCall) -> dict[str, Any]:
    try:
        value = json.loads(call.arguments or "{}")
    except json.JSONDecodeError as exc:
        raise InvalidMessages(f"tool call {call.id!r} ({call.name}) has arguments that are not JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise InvalidMessages(f"tool call {call.id!r} ({call.name}): Anthropic needs a JSON object as tool input")
    return value


def _blocks(message: Message) -> list[dict[str, Any]]:
    if message.role == "tool":
        return [{"type": "tool_result", "tool_use_id": message.tool_call_id, "content": message.content or ""}]
    # Anthropic rejects empty text blocks, so an empty content adds none.
    blocks: list[dict[str, Any]] = [{"type": "text", "text": message.content}] if message.content else []
    for call in message.tool_calls:
        blocks.append({"type": "tool_use", "id": call.id, "name": call.name, "input": _tool_input(call)})
    return blocks


def map_messages(messages: Iterable[Message]) -> tuple[str | None, list[dict[str, Any]]]:
    """The `system` text and the alternating `messages` list for a keel conversation."""
    system: list[str] = []
    turns: list[dict[str, Any]] = []
    for message in messages:
        if message.role == "system":
            system.append(message.content or "")
            continue
        role = "assistant" if message.role == "assistant" else "user"
        blocks = _blocks(message)
        if not blocks:
            continue
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": role, "content": blocks})
    return ("\n\n".join(system) if system else None), turns


def _tool_choice(choice: str | None) -> dict[str, Any] | None:
    if choice is None:
        return None
    known = {"auto": {"type": "auto"}, "required": {"type": "any"}, "none": {"type": "none"}}
    return known.get(choice, {"type": "tool", "name": choice})


def format_tool_name(fmt: ResponseFormat) -> str:
    """The tool name that carries structured output (Anthropic allows [a-zA-Z0-9_-]{1,64})."""
    return re.sub(r"[^a-zA-Z0-9_-]", "_", fmt.name)[:64] or "structured_output"


def _format_schema(fmt: ResponseFormat) -> dict[str, Any]:
    schema = dict(fmt.schema)
    if schema.get("type") == "object":
        return schema
    # A tool input must be an object: wrap anything else and unwrap the answer.
    return {"type": "object", "properties": {_WRAPPED_KEY: schema}, "required": [_WRAPPED_KEY]}


def _tools(options: ChatOptions) -> list[dict[str, Any]]:
    tools = []
    for tool in options.tools:
        spec: dict[str, Any] = {"name": tool.name, "input_schema": dict(tool.parameters)}
        if tool.description:
            spec["description"] = tool.description
        tools.append(spec)
    fmt = options.response_format
    if fmt is not None:
        description = f"Answer with the {fmt.name} object: call this tool with it as input."
        tools.append({"name": format_tool_name(fmt), "description": description, "input_schema": _format_schema(fmt)})
    return tools


def _structured_tool_choice(options: ChatOptions, name: str) -> dict[str, Any]:
    # Alone, the format tool is forced; next to the caller's tools the model
    # must call *some* tool, and calling the format tool is the final answer.
    if not options.tools:
        return {"type": "tool", "name": name}
    if options.tool_choice in (None, "auto", "required"):
        return {"type": "any"}
    return _tool_choice(options.tool_choice) or {"type": "any"}


def request_params(request: ChatRequest, *, max_output_tokens: int) -> dict[str, Any]:
    """The keyword arguments of `messages.create` for a keel request."""
    o = request.options
    system, messages = map_messages(request.messages)
    params: dict[str, Any] = {
        "model": request.model,
        "messages": messages,
        "max_tokens": o.max_tokens or max_output_tokens,
    }
    if system is not None:
        params["system"] = system
    if o.stop:
        params["stop_sequences"] = list(o.stop)
    tools = _tools(o)
    if tools:
        params["tools"] = tools
    if o.response_format is not None:
        params["tool_choice"] = _structured_tool_choice(o, format_tool_name(o.response_format))
    elif tools and (choice := _tool_choice(o.tool_choice)) is not None:
        params["tool_choice"] = choice
    sampling = {"temperature": o.temperature, "top_p": o.top_p}
    extra = {k: v for k, v in sampling.items() if v is not None}
    if extra:
        params["extra_body"] = extra
    if o.timeout is not None:
        params["timeout"] = o.timeout
    return params


# --- response ----------------------------------------------------------------------------


def usage_fields(raw: Any) -> dict[str, int]:
    """The counts an Anthropic `usage` object reports (stream events omit some: absent, not 0)."""
    if raw is None:
        return {}
    names = ("input_tokens", "output_tokens", "cache_read_input_tokens", "cache_creation_input_tokens")
    out = {name: getattr(raw, name, None) for name in names}
    out["thinking_tokens"] = getattr(getattr(raw, "output_tokens_details", None), "thinking_tokens", None)
    return {k: v for k, v in out.items() if isinstance(v, int)}


def usage_from(
    model: Model, request: ChatRequest, fields: dict[str, int], text: str, calls: Sequence[ToolCall]
) -> Usage:
    """keel usage: input includes cache reads and cache writes, which Anthropic counts apart.
    A count the answer left out is counted by keel (see `usage_or_estimate`)."""
    cache_read = fields.get("cache_read_input_tokens", 0)
    cache_write = fields.get("cache_creation_input_tokens", 0)
    given = fields.get("input_tokens")
    return usage_or_estimate(
        model, request,
        input_tokens=None if given is None else given + cache_read + cache_write,
        output_tokens=fields.get("output_tokens"), text=text, tool_calls=calls,
        cached_input_tokens=cache_read, reasoning_tokens=fields.get("thinking_tokens", 0),
    )  # fmt: skip


def _structured_text(value: Any, fmt: ResponseFormat) -> str:
    if fmt.schema.get("type") != "object" and isinstance(value, dict) and _WRAPPED_KEY in value:
        value = value[_WRAPPED_KEY]
    return json.dumps(value)


@dataclass
class _Answer:
    """What the content blocks of one answer add up to."""

    text: list[str] = field(default_factory=list)
    tool_calls: list[ToolCall] = field(default_factory=list)
    structured: str | None = None


def _read_blocks(blocks: Sequence[Any], fmt: ResponseFormat | None) -> _Answer:
    answer = _Answer()
    structured_name = format_tool_name(fmt) if fmt is not None else None
    for block in blocks:
        kind = getattr(block, "type", None)
        if kind == "text":
            answer.text.append(str(block.text))
        elif kind == "tool_use" and fmt is not None and block.name == structured_name:
            answer.structured = _structured_text(block.input, fmt)
        elif kind == "tool_use":
            answer.tool_calls.append(ToolCall(str(block.id), str(block.name), json.dumps(block.input)))
    return answer


def finish_reason(stop_reason: str | None, *, structured: bool) -> str:
    reason = _FINISH_REASONS.get(stop_reason or "end_turn", "stop")
    return "stop" if structured and reason == "tool_calls" else reason


# --- errors ------------------------------------------------------------------------------


def _transport_errors() -> tuple[tuple[type[BaseException], ...], tuple[type[BaseException], ...]]:
    """(timeouts, other transport failures) of the HTTP library the SDK uses (httpx2, or httpx before 2.x).

    The SDK wraps failures while it sends, but not while a stream is read: a
    reset in the middle of an SSE answer surfaces as the HTTP library's error.
    """
    timeouts: list[type[BaseException]] = [TimeoutError]
    transport: list[type[BaseException]] = [ConnectionError]
    for name in ("httpx", "httpx2"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        timeouts.append(module.TimeoutException)
        transport.append(module.TransportError)
    return tuple(timeouts), tuple(transport)


_TIMEOUTS, _TRANSPORT = _transport_errors()

_CONTEXT_OVERFLOW = re.compile(r"prompt is too long|exceeds? (the )?(model'?s? )?context|context (window|limit)", re.I)
_TOKEN_COUNTS = re.compile(r"(\d+) tokens? > (\d+)")


def _context_overflow(message: str) -> ContextWindowExceeded:
    counts = _TOKEN_COUNTS.search(message)
    tokens, window = (int(counts[1]), int(counts[2])) if counts else (None, None)
    return ContextWindowExceeded(f"anthropic: {message}", tokens=tokens, context_window=window)


def _status_error(exc: anthropic.APIStatusError, provider: str, model: str) -> KeelError:
    status = exc.status_code
    error_type = getattr(exc, "type", None)
    if status < 400:  # an error event inside a streamed 200 answer
        status = _ERROR_TYPE_STATUS.get(str(error_type), 500)
    message = str(getattr(exc, "api_message", None) or exc.message)
    if status == 400 and _CONTEXT_OVERFLOW.search(message):
        return _context_overflow(message)
    return status_error(
        provider, model, status, message, retry_after=parse_retry_after(exc.response.headers), body=exc.body
    )


def translate_error(exc: Exception, provider: str, model: str) -> KeelError:
    """An `anthropic` SDK (or transport) exception as a keel error."""
    if isinstance(exc, (anthropic.APITimeoutError, *_TIMEOUTS)):
        return timeout_error(provider, model)
    if isinstance(exc, (anthropic.APIConnectionError, *_TRANSPORT)):
        return connection_error(provider, model, exc.__cause__ or exc)  # the SDK's own message: "Connection error."
    if isinstance(exc, anthropic.APIStatusError):
        return _status_error(exc, provider, model)
    if isinstance(exc, (anthropic.APIResponseValidationError, json.JSONDecodeError, pydantic.ValidationError)):
        return malformed_error(provider, model, exc)
    raise exc


# --- streaming ---------------------------------------------------------------------------


@dataclass
class _StreamState:
    """Folds raw stream events into deltas and the final response."""

    fmt: ResponseFormat | None
    model: str = ""
    usage: dict[str, int] = field(default_factory=dict)
    stop_reason: str | None = None
    stopped: bool = False
    text: list[str] = field(default_factory=list)
    calls: dict[int, list[str]] = field(default_factory=dict)  # block index -> [id, name, argument pieces...]
    structured_block: int | None = None
    structured: list[str] = field(default_factory=list)  # the format tool's input JSON, streamed as text

    def feed(self, event: Any) -> list[StreamDelta]:
        kind = getattr(event, "type", None)
        if kind == "message_start":
            self.model = str(event.message.model)
            self.usage = usage_fields(getattr(event.message, "usage", None))
        elif kind == "content_block_start":
            return self._block_start(event.index, event.content_block)
        elif kind == "content_block_delta":
            return self._block_delta(event.index, event.delta)
        elif kind == "content_block_stop":
            return self._block_stop(event.index)
        elif kind == "message_delta":
            self.stop_reason = event.delta.stop_reason
            self.usage = {**self.usage, **usage_fields(getattr(event, "usage", None))}  # cumulative counts
        elif kind == "message_stop":
            self.stopped = True
        return []

    def _block_start(self, index: int, block: Any) -> list[StreamDelta]:
        kind = getattr(block, "type", None)
        if kind == "text" and block.text:
            self.text.append(str(block.text))
            return [StreamDelta(text=str(block.text))]
        if kind != "tool_use":
            return []
        if self.fmt is not None and block.name == format_tool_name(self.fmt):
            self.structured_block = index
            return []
        self.calls[index] = [str(block.id), str(block.name)]
        return [StreamDelta(tool_call_index=self._call_index(index), tool_call_id=block.id, tool_name=block.name)]

    def _block_delta(self, index: int, delta: Any) -> list[StreamDelta]:
        kind = getattr(delta, "type", None)
        if kind == "text_delta":
            self.text.append(str(delta.text))
            return [StreamDelta(text=str(delta.text))]
        if kind == "input_json_delta" and delta.partial_json:
            return self._add_json(index, str(delta.partial_json))
        return []

    def _block_stop(self, index: int) -> list[StreamDelta]:
        # A tool called without arguments streams no JSON at all: send "{}".
        if index == self.structured_block and not self.structured:
            return self._add_json(index, "{}")
        if index in self.calls and len(self.calls[index]) == 2:
            return self._add_json(index, "{}")
        return []

    def _add_json(self, index: int, piece: str) -> list[StreamDelta]:
        if index == self.structured_block:
            self.structured.append(piece)
            return [StreamDelta(text=piece)]
        if index in self.calls:
            self.calls[index].append(piece)
            return [StreamDelta(tool_call_index=self._call_index(index), tool_arguments=piece)]
        return []

    def _call_index(self, block_index: int) -> int:
        return sorted(self.calls).index(block_index)

    def response(self, model: Model, request: ChatRequest) -> ModelResponse:
        calls = tuple(ToolCall(c[0], c[1], "".join(c[2:])) for _, c in sorted(self.calls.items()))
        structured = self.structured_block is not None
        text = "".join(self.structured) if structured else "".join(self.text)
        if structured and self.fmt is not None and self.fmt.schema.get("type") != "object":
            text = _structured_text(json.loads(text), self.fmt)
        return ModelResponse(
            text=text,
            tool_calls=calls,
            finish_reason=finish_reason(self.stop_reason, structured=structured),
            usage=usage_from(model, request, self.usage, text, calls),
            model=self.model,
            provider=model.provider,
        )


@contextmanager
def _reading(provider: str, model: str) -> Iterator[None]:
    """An answer whose shape surprises the parser is the provider's malformed answer, not keel's bug."""
    try:
        yield
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise MalformedResponse(
            f"{provider} sent an answer keel cannot read: {exc!r}", provider=provider, model=model
        ) from exc


# --- the adapter ---------------------------------------------------------------------------


class AnthropicModel(Model):
    """Claude models through the Messages API."""

    provider = "anthropic"

    def __init__(
        self,
        model_id: str,
        *,
        api_key: str,
        base_url: str | None = None,
        timeout: float = 60,
        context_window: int | None = None,
        max_output_tokens: int = 4096,
    ) -> None:
        super().__init__(model_id, context_window=context_window)
        self.max_output_tokens = max_output_tokens
        self.client = anthropic.AsyncAnthropic(api_key=api_key, base_url=base_url, max_retries=0, timeout=timeout)

    def _params(self, request: ChatRequest) -> dict[str, Any]:
        return request_params(request, max_output_tokens=self.max_output_tokens)

    async def complete(self, request: ChatRequest) -> ModelResponse:
        try:
            raw = await self.client.messages.create(**self._params(request))
            with _reading(self.provider, request.model):
                return self._response(raw, request)
        except KeelError:
            raise
        except Exception as exc:
            raise translate_error(exc, self.provider, request.model) from exc

    def _response(self, raw: Any, request: ChatRequest) -> ModelResponse:
        if not isinstance(raw, anthropic.types.Message) or not isinstance(getattr(raw, "content", None), list):
            raise MalformedResponse(
                f"{self.provider} sent something that is not a message: {str(raw)[:200]!r}",
                provider=self.provider,
                model=request.model,
            )
        answer = _read_blocks(raw.content, request.options.response_format)
        structured = answer.structured is not None
        text = answer.structured if answer.structured is not None else "".join(answer.text)
        calls = tuple(answer.tool_calls)
        return ModelResponse(
            text=text,
            tool_calls=calls,
            finish_reason=finish_reason(raw.stop_reason, structured=structured),
            usage=usage_from(self, request, usage_fields(getattr(raw, "usage", None)), text, calls),
            model=str(raw.model),
            provider=self.provider,
        )

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamItem]:
        state = _StreamState(request.options.response_format)
        try:
            events = await self.client.messages.create(**self._params(request), stream=True)
            async with events:
                if "text/event-stream" not in (events.response.headers.get("content-type") or ""):
                    raise await self._not_events(events.response, request.model)
                async for event in events:
                    with _reading(self.provider, request.model):
                        deltas = state.feed(event)
                    for delta in deltas:
                        yield delta
            if not state.stopped:
                raise MalformedResponse(
                    f"{self.provider} ended the stream before message_stop", provider=self.provider, model=request.model
                )
            with _reading(self.provider, request.model):
                final = state.response(self, request)
        except KeelError:
            raise
        except Exception as exc:
            raise translate_error(exc, self.provider, request.model) from exc
        yield final

    async def _not_events(self, response: Any, model: str) -> KeelError:
        """The error for a 200 that is not server-sent events: the error its body names, else malformed."""
        body = await response.aread()
        try:
            raw = json.loads(body)
        except ValueError:
            raw = None
        error = raw.get("error") if isinstance(raw, dict) else None
        if isinstance(error, dict):
            status = _ERROR_TYPE_STATUS.get(str(error.get("type")), 500)
            message = str(error.get("message") or "no message")
            if status == 400 and _CONTEXT_OVERFLOW.search(message):
                return _context_overflow(message)
            return status_error(self.provider, model, status, message, body=raw)
        kind = response.headers.get("content-type") or "no content type"
        return MalformedResponse(
            f"{self.provider} answered a stream request with {kind}, not server-sent events: {body[:200]!r}",
            provider=self.provider,
            model=model,
        )

    async def aclose(self) -> None:
        await self.client.close()
