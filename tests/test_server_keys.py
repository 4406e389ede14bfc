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
    assert a["keel.user"] == "u-7"
    assert a["keel.session"] == "s-42"
    assert a["keel.tags"] == ["beta", "search"]
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
    assert all(s.attributes["gen_ai.operation.name"] == "http" for s in refused)  # not a model call


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
    assert denied.json()["error"]["message"].startswith("this endpoint needs the admin key, not the virtual key")


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


@pytest.mark.parametrize(
    ("client_host", "headers", "status"),
    [
        ("127.0.0.1", {"host": "127.0.0.1:8000"}, 200),
        ("127.0.0.1", {"host": "localhost"}, 200),
        ("::1", {"host": "[::1]:8000", "origin": "http://[::1]:8000"}, 200),
        ("10.1.2.3", {"host": "127.0.0.1:8000"}, 401),  # another machine
        ("127.0.0.1", {"host": "evil.example"}, 401),  # DNS rebinding: a web page's name resolved to 127.0.0.1
        ("127.0.0.1", {"host": "localhost", "origin": "http://evil.example"}, 401),  # a foreign page's script
        ("127.0.0.1", {"host": "localhost", "x-forwarded-for": "203.0.113.9"}, 401),  # behind a local proxy
        ("127.0.0.1", {"host": "localhost", "forwarded": "for=203.0.113.9"}, 401),
    ],
)
async def test_with_no_keys_only_direct_local_requests_may_call(
    gw: Gateway, client_host: str, headers: dict[str, str], status: int
) -> None:
    app = create_app(gateway=gw)
    body = {"model": "t", "messages": [{"role": "user", "content": "hi"}]}
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, client=(client_host, 5000))
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as http:
            answer = await http.post("/v1/chat/completions", json=body, headers=headers)
            admin = await http.get("/admin/keys", headers=headers)
    assert answer.status_code == status, answer.text
    assert admin.status_code == 401  # the open mode never serves the admin API, even to a local caller
    if status == 401:
        assert "answers only requests made on this machine" in answer.json()["error"]["message"]


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


def test_a_key_lists_only_its_models_and_is_refused_before_a_model_is_built(gw: Gateway, served: Server) -> None:
    secret = new_key(gw, "team-a", models=("t",))
    assert [m.id for m in client(served, secret).models.list()] == ["t"]
    assert "paid" in {m.id for m in client(served, ADMIN).models.list()}
    # gpt-4o-mini has no OPENAI_API_KEY here: building it would fail with a 500; the key check comes first
    with pytest.raises(openai.PermissionDeniedError, match="may not use model 'gpt-4o-mini'"):
        ask(served, secret, model="gpt-4o-mini")


def test_an_oversized_body_is_attributed_to_its_key(gw: Gateway, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEEL_ADMIN_KEY", ADMIN)
    gw.config = gw.config.model_copy(update={"server": gw.config.server.model_copy(update={"max_body_bytes": 100})})
    server = Server(gw)
    try:
        secret = new_key(gw, "team-a")
        answer = httpx.post(
            f"{server.url}/chat/completions", headers={"authorization": f"Bearer {secret}"},
            json={"model": "t", "messages": [{"role": "user", "content": "x" * 500}]},
        )  # fmt: skip
        assert answer.status_code == 413
        assert [(s.error_type, s.attributes.get("keel.api_key")) for s in spans(gw)] == [("BodyTooLarge", "team-a")]
    finally:
        server.stop()


def test_a_recreated_key_is_held_to_the_spend_of_its_name(gw: Gateway, served: Server) -> None:
    """Spend made while the name had no budget still counts once a budget is set again."""
    secret = new_key(gw, "team", daily_budget_usd=1.0)
    ask(served, secret, model="paid")
    revoke_key(store_of(gw), "team")
    unlimited = new_key(gw, "team")
    for _ in range(4):
        ask(served, unlimited, model="paid")  # about $0.01 each
    revoke_key(store_of(gw), "team")
    limited = new_key(gw, "team", daily_budget_usd=0.06)  # spent about 0.05: the next worst case does not fit
    with pytest.raises(openai.APIStatusError, match="daily budget") as caught:
        ask(served, limited, model="paid")
    assert caught.value.status_code == 402


@pytest.mark.parametrize(
    "body",
    [
        {"name": "x", "rpm": 2**40},
        {"name": "x", "tpm": 0},
        {"name": "x", "daily_budget_usd": -1},
        {"name": "x\u0000y"},
        {"name": "x", "metadata": {"a": "\u0000"}},
        {"name": "x" * 65},
        {"name": "has space"},
    ],
)
def test_the_admin_api_refuses_bad_keys_with_400(served: Server, body: dict[str, object]) -> None:
    answer = httpx.post(f"{served.base}/admin/keys", headers={"authorization": f"Bearer {ADMIN}"}, json=body)
    assert answer.status_code == 400, answer.text


def test_the_admin_api_refuses_infinite_budgets(served: Server) -> None:
    answer = httpx.post(
        f"{served.base}/admin/keys", headers={"authorization": f"Bearer {ADMIN}", "content-type": "application/json"},
        content=b'{"name": "x", "daily_budget_usd": Infinity}',
    )  # fmt: skip
    assert answer.status_code == 400
    assert (
        httpx.delete(f"{served.base}/admin/keys/a%00b", headers={"authorization": f"Bearer {ADMIN}"}).status_code == 400
    )


def test_concurrent_creates_of_one_name_make_one_key(store: Store) -> None:
    from concurrent.futures import ThreadPoolExecutor

    def make(_: int) -> str:
        try:
            create_key(store, "racer")
            return "created"
        except Exception as exc:  # every loser must get the clear InputError, not a driver error
            return type(exc).__name__

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(make, range(8)))
    assert sorted(outcomes) == ["InputError"] * 7 + ["created"]
    assert [r.name for r in list_keys(store)] == ["racer"]


def test_cli_refuses_non_finite_budgets() -> None:
    for text in ("nan/day", "inf/month"):
        result = CliRunner().invoke(cli, ["keys", "create", "--name", "x", "--budget-usd", text])
        assert result.exit_code == 2 and "AMOUNT/day" in result.output
