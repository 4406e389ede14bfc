"""Replica budgets (issue 18): two `keel serve` replicas on one PostgreSQL share a key's budget.

Each run starts, as its own processes: a throwaway PostgreSQL (pgserver), the
raw stub of benchmarks/_stub.py (a fixed chat.completion with usage, after a
fixed delay) and two `keel serve` replicas on that PostgreSQL, with the admin
key set and one openai model at the stub, priced so that a call costs about
one cent and reserves about three.

1. Overspend: a key with a $1 daily budget; N concurrent requests (500),
   sent alternately to the two replicas, all at once. Printed: requests
   admitted and refused (and anything else), the spend the ledger holds, the
   spend the spans hold, the overspend past $1, and one request's reserved
   worst case (the goal: overspend at most that).
2. Added latency: sequential requests to one replica with a key that has a
   budget and an RPM limit against a key with neither; the difference of the
   p50s is what the shared ledger and window cost a call. The same on one
   replica on a SQLite store (the in-process ledger and window). The model is
   unpriced here, so that no answer waits for its span's durable commit.

    .venv/bin/python benchmarks/replica_budgets.py
    .venv/bin/python benchmarks/replica_budgets.py --requests 500 --latency-calls 300
    .venv/bin/python benchmarks/replica_budgets.py --src /tmp/keel-main/src    # another checkout's keel

Every socket stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _stub import StubProcess, stop_group  # noqa: E402
from gateway_overhead import FAKE_KEY, FAKE_KEY_ENV, MESSAGES, MODEL, machine  # noqa: E402

ADMIN = "sk-bench-admin-000000000000000000"
BUDGET_USD = 1.0
# $ per million tokens: the stub's 21 prompt and 5 completion tokens cost $0.0102; max_tokens 20 reserves ~$0.028
PRICE = {"input": 200.0, "output": 1200.0}
MAX_TOKENS = 20


def keel_toml(stub_url: str, *, priced: bool = True) -> str:
    price = f"price = {{ input = {PRICE['input']}, output = {PRICE['output']} }}" if priced else ""
    return f"""\
default_model = "{MODEL}"
max_retries = 0

[models.{MODEL}]
provider = "openai"
model = "{MODEL}"
base_url = "{stub_url}"
api_key_env = "{FAKE_KEY_ENV}"
{price}
"""


class Replica:
    """`keel serve` in its own process group, on the given store."""

    def __init__(self, config: Path, store: str, src: Path, port: int, log: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("KEEL_")}
        env.update({
            "KEEL_CONFIG": str(config), "KEEL_STORE": store, "KEEL_ADMIN_KEY": ADMIN, FAKE_KEY_ENV: FAKE_KEY,
            "PYTHONPATH": str(src),
        })  # fmt: skip
        self.port = port
        self.base = f"http://127.0.0.1:{port}"
        command = [sys.executable, "-c", "from keel.cli.app import main; main()", "serve", "--host", "127.0.0.1"]
        command += ["--port", str(port)]
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                [*command, "--log-level", "warning"], env=env, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        self.log = log

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"replica exited:\n{self.log.read_text()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.base}/healthz", timeout=1).status_code == 200:
                    return
            time.sleep(0.2)
        raise RuntimeError(f"replica not ready:\n{self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        stop_group(self.process)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def create_key(replica: Replica, name: str, **limits: Any) -> str:
    answer = httpx.post(
        f"{replica.base}/admin/keys", json={"name": name, **limits}, headers={"Authorization": f"Bearer {ADMIN}"},
        timeout=30,
    )  # fmt: skip
    answer.raise_for_status()
    return str(answer.json()["key"])


def body() -> dict[str, Any]:
    return {"model": MODEL, "messages": MESSAGES, "max_tokens": MAX_TOKENS}


async def burst(replicas: list[Replica], key: str, n: int, concurrency: int) -> tuple[Counter[str], float | None]:
    """`n` requests, `concurrency` at a time, alternating between the replicas: outcomes by status, and
    one request's reserved worst case (from a refusal's message)."""
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    headers = {"Authorization": f"Bearer {key}"}
    worst: list[float] = []
    async with httpx.AsyncClient(limits=limits, timeout=300) as client:
        gate = asyncio.Semaphore(concurrency)

        async def one(i: int) -> str:
            replica = replicas[i % len(replicas)]
            try:
                async with gate:
                    answer = await client.post(f"{replica.base}/v1/chat/completions", json=body(), headers=headers)
            except httpx.HTTPError as exc:
                return type(exc).__name__
            if answer.status_code == 402 and (found := re.search(r"this call up to \$([0-9.]+)", answer.text)):
                worst.append(float(found[1]))
            return str(answer.status_code)

        outcomes = await asyncio.gather(*(one(i) for i in range(n)))
    return Counter(outcomes), (max(worst) if worst else None)


def ledger_spend(url: str, key_name: str) -> tuple[float, float] | None:
    """(spent, reserved) of the key's daily ledger row; None with a keel that has no shared ledger."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as db:
        try:
            row = db.execute(
                "SELECT COALESCE(SUM(spent), 0), COALESCE(SUM(reserved), 0) FROM keel_budget_ledgers"
                " WHERE key = %s AND period = 'daily'",
                [key_name],
            ).fetchone()
        except psycopg.errors.UndefinedTable:
            return None
    return (float(row[0]), float(row[1])) if row else (0.0, 0.0)


def span_spend(url: str, key_name: str) -> float:
    import psycopg

    with psycopg.connect(url, autocommit=True) as db:
        row = db.execute("SELECT COALESCE(SUM(cost_usd), 0) FROM spans WHERE api_key = %s", [key_name]).fetchone()
    return float(row[0]) if row else 0.0


def sequential_p50(replica: Replica, key: str, calls: int) -> float:
    """p50 latency (ms) of `calls` sequential requests after 20 of warm-up."""
    headers = {"Authorization": f"Bearer {key}"}
    latencies = []
    with httpx.Client(timeout=30) as client:
        for i in range(calls + 20):
            started = time.perf_counter()
            answer = client.post(f"{replica.base}/v1/chat/completions", json=body(), headers=headers)
            elapsed = (time.perf_counter() - started) * 1000
            if answer.status_code != 200:
                raise RuntimeError(f"latency call refused: {answer.status_code} {answer.text[:300]}")
            if i >= 20:
                latencies.append(elapsed)
    return statistics.median(latencies)


def latency(replica: Replica, calls: int, rounds: int) -> tuple[float, float]:
    """(p50 plain key, p50 key with a budget and an RPM limit), medians over alternating rounds."""
    plain = create_key(replica, f"plain-{replica.port}")
    limited = create_key(replica, f"limited-{replica.port}", daily_budget_usd=1_000_000.0, rpm=1_000_000)
    plains, limiteds = [], []
    for _ in range(rounds):
        plains.append(sequential_p50(replica, plain, calls))
        limiteds.append(sequential_p50(replica, limited, calls))
    return statistics.median(plains), statistics.median(limiteds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=500, help="concurrent requests of the overspend burst")
    parser.add_argument("--concurrency", type=int, default=50, help="requests at a time of the closed-loop burst")
    parser.add_argument("--delay-ms", type=float, default=50.0, help="the stub's latency per answer")
    parser.add_argument("--latency-calls", type=int, default=200, help="sequential calls per latency round")
    parser.add_argument("--latency-rounds", type=int, default=3)
    parser.add_argument("--src", type=Path, default=HERE.parent / "src", help="the keel sources to run")
    args = parser.parse_args()

    from pgserver.postgres_server import get_server

    work = Path(tempfile.mkdtemp(prefix="keel-replicas-"))
    server = get_server(work / "pgdata", cleanup_mode="delete")
    url = server.get_uri()
    print(f"machine: {machine()}")
    print(f"keel sources: {args.src}")
    try:
        overspend(args, work, url)
        if args.latency_calls > 0:
            added_latency(args, work, url)
    finally:
        server.cleanup()
    return 0


def start(work: Path, config: Path, stores: list[str], src: Path, name: str) -> list[Replica]:
    replicas = [Replica(config, store, src, free_port(), work / f"{name}{i}.log") for i, store in enumerate(stores)]
    try:
        for replica in replicas:
            replica.wait_ready()
    except BaseException:
        for replica in replicas:
            replica.stop()
        raise
    return replicas


def overspend(args: argparse.Namespace, work: Path, url: str) -> None:
    with StubProcess(delay_ms=args.delay_ms) as stub:
        config = work / "burst.toml"
        config.write_text(keel_toml(stub.url), encoding="utf-8")
        replicas = start(work, config, [url, url], args.src, "burst")
        results = []
        try:
            for name, concurrency in (("team", args.requests), ("team-closed-loop", args.concurrency)):
                key = create_key(replicas[0], name, daily_budget_usd=BUDGET_USD)
                time.sleep(1.0)  # the other replica has seen the new key (it would also look it up at once)
                started = time.perf_counter()
                outcomes, worst = asyncio.run(burst(replicas, key, args.requests, concurrency))
                results.append((name, concurrency, outcomes, worst, time.perf_counter() - started))
        finally:
            for replica in replicas:
                replica.stop()  # a graceful stop flushes the spans
    print(f"\n## Overspend: 2 replicas on one PostgreSQL, a ${BUDGET_USD:.2f} budget, {args.requests} requests")
    print(f"(stub latency {args.delay_ms:g} ms; requests alternate between the replicas)\n")
    print("| at once | admitted | refused (402) | other | ledger spent | spans | overspend | 1 worst case | wall s |")
    print("| ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for name, concurrency, outcomes, worst, wall in results:
        ledger = ledger_spend(url, name)
        spans = span_spend(url, name)
        other = {k: v for k, v in outcomes.items() if k not in ("200", "402")} or "-"
        over = max(0.0, max(ledger[0] if ledger else 0.0, spans) - BUDGET_USD)
        held = f"${ledger[0]:.4f} (reserved left ${ledger[1]:.4f})" if ledger else "(none: in-process ledgers)"
        print(
            f"| {concurrency} | {outcomes.get('200', 0)} | {outcomes.get('402', 0)} | {other} | {held}"
            f" | ${spans:.4f} | ${over:.4f} | ${worst or 0:.4f} | {wall:.1f} |"
        )


def added_latency(args: argparse.Namespace, work: Path, url: str) -> None:
    with StubProcess() as stub:  # no delay: the difference is keel's alone
        config = work / "latency.toml"
        # Unpriced: a priced call's answer waits for its span's durable commit (8-20 ms of fsync here), which
        # would drown the difference; an unpriced call still reserves (zero) and settles, in the same statements.
        config.write_text(keel_toml(stub.url, priced=False), encoding="utf-8")
        rows = []
        for name, store in (
            ("PostgreSQL (shared ledger and window)", url),
            ("SQLite (in-process)", str(work / "k.db")),
        ):
            [replica] = start(work, config, [store], args.src, "latency")
            try:
                rows.append((name, *latency(replica, args.latency_calls, args.latency_rounds)))
            finally:
                replica.stop()
    print("\n## Added latency of a key's budget and RPM limit (p50 of sequential calls, ms; medians of rounds)")
    print("| store | plain key | key with budget + rpm | added |\n| --- | ---: | ---: | ---: |")
    for name, plain, limited in rows:
        print(f"| {name} | {plain:.2f} | {limited:.2f} | {limited - plain:+.2f} |")


if __name__ == "__main__":
    raise SystemExit(main())
