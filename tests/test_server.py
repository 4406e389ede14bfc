"""The OpenAI-compatible server, driven by the official openai SDK over real HTTP."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from pydantic import BaseModel

from keel import Gateway, TestModel
from keel.errors import ServerError
from serving import Server

ADMIN = "admin-key-for-server-tests"


@pytest.fixture
def served() -> Iterator[tuple[Server, Gateway, openai.OpenAI]]:
    tool_answer = TestModel.tool_call("weather", '{"city": "Oslo"}')
    gw = Gateway(
        models={
            "t": TestModel("Hello from keel."),
            "tools": TestModel(tool_answer),
            "json": TestModel('{"name": "Oslo", "population": 709000}'),
            "broken": TestModel(ServerError("upstream down", status=503)),
        }
    )
    gw.config = gw.config.model_copy(update={"max_retries": 0})
    server = Server(gw)
    client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0)
    yield server, gw, client
    server.stop()
    gw.close()


def test_plain_completion(served: tuple[Server, Gateway, openai.OpenAI]) -> None:
    _, gw, client = served
    raw = client.chat.completions.with_raw_response.create(model="t", messages=[{"role": "user", "content": "hi"}])
    completion = raw.parse()
    assert completion.choices[0].message.content == "Hello from keel."
    assert completion.usage is not None and completion.usage.prompt_tokens > 0
    assert completion.choices[0].finish_reason == "stop"
    trace_id = raw.headers["x-keel-trace-id"]
    gw.flush()
    assert gw.store is not None and gw.store.get_trace(trace_id)[0].status == "ok"


def test_stream_with_usage(served: tuple[Server, Gateway, openai.OpenAI]) -> None:
    _, _, client = served
    stream = client.chat.completions.create(
        model="t", messages=[{"role": "user", "content": "hi"}], stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello from keel."
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_tool_calls(served: tuple[Server, Gateway, openai.OpenAI]) -> None:
    _, _, client = served
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
    completion = client.chat.completions.create(
        model="tools", messages=[{"role": "user", "content": "w?"}], tools=tools
    )  # type: ignore[arg-type]
    call = completion.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert call.function.name == "weather" and json.loads(call.function.arguments) == {"city": "Oslo"}  # type: ignore[union-attr]
    assert completion.choices[0].finish_reason == "tool_calls"


class City(BaseModel):
    name: str
    population: int


def test_json_schema_response_format(served: tuple[Server, Gateway, openai.OpenAI]) -> None:
    _, _, client = served
    parsed = client.chat.completions.parse(
        model="json", messages=[{"role": "user", "content": "city"}], response_format=City
    )
    assert parsed.choices[0].message.parsed == City(name="Oslo", population=709000)


def test_models_list(served: tuple[Server, Gateway, openai.OpenAI]) -> None:
    _, _, client = served
    ids = {m.id for m in client.models.list()}
    assert {"t", "tools", "local", "gpt-4o-mini"} <= ids and "local-embed" not in ids


def test_errors_in_openai_shape(served: tuple[Server, Gateway, openai.OpenAI]) -> None:
    server, _, client = served
    with pytest.raises(openai.NotFoundError) as not_found:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert "unknown model" in not_found.value.message
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="t", messages=[{"role": "wizard", "content": "hi"}])  # type: ignore[misc,list-item]
    with pytest.raises(openai.InternalServerError) as upstream:
        client.chat.completions.create(model="broken", messages=[{"role": "user", "content": "hi"}])
    assert upstream.value.status_code == 502
    bad = httpx.post(
        f"{server.url}/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert bad.status_code == 400 and "error" in bad.json()
    extra = httpx.post(
        f"{server.url}/chat/completions",
        json={"model": "t", "messages": [{"role": "user", "content": "x"}], "bogus": 1},
    )
    assert extra.status_code == 400 and extra.json()["error"]["param"] == "bogus"


def test_embeddings_with_the_local_model(served: tuple[Server, Gateway, openai.OpenAI]) -> None:
    _, _, client = served
    result = client.embeddings.create(model="local-embed", input=["a cat sat", "a dog ran"])
    assert [d.index for d in result.data] == [0, 1] and len(result.data[0].embedding) == 384
    assert result.usage.prompt_tokens > 0
    single = client.embeddings.create(model="local-embed", input="one text")
    assert len(single.data) == 1
    with pytest.raises(openai.BadRequestError, match="chat model"):
        client.embeddings.create(model="gpt-4o-mini", input="x")
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model="local-embed", input=[])


def test_embeddings_as_plain_floats(served: tuple[Server, Gateway, openai.OpenAI]) -> None:
    server, _, _ = served
    body = {"model": "local-embed", "input": "hello", "encoding_format": "float"}
    response = httpx.post(f"{server.url}/embeddings", json=body, timeout=30)
    assert response.status_code == 200 and len(response.json()["data"][0]["embedding"]) == 384
    assert "x-keel-trace-id" in response.headers


def test_a_refused_stream_gets_a_real_status(served: tuple[Server, Gateway, openai.OpenAI]) -> None:
    server, _, client = served
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}], stream=True)
    body = {"model": "t", "stream": True, "messages": [{"role": "user", "content": "x"}],
            "tools": [{"type": "function", "function": {"name": "f", "parameters": "not a schema"}}]}  # fmt: skip
    response = httpx.post(f"{server.url}/chat/completions", json=body)
    assert response.status_code == 400 and "parameters" in response.json()["error"]["message"]
    bad_choice = {"model": "t", "messages": [{"role": "user", "content": "x"}], "tool_choice": {"function": "f"}}
    assert httpx.post(f"{server.url}/chat/completions", json=bad_choice).status_code == 400


@pytest.fixture
def with_admin(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Server, Gateway, openai.OpenAI]]:
    """The served models, with the admin key set (what /metrics needs: the open mode never serves it)."""
    monkeypatch.setenv("KEEL_ADMIN_KEY", ADMIN)
    gw = Gateway(models={"t": TestModel("Hello from keel."), "broken": TestModel(ServerError("down", status=503))})
    gw.config = gw.config.model_copy(update={"max_retries": 0})
    server = Server(gw)
    yield server, gw, openai.OpenAI(base_url=server.url, api_key=ADMIN, max_retries=0)
    server.stop()
    gw.close()


def test_health_readiness_and_metrics(with_admin: tuple[Server, Gateway, openai.OpenAI]) -> None:
    server, _, client = with_admin
    base = server.url.removesuffix("/v1")
    assert httpx.get(f"{base}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{base}/readyz").status_code == 200
    client.chat.completions.create(model="t", messages=[{"role": "user", "content": "hi"}])
    client.chat.completions.create(model="t", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="broken", messages=[{"role": "user", "content": "hi"}])
    assert httpx.get(f"{base}/metrics").status_code == 401
    response = httpx.get(f"{base}/metrics", headers={"authorization": f"Bearer {ADMIN}"})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert 'keel_requests_total{key="",model="t",operation="chat",status="ok"} 2.0' in text
    assert 'keel_errors_total{error_type="ServerError",key="",model="broken",operation="chat"} 1.0' in text
    assert 'keel_tokens_total{direction="output",key="",model="t",operation="chat"}' in text
    assert 'keel_request_duration_seconds_count{key="",model="t",operation="chat"} 2.0' in text


def test_not_ready_when_the_store_is_unreachable(
    served: tuple[Server, Gateway, openai.OpenAI], monkeypatch: pytest.MonkeyPatch
) -> None:
    server, gw, _ = served

    def unreachable() -> None:
        raise OSError("connection refused")

    assert gw.store is not None
    monkeypatch.setattr(gw.store, "ping", unreachable)
    response = httpx.get(f"{server.url.removesuffix('/v1')}/readyz")
    assert response.status_code == 503 and "connection refused" in response.json()["store"]


@pytest.mark.local_model
def test_logprobs_from_the_local_model(served: tuple[Server, Gateway, openai.OpenAI]) -> None:
    _, _, client = served
    messages: list[Any] = [{"role": "user", "content": "Name a colour."}]
    completion = client.chat.completions.create(
        model="local", messages=messages, logprobs=True, top_logprobs=2, max_tokens=6, temperature=0
    )
    choice = completion.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content is not None and completion.usage is not None
    content = choice.logprobs.content
    assert len(content) == completion.usage.completion_tokens == 6
    assert "".join(t.token for t in content) == choice.message.content
    for token in content:
        assert token.logprob <= 0 and token.bytes and len(token.top_logprobs) == 2
        assert token.top_logprobs[0].logprob >= token.top_logprobs[1].logprob
    plain = client.chat.completions.create(model="local", messages=messages, max_tokens=4)
    assert plain.choices[0].logprobs is None

    stream = client.chat.completions.create(
        model="local", messages=messages, logprobs=True, max_tokens=6, temperature=0, stream=True
    )
    chunks = [c for c in stream if c.choices]
    streamed = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.content or []]
    assert len(streamed) == 6
    assert "".join(t.token for t in streamed) == "".join(c.choices[0].delta.content or "" for c in chunks)


def test_logprobs_refused_clearly_where_the_model_has_none(served: tuple[Server, Gateway, openai.OpenAI]) -> None:
    _, _, client = served
    messages: list[Any] = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.BadRequestError, match="does not return log-probabilities"):
        client.chat.completions.create(model="t", messages=messages, logprobs=True)
    with pytest.raises(openai.BadRequestError, match="does not return log-probabilities"):
        list(client.chat.completions.create(model="t", messages=messages, logprobs=True, stream=True))
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        client.chat.completions.create(model="t", messages=messages, logprobs=True, top_logprobs=21)
    with pytest.raises(openai.BadRequestError, match="top_logprobs needs logprobs"):
        client.chat.completions.create(model="t", messages=messages, top_logprobs=2)
    answer = client.chat.completions.create(model="t", messages=messages, logprobs=False)
    assert answer.choices[0].message.content == "Hello from keel." and answer.choices[0].logprobs is None
