"""What a new user meets setting up a server (issue 16): a provider key not set, the admin key read at start,
`curl -d` without a Content-Type, and a chat-only key used for RAG. Driven over real HTTP."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from helpers import gateway, spans
from keel import Gateway
from keel.config import KeyConfig
from keel.keys import create_key
from keel.rag import RAG, Document
from serving import Server

TOML = '[models.t]\nprovider = "test"\nmodel = "t"\nscript = ["Hello from keel."]\n[server]\nkey_refresh_s = 0.2\n'
ADMIN = "admin-secret-for-setup-tests"


@pytest.fixture
def gw(tmp_path: Path) -> Iterator[Gateway]:
    g = gateway(tmp_path, TOML)
    yield g
    g.close()


@pytest.fixture
def served(gw: Gateway, monkeypatch: pytest.MonkeyPatch) -> Iterator[Server]:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("KEEL_ADMIN_KEY", raising=False)
    server = Server(gw)
    yield server
    server.stop()


def test_a_missing_provider_key_is_a_503_naming_it_that_the_sdk_does_not_retry(gw: Gateway, served: Server) -> None:
    client = openai.OpenAI(base_url=served.url, api_key="unused")  # the SDK's default: 2 retries
    for stream in (False, True):
        with pytest.raises(openai.APIStatusError) as caught:
            client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=stream
            )
        error = caught.value
        assert error.status_code == 503 and error.code == "missing_api_key"
        assert "OPENAI_API_KEY" in error.message and error.response.headers["x-should-retry"] == "false"
    # one call each, not three: the SDK did not retry
    assert len(spans(gw, model="gpt-4o-mini")) == 2


def test_models_list_says_which_cannot_be_called(served: Server) -> None:
    listed = openai.OpenAI(base_url=served.url, api_key="unused").models.list()
    by_id = {m.id: m for m in listed.data}  # the SDK parses the extra fields
    assert by_id["t"].available is True and by_id["local"].available is True  # type: ignore[attr-defined]
    mini = by_id["gpt-4o-mini"]
    assert mini.available is False and mini.unavailable_reason == "OPENAI_API_KEY is not set"  # type: ignore[attr-defined]


def test_an_admin_key_exported_after_the_start_is_refused_with_the_reason(gw: Gateway, served: Server) -> None:
    assert gw.store is not None
    secret, _ = create_key(gw.store, "team-a", KeyConfig(models=("t",)))  # keys exist: the server is no longer open
    time.sleep(0.6)  # seen within key_refresh_s
    with httpx.Client(base_url=served.base, timeout=10) as http:
        late = http.get("/admin/keys", headers={"authorization": "Bearer exported-after-the-start"})
        assert late.status_code == 401
        message = late.json()["error"]["message"]
        assert "no admin key" in message and "$KEEL_ADMIN_KEY once, when it starts" in message
        forbidden = http.get("/admin/keys", headers={"authorization": f"Bearer {secret}"})
        assert forbidden.status_code == 403
        message = forbidden.json()["error"]["message"]
        assert "virtual key 'team-a'" in message and "KEEL_ADMIN_KEY" in message and "restart" in message


def test_admin_keys_take_json_without_a_content_type(gw: Gateway, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEEL_ADMIN_KEY", ADMIN)
    server = Server(gw)
    try:
        with httpx.Client(base_url=server.base, timeout=10) as http:
            auth = {"authorization": f"Bearer {ADMIN}"}
            body = b'{"name": "team-b", "rpm": 10, "models": ["t"]}'
            for content_type in ("application/x-www-form-urlencoded", None):  # what `curl -d` sends; nothing
                headers = {**auth, **({"content-type": content_type} if content_type else {})}
                http.delete("/admin/keys/team-b", headers=auth)
                created = http.post("/admin/keys", content=body, headers=headers)
                assert created.status_code == 201, created.text
                assert created.json()["name"] == "team-b" and created.json()["key"].startswith("sk-keel-")
            bad = http.post("/admin/keys", content=b'{"name": "x", "rpm": "lots"}', headers=auth)
            assert bad.status_code == 400 and "rpm" in bad.json()["error"]["message"]
            not_json = http.post("/admin/keys", content=b"name=x", headers=auth)
            assert not_json.status_code == 400 and "JSON" in not_json.json()["error"]["message"]
    finally:
        server.stop()


def test_rag_with_a_chat_only_key_names_the_embedding_model_it_needs(gw: Gateway, served: Server) -> None:
    rag = RAG(gw)
    rag.ingest_sync([Document("cats", "Cats sleep for about fifteen hours a day.")], "facts")
    assert gw.store is not None
    chat_only, _ = create_key(gw.store, "team-a", KeyConfig(models=("t", "local")))
    with httpx.Client(base_url=served.base, timeout=60, headers={"authorization": f"Bearer {chat_only}"}) as http:
        asks = {"question": "How long do cats sleep?", "model": "t"}
        for path, body in (("ask", asks), ("search", {"query": "cat"})):
            refused = http.post(f"/v1/rag/facts/{path}", json=body)
            assert refused.status_code == 403, refused.text
            message = refused.json()["error"]["message"]
            assert "'bge-small', the embedding model of collection 'facts'" in message
            assert "RAG embeds every question" in message and "--models t,local,bge-small" in message
    both, _ = create_key(gw.store, "team-b", KeyConfig(models=("t", "bge-small")))
    with httpx.Client(base_url=served.base, timeout=60, headers={"authorization": f"Bearer {both}"}) as http:
        assert http.post("/v1/rag/facts/search", json={"query": "cat"}).status_code == 200
    rag.close()


def test_admin_keys_refuse_a_body_nested_too_deeply(gw: Gateway, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEEL_ADMIN_KEY", ADMIN)
    server = Server(gw)
    try:
        deep = b"[" * 100_000 + b"]" * 100_000
        refused = httpx.post(
            f"{server.base}/admin/keys", content=deep, headers={"authorization": f"Bearer {ADMIN}"}, timeout=10
        )
        assert refused.status_code == 400 and "nested deeper than" in refused.json()["error"]["message"]
    finally:
        server.stop()
