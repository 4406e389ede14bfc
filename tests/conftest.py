"""Shared fixtures. Tests never reach a hosted provider."""

from __future__ import annotations

import os

import pytest

# PostgreSQL fixtures (pgserver) live in their own module.
from fixtures_pg import *  # noqa: F403

os.environ.pop("OPENAI_API_KEY", None)
os.environ.pop("ANTHROPIC_API_KEY", None)
os.environ.pop("GEMINI_API_KEY", None)
# a developer's own settings must not leak into the tests: no admin key, no OTLP export
for _name in ("KEEL_ADMIN_KEY", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
    os.environ.pop(_name, None)


@pytest.fixture(autouse=True)
def _isolated_store(tmp_path: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test gets its own store and no keel.toml from the working directory."""
    monkeypatch.setenv("KEEL_STORE", str(tmp_path / "keel.db"))  # type: ignore[operator]
    monkeypatch.delenv("KEEL_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def openai_stub_server():  # type: ignore[no-untyped-def]
    from stubs import OpenAIStub

    stub = OpenAIStub().start()
    yield stub
    stub.stop()


@pytest.fixture
def openai_stub(openai_stub_server, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """The shared stub with an empty script and OPENAI_API_KEY set to a fake key."""
    openai_stub_server.script.clear()
    openai_stub_server.requests.clear()
    openai_stub_server.headers.clear()
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-0123456789abcdefghijklmnop")
    return openai_stub_server


@pytest.fixture(scope="module")
def server():  # type: ignore[no-untyped-def]
    """The Anthropic/Gemini stub server, one per test module."""
    from provider_stubs import StubServer

    with StubServer() as stub:
        yield stub


@pytest.fixture
def stub(server):  # type: ignore[no-untyped-def]
    """The module's stub server with its script and records cleared."""
    server.reset()
    return server
