"""The open mode (no keys configured): model calls from this machine only, never the admin's data.

A relay on the same machine (a plain TCP forwarder, a proxy) makes its clients look local, so the
open mode serves nothing that needs the admin key, and treats any proxy header or malformed Host as
foreign. Tested through a real TCP relay and with each header.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from helpers import gateway
from keel import Gateway
from keel.server.app import create_app
from serving import Server

MODELS = '[models.t]\nprovider = "test"\nmodel = "t"\nscript = ["Hello from keel."]\n'
CHAT = {"model": "t", "messages": [{"role": "user", "content": "hi"}]}
ADMIN_ONLY = ("/admin/keys", "/api/traces", "/api/overview", "/api/facets", "/metrics")


@pytest.fixture
def gw(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Gateway]:
    monkeypatch.delenv("KEEL_ADMIN_KEY", raising=False)
    g = gateway(tmp_path, MODELS)
    yield g
    g.close()


@pytest.fixture
def served(gw: Gateway) -> Iterator[Server]:
    server = Server(gw)
    yield server
    server.stop()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


@pytest.fixture
async def relay(served: Server) -> AsyncIterator[str]:
    """A plain TCP relay on this machine (what `socat` or an SSH tunnel does): bytes in, bytes out."""
    connections: set[asyncio.Task[object]] = set()

    async def forward(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", served.port)
        both = asyncio.gather(_pipe(client_reader, upstream_writer), _pipe(upstream_reader, client_writer))
        connections.add(both)
        await asyncio.gather(both, return_exceptions=True)

    server = await asyncio.start_server(forward, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    server.close()
    for both in connections:
        both.cancel()
    await asyncio.gather(*connections, return_exceptions=True)
    await server.wait_closed()


async def test_through_a_tcp_relay_the_admin_api_and_dashboard_data_are_refused(relay: str) -> None:
    async with httpx.AsyncClient(base_url=relay, timeout=10) as http:
        for path in ADMIN_ONLY:
            answer = await http.get(path)
            assert answer.status_code == 401, (path, answer.text)
            assert "set $KEEL_ADMIN_KEY" in answer.json()["error"]["message"]
        created = await http.post("/admin/keys", json={"name": "mallory"})
        assert created.status_code == 401
        page = await http.get("/")  # the page loads, holds no data and asks for the admin key
        assert page.status_code == 200 and "login" in page.text
        chat = await http.post("/v1/chat/completions", json=CHAT)  # chat for local tools stays open
        assert chat.status_code == 200, chat.text


async def test_direct_local_callers_get_no_admin_data_either(served: Server) -> None:
    async with httpx.AsyncClient(base_url=served.base, timeout=10) as http:
        for path in ADMIN_ONLY:
            assert (await http.get(path)).status_code == 401, path
        ingest = await http.post("/v1/rag/docs/documents", json={"documents": [{"id": "a", "text": "x"}]})
        assert ingest.status_code == 401
        assert (await http.delete("/v1/rag/docs")).status_code == 401


def test_with_the_admin_key_set_the_dashboard_data_is_served(gw: Gateway, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEEL_ADMIN_KEY", "sk-keel-admin-open-mode-0123456789")
    server = Server(gw)
    try:
        admin = {"authorization": "Bearer sk-keel-admin-open-mode-0123456789"}
        for path in ADMIN_ONLY:
            assert httpx.get(server.base + path, headers=admin).status_code == 200, path
            assert httpx.get(server.base + path).status_code == 401, path
    finally:
        server.stop()


@pytest.mark.parametrize(
    "header",
    [
        "X-Real-IP", "CF-Connecting-IP", "True-Client-IP", "Via", "X-Forwarded-Host", "X-Original-Forwarded-For",
        "X-Forwarded-Proto", "X-Client-IP", "Fastly-Client-IP", "X-Cluster-Client-IP", "X-Forwarded-For", "Forwarded",
    ],
)  # fmt: skip
async def test_every_proxy_header_is_foreign(gw: Gateway, header: str) -> None:
    app = create_app(gateway=gw)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 5000))
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8000") as http:
            plain = await http.post("/v1/chat/completions", json=CHAT)
            proxied = await http.post("/v1/chat/completions", json=CHAT, headers={header: "203.0.113.9"})
    assert plain.status_code == 200, plain.text
    assert proxied.status_code == 401, proxied.text
    assert "answers only requests made on this machine" in proxied.json()["error"]["message"]


@pytest.mark.parametrize(
    ("host", "origin"),
    [
        ("127.0.0.1:evil.com", None),
        ("localhost:8000:80", None),
        ("localhost@evil.com", None),
        ("127.0.0.1.", None),
        ("localhost:", None),
        ("localhost:123456", None),
        ("::1", None),
        ("[::1]evil", None),
        ("localhost, evil.com", None),
        ("localhost", "http://127.0.0.1:evil.com"),
        ("localhost", "http://localhost.evil.com"),
        ("localhost", "http://localhost/x/../evil"),
        ("localhost:8000", "null"),  # a sandboxed iframe (or data: page) of any web site sends Origin: null
    ],
)
async def test_malformed_host_and_origin_values_are_foreign(gw: Gateway, host: str, origin: str | None) -> None:
    app = create_app(gateway=gw)
    headers = {"host": host, **({"origin": origin} if origin else {})}
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 5000))
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8000") as http:
            answer = await http.post("/v1/chat/completions", json=CHAT, headers=headers)
    assert answer.status_code == 401, answer.text


def test_the_start_message_says_how_to_reach_the_dashboard(gw: Gateway, capfd: pytest.CaptureFixture[str]) -> None:
    Server(gw).stop()
    err = capfd.readouterr().err
    assert "no keys configured: answering localhost only" in err
    assert "dashboard" in err and "set $KEEL_ADMIN_KEY" in err
