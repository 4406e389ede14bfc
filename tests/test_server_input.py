"""The HTTP input edge: one error shape for every refusal, bodies keel cannot store or send refused
with a 400 naming the field, strict types, bounded work per body, and `GET /v1/models/{id}`."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from helpers import gateway, spans
from keel import Gateway, TestModel
from keel.config import KeyConfig
from keel.errors import BudgetExceeded, InputError
from keel.keys import create_key
from keel.server.schemas import MAX_MESSAGES
from keel.trace import Span
from serving import Server

ADMIN = "admin-secret-for-input-tests"
CHAT = {"model": "t", "messages": [{"role": "user", "content": "hi"}]}
LONE = "bad \ud800 text"  # a lone surrogate: valid JSON escape, not Unicode


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Server, Gateway]]:
    monkeypatch.setenv("KEEL_ADMIN_KEY", ADMIN)
    gw = Gateway(models={"t": TestModel("ok"), "u": TestModel("ok")})
    gw.config = gw.config.model_copy(update={"max_retries": 0})
    server = Server(gw)
    yield server, gw
    server.stop()
    gw.close()


def admin() -> dict[str, str]:
    return {"authorization": f"Bearer {ADMIN}"}


def assert_openai_error(response: httpx.Response, status: int) -> dict[str, Any]:
    """OpenAI's error shape, exactly: {"error": {"message", "type", "param", "code"}}."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    error: dict[str, Any] = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] == ("invalid_request_error" if status < 500 else "api_error")
    assert error["param"] is None or isinstance(error["param"], str)
    return error


def post_raw(server: Server, path: str, content: bytes, **headers: str) -> httpx.Response:
    return httpx.post(
        f"{server.base}{path}", content=content, headers={"content-type": "application/json", **admin(), **headers}
    )


# --- 16.6: one error shape -----------------------------------------------------------------------

ROUTES = ["/v1/chat/completions", "/v1/embeddings", "/admin/keys", "/v1/rag/facts/search"]


@pytest.mark.parametrize("path", ROUTES)
def test_invalid_utf8_and_non_json_bodies_answer_in_the_openai_shape(served: tuple[Server, Gateway], path: str) -> None:
    server, _ = served
    error = assert_openai_error(post_raw(server, path, b'{"model": "t\xff\xfe"}'), 400)
    assert "not valid UTF-8" in error["message"]
    error = assert_openai_error(post_raw(server, path, b"model=t&messages=hi"), 400)
    assert "not valid JSON" in error["message"] and error["param"] is None  # not param "0"


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/v1/nothing", 404),
        ("POST", "/admin/nothing", 404),
        ("GET", "/api/nothing", 404),
        ("GET", "/v1/rag/facts/nothing", 404),
        ("GET", "/v1/chat/completions", 405),
        ("PUT", "/admin/keys", 405),
        ("DELETE", "/v1/rag/facts/search", 405),
        ("POST", "/healthz", 405),
    ],
)
def test_unknown_routes_and_methods_answer_in_the_openai_shape(
    served: tuple[Server, Gateway], method: str, path: str, status: int
) -> None:
    server, _ = served
    response = httpx.request(method, f"{server.base}{path}", headers=admin())
    error = assert_openai_error(response, status)
    assert error["code"] == ("not_found" if status == 404 else "method_not_allowed")
    assert path in error["message"]
    if status == 405:
        assert response.headers["allow"]


# --- 16.12: GET /v1/models/{id} -----------------------------------------------------------------


def test_retrieve_a_model_as_openai_does(served: tuple[Server, Gateway]) -> None:
    server, gw = served
    client = openai.OpenAI(base_url=server.url, api_key=ADMIN, max_retries=0)
    model = client.models.retrieve("t")
    assert (model.id, model.object, model.owned_by) == ("t", "model", "keel")
    with pytest.raises(openai.NotFoundError) as unknown:
        client.models.retrieve("gpt-9-imaginary")
    assert unknown.value.code == "model_not_found"
    assert gw.store is not None
    secret, _ = create_key(gw.store, "only-t", KeyConfig(models=("t",)))
    time.sleep(0)  # the key ring reads new keys on a miss
    limited = openai.OpenAI(base_url=server.url, api_key=secret, max_retries=0)
    assert limited.models.retrieve("t").id == "t"
    with pytest.raises(openai.NotFoundError) as refused:
        limited.models.retrieve("u")  # configured, but not for this key: the same 404
    assert refused.value.code == "model_not_found" and "'u'" in refused.value.message


# --- 17.2 and 17.10: lone surrogates, deep nesting -------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", {**CHAT, "user": LONE}, "user"),
        ("/v1/chat/completions", {**CHAT, "metadata": {"team": LONE}}, "metadata.team"),
        ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": LONE}]}, "messages.0.content"),
        ("/v1/chat/completions", {**CHAT, "stop": ["x", LONE]}, "stop.1"),
        ("/v1/embeddings", {"model": "local-embed", "input": ["fine", LONE]}, "input.1"),
        ("/v1/rag/facts/search", {"query": LONE}, "query"),
    ],
)
def test_a_lone_surrogate_is_a_400_naming_the_field(
    served: tuple[Server, Gateway], path: str, body: dict[str, Any], param: str
) -> None:
    server, gw = served
    content = json.dumps(body).encode()  # ensure_ascii: the surrogate travels as the escape \ud800
    assert b"\\ud800" in content
    error = assert_openai_error(post_raw(server, path, content), 400)
    assert error["param"] == param and "lone surrogate" in error["message"]
    if path != "/v1/rag/facts/search":  # a refused model call is traced as such, and nothing was charged
        [span] = spans(gw)
        assert span.attributes["gen_ai.operation.name"] == "http" and span.status == "error"


def test_rag_metadata_nested_900_deep_is_a_400(served: tuple[Server, Gateway]) -> None:
    server, _ = served
    deep: Any = "leaf"
    for _ in range(900):
        deep = {"a": deep}
    body = {"documents": [{"id": "d", "text": "some text", "metadata": {"nested": deep}}]}
    error = assert_openai_error(post_raw(server, "/v1/rag/facts/documents", json.dumps(body).encode()), 400)
    assert error["param"] is not None and error["param"].startswith("documents.0.metadata.nested")
    assert "nested deeper than" in error["message"]


async def test_the_library_refuses_a_lone_surrogate_naming_the_field() -> None:
    gw = Gateway(models={"t": TestModel("ok")})
    with pytest.raises(InputError, match=r"metadata\.team contains a lone surrogate"):
        await gw.chat("hi", model="t", metadata={"team": LONE})
    with pytest.raises(InputError, match=r"metadata\.user contains a lone surrogate"):
        async for _ in gw.stream("hi", model="t", metadata={"user": LONE}):
            pass
    with pytest.raises(InputError, match=r"messages\[1\]\.content contains a lone surrogate"):
        await gw.chat(["fine", {"role": "user", "content": LONE}], model="t")
    with pytest.raises(InputError, match=r"stop\[0\] contains a lone surrogate"):
        await gw.chat("hi", model="t", stop=LONE)
    with pytest.raises(InputError, match=r"texts\[1\] contains a lone surrogate"):
        await gw.embed(["fine", LONE], "local-embed")
    await gw.aclose()


PRICED = "price = { input = 1000.0, output = 2000.0 }\nmax_output_tokens = 10"


def scripted_model(gw: Gateway, name: str) -> TestModel:
    model: Any = gw.deployment(name)
    while not isinstance(model, TestModel):
        model = model.inner
    return model


async def test_a_span_the_store_refuses_still_keeps_its_charge_after_a_restart(tmp_path: Path) -> None:
    """An answer with a lone surrogate (the provider's, not the caller's) cannot be stored as it is:
    its span is stored sanitised, so its cost counts against the budget after a restart."""
    toml = f'[models.t]\nprovider = "test"\nmodel = "t"\nscript = ["ok"]\n{PRICED}\n'
    toml += "[keys.team]\ndaily_budget_usd = 1.0\n"
    gw = gateway(tmp_path, toml)
    scripted_model(gw, "t").script = [LONE * 3]
    spent = 0.0
    for _ in range(3):
        result = await gw.chat("hello " * 5, model="t", key="team", max_tokens=5)
        assert result.cost_usd is not None
        spent += result.cost_usd
    [span, *_] = spans(gw)
    assert span.attributes["keel.span.sanitised"] is True and "\ufffd" in span.output["text"]
    assert gw.store is not None and gw.store.spend("team", 0) == pytest.approx(spent)
    await gw.aclose()
    again = gateway(tmp_path, toml)  # a restart: spend is read back from the store
    assert again.store is not None and again.store.spend("team", 0) == pytest.approx(spent)
    again.keys["team"] = KeyConfig(daily_budget_usd=spent * 1.01)
    with pytest.raises(BudgetExceeded):
        await again.chat("hello " * 5, model="t", key="team", max_tokens=5)
    await again.aclose()


def test_a_span_that_cannot_be_redacted_is_stored_without_its_content(tmp_path: Path) -> None:
    gw = gateway(tmp_path, "")
    assert gw.tracer.writer is not None

    class Unredactable:  # an attribute the redactor cannot walk
        def __repr__(self) -> str:
            raise RuntimeError("no")

    span = Span("ab" * 16, "cd" * 8, None, "chat t", time.time(), time.time() + 0.1)
    span.attributes.update({"gen_ai.operation.name": "chat", "keel.api_key": "team", "keel.cost_usd": 0.25})
    span.attributes["keel.metadata.bad"] = {1j: Unredactable()}  # not JSON: neither store encodes it
    span.input = {"messages": [{"role": "user", "content": "sk-" + "x" * 30}]}
    gw.tracer.finish(span)
    [stored] = spans(gw)
    assert stored.attributes["keel.cost_usd"] == 0.25 and stored.attributes["keel.api_key"] == "team"
    assert stored.attributes["keel.span.content_dropped"] is True and stored.input is None
    assert gw.store is not None and gw.store.spend("team", 0) == pytest.approx(0.25)
    gw.close()


# --- 17.14: strict types ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", {**CHAT, "max_tokens": True}, "max_tokens"),
        ("/v1/chat/completions", {**CHAT, "max_tokens": "10"}, "max_tokens"),
        ("/v1/chat/completions", {**CHAT, "stream": "yes"}, "stream"),
        ("/v1/chat/completions", {**CHAT, "temperature": "0.5"}, "temperature"),
        ("/v1/chat/completions", {**CHAT, "seed": 1.5}, "seed"),
        ("/v1/chat/completions", {**CHAT, "n": "1"}, "n"),
        ("/v1/chat/completions", {**CHAT, "stream": True, "stream_options": {"include_usage": 1}},
         "stream_options.include_usage"),
        ("/v1/embeddings", {"model": "local-embed", "input": "x", "dimensions": "3"}, "dimensions"),
        ("/v1/rag/facts/search", {"query": "x", "top_k": "5"}, "top_k"),
        ("/v1/rag/facts/ask", {"question": "x", "max_tokens": False}, "max_tokens"),
        ("/v1/rag/facts/documents", {"documents": [{"id": "d", "text": "t"}], "chunk_size": "64"}, "chunk_size"),
    ],
)  # fmt: skip
def test_lax_types_are_refused(served: tuple[Server, Gateway], path: str, body: dict[str, Any], param: str) -> None:
    server, _ = served
    error = assert_openai_error(post_raw(server, path, json.dumps(body).encode()), 400)
    assert error["param"] == param


def test_strict_types_still_take_what_clients_send(served: tuple[Server, Gateway]) -> None:
    server, _ = served
    body = {**CHAT, "temperature": 1, "top_p": 1, "max_tokens": 5, "stream": False, "n": 1, "seed": 3}
    assert post_raw(server, "/v1/chat/completions", json.dumps(body).encode()).status_code == 200


@pytest.mark.parametrize("extra", [{"logprobs": True}, {"logprobs": True, "top_logprobs": 3}, {"top_logprobs": 2}])
def test_logprobs_are_refused_not_silently_dropped(served: tuple[Server, Gateway], extra: dict[str, Any]) -> None:
    """Issue 16.12: `logprobs=True` answered `logprobs: null`, which a client reads as a provider that has
    none; keel returns no log-probabilities, so asking for them is a 400 that says so."""
    server, _ = served
    answer = post_raw(server, "/v1/chat/completions", json.dumps({**CHAT, **extra}).encode())
    error = assert_openai_error(answer, 400)
    assert error["param"] in ("logprobs", "top_logprobs") and "log-probabilities" in error["message"]
    quiet = {**CHAT, "logprobs": False, "top_logprobs": 0}  # what some clients send by default
    assert post_raw(server, "/v1/chat/completions", json.dumps(quiet).encode()).status_code == 200


@pytest.mark.parametrize("content_type", ["application/x-www-form-urlencoded", "text/plain"])
def test_a_json_body_sent_as_another_type_says_which_type_to_send(
    served: tuple[Server, Gateway], content_type: str
) -> None:
    """`curl -d '{...}'` labels the body a form: it was refused as "body: Input should be a valid
    dictionary", which says nothing of the header. (Not parsed anyway: a web page may send a form or
    text/plain to a local server without the browser asking first.)"""
    server, _ = served
    body = json.dumps(CHAT).encode()
    error = assert_openai_error(post_raw(server, "/v1/chat/completions", body, **{"content-type": content_type}), 400)
    assert "Content-Type: application/json" in error["message"] and content_type in error["message"]


# --- 17.8: a large body does not stall everyone ----------------------------------------------------


def _healthz_s(server: Server) -> float:
    started = time.perf_counter()
    assert httpx.get(f"{server.base}/healthz").status_code == 200
    return time.perf_counter() - started


def test_too_many_messages_is_a_400_before_validation(served: tuple[Server, Gateway]) -> None:
    server, _ = served
    body = {**CHAT, "messages": [{"role": "user", "content": "hi"}] * (MAX_MESSAGES + 1)}
    error = assert_openai_error(post_raw(server, "/v1/chat/completions", json.dumps(body).encode()), 400)
    assert error["param"] == "messages" and f"at most {MAX_MESSAGES}" in error["message"]
    body = {**CHAT, "messages": [{"role": "user", "content": "hi"}] * MAX_MESSAGES}
    assert post_raw(server, "/v1/chat/completions", json.dumps(body).encode()).status_code == 200


@pytest.mark.parametrize("messages", [100_000, MAX_MESSAGES])
def test_a_large_body_does_not_hold_other_requests(served: tuple[Server, Gateway], messages: int) -> None:
    """100,000 short messages (3.5 MB, refused) or the most a request may carry, with long contents
    (accepted): /healthz keeps answering meanwhile. Before, the first held it for over 3 s."""
    server, _ = served
    content = "hi" if messages > MAX_MESSAGES else "word " * 300
    body = json.dumps({**CHAT, "messages": [{"role": "user", "content": content}] * messages}).encode()
    baseline = min(_healthz_s(server) for _ in range(5))
    done = threading.Event()
    statuses: list[int] = []

    def post() -> None:
        statuses.append(post_raw(server, "/v1/chat/completions", body).status_code)
        done.set()

    sender = threading.Thread(target=post)
    sender.start()
    worst = 0.0
    while not done.is_set():
        worst = max(worst, _healthz_s(server))
    sender.join()
    assert statuses == [400 if messages > MAX_MESSAGES else 200]
    assert worst < max(0.5, 20 * baseline), f"/healthz took {worst:.2f} s (baseline {baseline * 1000:.1f} ms)"


async def test_json_nested_past_the_parser_limit_is_a_400(served: tuple[Server, Gateway]) -> None:
    """Deeper than the JSON parser itself can go (it raises RecursionError): a 400, never a 500."""
    server, _ = served
    async with httpx.AsyncClient(base_url=server.base, headers=admin()) as client:
        answers = await asyncio.gather(*[
            client.post("/v1/chat/completions", content=b"[" * 200_000, headers={"content-type": "application/json"})
            for _ in range(3)
        ])  # fmt: skip
    for answer in answers:
        assert "nested deeper" in assert_openai_error(answer, 400)["message"]


def test_an_unexpected_failure_is_a_500_in_the_openai_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    gw = Gateway(models={"t": TestModel("ok")})

    def broken(*args: Any) -> dict[str, Any]:
        raise RuntimeError("a bug, not a refusal")

    monkeypatch.setattr("keel.server.app.completion_body", broken)
    server = Server(gw)
    try:
        error = assert_openai_error(httpx.post(f"{server.url}/chat/completions", json=CHAT), 500)
        assert error["code"] == "internal" and "bug" not in error["message"]  # no internals leak
    finally:
        server.stop()
        gw.close()
