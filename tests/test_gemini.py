"""GeminiModel through the official google-genai SDK against a local Gemini API stub."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import pytest
import pytest_asyncio
from google.genai import _api_client as genai_api_client

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
from keel.models.gemini import SKIP_SIGNATURE, GeminiModel
from keel.types import ChatOptions, ChatRequest, Message, ToolCall
from provider_stubs import (
    PERSON,
    WEATHER,
    Reply,
    StubServer,
    closed_port_url,
    gemini_embeddings,
    gemini_error,
    gemini_response,
    gemini_stream,
)

MODEL = "gemini-test"


# One event loop for the module, so one client serves most tests: building one
# loads the CA bundle three times (about 0.1 s).
pytestmark = [
    pytest.mark.asyncio(loop_scope="module"),
    # google-genai's own aiohttp subclass warns on import; not ours to fix.
    pytest.mark.filterwarnings("ignore:Inheritance class AiohttpClientSession:DeprecationWarning"),
]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def shared_model(server: StubServer) -> AsyncIterator[GeminiModel]:
    m = GeminiModel(MODEL, api_key="gk-test", base_url=server.url, timeout=5, api_version="v1beta")
    yield m
    await m.aclose()


@pytest.fixture
def model(stub: StubServer, shared_model: GeminiModel) -> GeminiModel:
    shared_model.forget_signatures()
    return shared_model


def chat(*messages: Message | str, **options: Any) -> ChatRequest:
    msgs = tuple(Message.user(m) if isinstance(m, str) else m for m in messages)
    return ChatRequest(MODEL, msgs, ChatOptions(**options))


# --- plain completion ---------------------------------------------------------------


async def test_complete_text_usage_and_model(stub: StubServer, model: GeminiModel) -> None:
    usage = {
        "promptTokenCount": 120,
        "cachedContentTokenCount": 100,
        "candidatesTokenCount": 7,
        "thoughtsTokenCount": 30,
    }
    stub.reply_json(gemini_response("Hi there", usage=usage, model_version="gemini-test-002", thought="thinking..."))

    response = await model.complete(chat("Hello"))

    assert response.text == "Hi there"  # thought parts are not the answer
    assert response.finish_reason == "stop"
    assert response.model == "gemini-test-002"
    assert response.provider == "gcp.gemini"
    assert response.usage.input_tokens == 120  # the prompt count already includes cached tokens
    assert response.usage.cached_input_tokens == 100
    assert response.usage.output_tokens == 37  # candidates + thoughts
    assert response.usage.reasoning_tokens == 30
    sent = stub.last
    assert (sent.method, sent.path) == ("POST", f"/v1beta/models/{MODEL}:generateContent")
    assert sent.headers["x-goog-api-key"] == "gk-test"
    assert sent.json["contents"] == [{"role": "user", "parts": [{"text": "Hello"}]}]
    assert "systemInstruction" not in sent.json


async def test_default_api_version_is_the_sdks(stub: StubServer) -> None:
    stub.reply_json(gemini_response())
    m = GeminiModel(MODEL, api_key="k", base_url=stub.url)
    try:
        await m.complete(chat("hi"))
    finally:
        await m.aclose()
    assert stub.last.path.endswith(f"/models/{MODEL}:generateContent")


@pytest.mark.parametrize(
    ("reason", "expected"),
    [
        ("STOP", "stop"),
        ("MAX_TOKENS", "length"),
        ("SAFETY", "content_filter"),
        ("RECITATION", "content_filter"),
        ("MALFORMED_FUNCTION_CALL", "error"),
    ],
)
async def test_finish_reasons(stub: StubServer, model: GeminiModel, reason: str, expected: str) -> None:
    stub.reply_json(gemini_response("x", finish_reason=reason))
    assert (await model.complete(chat("Hello"))).finish_reason == expected


async def test_blocked_prompt_is_content_filter(stub: StubServer, model: GeminiModel) -> None:
    stub.reply_json({"promptFeedback": {"blockReason": "SAFETY"}, "usageMetadata": {"promptTokenCount": 4}})
    response = await model.complete(chat("Hello"))
    assert (response.text, response.finish_reason, response.usage.input_tokens) == ("", "content_filter", 4)


async def test_request_body_system_merging_and_options(stub: StubServer, model: GeminiModel) -> None:
    stub.reply_json(gemini_response())
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
        stop=("END",),
        seed=7,
    )

    await model.complete(request)

    body = stub.last.json
    assert body["systemInstruction"]["parts"] == [{"text": "Be brief.\n\nAnswer in French."}]
    assert body["contents"] == [
        {"role": "user", "parts": [{"text": "first"}, {"text": "second"}]},
        {"role": "model", "parts": [{"text": "ok"}, {"text": "more"}]},
        {"role": "user", "parts": [{"text": "third"}]},
    ]
    assert body["generationConfig"] == {
        "temperature": 0.2,
        "topP": 0.9,
        "maxOutputTokens": 100,
        "stopSequences": ["END"],
        "seed": 7,
    }
    assert "tools" not in body and "toolConfig" not in body


async def test_max_output_tokens_default_comes_from_the_adapter(stub: StubServer) -> None:
    stub.reply_json(gemini_response())
    m = GeminiModel(MODEL, api_key="k", base_url=stub.url, max_output_tokens=321)
    try:
        await m.complete(chat("hi"))
    finally:
        await m.aclose()
    assert stub.last.json["generationConfig"]["maxOutputTokens"] == 321


# --- tools --------------------------------------------------------------------------


async def test_function_call_in_the_answer(stub: StubServer, model: GeminiModel) -> None:
    call = {"name": "get_weather", "args": {"city": "Paris"}, "id": "fc_1"}
    stub.reply_json(gemini_response("Let me check.", function_calls=[call]))

    response = await model.complete(chat("Weather in Paris?", tools=(WEATHER,)))

    assert response.finish_reason == "tool_calls"
    assert response.text == "Let me check."
    [tool_call] = response.tool_calls
    assert (tool_call.id, tool_call.name, tool_call.parsed_arguments()) == ("fc_1", "get_weather", {"city": "Paris"})
    declaration = stub.last.json["tools"][0]["functionDeclarations"][0]
    assert declaration["name"] == "get_weather"
    assert declaration["description"] == "Weather of a city"
    # The SDK sends the raw JSON schema under its proto field name; the API accepts both spellings.
    schema = declaration.get("parametersJsonSchema", declaration.get("parameters_json_schema"))
    assert schema == dict(WEATHER.parameters)


async def test_function_call_without_id_gets_one(stub: StubServer, model: GeminiModel) -> None:
    stub.reply_json(gemini_response(None, function_calls=[{"name": "get_weather", "args": {}}]))
    response = await model.complete(chat("q", tools=(WEATHER,)))
    assert response.tool_calls[0].id.startswith("call_")
    assert response.tool_calls[0].arguments == "{}"


async def test_tool_calls_and_results_in_the_conversation(stub: StubServer, model: GeminiModel) -> None:
    stub.reply_json(gemini_response("Sunny in both."))
    calls = (ToolCall("c1", "get_weather", '{"city": "Paris"}'), ToolCall("c2", "get_weather", '{"city": "Oslo"}'))
    request = chat(
        "Weather in Paris and Oslo?",
        Message.assistant(None, calls),
        Message.tool("c1", "sunny"),
        Message.tool("c2", "sunny too"),
        tools=(WEATHER,),
    )

    await model.complete(request)

    contents = stub.last.json["contents"]
    assert len(contents) == 3
    model_turn = contents[1]
    assert model_turn["role"] == "model"
    assert [p["functionCall"] for p in model_turn["parts"]] == [
        {"id": "c1", "name": "get_weather", "args": {"city": "Paris"}},
        {"id": "c2", "name": "get_weather", "args": {"city": "Oslo"}},
    ]
    # Unknown signatures: the first call carries Google's documented placeholder, the others none.
    assert base64.b64decode(model_turn["parts"][0]["thoughtSignature"]) == SKIP_SIGNATURE
    assert "thoughtSignature" not in model_turn["parts"][1]
    assert contents[2] == {
        "role": "user",
        "parts": [
            {"functionResponse": {"id": "c1", "name": "get_weather", "response": {"output": "sunny"}}},
            {"functionResponse": {"id": "c2", "name": "get_weather", "response": {"output": "sunny too"}}},
        ],
    }


async def test_thought_signature_is_sent_back_with_its_call(stub: StubServer, model: GeminiModel) -> None:
    signature = base64.b64encode(b"real-signature").decode()
    call = {"name": "get_weather", "args": {"city": "Oslo"}, "id": "fc_9", "thoughtSignature": signature}
    stub.reply_json(gemini_response(None, function_calls=[call]))
    first = await model.complete(chat("q", tools=(WEATHER,)))

    stub.reply_json(gemini_response("done"))
    await model.complete(chat("q", Message.assistant(None, first.tool_calls), Message.tool("fc_9", "cold")))

    part = stub.last.json["contents"][1]["parts"][0]
    assert base64.b64decode(part["thoughtSignature"]) == b"real-signature"


async def test_tool_result_for_an_unknown_call_is_refused(model: GeminiModel) -> None:
    with pytest.raises(InvalidMessages, match="function name"):
        await model.complete(chat("q", Message.tool("nope", "x")))


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ("auto", {"mode": "AUTO"}),
        ("required", {"mode": "ANY"}),
        ("none", {"mode": "NONE"}),
        ("get_weather", {"mode": "ANY", "allowedFunctionNames": ["get_weather"]}),
    ],
)
async def test_tool_choice_mapping(stub: StubServer, model: GeminiModel, choice: str, expected: Any) -> None:
    stub.reply_json(gemini_response())
    await model.complete(chat("hi", tools=(WEATHER,), tool_choice=choice))
    assert stub.last.json["toolConfig"] == {"functionCallingConfig": expected}


# --- structured output ----------------------------------------------------------------


async def test_structured_output(stub: StubServer, model: GeminiModel) -> None:
    stub.reply_json(gemini_response('{"name": "Ada", "age": 36}'))

    response = await model.complete(chat("Who wrote the first program?", response_format=PERSON))

    assert json.loads(response.text) == {"name": "Ada", "age": 36}
    assert response.finish_reason == "stop"
    config = stub.last.json["generationConfig"]
    assert config["responseMimeType"] == "application/json"
    assert config["responseJsonSchema"] == dict(PERSON.schema)


# --- streaming --------------------------------------------------------------------------


async def test_stream_text_and_usage(stub: StubServer, model: GeminiModel) -> None:
    final_usage = {"promptTokenCount": 20, "cachedContentTokenCount": 8, "candidatesTokenCount": 9}
    chunks = [
        gemini_response("Hel", finish_reason=None),
        gemini_response("lo", finish_reason=None),
        gemini_response(" world", usage=final_usage, model_version="gemini-test-003"),
    ]
    stub.reply_stream(gemini_stream(chunks))

    deltas, final = await collect(model, chat("Hello"))

    assert "".join(d.text for d in deltas) == "Hello world" == final.text
    assert len(deltas) == 3
    assert final.finish_reason == "stop"
    assert final.model == "gemini-test-003"
    assert (final.usage.input_tokens, final.usage.cached_input_tokens, final.usage.output_tokens) == (20, 8, 9)
    assert stub.last.path == f"/v1beta/models/{MODEL}:streamGenerateContent"
    assert stub.last.query == {"alt": ["sse"]}


async def test_stream_function_calls(stub: StubServer, model: GeminiModel) -> None:
    calls = [
        {"name": "get_weather", "args": {"city": "Paris"}, "id": "fc_1"},
        {"name": "get_weather", "args": {"city": "Oslo"}, "id": "fc_2"},
    ]
    chunks = [gemini_response("Checking.", finish_reason=None), gemini_response(None, function_calls=calls)]
    stub.reply_stream(gemini_stream(chunks))

    deltas, final = await collect(model, chat("q", tools=(WEATHER,)))

    pieces = [(d.tool_call_index, d.tool_call_id, d.tool_name, d.tool_arguments) for d in deltas if d.tool_name]
    assert pieces == [
        (0, "fc_1", "get_weather", '{"city": "Paris"}'),
        (1, "fc_2", "get_weather", '{"city": "Oslo"}'),
    ]
    assert final.finish_reason == "tool_calls"
    assert final.text == "Checking."
    assert [c.id for c in final.tool_calls] == ["fc_1", "fc_2"]


async def test_stream_structured_output(stub: StubServer, model: GeminiModel) -> None:
    chunks = [gemini_response('{"name": "A', finish_reason=None), gemini_response('da", "age": 36}')]
    stub.reply_stream(gemini_stream(chunks))
    deltas, final = await collect(model, chat("q", response_format=PERSON))
    assert "".join(d.text for d in deltas) == final.text
    assert json.loads(final.text) == {"name": "Ada", "age": 36}


async def test_stream_with_bad_json_is_malformed(stub: StubServer, model: GeminiModel) -> None:
    stub.reply_stream([b"data: {not json\r\n\r\n"])
    with pytest.raises(MalformedResponse):
        await collect(model, chat("q"))


async def test_stream_without_a_finish_reason_is_malformed(stub: StubServer, model: GeminiModel) -> None:
    stub.reply_stream(
        gemini_stream([gemini_response("Hel", finish_reason=None), gemini_response("lo", finish_reason=None)])
    )
    with pytest.raises(MalformedResponse, match="finish reason"):
        await collect(model, chat("q"))


@pytest.mark.parametrize("first", [True, False])
async def test_stream_error_chunk_is_translated(stub: StubServer, model: GeminiModel, first: bool) -> None:
    error = b'data: {"error": {"code": 429, "message": "quota", "status": "RESOURCE_EXHAUSTED"}}\r\n\r\n'
    before = [] if first else gemini_stream([gemini_response("Hel", finish_reason=None)])
    stub.reply_stream([*before, error])
    with pytest.raises(ProviderRateLimited, match="quota") as info:
        await collect(model, chat("q"))
    assert info.value.status == 429


async def test_stream_answered_with_bad_json_and_no_events_is_malformed(stub: StubServer, model: GeminiModel) -> None:
    stub.push(Reply(body=b"{not json"))
    with pytest.raises(MalformedResponse):
        await collect(model, chat("q"))


async def test_stream_http_error_before_the_stream(stub: StubServer, model: GeminiModel) -> None:
    stub.push(gemini_error(503, "overloaded"))
    with pytest.raises(ServerError) as info:
        await collect(model, chat("q"))
    assert info.value.status == 503


# --- embeddings --------------------------------------------------------------------------


async def test_embed(stub: StubServer) -> None:
    stub.reply_json(gemini_embeddings([[0.1, 0.2], [0.3, 0.4]]))
    m = GeminiModel("gemini-embedding-2", api_key="k", base_url=stub.url, api_version="v1beta")
    try:
        result = await m.embed(["first text", "second text"])
    finally:
        await m.aclose()

    assert result.vectors == [[0.1, 0.2], [0.3, 0.4]]
    assert (result.model, result.provider) == ("gemini-embedding-2", "gcp.gemini")
    assert result.usage.input_tokens > 0  # approximated: the API reported none
    sent = stub.last
    assert sent.path == "/v1beta/models/gemini-embedding-2:batchEmbedContents"
    # One request per text, even for multimodal embedding models.
    assert [r["content"]["parts"] for r in sent.json["requests"]] == [
        [{"text": "first text"}],
        [{"text": "second text"}],
    ]


async def test_embed_uses_reported_usage_and_batches_by_100(stub: StubServer, model: GeminiModel) -> None:
    stub.reply_json(gemini_embeddings([[1.0]] * 100, usage={"promptTokenCount": 300}))
    stub.reply_json(gemini_embeddings([[2.0]] * 5, usage={"promptTokenCount": 15}))

    result = await model.embed([f"t{i}" for i in range(105)])

    assert len(result.vectors) == 105
    assert result.usage.input_tokens == 315
    assert [len(r.json["requests"]) for r in stub.requests] == [100, 5]


async def test_embed_with_a_wrong_number_of_vectors_is_malformed(stub: StubServer, model: GeminiModel) -> None:
    stub.reply_json(gemini_embeddings([[1.0]]))
    with pytest.raises(MalformedResponse):
        await model.embed(["a", "b"])


async def test_embed_error_is_translated(stub: StubServer, model: GeminiModel) -> None:
    stub.push(gemini_error(429, "quota"))
    with pytest.raises(ProviderRateLimited):
        await model.embed(["a"])


# --- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("status", "error_class"), ERROR_STATUSES)
async def test_error_statuses(
    stub: StubServer, model: GeminiModel, status: int, error_class: type[ProviderError]
) -> None:
    stub.push(gemini_error(status, "went wrong"))

    with pytest.raises(error_class) as info:
        await model.complete(chat("q"))

    check_status_error(info.value, error_class, status, "gcp.gemini", MODEL)


async def test_rate_limit_retry_after_header(stub: StubServer, model: GeminiModel) -> None:
    stub.push(gemini_error(429, headers={"retry-after": "17"}))
    with pytest.raises(ProviderRateLimited) as info:
        await model.complete(chat("q"))
    assert info.value.retry_after == 17


async def test_rate_limit_retry_after_http_date(stub: StubServer, model: GeminiModel) -> None:
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    stub.push(gemini_error(429, headers={"retry-after": when}))
    with pytest.raises(ProviderRateLimited) as info:
        await model.complete(chat("q"))
    assert info.value.retry_after is not None
    assert 25 <= info.value.retry_after <= 31


async def test_rate_limit_retry_info_in_the_body(stub: StubServer, model: GeminiModel) -> None:
    retry_info = {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "12s"}
    stub.push(gemini_error(429, "quota exceeded", details=[retry_info]))
    with pytest.raises(ProviderRateLimited) as info:
        await model.complete(chat("q"))
    assert info.value.retry_after == 12


async def test_prompt_too_long_is_context_window_exceeded(stub: StubServer, model: GeminiModel) -> None:
    message = "The input token count (1200000) exceeds the maximum number of tokens allowed (1048576)."
    stub.push(gemini_error(400, message))
    with pytest.raises(ContextWindowExceeded) as info:
        await model.complete(chat("q"))
    assert (info.value.tokens, info.value.context_window) == (1200000, 1048576)


# --- transport failures, on each HTTP library the SDK may use -------------------------


@pytest.fixture(params=["aiohttp", "httpx"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The SDK sends through aiohttp when it is installed, else httpx2: test both."""
    name: str = request.param
    if name == "aiohttp":
        pytest.importorskip("aiohttp")
    else:
        monkeypatch.setattr(genai_api_client, "has_aiohttp", False)
    return name


@pytest_asyncio.fixture(loop_scope="module")
async def fresh_model(stub: StubServer, backend: str) -> AsyncIterator[GeminiModel]:
    m = GeminiModel(MODEL, api_key="k", base_url=stub.url, timeout=0.2)
    yield m
    await m.aclose()


async def test_timeout(stub: StubServer, fresh_model: GeminiModel) -> None:
    stub.push(Reply(delay=2.0, body=gemini_response()))
    with pytest.raises(ProviderTimeout) as info:
        await fresh_model.complete(chat("q"))
    assert info.value.provider == "gcp.gemini"


async def test_timeout_between_stream_chunks(stub: StubServer, fresh_model: GeminiModel) -> None:
    chunks = gemini_stream([gemini_response("a", finish_reason=None), gemini_response("b")])
    stub.reply_stream(chunks, event_delay=1.0)
    with pytest.raises(ProviderTimeout):
        await collect(fresh_model, chat("q"))


async def test_per_call_timeout_option(stub: StubServer, model: GeminiModel) -> None:
    stub.push(Reply(delay=2.0, body=gemini_response()))
    with pytest.raises(ProviderTimeout):
        await model.complete(chat("q", timeout=0.2))
    assert stub.last.headers["x-server-timeout"] == "1"


async def test_connection_refused(backend: str) -> None:
    m = GeminiModel(MODEL, api_key="k", base_url=closed_port_url())
    try:
        with pytest.raises(ProviderConnectionError) as info:
            await m.complete(chat("q"))
    finally:
        await m.aclose()
    assert info.value.provider == "gcp.gemini"


async def test_connection_reset(stub: StubServer, fresh_model: GeminiModel) -> None:
    stub.push(Reply(reset=True))
    with pytest.raises(ProviderConnectionError):
        await fresh_model.complete(chat("q"))


async def test_stream_cut_by_the_server_is_a_connection_error(stub: StubServer, fresh_model: GeminiModel) -> None:
    stub.reply_stream(gemini_stream([gemini_response("Hel", finish_reason=None)]), abort=True)
    with pytest.raises(ProviderConnectionError):
        await collect(fresh_model, chat("q"))


# --- malformed answers ----------------------------------------------------------------------


async def test_malformed_json_body(stub: StubServer, model: GeminiModel) -> None:
    stub.push(Reply(body=b'{"candidates": [tru'))
    with pytest.raises(MalformedResponse) as info:
        await model.complete(chat("q"))
    assert info.value.provider == "gcp.gemini"


async def test_json_of_the_wrong_shape_is_malformed(stub: StubServer, model: GeminiModel) -> None:
    stub.reply_json({"candidates": "not a list"})
    with pytest.raises(MalformedResponse):
        await model.complete(chat("q"))


async def test_count_tokens_is_the_offline_approximation(model: GeminiModel) -> None:
    assert model.count_tokens(chat("Hello there")) > 0
    assert model.exact_token_count is False
