"""HTTP bodies of the OpenAI-compatible API (pydantic at the edge).

Fields OpenAI defines but keel does not act on are accepted and ignored
(listed in `IGNORED`), so unchanged clients work; anything else is refused
with a 400 naming the field.

Types are strict, as OpenAI's API is: `max_tokens: "10"`, `max_tokens: true` and `stream: "yes"`
are refused, not coerced (an integer is still a valid float). A chat request takes at most
`MAX_MESSAGES` messages; bodies are checked for size, depth and lone surrogates before they get
here (server/bodies.py).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_MESSAGES = 2048  # per chat request: bounds the work one body can cost (see docs/server.md)


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    input: str | list[str] = Field(min_length=1)
    encoding_format: Literal["float", "base64"] = "float"  # the openai SDK asks for base64
    user: str | None = None
    dimensions: int | None = Field(default=None, gt=0)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str = Field(min_length=1)
    messages: list[ChatMessageIn] = Field(min_length=1, max_length=MAX_MESSAGES)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    max_tokens: int | None = Field(default=None, gt=0)
    max_completion_tokens: int | None = Field(default=None, gt=0)
    stop: str | list[str] | None = None
    seed: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(default=None, ge=1, le=1)
    user: str | None = None
    metadata: dict[str, str] | None = None
    # accepted for compatibility, not acted on
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    # refused when asked for (issue 16.12): a `logprobs: null` answer reads as a provider that has none
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0)
    parallel_tool_calls: bool | None = None
    store: bool | None = None
    service_tier: str | None = None
    reasoning_effort: str | None = None

    @field_validator("logprobs", "top_logprobs")
    @classmethod
    def _no_logprobs(cls, value: bool | int | None) -> bool | int | None:
        if value:  # False, 0 and None ask for nothing
            raise ValueError("keel does not return log-probabilities yet; leave logprobs and top_logprobs unset")
        return value
