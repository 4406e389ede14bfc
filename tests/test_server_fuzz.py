"""Fuzz every operation of the HTTP API from its own OpenAPI schema (schemathesis): no 500s, and
every 4xx in OpenAI's error shape; then random methods, paths and bytes (hypothesis), the same.

Runs against a real server on a socket, as the admin (so the admin and dashboard APIs are reached
too), with test models only. Schemathesis sends both valid and invalid bodies, parameters and headers.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from helpers import gateway
from serving import Server

ADMIN = "fuzz-admin-key"
TOML = """
default_model = "t"
default_embedding_model = "e"
[models.t]
provider = "test"
model = "t"
script = ["fuzzed"]
[models.e]
provider = "test"
model = "e"
kind = "embedding"
"""

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def served(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server per store backend: PostgreSQL refuses some values SQLite takes (NUL, int4 overflow)."""
    if request.param == "postgres":
        databases = request.getfixturevalue("pg_databases")
        name = databases.take()
        store = databases.url(name)
    else:
        store = str(tmp_path_factory.mktemp("db") / "k.db")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KEEL_ADMIN_KEY", ADMIN)
        gw = gateway(Path(tmp_path_factory.mktemp("fuzz")), TOML, store=store)
        server = Server(gw)
        yield server
        server.stop()
        gw.close()
    if request.param == "postgres":
        databases.give_back(name)


def assert_error_shape(status: int, body: Any) -> None:
    """OpenAI's error shape, exactly, for any 4xx: never FastAPI's `{"detail": ...}`."""
    if not 400 <= status < 500:
        return
    assert isinstance(body, dict) and set(body) == {"error"}, f"{status}: {body!r}"
    error = body["error"]
    assert isinstance(error, dict) and set(error) == {"message", "type", "param", "code"}, f"{status}: {body!r}"
    assert isinstance(error["message"], str) and error["message"] and error["type"] == "invalid_request_error"
    assert error["param"] is None or isinstance(error["param"], str)
    assert error["code"] is None or isinstance(error["code"], str)


@schemathesis.check
def openai_error_shape(ctx: Any, response: Any, case: Any) -> None:
    assert_error_shape(response.status_code, response.json() if response.status_code >= 400 else None)


def _has_invalid_inputs(operation: dict[str, Any]) -> bool:
    """A body, or a query parameter that is not any string: schemathesis can make invalid ones."""
    params = [p for p in operation.get("parameters", []) if p["in"] == "query"]
    return "requestBody" in operation or any(p["schema"] != {"type": "string"} for p in params)


def operations() -> list[tuple[str, GenerationMode]]:
    """Each operation with valid inputs, and with invalid ones where it has any (read from the app)."""
    from keel.server.app import create_app

    cases = []
    for path, methods in create_app(gateway=None).openapi()["paths"].items():
        for method, operation in methods.items():
            label = f"{method.upper()} {path}"
            cases.append((label, GenerationMode.POSITIVE))
            if _has_invalid_inputs(operation):
                cases.append((label, GenerationMode.NEGATIVE))
    return cases


@pytest.mark.parametrize(("label", "mode"), operations(), ids=lambda v: v if isinstance(v, str) else v.value)
def test_no_server_errors(label: str, mode: GenerationMode, served: Server) -> None:
    """schemathesis's own pytest plugin does not load under pytest 9, so its strategies are driven here."""
    api = schemathesis.openapi.from_url(f"{served.base}/openapi.json")
    [operation] = [r.ok() for r in api.get_all_operations() if r.ok().label == label]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def fuzz(case: Any) -> None:
        case.call_and_validate(
            base_url=served.base,
            headers={"Authorization": f"Bearer {ADMIN}"},
            checks=[not_a_server_error, openai_error_shape],
        )

    fuzz()


PATHS = ["/v1/chat/completions", "/v1/embeddings", "/v1/models", "/v1/models/t", "/admin/keys", "/api/traces",
         "/v1/rag/collections", "/v1/rag/c/search", "/v1/nothing", "/admin/keys/x", "/api/traces/x"]  # fmt: skip


@pytest.fixture(scope="module")
def raw_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KEEL_ADMIN_KEY", ADMIN)
        store = str(tmp_path_factory.mktemp("rawdb") / "k.db")
        gw = gateway(Path(tmp_path_factory.mktemp("raw")), TOML, store=store)
        server = Server(gw)
        yield server
        server.stop()
        gw.close()


@given(
    method=st.sampled_from(["GET", "POST", "PUT", "PATCH", "DELETE"]),
    path=st.one_of(st.sampled_from(PATHS), st.text(min_size=1, max_size=20).map(lambda t: "/v1/" + t)),
    body=st.one_of(st.binary(max_size=64), st.text(max_size=64).map(lambda t: t.encode("utf-8", "surrogatepass"))),
)
@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)
def test_any_method_path_and_bytes_get_the_openai_shape(
    raw_server: Server, method: str, path: str, body: bytes
) -> None:
    """What the schema does not describe: unknown routes, wrong methods, bytes that are not JSON."""
    headers = {"Authorization": f"Bearer {ADMIN}", "content-type": "application/json"}
    response = httpx.request(method, raw_server.base + quote(path), content=body, headers=headers)
    assert response.status_code < 500, response.text
    assert_error_shape(response.status_code, response.json() if response.status_code >= 400 else None)
