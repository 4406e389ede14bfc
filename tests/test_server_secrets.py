"""Secrets never left in clear (span names, attribute names, labels, errors), and metric labels bounded.

A key-shaped model name, a secret in a metadata header's name and the admin key's own value are sent
through the server; none may be stored, served by the dashboard's API or become a /metrics label.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from helpers import gateway, spans
from keel import Gateway
from keel.config import KeyConfig
from keel.keys import create_key
from keel.server.app import create_app
from keel.trace import REDACTED, Redactor, Span
from serving import Server

ADMIN = "adm1n-value-that-is-not-key-shaped"
PROVIDER = "prov1der-value-that-is-not-key-shaped"
MODEL_SECRET = "sk-proj-AbCdEfGhIjKlMnOpQrStUv012345"
HEADER_SECRET = "sk-proj-zyxwvutsrqponmlkjihgf98765"
MODELS = '[models.t]\nprovider = "test"\nmodel = "t"\nscript = ["Hello from keel."]\n[aliases]\nfast = "t"\n'
admin = {"authorization": f"Bearer {ADMIN}"}


@pytest.fixture
def gw(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Gateway]:
    monkeypatch.setenv("KEEL_ADMIN_KEY", ADMIN)
    monkeypatch.setenv("OPENAI_API_KEY", PROVIDER)
    g = gateway(tmp_path, MODELS)
    yield g
    g.close()


@pytest.fixture
def served(gw: Gateway) -> Iterator[Server]:
    server = Server(gw)
    yield server
    server.stop()


def chat(server: Server, model: str, content: str = "hi", **headers: str) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": content}]}
    return httpx.post(f"{server.url}/chat/completions", json=body, headers={**admin, **headers})


# --- redaction -----------------------------------------------------------------------------


def test_the_redactor_covers_names_keys_and_the_admin_and_provider_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEEL_ADMIN_KEY", ADMIN)
    monkeypatch.setenv("ANTHROPIC_API_KEY", PROVIDER)
    redactor = Redactor()  # nothing configured: the admin and the providers' standard keys still count
    span = Span("t" * 32, "s" * 16, None, f"chat {MODEL_SECRET}", 0.0, status="error", error_type=MODEL_SECRET)
    span.attributes = {f"keel.metadata.{HEADER_SECRET}": "v", "nested": {ADMIN: [PROVIDER]}}
    span.error_message = f"the admin key {ADMIN} was refused"
    redactor.span(span)
    text = repr(span)
    for secret in (MODEL_SECRET, HEADER_SECRET, ADMIN, PROVIDER):
        assert secret not in text
    assert span.name == f"chat {REDACTED}" and f"keel.metadata.{REDACTED}" in span.attributes
    assert span.attributes["nested"] == {REDACTED: [REDACTED]}
    assert span.error_message == f"the admin key {REDACTED} was refused"


def test_secrets_sent_to_the_server_are_stored_served_and_counted_redacted(gw: Gateway, served: Server) -> None:
    unknown = chat(served, MODEL_SECRET)
    assert unknown.status_code == 404, unknown.text
    ok = chat(served, "t", f"my admin key is {ADMIN}", **{f"x-keel-meta-{HEADER_SECRET}": "x"})
    assert ok.status_code == 200, ok.text
    stored = spans(gw)
    assert len(stored) == 2
    traces = httpx.get(f"{served.base}/api/traces", headers=admin)
    trace = httpx.get(f"{served.base}/api/traces/{ok.headers['x-keel-trace-id']}", headers=admin)
    facets = httpx.get(f"{served.base}/api/facets", headers=admin)
    metrics = httpx.get(f"{served.base}/metrics", headers=admin)
    for response in (traces, trace, facets, metrics):
        assert response.status_code == 200, response.text
    served_text = "".join(r.text for r in (traces, trace, facets, metrics)) + repr(stored)
    for secret in (MODEL_SECRET, HEADER_SECRET, ADMIN):
        assert secret not in served_text
        assert secret.lower() not in served_text.lower()  # header names arrive lower-cased
    assert any(f"keel.metadata.{REDACTED}" in s.attributes for s in stored)
    assert any(s.name == f"chat {REDACTED}" for s in stored), [s.name for s in stored]
    assert "[REDACTED]" in traces.text


# --- bounded labels ------------------------------------------------------------------------


def series(text: str, metric: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(metric + "{")]


def test_unknown_model_names_share_one_label(gw: Gateway, served: Server) -> None:
    for i in range(300):
        assert chat(served, f"invented-model-{i}").status_code == 404
    assert chat(served, "fast").status_code == 200  # an alias is counted as its model
    assert chat(served, "t").status_code == 200
    text = httpx.get(f"{served.base}/metrics", headers=admin).text
    requests = series(text, "keel_requests_total")
    assert len(requests) == 2, requests  # one unknown series and one for t, whatever the 300 names
    assert 'keel_requests_total{key="",model="unknown",operation="chat",status="error"} 300.0' in text
    assert 'keel_requests_total{key="",model="t",operation="chat",status="ok"} 2.0' in text
    assert "invented-model" not in text and 'model="fast"' not in text
    assert len(text) < 20_000


async def test_unknown_keys_and_refused_models_share_one_label(gw: Gateway) -> None:
    """A refused call (a body that fails validation) names its model in the span: bounded too;
    a key only counts under its name while the gateway knows it."""
    assert gw.store is not None
    secret, _ = create_key(gw.store, "team-a", KeyConfig())
    app = create_app(gateway=gw)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 5000))
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as http:
            key = {"authorization": f"Bearer {secret}"}
            for i in range(100):
                bad = {"model": f"made-up-{i}", "messages": "not a list"}
                answer = await http.post("/v1/chat/completions", json=bad, headers=key)
                assert answer.status_code == 400
            app.state.metrics.observe(_span_of_key("someone-else"))
            text = (await http.get("/metrics", headers=admin)).text
    requests = series(text, "keel_requests_total")
    assert requests == [
        'keel_requests_total{key="team-a",model="unknown",operation="http",status="error"} 100.0',
        'keel_requests_total{key="unknown",model="t",operation="chat",status="ok"} 1.0',
    ]


def _span_of_key(key: str) -> Span:
    span = Span("t" * 32, "s" * 16, None, "chat t", 0.0, 0.01)
    span.set(gen_ai__operation__name="chat", gen_ai__request__model="t", keel__model="t", keel__api_key=key)
    return span
