"""Streaming correctness: structured output while streaming, truncated JSON, and the streams of a flaky
upstream (a non-SSE body, an SSE stream without its end, an error event) never passed off as answers."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from pydantic import BaseModel

from helpers import gateway, openai_model, spans
from keel import Gateway, TestModel, errors
from keel.types import ModelResponse
from provider_stubs import Reply, StubServer, anthropic_stream, gemini_response, gemini_stream, sse
from serving import Server
from stubs import OpenAIStub, Scripted, stream_chunks, stream_error


class City(BaseModel):
    name: str
    population: int


CITY = '{"name": "Oslo", "population": 709000}'


BACKUP = '[models.backup]\nprovider = "test"\nmodel = "backup"\nscript = ["from the backup"]\n'


def _backed_up(tmp_path: Path, url: str) -> Gateway:
    """`up` (the OpenAI stub, no retries) falling back to `backup` (a scripted test model)."""
    return gateway(tmp_path, "max_retries = 0\n" + openai_model("up", url, extra='fallbacks = ["backup"]') + BACKUP)


def _alone(tmp_path: Path, url: str) -> Gateway:
    return gateway(tmp_path, "max_retries = 0\n" + openai_model("up", url))


# --- structured output while streaming (16.2) ----------------------------------------------


async def test_stream_with_a_response_model_streams_the_json_and_parses_it_at_the_end() -> None:
    gw = Gateway(models={"t": TestModel(CITY, chunk_chars=5)})
    stream = gw.stream("Biggest city in Norway?", model="t", response_model=City)
    pieces = [d.text async for d in stream]
    assert len(pieces) > 3 and "".join(pieces) == CITY
    assert stream.result is not None and stream.result.parsed == City(name="Oslo", population=709000)
    [span] = spans(gw)
    assert span.status == "ok" and span.attributes["keel.structured.tries"] == 1
    assert span.input is not None and span.input["response_format"]["name"] == "City"
    await gw.aclose()


async def test_an_invalid_streamed_answer_fails_at_the_end_without_a_reask() -> None:
    model = TestModel('{"name": "Oslo"}')
    gw = Gateway(models={"t": model})
    stream = gw.stream("q", model="t", response_model=City)
    pieces: list[str] = []
    with pytest.raises(errors.StructuredOutputError, match="population") as caught:
        async for delta in stream:
            pieces.append(delta.text)
    assert "".join(pieces) == '{"name": "Oslo"}'  # the caller saw the pieces, then the error
    assert len(model.requests) == 1 and caught.value.last_text == '{"name": "Oslo"}'
    assert caught.value.usage is not None and caught.value.usage.output_tokens > 0  # what it cost is kept
    [span] = spans(gw)
    assert span.status == "error" and span.error_type == "StructuredOutputError"
    await gw.aclose()


async def test_a_structured_stream_reaches_the_provider_with_its_schema(
    tmp_path: Path, openai_stub: OpenAIStub
) -> None:
    openai_stub.push(Scripted(stream=stream_chunks(CITY)))
    gw = _alone(tmp_path, openai_stub.url)
    result = await gw.stream("q", model="up", response_model=City).collect()
    assert result.parsed == City(name="Oslo", population=709000)
    sent = openai_stub.requests[-1]
    assert sent["stream"] is True and sent["response_format"]["json_schema"]["name"] == "City"
    await gw.aclose()


# --- truncated JSON says why (16.3) -----------------------------------------------------


def _cut(text: str = '{"name": "Os') -> ModelResponse:
    return ModelResponse(text=text, finish_reason="length")


async def test_json_cut_by_max_tokens_says_so_and_is_not_reasked() -> None:
    model = TestModel(_cut())
    gw = Gateway(models={"t": model})
    with pytest.raises(errors.StructuredOutputError) as caught:
        await gw.chat("q", model="t", response_model=City, max_tokens=100)
    message = caught.value.message
    assert "max_tokens=100" in message and "cut off" in message and "length" in message
    assert caught.value.code == "structured_output_truncated"
    assert len(model.requests) == 1 and caught.value.attempts == 1  # the same limit would cut it again
    await gw.aclose()


async def test_json_cut_by_the_models_own_limit_names_it() -> None:
    gw = Gateway(models={"t": TestModel(_cut())})
    with pytest.raises(errors.StructuredOutputError, match="the model's own output limit"):
        await gw.chat("q", model="t", response_model=City)
    with pytest.raises(errors.StructuredOutputError, match="max_tokens=50"):
        await gw.stream("q", model="t", response_model=City, max_tokens=50).collect()
    await gw.aclose()


async def test_a_reask_still_happens_when_the_answer_was_not_cut() -> None:
    model = TestModel(["not json", _cut(), CITY])
    gw = Gateway(models={"t": model})
    with pytest.raises(errors.StructuredOutputError, match="max_tokens=20"):
        await gw.chat("q", model="t", response_model=City, max_tokens=20)
    assert len(model.requests) == 2  # one re-ask for the bad answer; none after the cut one
    await gw.aclose()


# --- malformed streams (17.3) and error events (17.4), OpenAI-compatible upstream -----------


async def test_a_non_sse_answer_with_bad_json_is_malformed_and_falls_back(
    tmp_path: Path, openai_stub: OpenAIStub
) -> None:
    openai_stub.push(Scripted(raw=b"{not json"), Scripted(raw=b"{not json"))
    alone = _alone(tmp_path / "a", openai_stub.url)
    with pytest.raises(errors.MalformedResponse, match="server-sent events"):
        await alone.stream("hi", model="up").collect()
    [span] = spans(alone)
    assert span.status == "error" and span.error_type == "MalformedResponse"
    await alone.aclose()
    backed = _backed_up(tmp_path / "b", openai_stub.url)
    result = await backed.stream("hi", model="up").collect()
    assert result.text == "from the backup" and result.model == "backup" and result.attempts == 2
    await backed.aclose()


async def test_a_non_sse_completion_to_a_stream_request_is_still_an_answer(
    tmp_path: Path, openai_stub: OpenAIStub
) -> None:
    # some OpenAI-compatible servers ignore `stream` and answer one JSON completion: that is a real answer
    from stubs import completion

    openai_stub.push(Scripted(raw=json.dumps(completion("whole answer")).encode()))
    gw = _alone(tmp_path, openai_stub.url)
    stream = gw.stream("hi", model="up")
    assert [d.text async for d in stream] == ["whole answer"]
    assert (
        stream.result is not None and stream.result.finish_reason == "stop" and stream.result.usage.output_tokens == 5
    )
    await gw.aclose()


async def test_an_sse_stream_without_a_finish_reason_or_done_is_an_error(
    tmp_path: Path, openai_stub: OpenAIStub
) -> None:
    chunks = stream_chunks("This answer never ends properly")
    openai_stub.push(Scripted(stream=chunks[:3], done=False))
    gw = _alone(tmp_path, openai_stub.url)
    stream = gw.stream("hi", model="up")
    with pytest.raises(errors.MalformedResponse, match="finish reason"):
        async for _ in stream:
            pass
    assert stream.text  # the partial text reached the caller, then the error: never a clean stop
    [span] = spans(gw)
    assert span.status == "error" and span.error_type == "MalformedResponse"
    await gw.aclose()


async def test_an_empty_stream_falls_back(tmp_path: Path, openai_stub: OpenAIStub) -> None:
    openai_stub.push(Scripted(stream=[], done=False))
    gw = _backed_up(tmp_path, openai_stub.url)
    result = await gw.stream("hi", model="up").collect()
    assert result.text == "from the backup" and result.attempts == 2
    await gw.aclose()


@pytest.mark.parametrize(
    ("event", "error_class", "status"),
    [
        (stream_error("The server is overloaded", "server_error"), errors.ServerError, 500),
        (
            stream_error("Rate limit reached", "rate_limit_error", "rate_limit_exceeded"),
            errors.ProviderRateLimited,
            429,
        ),
        (stream_error("bad value", "invalid_request_error"), errors.BadRequest, 400),
        (stream_error("vLLM: engine dead", "InternalServerError", 503), errors.ServerError, 503),
    ],
)
async def test_an_error_event_first_is_translated(
    tmp_path: Path,
    openai_stub: OpenAIStub,
    event: dict[str, object],
    error_class: type[errors.ProviderError],
    status: int,
) -> None:
    openai_stub.push(Scripted(stream=[event]))
    gw = _alone(tmp_path, openai_stub.url)
    with pytest.raises(error_class) as caught:
        await gw.stream("hi", model="up").collect()
    assert caught.value.status == status and caught.value.provider == "openai"
    assert str(event["error"]["message"]) in caught.value.message  # type: ignore[index]
    await gw.aclose()


async def test_an_error_event_first_falls_back(tmp_path: Path, openai_stub: OpenAIStub) -> None:
    openai_stub.push(Scripted(stream=[stream_error("The server is overloaded")]))
    gw = _backed_up(tmp_path, openai_stub.url)
    result = await gw.stream("hi", model="up").collect()
    assert result.text == "from the backup" and result.attempts == 2
    await gw.aclose()


async def test_an_error_event_mid_stream_is_an_error_after_the_pieces(tmp_path: Path, openai_stub: OpenAIStub) -> None:
    chunks = stream_chunks("Half of an answer, then")
    openai_stub.push(Scripted(stream=[*chunks[:2], stream_error("The server is overloaded")]))
    gw = _backed_up(tmp_path, openai_stub.url)
    stream = gw.stream("hi", model="up")
    with pytest.raises(errors.ServerError, match="overloaded"):
        async for _ in stream:
            pass
    assert stream.text and len(openai_stub.requests) == 1  # no fallback once a piece reached the caller
    await gw.aclose()


async def test_an_sse_error_event_with_an_event_name(tmp_path: Path, openai_stub: OpenAIStub) -> None:
    frame = b'event: error\ndata: {"error": {"message": "quota gone", "type": "insufficient_quota"}}\n\n'
    openai_stub.push(Scripted(stream=[frame]))
    gw = _alone(tmp_path, openai_stub.url)
    with pytest.raises(errors.ProviderRateLimited, match="quota gone"):
        await gw.stream("hi", model="up").collect()
    await gw.aclose()


# --- the same defects through keel's server, seen by the openai SDK -----------------------


@pytest.fixture
def served_up(tmp_path: Path, openai_stub: OpenAIStub) -> Iterator[tuple[Server, Gateway, openai.OpenAI]]:
    """keel's server with `up` (the stub, falling back to `backup`) and `solo` (the stub alone)."""
    toml = (
        "max_retries = 0\n"
        + openai_model("up", openai_stub.url, extra='fallbacks = ["backup"]')
        + openai_model("solo", openai_stub.url)
        + BACKUP
    )
    gw = gateway(tmp_path, toml, models={"json": TestModel(_cut())})
    server = Server(gw)
    yield server, gw, openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0)
    server.stop()
    gw.close()


def _ask(client: openai.OpenAI, model: str) -> list[object]:
    return list(client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], stream=True))


def test_server_falls_back_before_the_first_byte(
    served_up: tuple[Server, Gateway, openai.OpenAI], openai_stub: OpenAIStub
) -> None:
    _, _, client = served_up
    for fault in (Scripted(raw=b"{not json"), Scripted(stream=[stream_error("overloaded")]), Scripted(stream=[])):
        openai_stub.push(fault)
        chunks = _ask(client, "up")
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)  # type: ignore[attr-defined]
        assert text == "from the backup"


def test_server_answers_an_upstream_error_event_with_its_status(
    served_up: tuple[Server, Gateway, openai.OpenAI], openai_stub: OpenAIStub
) -> None:
    server, _, client = served_up
    openai_stub.push(Scripted(stream=[stream_error("Rate limit reached", "rate_limit_error")]))
    with pytest.raises(openai.RateLimitError) as caught:
        _ask(client, "solo")
    assert "Rate limit reached" in caught.value.message
    openai_stub.push(Scripted(raw=b"{not json"))
    body = {"model": "solo", "stream": True, "messages": [{"role": "user", "content": "x"}]}
    response = httpx.post(f"{server.url}/chat/completions", json=body)
    assert response.status_code == 502 and response.headers["content-type"].startswith("application/json")
    assert response.json()["error"]["code"] == "malformed_response"


@pytest.mark.parametrize("fault", ["cut", "error"])
def test_server_reports_a_fault_after_the_first_byte_as_an_error_event(
    served_up: tuple[Server, Gateway, openai.OpenAI], openai_stub: OpenAIStub, fault: str
) -> None:
    _, gw, client = served_up
    chunks = stream_chunks("A partial answer that stops")
    if fault == "cut":
        openai_stub.push(Scripted(stream=chunks[:3], done=False))
    else:
        openai_stub.push(Scripted(stream=[*chunks[:3], stream_error("The server is overloaded")]))
    seen: list[object] = []
    stream = client.chat.completions.create(model="up", messages=[{"role": "user", "content": "hi"}], stream=True)
    with pytest.raises(openai.APIError) as caught:
        for chunk in stream:
            seen.append(chunk)
    assert seen and not any(c.choices and c.choices[0].finish_reason for c in seen)  # type: ignore[attr-defined]
    assert ("finish reason" if fault == "cut" else "overloaded") in caught.value.message
    failed = [s for s in spans(gw) if s.attributes.get("keel.stream")]
    assert failed[-1].status == "error"


def test_server_streams_structured_output(
    served_up: tuple[Server, Gateway, openai.OpenAI], openai_stub: OpenAIStub
) -> None:
    _, _, client = served_up
    openai_stub.push(Scripted(stream=stream_chunks(CITY, pieces=6)))
    schema = {"name": "City", "schema": City.model_json_schema()}
    stream = client.chat.completions.create(
        model="solo", messages=[{"role": "user", "content": "city?"}], stream=True,
        response_format={"type": "json_schema", "json_schema": schema},  # type: ignore[typeddict-item]
    )  # fmt: skip
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert json.loads(text) == {"name": "Oslo", "population": 709000} and len(chunks) > 4
    assert openai_stub.requests[-1]["response_format"]["type"] == "json_schema"


def test_server_says_max_tokens_cut_the_json(served_up: tuple[Server, Gateway, openai.OpenAI]) -> None:
    _, gw, client = served_up
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        client.chat.completions.create(
            model="json", messages=[{"role": "user", "content": "json please"}], max_tokens=100,
            response_format={"type": "json_object"},
        )  # fmt: skip
    assert "max_tokens=100" in caught.value.message and "tries" not in caught.value.message
    model = gw._extra["json"]
    assert isinstance(model, TestModel) and model.calls == 1


async def test_a_retryable_error_event_first_is_retried(tmp_path: Path, openai_stub: OpenAIStub) -> None:
    openai_stub.push(Scripted(stream=[stream_error("The server is overloaded")]), Scripted(stream=stream_chunks("ok")))
    gw = gateway(tmp_path, "max_retries = 1\n" + openai_model("up", openai_stub.url))
    result = await gw.stream("hi", model="up").collect()
    assert result.text == "ok" and result.attempts == 2 and len(openai_stub.requests) == 2
    await gw.aclose()


# --- Anthropic and Gemini: the same faults fall back before the first byte ----------------------


@pytest.mark.parametrize(
    ("provider", "fault"),
    [
        ("anthropic", Reply(events=[sse({"type": "error", "error": {"type": "overloaded_error", "message": "x"}})])),
        ("anthropic", Reply(body=b"{not json")),
        ("anthropic", Reply(events=anthropic_stream([], stop=False)[:1])),
        ("gemini", Reply(events=[b'data: {"error": {"code": 503, "message": "x", "status": "UNAVAILABLE"}}\r\n\r\n'])),
        ("gemini", Reply(events=gemini_stream([gemini_response(None, finish_reason=None)]))),
        ("gemini", Reply(body=b"{not json")),
    ],
)
@pytest.mark.filterwarnings("ignore:Inheritance class AiohttpClientSession:DeprecationWarning")  # google-genai's
async def test_other_providers_fall_back_before_the_first_byte(
    tmp_path: Path, stub: StubServer, monkeypatch: pytest.MonkeyPatch, provider: str, fault: Reply
) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test")
    monkeypatch.setenv("GEMINI_API_KEY", "gk-test")
    stub.push(fault)
    head = f'max_retries = 0\n[models.up]\nprovider = "{provider}"\nmodel = "m"\nbase_url = "{stub.url}"\n'
    gw = gateway(tmp_path, head + 'fallbacks = ["backup"]\n' + BACKUP)
    result = await gw.stream("hi", model="up").collect()
    assert result.text == "from the backup" and result.attempts == 2 and len(stub.requests) == 1
    await gw.aclose()


@pytest.mark.parametrize(
    "chunk", [{"choices": "nope"}, {"choices": [{"delta": None, "finish_reason": "stop"}]}, "a string", [1, 2]]
)
async def test_a_chunk_of_the_wrong_shape_is_malformed(tmp_path: Path, openai_stub: OpenAIStub, chunk: object) -> None:
    openai_stub.push(Scripted(stream=[chunk]))
    gw = _alone(tmp_path, openai_stub.url)
    with pytest.raises(errors.MalformedResponse, match="cannot read"):
        await gw.stream("hi", model="up").collect()
    await gw.aclose()
