"""The OpenAI adapter through the official SDK against the local stub."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from helpers import gateway, openai_model, spans
from keel import errors
from keel.types import Tool
from stubs import OpenAIStub, Scripted, completion, error_body, stream_chunks


async def test_plain_call_maps_usage_cost_and_body(tmp_path: Path, openai_stub: OpenAIStub) -> None:
    openai_stub.push(
        completion("Paris.", prompt_tokens=1000, completion_tokens=100, cached_tokens=200, reasoning_tokens=30)
    )
    gw = gateway(tmp_path, openai_model("gpt", openai_stub.url))
    result = await gw.chat(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}],
        model="gpt", temperature=0.2, max_tokens=50, stop=["\n\n"], seed=7,
    )  # fmt: skip
    assert result.text == "Paris."
    assert result.usage.input_tokens == 1000 and result.usage.cached_input_tokens == 200
    assert result.usage.reasoning_tokens == 30 and result.usage.output_tokens == 100
    # gpt-4o-mini from genai-prices: $0.15/M input, $0.075/M cached input, $0.60/M output
    assert result.cost_usd == pytest.approx(800 * 0.15e-6 + 200 * 0.075e-6 + 100 * 0.6e-6)
    assert result.response_model == "gpt-4o-mini-2024-07-18" and result.model == "gpt" and result.attempts == 1
    sent = openai_stub.requests[-1]
    assert sent["model"] == "gpt-4o-mini" and sent["temperature"] == 0.2 and sent["max_tokens"] == 50
    assert sent["stop"] == ["\n\n"] and sent["seed"] == 7 and sent["messages"][0]["role"] == "system"
    await gw.aclose()


async def test_tool_calls_round_trip(tmp_path: Path, openai_stub: OpenAIStub) -> None:
    call = {"id": "call_9", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}
    openai_stub.push(completion(tool_calls=[call]))
    gw = gateway(tmp_path, openai_model("gpt", openai_stub.url))
    tool = Tool("weather", "Weather in a city", {"type": "object", "properties": {"city": {"type": "string"}}})
    result = await gw.chat("Weather in Oslo?", model="gpt", tools=[tool], tool_choice="weather")
    assert result.finish_reason == "tool_calls"
    assert result.tool_calls[0].name == "weather" and result.tool_calls[0].parsed_arguments() == {"city": "Oslo"}
    sent = openai_stub.requests[-1]
    assert sent["tools"][0]["function"]["name"] == "weather"
    assert sent["tool_choice"] == {"type": "function", "function": {"name": "weather"}}
    openai_stub.push(completion("It is sunny."))
    follow = await gw.chat(
        ["Weather in Oslo?", result.message(), {"role": "tool", "tool_call_id": "call_9", "content": "sunny"}],
        model="gpt",
    )
    assert follow.text == "It is sunny."
    assert openai_stub.requests[-1]["messages"][2] == {"role": "tool", "content": "sunny", "tool_call_id": "call_9"}
    await gw.aclose()


class City(BaseModel):
    name: str
    population: int


async def test_structured_output_uses_json_schema(tmp_path: Path, openai_stub: OpenAIStub) -> None:
    openai_stub.push(completion(json.dumps({"name": "Oslo", "population": 709000})))
    gw = gateway(tmp_path, openai_model("gpt", openai_stub.url))
    result = await gw.chat("Biggest city in Norway?", model="gpt", response_model=City)
    assert result.parsed == City(name="Oslo", population=709000)
    fmt = openai_stub.requests[-1]["response_format"]
    assert (
        fmt["type"] == "json_schema" and fmt["json_schema"]["name"] == "City" and fmt["json_schema"]["strict"] is True
    )
    assert fmt["json_schema"]["schema"]["additionalProperties"] is False
    await gw.aclose()


async def test_stream_yields_deltas_then_result(tmp_path: Path, openai_stub: OpenAIStub) -> None:
    openai_stub.push(Scripted(stream=stream_chunks("Streaming works fine.")))
    gw = gateway(tmp_path, openai_model("gpt", openai_stub.url))
    stream = gw.stream("Say something", model="gpt")
    pieces = [d.text async for d in stream]
    assert len([p for p in pieces if p]) >= 3 and "".join(pieces) == "Streaming works fine."
    assert stream.result is not None and stream.result.text == "Streaming works fine."
    assert stream.result.usage.input_tokens == 9 and stream.result.cost_usd is not None
    assert openai_stub.requests[-1]["stream_options"] == {"include_usage": True}
    [span] = spans(gw)
    assert span.attributes["keel.stream"] is True and span.status == "ok"
    assert span.attributes["keel.time_to_first_token_ms"] > 0
    await gw.aclose()


@pytest.mark.parametrize(
    ("status", "error_class", "retried"),
    [
        (400, errors.BadRequest, False),
        (401, errors.AuthenticationFailed, False),
        (403, errors.PermissionDenied, False),
        (404, errors.ModelNotFound, False),
        (408, errors.ProviderTimeout, True),
        (429, errors.ProviderRateLimited, True),
        (500, errors.ServerError, True),
        (503, errors.ServerError, True),
    ],
)
async def test_status_errors_map_and_retry_only_when_retryable(
    tmp_path: Path, openai_stub: OpenAIStub, status: int, error_class: type[errors.ProviderError], retried: bool
) -> None:
    for _ in range(3):
        openai_stub.push(Scripted(body=error_body(f"stub says {status}"), status=status, headers={"retry-after": "0"}))
    gw = gateway(tmp_path, openai_model("gpt", openai_stub.url, extra="max_retries = 2"))
    with pytest.raises(error_class) as caught:
        await gw.chat("hi", model="gpt")
    assert caught.value.status == status and caught.value.provider == "openai"
    assert caught.value.attempts == (3 if retried else 1)
    assert len(openai_stub.requests) == (3 if retried else 1)
    [span] = spans(gw)
    assert span.status == "error" and span.error_type == error_class.__name__
    assert (
        span.attributes["error.type"] == error_class.__name__
        and span.attributes["keel.attempts"] == caught.value.attempts
    )
    await gw.aclose()


async def test_retry_after_is_honoured_then_success(tmp_path: Path, openai_stub: OpenAIStub) -> None:
    openai_stub.push(
        Scripted(body=error_body("slow down"), status=429, headers={"retry-after": "0.3"}), completion("ok")
    )
    gw = gateway(tmp_path, openai_model("gpt", openai_stub.url))
    import time

    started = time.perf_counter()
    result = await gw.chat("hi", model="gpt")
    assert time.perf_counter() - started >= 0.3
    assert result.text == "ok" and result.attempts == 2
    await gw.aclose()


async def test_timeout_and_connection_errors(tmp_path: Path, openai_stub: OpenAIStub) -> None:
    openai_stub.push(Scripted(body=completion(), delay=1.0))
    gw = gateway(
        tmp_path,
        openai_model("gpt", openai_stub.url, extra="max_retries = 0\ntimeout = 0.2")
        + openai_model("dead", "http://127.0.0.1:9/v1", extra="max_retries = 1"),
    )
    with pytest.raises(errors.ProviderTimeout):
        await gw.chat("hi", model="gpt")
    with pytest.raises(errors.ProviderConnectionError) as caught:
        await gw.chat("hi", model="dead")
    assert caught.value.attempts == 2
    assert {s.error_type for s in spans(gw)} == {"ProviderTimeout", "ProviderConnectionError"}
    await gw.aclose()


async def test_dropped_stream_is_an_error_with_a_failed_span(tmp_path: Path, openai_stub: OpenAIStub) -> None:
    chunks = stream_chunks("This stream will be cut off halfway")
    openai_stub.push(Scripted(stream=[*chunks[:2], "DROP"]))
    gw = gateway(tmp_path, openai_model("gpt", openai_stub.url))
    stream = gw.stream("hi", model="gpt")
    with pytest.raises(errors.ProviderError):
        async for _ in stream:
            pass
    [span] = spans(gw)
    assert span.status == "error"
    await gw.aclose()


async def test_malformed_json_body(tmp_path: Path, openai_stub: OpenAIStub) -> None:
    openai_stub.push(Scripted(raw=b"{not json"))
    gw = gateway(tmp_path, openai_model("gpt", openai_stub.url))
    with pytest.raises(errors.MalformedResponse):
        await gw.chat("hi", model="gpt")
    await gw.aclose()


async def test_context_overflow_from_provider_falls_back_to_larger_model(
    tmp_path: Path, openai_stub: OpenAIStub
) -> None:
    overflow = error_body("This model's maximum context length is 128000 tokens.", code="context_length_exceeded")
    openai_stub.push(Scripted(body=overflow, status=400), completion("from the big one", model="gpt-4.1"))
    toml = openai_model("small", openai_stub.url, extra='context_fallbacks = ["big"]') + openai_model(
        "big", openai_stub.url, model="gpt-4.1"
    )
    gw = gateway(tmp_path, toml)
    result = await gw.chat("hi", model="small")
    assert result.text == "from the big one" and result.model == "big" and result.attempts == 2
    await gw.aclose()


async def test_embeddings(tmp_path: Path, openai_stub: OpenAIStub) -> None:
    gw = gateway(
        tmp_path, openai_model("emb", openai_stub.url, model="text-embedding-3-small", extra='kind = "embedding"')
    )
    result = await gw.embed(["a", "abc"], model="emb")
    assert result.vectors == [[1.0, 1.0, 0.5], [3.0, 1.0, 0.5]]
    assert result.usage.input_tokens == 7 and result.cost_usd == pytest.approx(7 * 0.02e-6)
    [span] = spans(gw)
    assert span.attributes["gen_ai.operation.name"] == "embeddings"
    await gw.aclose()


async def test_missing_key_names_the_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    gw = gateway(tmp_path)
    with pytest.raises(errors.MissingAPIKey, match="OPENAI_API_KEY"):
        await gw.chat("hi", model="gpt-4o-mini")
    [span] = spans(gw)
    assert span.error_type == "MissingAPIKey"
    await gw.aclose()


def _logprobs(*tokens: tuple[str, float]) -> dict[str, Any]:
    return {
        "content": [
            {
                "token": t,
                "logprob": lp,
                "bytes": list(t.encode()),
                "top_logprobs": [{"token": t, "logprob": lp, "bytes": None}],
            }
            for t, lp in tokens
        ],
        "refusal": None,
    }


async def test_logprobs_pass_through(tmp_path: Path, openai_stub: OpenAIStub) -> None:
    body = completion("Hi there")
    body["choices"][0]["logprobs"] = _logprobs(("Hi", -0.25), (" there", -1.5))
    openai_stub.push(body)
    gw = gateway(tmp_path, openai_model("gpt", openai_stub.url))
    result = await gw.chat("Greet me", model="gpt", logprobs=True, top_logprobs=1)
    sent = openai_stub.requests[-1]
    assert sent["logprobs"] is True and sent["top_logprobs"] == 1
    assert result.logprobs is not None and [(t.token, t.logprob) for t in result.logprobs] == [
        ("Hi", -0.25),
        (" there", -1.5),
    ]
    assert result.logprobs[1].bytes == tuple(b" there") and result.logprobs[0].top_logprobs[0].token == "Hi"
    plain = await gw.chat("Greet me", model="gpt")
    assert plain.logprobs is None and "logprobs" not in openai_stub.requests[-1]

    chunks = stream_chunks("Hi there", pieces=2)
    chunks[1]["choices"][0]["logprobs"] = _logprobs(("Hi", -0.25))
    chunks[2]["choices"][0]["logprobs"] = _logprobs((" there", -1.5))
    openai_stub.push(Scripted(stream=chunks))
    stream = gw.stream("Greet me", model="gpt", logprobs=True)
    deltas = [d async for d in stream]
    assert [t.token for d in deltas for t in d.logprobs] == ["Hi", " there"]
    assert stream.result is not None and stream.result.logprobs is not None and len(stream.result.logprobs) == 2
    assert openai_stub.requests[-1]["logprobs"] is True and "top_logprobs" not in openai_stub.requests[-1]
    await gw.aclose()
