"""Several gateways (replicas, workers) on one PostgreSQL share each key's budget and rate limits.

Each test runs two `Gateway`s (or two servers) on the same database, as two `keel serve` replicas
behind a load balancer would, and splits concurrent calls between them.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest

from helpers import write_config
from keel import Call, CallContext, Gateway, TestModel
from keel.config import load_config
from keel.errors import BudgetExceeded, RateLimited
from keel.gateway.budget import BudgetTracker
from keel.gateway.limits import Limiter
from keel.types import ChatOptions
from serving import Server

pytestmark = pytest.mark.postgres

BUDGET = 0.2
TOML = f"""max_retries = 0
default_model = "t"
[models.t]
provider = "test"
model = "t"
script = ["answer"]
price = {{ input = 1000.0, output = 2000.0 }}
max_output_tokens = 10

[keys.team]
daily_budget_usd = {BUDGET}

[keys.paced]
rpm = 5
"""


def _gateways(tmp_path: Path, url: str, n: int = 2, *, delay: float = 0.02) -> list[Gateway]:
    config = load_config(write_config(tmp_path, TOML), environ={"KEEL_STORE": url})
    gateways = [Gateway(config) for _ in range(n)]
    for gw in gateways:
        gw._extra["t"] = TestModel("four tokens of answer", model_id="t", delay=delay)
    return gateways


def _worst_case(gw: Gateway) -> float:
    """The reserved worst case of one of the calls below: the prompt and max_tokens at the model's prices."""
    request = gw._request("q 10", "t", None, ChatOptions(max_tokens=5))
    worst = gw._worst_case(Call("chat", "t", CallContext(key="team"), gw.tracer.start("probe"), request=request))
    assert worst is not None
    return worst


async def test_the_store_backend_chooses_the_ledger(tmp_path: Path, pg_database_url: str) -> None:
    sqlite = Gateway(load_config(write_config(tmp_path, TOML), environ={"KEEL_STORE": str(tmp_path / "k.db")}))
    assert type(sqlite.budgets) is BudgetTracker  # one process: the in-process ledger, unchanged
    assert type(sqlite._key_limiter("paced")) is Limiter
    [shared] = _gateways(tmp_path, pg_database_url, 1)
    assert type(shared.budgets) is not BudgetTracker and type(shared._key_limiter("paced")) is not Limiter
    await sqlite.aclose()
    await shared.aclose()


async def test_concurrent_calls_on_two_gateways_never_overspend_the_key(tmp_path: Path, pg_database_url: str) -> None:
    a, b = _gateways(tmp_path, pg_database_url)
    worst = _worst_case(a)
    outcomes = await asyncio.gather(
        *(gw.chat(f"q {i}", key="team", max_tokens=5) for i, gw in zip(range(80), [a, b] * 40, strict=False)),
        return_exceptions=True,
    )
    admitted = [o for o in outcomes if not isinstance(o, BaseException)]
    refused = [o for o in outcomes if isinstance(o, BudgetExceeded)]
    assert len(admitted) + len(refused) == len(outcomes)  # nothing else went wrong
    assert admitted and refused
    charged = sum(o.cost_usd or 0 for o in admitted)
    assert charged <= BUDGET + worst  # both replicas together: one budget, at most one call's worst case over
    assert a.budgets.spent("team") == pytest.approx(charged) == pytest.approx(b.budgets.spent("team"))
    # both gateways admitted some: the budget was shared, not won by one replica
    assert {a.flush(), b.flush()} == {True}
    for gw in (a, b):
        await gw.aclose()


async def test_an_rpm_limit_holds_across_two_gateways(tmp_path: Path, pg_database_url: str) -> None:
    a, b = _gateways(tmp_path, pg_database_url)
    outcomes = await asyncio.gather(
        *(gw.chat(f"q {i}", key="paced") for i, gw in zip(range(12), [a, b] * 6, strict=False)),
        return_exceptions=True,
    )
    refused = [o for o in outcomes if isinstance(o, RateLimited)]
    assert len(outcomes) - len(refused) == 5  # rpm 5 over both replicas, not 5 each
    assert all(0 < (r.retry_after or 0) <= 61 for r in refused)
    for gw in (a, b):
        await gw.aclose()


ADMIN = "sk-admin-replicas-0123456789"


@pytest.fixture
def replicas(tmp_path: Path, pg_database_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Server]]:
    monkeypatch.setenv("KEEL_ADMIN_KEY", ADMIN)
    servers = [Server(gw) for gw in _gateways(tmp_path, pg_database_url)]
    yield servers
    for server in servers:
        server.stop()


def test_a_revocation_on_one_replica_is_refused_on_the_other_within_a_second(replicas: list[Server]) -> None:
    a, b = replicas
    admin = {"Authorization": f"Bearer {ADMIN}"}
    body = {"model": "t", "messages": [{"role": "user", "content": "hi"}]}
    for round_ in range(3):  # at different moments of the other replica's refresh cycle
        created = httpx.post(f"{a.base}/admin/keys", json={"name": f"k{round_}"}, headers=admin, timeout=10)
        assert created.status_code == 201, created.text
        user = {"Authorization": f"Bearer {created.json()['key']}"}
        assert httpx.post(f"{b.url}/chat/completions", json=body, headers=user, timeout=10).status_code == 200
        time.sleep(0.3 * round_)
        assert httpx.delete(f"{a.base}/admin/keys/k{round_}", headers=admin, timeout=10).status_code == 200
        revoked = time.monotonic()
        while httpx.post(f"{b.url}/chat/completions", json=body, headers=user, timeout=10).status_code == 200:
            assert time.monotonic() - revoked < 1.0, "the other replica still accepts the revoked key"
            time.sleep(0.02)


HOLDER = """
import asyncio, sys
import keel.gateway.shared_limits as shared
shared.LEASE_S = 1.0  # a short lease, renewed while this process lives
from keel import Call, CallContext, Gateway, TestModel
from keel.config import load_config

async def main():
    gw = Gateway(load_config(sys.argv[1], environ={"KEEL_STORE": sys.argv[2]}))
    gw._extra["t"] = TestModel("slow", model_id="t", delay=600)
    await gw.chat("hold the budget", key="team", max_tokens=5)

asyncio.run(main())
"""


async def test_a_killed_process_does_not_hold_its_reservations_forever(tmp_path: Path, pg_database_url: str) -> None:
    toml = TOML.replace(f"daily_budget_usd = {BUDGET}", "daily_budget_usd = 0.03")  # room for one call in flight
    config = write_config(tmp_path, toml)
    script = tmp_path / "holder.py"
    script.write_text(textwrap.dedent(HOLDER))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    holder = subprocess.Popen([sys.executable, str(script), str(config), pg_database_url], env=env)
    gw = Gateway(load_config(config, environ={"KEEL_STORE": pg_database_url}))
    gw._extra["t"] = TestModel("fast", model_id="t")
    try:
        _wait_for_reservation(pg_database_url, holder)
        with pytest.raises(BudgetExceeded, match="in flight"):  # the other process's call is in flight
            await gw.chat("q", key="team", max_tokens=5)
        await asyncio.sleep(2.5)  # past its lease: a live holder renews it, so it still counts
        with pytest.raises(BudgetExceeded, match="in flight"):
            await gw.chat("q", key="team", max_tokens=5)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
    deadline = time.monotonic() + 5
    while True:  # the dead process's reservation expires with its lease and is reclaimed
        try:
            result = await gw.chat("q", key="team", max_tokens=5)
            break
        except BudgetExceeded:
            assert time.monotonic() < deadline, "the killed process's reservation was never released"
            await asyncio.sleep(0.1)
    assert result.text == "fast"
    assert gw.budgets.spent("team") == pytest.approx(result.cost_usd)  # the dead call was never charged
    await gw.aclose()


def _wait_for_reservation(url: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the holder process exited"
        with psycopg.connect(url, autocommit=True) as conn:
            try:
                if conn.execute("SELECT COUNT(*) FROM keel_budget_reservations").fetchone() == (1,):
                    return
            except psycopg.errors.UndefinedTable:
                pass
        time.sleep(0.1)
    raise AssertionError("the holder never reserved")


async def test_a_shared_window_frees_its_slots_after_the_window(
    tmp_path: Path, pg_database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("keel.gateway.limits.WINDOW_S", 1.5)  # buckets of 25 ms
    a, b = _gateways(tmp_path, pg_database_url, delay=0.0)
    for gw in (a, b, a, b, a):
        await gw.chat("q", key="paced")
    started = time.monotonic()
    with pytest.raises(RateLimited, match=r"request limit of 5/1.5 s") as refused:
        await b.chat("q", key="paced")
    assert 0 < (refused.value.retry_after or 0) <= 1.5 + 0.025
    while True:  # never admitted again before the first call is a full window old
        try:
            await b.chat("q", key="paced")
            break
        except RateLimited:
            await asyncio.sleep(0.05)
    assert 1.0 < time.monotonic() - started < 3.0
    for gw in (a, b):
        await gw.aclose()


async def test_the_store_going_away_refuses_limited_keys_with_503(tmp_path: Path, pg_database_url: str) -> None:
    from keel.errors import LimitsUnavailable
    from keel.store.postgres import PostgresStore

    [gw] = _gateways(tmp_path, pg_database_url, 1)
    gone = PostgresStore("postgresql://keel@127.0.0.1:1/keel", connect_timeout=1)  # nothing listens there
    gw.budgets.store = gone  # type: ignore[attr-defined]
    limiter = gw._key_limiter("paced")
    limiter.store = gone  # type: ignore[union-attr]
    for key in ("team", "paced"):
        with pytest.raises(LimitsUnavailable, match="the store does not answer") as caught:
            await gw.chat("q", key=key, max_tokens=5)
        assert caught.value.http_status == 503
    assert (await gw.chat("q")).text  # a key without budget or limits is not held up
    await gw.aclose()
