"""Values that cross keel's layers: messages, requests, results, usage.

Plain dataclasses: adapters build them from SDK objects at the boundary and
everything above the adapters only sees these.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from keel.errors import InputError, InvalidMessages

__all__ = [
    "ChatOptions",
    "ChatRequest",
    "ChatResult",
    "EmbeddingResult",
    "Message",
    "ModelResponse",
    "ResponseFormat",
    "Role",
    "StreamDelta",
    "TokenLogprob",
    "Tool",
    "ToolCall",
    "TopLogprob",
    "Usage",
    "check_unicode",
    "parse_messages",
]

Role = Literal["system", "user", "assistant", "tool"]
ROLES: tuple[str, ...] = ("system", "user", "assistant", "tool")
FinishReason = str  # "stop" | "length" | "tool_calls" | "content_filter" | "error", as OpenAI names them


@dataclass(frozen=True, slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, exactly as the model produced it

    def parsed_arguments(self) -> Any:
        return json.loads(self.arguments or "{}")


@dataclass(frozen=True, slots=True)
class Message:
    role: Role
    content: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None  # for role="tool": which call this answers
    name: str | None = None

    @classmethod
    def system(cls, content: str) -> Message:
        return cls("system", content)

    @classmethod
    def user(cls, content: str) -> Message:
        return cls("user", content)

    @classmethod
    def assistant(cls, content: str | None, tool_calls: Sequence[ToolCall] = ()) -> Message:
        return cls("assistant", content, tuple(tool_calls))

    @classmethod
    def tool(cls, tool_call_id: str, content: str) -> Message:
        return cls("tool", content, tool_call_id=tool_call_id)

    def to_openai(self) -> dict[str, Any]:
        """The OpenAI chat message shape (also what traces store)."""
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            out["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for c in self.tool_calls
            ]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            out["name"] = self.name
        return out


@dataclass(frozen=True, slots=True)
class Tool:
    """A function the model may call; `parameters` is a JSON schema object."""

    name: str
    description: str = ""
    parameters: Mapping[str, Any] = field(default_factory=lambda: {"type": "object", "properties": {}})

    def to_openai(self) -> dict[str, Any]:
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": dict(self.parameters)},
        }


@dataclass(frozen=True, slots=True)
class ResponseFormat:
    """Ask for JSON matching `schema` (a JSON schema object)."""

    name: str
    schema: Mapping[str, Any]
    strict: bool = True


@dataclass(frozen=True, slots=True)
class ChatOptions:
    temperature: float | None = None
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    tools: tuple[Tool, ...] = ()
    tool_choice: str | None = None  # "auto" | "none" | "required" | a tool name
    timeout: float | None = None  # seconds, per attempt
    response_format: ResponseFormat | None = None
    top_p: float | None = None
    logprobs: bool = False  # return each output token's log-probability (providers that give them)
    top_logprobs: int | None = None  # and the N likeliest tokens at each position (0-20, needs logprobs)


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """What an adapter receives: `model` is the provider's model id."""

    model: str
    messages: tuple[Message, ...]
    options: ChatOptions = ChatOptions()

    def with_model(self, model: str) -> ChatRequest:
        return replace(self, model=model)


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts. `input_tokens` includes `cached_input_tokens`;
    `output_tokens` includes `reasoning_tokens` (OpenAI's convention).
    `estimated`: the provider did not report (all of) them, keel counted them itself."""

    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0
    reasoning_tokens: int = 0
    estimated: bool = False

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.input_tokens + other.input_tokens,
            self.output_tokens + other.output_tokens,
            self.cached_input_tokens + other.cached_input_tokens,
            self.reasoning_tokens + other.reasoning_tokens,
            self.estimated or other.estimated,
        )

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


@dataclass(frozen=True, slots=True)
class TopLogprob:
    """One candidate token at a position and its log-probability (OpenAI's `top_logprobs` item)."""

    token: str
    logprob: float
    bytes: tuple[int, ...] | None = None  # the token's UTF-8 bytes (a token may hold part of a character)

    def to_openai(self) -> dict[str, Any]:
        return {"token": self.token, "logprob": self.logprob, "bytes": list(self.bytes) if self.bytes else None}


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """An output token, its log-probability under the model, and the likeliest alternatives."""

    token: str
    logprob: float
    bytes: tuple[int, ...] | None = None
    top_logprobs: tuple[TopLogprob, ...] = ()

    def to_openai(self) -> dict[str, Any]:
        """OpenAI's `choices[0].logprobs.content[i]` shape."""
        out = TopLogprob(self.token, self.logprob, self.bytes).to_openai()
        out["top_logprobs"] = [t.to_openai() for t in self.top_logprobs]
        return out


@dataclass(frozen=True, slots=True)
class ModelResponse:
    """What an adapter returns for one provider call."""

    text: str
    tool_calls: tuple[ToolCall, ...] = ()
    finish_reason: FinishReason = "stop"
    usage: Usage = Usage()
    model: str = ""  # the model the provider says answered
    provider: str = ""
    attempts: int = 1  # provider calls made, counted by the retry/fallback wrappers
    cost_usd: float | None = None  # filled by the deployment wrapper; None = unknown price
    deployment: str = ""  # the configured name of the model that answered
    logprobs: tuple[TokenLogprob, ...] | None = None  # when the request asked for them
    stop_reason: str = ""  # why generation stopped, when finish_reason alone does not say (e.g. "repetition")


@dataclass(frozen=True, slots=True)
class StreamDelta:
    """One piece of a streamed answer. Tool call pieces carry their index."""

    text: str = ""
    tool_call_index: int | None = None
    tool_call_id: str | None = None
    tool_name: str | None = None
    tool_arguments: str = ""
    logprobs: tuple[TokenLogprob, ...] = ()  # of the tokens of this piece, when the request asked for them


@dataclass(frozen=True, slots=True)
class ChatResult:
    """The answer of one gateway call, with everything that explains it."""

    text: str
    tool_calls: tuple[ToolCall, ...]
    finish_reason: FinishReason
    usage: Usage
    cost_usd: float | None  # None when the price is unknown (never a guess)
    latency_s: float
    model: str  # the configured name of the model actually used
    response_model: str  # what the provider reported
    provider: str
    attempts: int
    trace_id: str
    span_id: str
    parsed: Any = None  # the validated instance for structured output
    logprobs: tuple[TokenLogprob, ...] | None = None  # per output token, when asked for with logprobs=True
    stop_reason: str = ""  # why generation stopped, when finish_reason alone does not say (e.g. "repetition")

    def message(self) -> Message:
        """This answer as an assistant message, to continue a conversation."""
        return Message.assistant(self.text or None, self.tool_calls)


@dataclass(frozen=True, slots=True)
class EmbeddingResult:
    vectors: list[list[float]]
    usage: Usage = Usage()
    model: str = ""
    provider: str = ""
    cost_usd: float | None = None
    trace_id: str = ""
    attempts: int = 1


# --- input parsing ------------------------------------------------------------


def _lone_surrogate_at(value: Any, where: str) -> str | None:
    """Where in `value` a string holds a lone surrogate (`"\\ud800"`): valid in a Python str and
    in JSON escapes, but not Unicode, so no store, provider or UTF-8 encoder takes it."""
    if isinstance(value, str):
        if value.isascii():
            return None
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return where
        return None
    if isinstance(value, Mapping):
        for k, v in value.items():
            found = _lone_surrogate_at(k, where) or _lone_surrogate_at(v, f"{where}.{k}")
            if found:
                return found
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            if found := _lone_surrogate_at(v, f"{where}[{i}]"):
                return found
    return None


def check_unicode(value: Any, field: str, error: type[InputError] = InputError) -> None:
    """Refuse a lone surrogate anywhere in `value` (a string, or a mapping or list of them), naming
    the field: accepted, it fails the provider call as the provider's fault, or the span's write."""
    if where := _lone_surrogate_at(value, field):
        raise error(f"{where} contains a lone surrogate (such as \\ud800), which is not valid Unicode")


MessageLike = Message | Mapping[str, Any] | str


def _tool_calls_from_openai(raw: Any, index: int) -> tuple[ToolCall, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise InvalidMessages(f"messages[{index}].tool_calls must be a list")
    calls = []
    for j, item in enumerate(raw):
        fn = item.get("function") if isinstance(item, Mapping) else None
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
            raise InvalidMessages(f"messages[{index}].tool_calls[{j}] needs function.name")
        args = fn.get("arguments", "{}")
        calls.append(
            ToolCall(str(item.get("id", f"call_{j}")), fn["name"], args if isinstance(args, str) else json.dumps(args))
        )
    return tuple(calls)


def _content_text(content: Any, index: int) -> str | None:
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts: keep the text parts
        texts = []
        for part in content:
            if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise InvalidMessages(f"messages[{index}].content: only text parts are supported")
            texts.append(part["text"])
        return "".join(texts)
    raise InvalidMessages(f"messages[{index}].content must be a string, got {type(content).__name__}")


def _message_from_mapping(raw: Mapping[str, Any], index: int) -> Message:
    role = raw.get("role")
    if role not in ROLES:
        raise InvalidMessages(f"messages[{index}].role must be one of {', '.join(ROLES)}, got {role!r}")
    content = _content_text(raw.get("content"), index)
    tool_calls = _tool_calls_from_openai(raw.get("tool_calls"), index)
    tool_call_id = raw.get("tool_call_id")
    if role == "tool" and not isinstance(tool_call_id, str):
        raise InvalidMessages(f"messages[{index}]: a tool message needs tool_call_id")
    name = raw.get("name")
    return Message(role, content, tool_calls, tool_call_id, name if isinstance(name, str) else None)


def _check_message(message: Message, index: int) -> None:
    check_unicode(message.content, f"messages[{index}].content", InvalidMessages)
    check_unicode(message.name, f"messages[{index}].name", InvalidMessages)
    check_unicode(message.tool_call_id, f"messages[{index}].tool_call_id", InvalidMessages)
    for j, call in enumerate(message.tool_calls):
        check_unicode([call.id, call.name, call.arguments], f"messages[{index}].tool_calls[{j}]", InvalidMessages)
    if message.role not in ROLES:
        raise InvalidMessages(f"messages[{index}].role must be one of {', '.join(ROLES)}, got {message.role!r}")
    if message.content is None and not message.tool_calls:
        raise InvalidMessages(f"messages[{index}] ({message.role}) has no content")
    if message.tool_calls and message.role != "assistant":
        raise InvalidMessages(f"messages[{index}]: only assistant messages carry tool_calls")


def parse_messages(messages: str | Sequence[MessageLike]) -> tuple[Message, ...]:
    """Accept a string, Message objects or OpenAI-style dicts; validate them."""
    if isinstance(messages, str):
        messages = [messages]
    if not isinstance(messages, Sequence) or isinstance(messages, bytes):
        raise InvalidMessages("messages must be a string or a list of messages")
    if not messages:
        raise InvalidMessages("messages is empty")
    out: list[Message] = []
    for i, raw in enumerate(messages):
        if isinstance(raw, Message):
            msg = raw
        elif isinstance(raw, str):
            msg = Message.user(raw)
        elif isinstance(raw, Mapping):
            msg = _message_from_mapping(raw, i)
        else:
            raise InvalidMessages(f"messages[{i}] must be a Message, a dict or a string, got {type(raw).__name__}")
        _check_message(msg, i)
        out.append(msg)
    if all(m.role == "system" for m in out):
        raise InvalidMessages("messages has only system messages; add a user message")
    return tuple(out)
