"""AnthropicModel through the official SDK against a local Messages API stub."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import pytest
import pytest_asyncio

from helpers import ERROR_STATUSES, check_status_error, collect
from keel.errors import (
    ContextWindowExceeded,
    InvalidMessages,
    MalformedResponse,
    ProviderConnectionError,
    ProviderError,
    ProviderRateLimited,
    ProviderTimeout,
    ServerError,
)
from keel.models.anthropic import AnthropicModel
from keel.types import ChatOptions, ChatRequest, Message, ResponseFormat, ToolCall
from provider_stubs import (
    PERSON,
    WEATHER,
    Reply,
    StubServer,
    anthropic_error,
    anthropic_message,
    anthropic_stream,
    closed_port_url,
    sse,
)

MODEL = "claude-test-1"


# One event loop for the module, so one client (building one costs ~50 ms of CA loading) serves every test.
pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def shared_model(server: StubServer) -> AsyncIterator[AnthropicModel]:
    m = AnthropicModel(MODEL, api_key="sk-test", base_url=server.url, timeout=5)
    yield m
    await m.aclose()


@pytest.fixture
def model(stub: StubServer, shared_model: AnthropicModel) -> AnthropicModel:
    return shared_model


def chat(*messages: Message | str, **options: Any) -> ChatRequest:
    msgs = tuple(Message.user(m) if isinstance(m, str) else m for m in messages)
    return ChatRequest(MODEL, msgs, ChatOptions(**options))


# --- plain completion ---------------------------------------------------------------


async def test_complete_text_usage_and_model(stub: StubServer, model: AnthropicModel) -> None:
    usage = {"input_tokens": 10, "cache_read_input_tokens": 100, "cache_creation_input_tokens": 20, "output_tokens": 7}
    stub.reply_json(anthropic_message("Hi there", usage=usage, model="claude-test-1-20250101"))

    response = await model.complete(chat("Hello"))

    assert response.text == "Hi there"
    assert response.finish_reason == "stop"
    assert response.model == "claude-test-1-20250101"
    assert response.provider == "anthropic"
    assert response.tool_calls == ()
    assert response.usage.input_tokens == 130  # input + cache reads + cache writes
    assert response.usage.cached_input_tokens == 100
    assert response.usage.output_tokens == 7
    sent = stub.last
    assert (sent.method, sent.path) == ("POST", "/v1/messages")
    # Older SDKs send `x-api-key`; the installed one sends the key as a bearer token.
    assert sent.headers.get("x-api-key") == "sk-test" or sent.headers.get("authorization") == "Bearer sk-test"
    assert "anthropic-version" in sent.headers
    assert sent.json == {
        "model": MODEL,
        "max_tokens": 4096,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Hello"}]}],
    }


async def test_thinking_tokens_become_reasoning_tokens(stub: StubServer, model: AnthropicModel) -> None:
    body = anthropic_message("ok", usage={"output_tokens": 50})
    body["usage"]["output_tokens_details"] = {"thinking_tokens": 30}
    body["content"].insert(0, {"type": "thinking", "thinking": "hmm", "signature": "sig"})
    stub.reply_json(body)

    response = await model.complete(chat("Hello"))

    assert response.text == "ok"
    assert (response.usage.output_tokens, response.usage.reasoning_tokens) == (50, 30)


@pytest.mark.parametrize(
    ("stop_reason", "expected"),
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("max_tokens", "length"),
        ("model_context_window_exceeded", "length"),
        ("tool_use", "tool_calls"),
        ("refusal", "content_filter"),
    ],
)
async def test_finish_reasons(stub: StubServer, model: AnthropicModel, stop_reason: str, expected: str) -> None:
    stub.reply_json(anthropic_message("x", stop_reason=stop_reason))
    assert (await model.complete(chat("Hello"))).finish_reason == expected


async def test_request_body_system_merging_and_options(stub: StubServer, model: AnthropicModel) -> None:
    stub.reply_json(anthropic_message())
    request = chat(
        Message.system("Be brief."),
        "first",
        Message.system("Answer in French."),
        "second",
        Message.assistant("ok"),
        Message.assistant("more"),
        "third",
        temperature=0.2,
        top_p=0.9,
        max_tokens=100,
        stop=("END", "STOP"),
        seed=7,
    )

    await model.complete(request)

    body = stub.last.json
    assert body["system"] == "Be brief.\n\nAnswer in French."
    assert body["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "ok"}, {"type": "text", "text": "more"}]},
        {"role": "user", "content": [{"type": "text", "text": "third"}]},
    ]
    assert body["temperature"] == 0.2
    assert body["top_p"] == 0.9
    assert body["max_tokens"] == 100
    assert body["stop_sequences"] == ["END", "STOP"]
    assert "seed" not in body  # Anthropic has no seed
    assert "tools" not in body and "tool_choice" not in body


async def test_max_output_tokens_default_comes_from_the_adapter(stub: StubServer) -> None:
    stub.reply_json(anthropic_message())
    m = AnthropicModel(MODEL, api_key="k", base_url=stub.url, max_output_tokens=321)
    try:
        await m.complete(chat("hi"))
    finally:
        await m.aclose()
    assert stub.last.json["max_tokens"] == 321


# --- tools --------------------------------------------------------------------------


async def test_tool_call_in_the_answer(stub: StubServer, model: AnthropicModel) -> None:
    tool_use = {"id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}
    stub.reply_json(anthropic_message("Let me check.", tool_uses=[tool_use], stop_reason="tool_use"))

    response = await model.complete(chat("Weather in Paris?", tools=(WEATHER,)))

    assert response.finish_reason == "tool_calls"
    assert response.text == "Let me check."
    assert len(response.tool_calls) == 1
    call = response.tool_calls[0]
    assert (call.id, call.name, call.parsed_arguments()) == ("toolu_1", "get_weather", {"city": "Paris"})
    body = stub.last.json
    assert body["tools"] == [
        {"name": "get_weather", "description": "Weather of a city", "input_schema": dict(WEATHER.parameters)}
    ]
    assert "tool_choice" not in body


async def test_tool_calls_and_results_in_the_conversation(stub: StubServer, model: AnthropicModel) -> None:
    stub.reply_json(anthropic_message("Sunny in both."))
    calls = (
        ToolCall("toolu_1", "get_weather", '{"city": "Paris"}'),
        ToolCall("toolu_2", "get_weather", '{"city": "Oslo"}'),
    )
    request = chat(
        "Weather in Paris and Oslo?",
        Message.assistant(None, calls),
        Message.tool("toolu_1", "sunny"),
        Message.tool("toolu_2", "sunny too"),
        tools=(WEATHER,),
    )

    await model.complete(request)

    messages = stub.last.json["messages"]
    assert messages[1] == {
        "role": "assistant",
        "content": [
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
            {"type": "tool_use", "id": "toolu_2", "name": "get_weather", "input": {"city": "Oslo"}},
        ],
    }
    assert messages[2] == {
        "role": "user",
        "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"},
            {"type": "tool_result", "tool_use_id": "toolu_2", "content": "sunny too"},
        ],
    }
    assert len(messages) == 3


async def test_tool_result_then_user_text_share_one_user_turn(stub: StubServer, model: AnthropicModel) -> None:
    stub.reply_json(anthropic_message())
    request = chat(
        "q",
        Message.assistant("calling", (ToolCall("t1", "get_weather", "{}"),)),
        Message.tool("t1", "rain"),
        "and tomorrow?",
        tools=(WEATHER,),
    )
    await model.complete(request)
    last = stub.last.json["messages"][-1]
    assert last["role"] == "user"
    assert [b["type"] for b in last["content"]] == ["tool_result", "text"]


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ("auto", {"type": "auto"}),
        ("required", {"type": "any"}),
        ("none", {"type": "none"}),
        ("get_weather", {"type": "tool", "name": "get_weather"}),
    ],
)
async def test_tool_choice_mapping(stub: StubServer, model: AnthropicModel, choice: str, expected: Any) -> None:
    stub.reply_json(anthropic_message())
    await model.complete(chat("hi", tools=(WEATHER,), tool_choice=choice))
    assert stub.last.json["tool_choice"] == expected


async def test_tool_call_with_arguments_that_are_not_json_is_refused(model: AnthropicModel) -> None:
    request = chat("q", Message.assistant(None, (ToolCall("t1", "get_weather", "{oops"),)), Message.tool("t1", "x"))
    with pytest.raises(InvalidMessages, match="not JSON"):
        await model.complete(request)


# --- structured output ----------------------------------------------------------------


async def test_structured_output_forces_a_tool_and_returns_its_input_as_text(
    stub: StubServer, model: AnthropicModel
) -> None:
    tool_use = {"id": "toolu_9", "name": "person", "input": {"name": "Ada", "age": 36}}
    stub.reply_json(anthropic_message(None, tool_uses=[tool_use], stop_reason="tool_use"))

    response = await model.complete(chat("Who wrote the first program?", response_format=PERSON))

    assert json.loads(response.text) == {"name": "Ada", "age": 36}
    assert response.finish_reason == "stop"
    assert response.tool_calls == ()
    body = stub.last.json
    assert body["tool_choice"] == {"type": "tool", "name": "person"}
    assert len(body["tools"]) == 1
    assert body["tools"][0]["name"] == "person"
    assert body["tools"][0]["input_schema"] == dict(PERSON.schema)


async def test_structured_output_next_to_tools_lets_the_model_call_them(
    stub: StubServer, model: AnthropicModel
) -> None:
    tool_use = {"id": "toolu_1", "name": "get_weather", "input": {"city": "Oslo"}}
    stub.reply_json(anthropic_message(None, tool_uses=[tool_use], stop_reason="tool_use"))

    response = await model.complete(chat("q", tools=(WEATHER,), response_format=PERSON))

    assert response.finish_reason == "tool_calls"
    assert response.tool_calls[0].name == "get_weather"
    body = stub.last.json
    assert body["tool_choice"] == {"type": "any"}
    assert [t["name"] for t in body["tools"]] == ["get_weather", "person"]


async def test_structured_output_with_a_non_object_schema_is_wrapped(stub: StubServer, model: AnthropicModel) -> None:
    fmt = ResponseFormat("tags list", {"type": "array", "items": {"type": "string"}})
    tool_use = {"id": "toolu_1", "name": "tags_list", "input": {"value": ["a", "b"]}}
    stub.reply_json(anthropic_message(None, tool_uses=[tool_use], stop_reason="tool_use"))

    response = await model.complete(chat("q", response_format=fmt))

    assert json.loads(response.text) == ["a", "b"]
    tool = stub.last.json["tools"][0]
    assert tool["name"] == "tags_list"
    assert tool["input_schema"]["properties"]["value"] == dict(fmt.schema)


# --- streaming --------------------------------------------------------------------------


async def test_stream_text_and_usage(stub: StubServer, model: AnthropicModel) -> None:
    usage = {"input_tokens": 12, "cache_read_input_tokens": 8, "output_tokens": 9}
    stub.reply_stream(anthropic_stream(["Hel", "lo", " world"], usage=usage, model="claude-test-1-x"))

    deltas, final = await collect(model, chat("Hello"))

    assert "".join(d.text for d in deltas) == "Hello world" == final.text
    assert len(deltas) == 3
    assert final.finish_reason == "stop"
    assert final.model == "claude-test-1-x"
    assert final.provider == "anthropic"
    assert (final.usage.input_tokens, final.usage.cached_input_tokens, final.usage.output_tokens) == (20, 8, 9)
    assert stub.last.json["stream"] is True


async def test_stream_tool_call_pieces(stub: StubServer, model: AnthropicModel) -> None:
    tools = [
        {"id": "toolu_1", "name": "get_weather", "pieces": ['{"ci', 'ty": "Par', 'is"}']},
        {"id": "toolu_2", "name": "get_weather", "pieces": ['{"city": "Oslo"}']},
    ]
    stub.reply_stream(anthropic_stream(["Checking."], tool_uses=tools, stop_reason="tool_use"))

    deltas, final = await collect(model, chat("q", tools=(WEATHER,)))

    starts = [d for d in deltas if d.tool_name]
    assert [(d.tool_call_index, d.tool_call_id, d.tool_name) for d in starts] == [
        (0, "toolu_1", "get_weather"),
        (1, "toolu_2", "get_weather"),
    ]
    first_args = "".join(d.tool_arguments for d in deltas if d.tool_call_index == 0)
    assert json.loads(first_args) == {"city": "Paris"}
    assert final.finish_reason == "tool_calls"
    assert final.text == "Checking."
    assert [(c.id, c.parsed_arguments()) for c in final.tool_calls] == [
        ("toolu_1", {"city": "Paris"}),
        ("toolu_2", {"city": "Oslo"}),
    ]


async def test_stream_tool_call_without_arguments(stub: StubServer, model: AnthropicModel) -> None:
    tools = [{"id": "toolu_1", "name": "get_weather", "pieces": []}]
    stub.reply_stream(anthropic_stream([], tool_uses=tools, stop_reason="tool_use"))

    deltas, final = await collect(model, chat("q", tools=(WEATHER,)))

    assert "".join(d.tool_arguments for d in deltas) == "{}"
    assert final.tool_calls == (ToolCall("toolu_1", "get_weather", "{}"),)


async def test_stream_structured_output_streams_the_json_as_text(stub: StubServer, model: AnthropicModel) -> None:
    tools = [{"id": "toolu_1", "name": "person", "pieces": ['{"name": "A', 'da", "age": 36}']}]
    stub.reply_stream(anthropic_stream([], tool_uses=tools, stop_reason="tool_use"))

    deltas, final = await collect(model, chat("q", response_format=PERSON))

    assert "".join(d.text for d in deltas) == final.text
    assert json.loads(final.text) == {"name": "Ada", "age": 36}
    assert final.tool_calls == ()
    assert final.finish_reason == "stop"


async def test_stream_error_event_mid_stream(stub: StubServer, model: AnthropicModel) -> None:
    events = anthropic_stream(["partial"], stop=False)[:-1]
    events.append(sse({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}, "error"))
    stub.reply_stream(events)

    with pytest.raises(ServerError) as info:
        await collect(model, chat("q"))
    assert info.value.status == 529
    assert info.value.provider == "anthropic"


async def test_stream_without_message_stop_is_malformed(stub: StubServer, model: AnthropicModel) -> None:
    stub.reply_stream(anthropic_stream(["cut"], stop=False))
    with pytest.raises(MalformedResponse):
        await collect(model, chat("q"))


async def test_stream_with_bad_json_data_is_malformed(stub: StubServer, model: AnthropicModel) -> None:
    stub.reply_stream([*anthropic_stream(["a"])[:2], sse(b"{not json", "content_block_delta")])
    with pytest.raises(MalformedResponse):
        await collect(model, chat("q"))


async def test_stream_error_event_first_is_translated(stub: StubServer, model: AnthropicModel) -> None:
    stub.reply_stream([sse({"type": "error", "error": {"type": "rate_limit_error", "message": "Slow down"}}, "error")])
    with pytest.raises(ProviderRateLimited, match="Slow down") as info:
        await collect(model, chat("q"))
    assert info.value.status == 429


async def test_stream_answered_with_a_json_error_body_is_that_error(stub: StubServer, model: AnthropicModel) -> None:
    # a 200 that is not server-sent events: an error body says what failed, not "malformed"
    stub.reply_json({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
    with pytest.raises(ServerError, match="Overloaded") as info:
        await collect(model, chat("q"))
    assert info.value.status == 529


async def test_stream_answered_with_bad_json_and_no_events_is_malformed(
    stub: StubServer, model: AnthropicModel
) -> None:
    stub.push(Reply(body=b"{not json"))
    with pytest.raises(MalformedResponse, match="not server-sent events"):
        await collect(model, chat("q"))


async def test_stream_cut_by_the_server_is_a_connection_error(stub: StubServer, model: AnthropicModel) -> None:
    stub.reply_stream(anthropic_stream(["Hel", "lo"])[:4], abort=True)
    with pytest.raises(ProviderConnectionError):
        await collect(model, chat("q"))


async def test_stream_http_error_before_the_stream(stub: StubServer, model: AnthropicModel) -> None:
    stub.push(anthropic_error(429, "slow down", headers={"retry-after": "3"}))
    with pytest.raises(ProviderRateLimited) as info:
        await collect(model, chat("q"))
    assert info.value.retry_after == 3


# --- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("status", "error_class"), [*ERROR_STATUSES, (529, ServerError)])
async def test_error_statuses(
    stub: StubServer, model: AnthropicModel, status: int, error_class: type[ProviderError]
) -> None:
    stub.push(anthropic_error(status, "went wrong"))

    with pytest.raises(error_class) as info:
        await model.complete(chat("q"))

    check_status_error(info.value, error_class, status, "anthropic", MODEL)


async def test_rate_limit_retry_after_seconds(stub: StubServer, model: AnthropicModel) -> None:
    stub.push(anthropic_error(429, headers={"retry-after": "17"}))
    with pytest.raises(ProviderRateLimited) as info:
        await model.complete(chat("q"))
    assert info.value.retry_after == 17
    assert info.value.retryable


async def test_rate_limit_retry_after_http_date(stub: StubServer, model: AnthropicModel) -> None:
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    stub.push(anthropic_error(429, headers={"retry-after": when}))
    with pytest.raises(ProviderRateLimited) as info:
        await model.complete(chat("q"))
    assert info.value.retry_after is not None
    assert 25 <= info.value.retry_after <= 31


async def test_prompt_too_long_is_context_window_exceeded(stub: StubServer, model: AnthropicModel) -> None:
    stub.push(anthropic_error(400, "prompt is too long: 208310 tokens > 200000 maximum"))
    with pytest.raises(ContextWindowExceeded) as info:
        await model.complete(chat("q"))
    assert (info.value.tokens, info.value.context_window) == (208310, 200000)


async def test_timeout(stub: StubServer) -> None:
    stub.push(Reply(delay=2.0, body=anthropic_message()))
    m = AnthropicModel(MODEL, api_key="k", base_url=stub.url, timeout=0.2)
    try:
        with pytest.raises(ProviderTimeout) as info:
            await m.complete(chat("q"))
    finally:
        await m.aclose()
    assert info.value.provider == "anthropic"


async def test_per_call_timeout_option(stub: StubServer, model: AnthropicModel) -> None:
    stub.push(Reply(delay=2.0, body=anthropic_message()))
    with pytest.raises(ProviderTimeout):
        await model.complete(chat("q", timeout=0.2))


async def test_connection_refused() -> None:
    m = AnthropicModel(MODEL, api_key="k", base_url=closed_port_url())
    try:
        with pytest.raises(ProviderConnectionError) as info:
            await m.complete(chat("q"))
    finally:
        await m.aclose()
    assert info.value.provider == "anthropic"


async def test_connection_reset(stub: StubServer, model: AnthropicModel) -> None:
    stub.push(Reply(reset=True))
    with pytest.raises(ProviderConnectionError):
        await model.complete(chat("q"))


async def test_malformed_json_body(stub: StubServer, model: AnthropicModel) -> None:
    stub.push(Reply(body=b'{"id": "msg_01", "content": [tru'))
    with pytest.raises(MalformedResponse) as info:
        await model.complete(chat("q"))
    assert info.value.provider == "anthropic"


async def test_json_that_is_not_a_message(stub: StubServer, model: AnthropicModel) -> None:
    stub.reply_json({"unexpected": True})
    with pytest.raises(MalformedResponse):
        await model.complete(chat("q"))


async def test_count_tokens_is_the_offline_approximation(model: AnthropicModel) -> None:
    assert model.count_tokens(chat("Hello there")) > 0
    assert model.exact_token_count is False
