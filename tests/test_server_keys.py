"""Virtual keys on the server: authentication, per-key models, limits and budgets, attribution, the admin API.

Driven by the official openai SDK over real HTTP, plus `keel keys` in the CLI.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from typer.testing import CliRunner

from helpers import gateway, spans
from keel import Gateway
from keel.cli.app import app as cli
from keel.config import KeyConfig
from keel.keys import create_key, list_keys, parse_budget, revoke_key
from keel.server.app import create_app
from keel.store import Store
from serving import Server

ADMIN = "admin-secret-for-tests"
MODELS = (
    '[models.t]\nprovider = "test"\nmodel = "t"\nscript = ["Hello from keel."]\n'
    '[models.paid]\nprovider = "test"\nmodel = "paid"\nscript = ["ok"]\n'
    "price = { input = 1000.0, output = 2000.0 }\nmax_output_tokens = 10\n"
    "[server]\nkey_refresh_s = 0.2\n"
)


def store_of(gw: Gateway) -> Store:
    assert gw.store is not None
    return gw.store


@pytest.fixture
def gw(tmp_path: Path) -> Iterator[Gateway]:
    g = gateway(tmp_path, MODELS)
    yield g
    g.close()


@pytest.fixture
def served(gw: Gateway, monkeypatch: pytest.MonkeyPatch) -> Iterator[Server]:
    monkeypatch.setenv("KEEL_ADMIN_KEY", ADMIN)
    server = Server(gw)
    yield server
    server.stop()


def client(server: Server, key: str | None) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url, api_key=key or "none", max_retries=0)


def ask(server: Server, key: str | None, model: str = "t", **extra: object) -> str | None:
    answer = client(server, key).chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}], **extra
    )  # type: ignore[call-overload]
    return answer.choices[0].message.content  # type: ignore[no-any-return]


def new_key(gw: Gateway, name: str, **limits: object) -> str:
    secret, _ = create_key(store_of(gw), name, KeyConfig(**limits))  # type: ignore[arg-type]
    return secret


# --- keys in the store -----------------------------------------------------------------------


def test_keys_are_stored_hashed_and_shown_once(gw: Gateway) -> None:
    secret, record = create_key(store_of(gw), "team-a", KeyConfig(rpm=60, models=("t",)))
    assert secret.startswith("sk-keel-") and len(secret) > 30
    with store_of(gw).transaction() as cur:
        cur.execute("SELECT * FROM keel_keys")
        row = cur.fetchone()
    assert secret not in json.dumps(row, default=str)  # only the hash and a short prefix
    assert record.prefix == secret[:12]
    assert [r.name for r in list_keys(store_of(gw))] == ["team-a"]


def test_one_active_key_per_name_and_revoke(gw: Gateway) -> None:
    create_key(store_of(gw), "team-a")
    with pytest.raises(Exception, match="active key named 'team-a' exists"):
        create_key(store_of(gw), "team-a")
    revoked = revoke_key(store_of(gw), "team-a")
    assert revoked.revoked_at is not None
    create_key(store_of(gw), "team-a")  # a new key for the same team, after the old one is revoked
    assert len(list_keys(store_of(gw), include_revoked=True)) == 2
    with pytest.raises(Exception, match="no active key named 'nobody'"):
        revoke_key(store_of(gw), "nobody")


@pytest.mark.parametrize("text", ["50", "50/week", "-3/day", "x/month", ""])
def test_bad_budgets_are_refused(text: str) -> None:
    with pytest.raises(Exception, match="AMOUNT/day or AMOUNT/month"):
        parse_budget(text)


def test_budget_periods() -> None:
    assert parse_budget("50/month") == ("monthly", 50.0)
    assert parse_budget("$2.5/day") == ("daily", 2.5)


# --- authentication ------------------------------------------------------------------------


def test_a_virtual_key_is_accepted_and_attributed(gw: Gateway, served: Server) -> None:
    secret = new_key(gw, "team-a")
    http = httpx.post(
        f"{served.url}/chat/completions",
        headers={
            "authorization": f"Bearer {secret}", "x-keel-session-id": "s-42", "x-keel-tags": "beta, search",
            "x-keel-meta-feature": "summaries",
        },
        json={"model": "t", "messages": [{"role": "user", "content": "hi"}], "user": "u-7",
              "metadata": {"ticket": "T-1"}},
    )  # fmt: skip
    assert http.status_code == 200, http.text
    [span] = spans(gw, trace_id=http.headers["x-keel-trace-id"])
    a = span.attributes
    assert a["keel.api_key"] == "team-a"
    assert a["keel.metadata.user"] == "u-7"
    assert a["keel.metadata.session_id"] == "s-42"
    assert a["keel.metadata.tags"] == ["beta", "search"]
    assert a["keel.metadata.feature"] == "summaries"
    assert a["keel.metadata.ticket"] == "T-1"


def test_missing_invalid_and_revoked_keys_get_401_and_are_traced(gw: Gateway, served: Server) -> None:
    secret = new_key(gw, "team-a")
    missing = httpx.post(f"{served.url}/chat/completions", json={"model": "t", "messages": [{"role": "user"}]})
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert missing.json()["error"]["message"] == "missing API key: send Authorization: Bearer <key>"
    with pytest.raises(openai.AuthenticationError, match="invalid API key") as invalid:
        ask(served, "sk-keel-not-a-real-key-at-all")
    assert invalid.value.body["type"] == "invalid_request_error"  # type: ignore[index]
    assert ask(served, secret) == "Hello from keel."
    revoke_key(store_of(gw), "team-a")  # as `keel keys revoke` in another process: seen within key_refresh_s
    deadline = time.monotonic() + 5
    with pytest.raises(openai.AuthenticationError, match=r"\(team-a\) was revoked"):
        while time.monotonic() < deadline:
            ask(served, secret)
            time.sleep(0.05)
    refused = spans(gw, status="error")
    assert {s.error_type for s in refused} == {"Unauthorized"}
    assert len(refused) == 3
    assert all(s.attributes["gen_ai.operation.name"] == "chat" for s in refused)


def test_the_admin_key_may_call_models(served: Server) -> None:
    assert ask(served, ADMIN) == "Hello from keel."


def test_a_key_sees_only_its_models(gw: Gateway, served: Server) -> None:
    secret = new_key(gw, "team-a", models=("t",))
    assert ask(served, secret) == "Hello from keel."
    with pytest.raises(openai.PermissionDeniedError, match="may not use model 'paid'"):
        ask(served, secret, model="paid")
    [refused] = spans(gw, status="error")
    assert refused.attributes["keel.api_key"] == "team-a"


def test_over_the_rate_limit_is_429_with_retry_after(gw: Gateway, served: Server) -> None:
    secret = new_key(gw, "team-a", rpm=2)
    ask(served, secret)
    ask(served, secret)
    with pytest.raises(openai.RateLimitError) as caught:
        ask(served, secret)
    assert int(caught.value.response.headers["retry-after"]) >= 1
    assert "key team-a" in caught.value.message


def test_over_budget_is_402(gw: Gateway, served: Server) -> None:
    # a call costs about $0.01 and reserves its worst case of about $0.028 (10 output tokens) before it is sent
    secret = new_key(gw, "team-a", daily_budget_usd=0.03)
    ask(served, secret, model="paid")
    with pytest.raises(openai.APIStatusError, match="daily budget") as caught:
        ask(served, secret, model="paid")
    assert caught.value.status_code == 402


def test_a_key_created_elsewhere_works_at_once(gw: Gateway, served: Server) -> None:
    ask(served, ADMIN)  # the server is up and has loaded its keys
    secret = new_key(gw, "late")  # as `keel keys create` in another process would
    assert ask(served, secret) == "Hello from keel."


# --- the admin API -------------------------------------------------------------------------


def test_admin_api_needs_the_admin_key(gw: Gateway, served: Server) -> None:
    secret = new_key(gw, "team-a")
    assert httpx.get(f"{served.base}/admin/keys").status_code == 401
    denied = httpx.get(f"{served.base}/admin/keys", headers={"authorization": f"Bearer {secret}"})
    assert denied.status_code == 403
    assert denied.json()["error"]["message"] == "this endpoint needs the admin key"


def test_admin_api_creates_lists_and_revokes(served: Server) -> None:
    admin = {"authorization": f"Bearer {ADMIN}"}
    made = httpx.post(f"{served.base}/admin/keys", headers=admin, json={"name": "team-b", "rpm": 10, "models": ["t"]})
    assert made.status_code == 201, made.text
    secret = made.json()["key"]
    assert ask(served, secret) == "Hello from keel."
    listed = httpx.get(f"{served.base}/admin/keys", headers=admin).json()["data"]
    assert [(k["name"], k["rpm"], k["models"]) for k in listed] == [("team-b", 10, ["t"])]
    assert "key" not in listed[0]
    assert httpx.delete(f"{served.base}/admin/keys/team-b", headers=admin).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        ask(served, secret)
    bad = httpx.post(f"{served.base}/admin/keys", headers=admin, json={"name": "x", "models": ["nope"]})
    assert bad.status_code == 400 and "unknown model 'nope'" in bad.json()["error"]["message"]
    bad = httpx.post(f"{served.base}/admin/keys", headers=admin, json={"name": "x", "rpm": "many"})
    assert bad.status_code == 400


# --- the open mode -------------------------------------------------------------------------


async def test_with_no_keys_only_localhost_may_call(gw: Gateway) -> None:
    app = create_app(gateway=gw)
    body = {"model": "t", "messages": [{"role": "user", "content": "hi"}]}
    async with app.router.lifespan_context(app):
        for host, status in (("127.0.0.1", 200), ("10.1.2.3", 401)):
            transport = httpx.ASGITransport(app=app, client=(host, 5000))
            async with httpx.AsyncClient(transport=transport, base_url="http://keel") as http:
                answer = await http.post("/v1/chat/completions", json=body)
            assert answer.status_code == status, (host, answer.text)
    assert "answers only on localhost" in answer.json()["error"]["message"]


def test_the_open_mode_is_announced_at_start(gw: Gateway, capfd: pytest.CaptureFixture[str]) -> None:
    Server(gw).stop()
    assert "no keys configured: answering localhost only" in capfd.readouterr().err


# --- the CLI -------------------------------------------------------------------------------


def test_cli_create_list_revoke() -> None:
    runner = CliRunner()
    made = runner.invoke(
        cli, ["keys", "create", "--name", "team-a", "--rpm", "60", "--tpm", "100000", "--budget-usd", "50/month",
              "--models", "gpt-4o-mini,local"],
    )  # fmt: skip
    assert made.exit_code == 0, made.output
    secret = made.output.strip().splitlines()[-1]
    assert secret.startswith("sk-keel-")
    listed = runner.invoke(cli, ["keys", "list", "--json"])
    [key] = json.loads(listed.output)
    assert (key["name"], key["rpm"], key["tpm"], key["monthly_budget_usd"]) == ("team-a", 60, 100000, 50.0)
    assert key["models"] == ["gpt-4o-mini", "local"] and secret not in listed.output
    assert runner.invoke(cli, ["keys", "create", "--name", "x", "--models", "nope"]).exit_code == 2
    assert runner.invoke(cli, ["keys", "create", "--name", "x", "--budget-usd", "5/week"]).exit_code == 2
    assert runner.invoke(cli, ["keys", "revoke", "team-a"]).exit_code == 0
    assert json.loads(runner.invoke(cli, ["keys", "list", "--json"]).output) == []
    assert runner.invoke(cli, ["keys", "revoke", "team-a"]).exit_code == 2


def test_metrics_need_the_admin_key(gw: Gateway, served: Server) -> None:
    secret = new_key(gw, "team-a")
    assert httpx.get(f"{served.base}/metrics", headers={"authorization": f"Bearer {secret}"}).status_code == 403
    scraped = httpx.get(f"{served.base}/metrics", headers={"authorization": f"Bearer {ADMIN}"})
    assert scraped.status_code == 200 and "keel_requests_total" in scraped.text
