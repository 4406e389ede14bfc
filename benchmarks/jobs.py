"""Durable jobs: per-item overhead, throughput with 1, 2 and 4 workers, and exactly-once under kill -9.

    python benchmarks/jobs.py overhead --items 500          # (a) no-op items, SQLite and PostgreSQL
    python benchmarks/jobs.py scale --items 10000           # (b) items calling a 200 ms stub, 1/2/4 workers
    python benchmarks/jobs.py kills --items 10000 --kills 20  # (c) a worker killed -9 at random moments

PostgreSQL comes from pgserver (a throwaway server), the stub model from
benchmarks/_stub.py (its own process). Workers are `keel worker` processes
importing this file's kinds (`--import jobs`, with benchmarks/ on the path).
Side effects are rows keyed by each item's idempotency key in a table of
their own: (c) counts those, not the job's status.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent / "src"))

from keel import jobs  # noqa: E402

_local = threading.local()
_effects_lock = threading.Lock()
_effects_conn: Any = None


def _effect(key: str) -> None:
    """The item's side effect, keyed: a second run of the same item adds nothing.

    One connection per worker process, not one per thread: DBOS runs each item's
    thread work on an unbounded pool, so per-thread connections (100 items at once
    per worker) exhaust PostgreSQL's max_connections.
    """
    global _effects_conn
    import psycopg

    with _effects_lock:
        if _effects_conn is None:
            _effects_conn = psycopg.connect(os.environ["KEEL_STORE"], autocommit=True)
        _effects_conn.execute("INSERT INTO bench_effects (key) VALUES (%s) ON CONFLICT DO NOTHING", (key,))
        _effects_conn.execute("UPDATE bench_runs SET n = n + 1")  # every run, duplicates included


@jobs.kind("bench.noop")
def noop(item: Any) -> None:
    return None


@jobs.kind("bench.model")
async def call_model(item: Any, ctx: jobs.ItemContext) -> int:
    import httpx

    client = getattr(_local, "http", None)
    if client is None:
        client = _local.http = httpx.AsyncClient(base_url=os.environ["BENCH_STUB"], timeout=30)
    response = await client.post("/v1/chat/completions", json={"model": "m", "messages": []})
    response.raise_for_status()
    await asyncio.to_thread(_effect, ctx.key)
    return response.status_code


def _pg() -> tuple[Any, str]:
    from pgserver.postgres_server import get_server

    server = get_server(Path(tempfile.mkdtemp(prefix="keel-bench-pg-")), cleanup_mode="delete")
    return server, server.get_uri()


def _env(store: str, **extra: str) -> dict[str, str]:
    env = {**os.environ, "KEEL_STORE": store, "PYTHONPATH": f"{HERE.parent / 'src'}{os.pathsep}{HERE}"}
    env.update({"KEEL_JOBS__POLL_S": "0.05", "KEEL_JOBS__HEARTBEAT_S": "1", "KEEL_JOBS__DEAD_AFTER_S": "5"})
    env.update(extra)
    return env


def overhead(items: int) -> None:
    """(a) Per item: submit (rows + enqueue) and run (dequeue, workflow, outcome) of no-op items.

    The worker runs in this process, so the process's CPU time over the run
    (`cpu`) is what the items cost it; on a shared machine the wall time of
    the run is that CPU stretched by the share of a core the process gets
    (PostgreSQL's own CPU, in its processes, is not counted).
    """
    from keel.config import load_config

    def measure(store: str) -> tuple[float, float, float]:
        os.environ.update(_env(store, KEEL_JOBS__QUEUES__DEFAULT__WORKER_CONCURRENCY="64"))
        config = load_config()
        runner = jobs.JobRunner(config)
        worker = jobs.Worker(config, worker_id="bench").start()
        runner.submit("warm-up", "bench.noop", list(range(20)))
        runner.wait("warm-up")
        t0 = time.perf_counter()
        runner.submit("noop", "bench.noop", list(range(items)))
        t1, c1 = time.perf_counter(), time.process_time()
        runner.wait("noop", poll_s=0.01)
        t2, c2 = time.perf_counter(), time.process_time()
        worker.stop()
        runner.close()
        return (t1 - t0) / items * 1000, (t2 - t1) / items * 1000, (c2 - c1) / items * 1000

    direct = time.perf_counter()
    for i in range(items):
        noop(i)
    direct_ms = (time.perf_counter() - direct) / items * 1000
    with tempfile.TemporaryDirectory() as tmp:
        sqlite = measure(str(Path(tmp) / "keel.db"))
    server, url = _pg()
    try:
        postgres = measure(url)
    finally:
        server.cleanup()
    print(f"no-op items: {items}; the handler alone: {direct_ms * 1000:.1f} us per item; load {os.getloadavg()[0]:.1f}")
    print("| store | submit ms/item | run ms/item | total ms/item | run CPU ms/item |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, (submit, run, cpu) in (("SQLite", sqlite), ("PostgreSQL", postgres)):
        print(f"| {name} | {submit:.2f} | {run:.2f} | {submit + run:.2f} | {cpu:.2f} |")


def _prepare(url: str) -> None:
    import psycopg

    from keel.store import open_store

    open_store(url).close()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS bench_effects; DROP TABLE IF EXISTS bench_runs")
        conn.execute("CREATE TABLE bench_effects (key TEXT PRIMARY KEY); CREATE TABLE bench_runs (n BIGINT)")
        conn.execute("INSERT INTO bench_runs VALUES (0)")


def _counts(url: str) -> tuple[int, int]:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        effects = conn.execute("SELECT COUNT(*) FROM bench_effects").fetchone()
        runs = conn.execute("SELECT n FROM bench_runs").fetchone()
    return int(effects[0]) if effects else 0, int(runs[0]) if runs else 0


def _worker(env: dict[str, str], worker_id: str) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-c", "from keel.cli.app import main; main()", "worker", "--id", worker_id,
               "--import", "jobs"]  # fmt: skip
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _run_job(url: str, env: dict[str, str], name: str, items: int, workers: int, kills: int = 0) -> dict[str, float]:
    from keel.config import load_config

    _prepare(url)
    os.environ.update(env)
    runner = jobs.JobRunner(load_config())
    procs = {f"w{i}": _worker(env, f"w{i}") for i in range(workers)}
    runner.submit(name, "bench.model", list(range(items)))
    while runner.get(name).done == 0:
        time.sleep(0.05)
    t0, done0 = time.perf_counter(), runner.get(name).done
    for _ in range(kills):
        time.sleep(random.uniform(0.5, 3.0))
        victim = random.choice(list(procs))
        procs[victim].send_signal(signal.SIGKILL)
        procs[victim].wait()
        procs[victim] = _worker(env, victim)  # restarts under its id: takes its own items back
    job = runner.wait(name, poll_s=0.05)
    elapsed = time.perf_counter() - t0
    for proc in procs.values():
        proc.terminate()
    for proc in procs.values():
        proc.wait(timeout=60)
    effects, runs = _counts(url)
    for item in runner.status(name).errors:
        print(f"failed item {item.key} (attempt {item.attempts}): {item.error}", file=sys.stderr)
    runner.close()
    return {"items_per_s": (job.done - done0) / elapsed, "done": job.done, "effects": effects, "runs": runs}


def scale(items: int, concurrency: int) -> None:
    """(b) Items per second with 1, 2 and 4 workers, each item a 200 ms model call."""
    from _stub import StubProcess

    server, url = _pg()
    try:
        with StubProcess(delay_ms=200) as stub:
            env = _env(
                url,
                BENCH_STUB=stub.url.removesuffix("/v1"),
                KEEL_JOBS__QUEUES__DEFAULT__WORKER_CONCURRENCY=str(concurrency),
            )
            print(f"{items} items, 200 ms each, worker_concurrency {concurrency}")
            print("| workers | items/s | speed-up |\n| ---: | ---: | ---: |")
            base = None
            for n in (1, 2, 4):
                r = _run_job(url, env, f"scale-{n}", items, n)
                base = base or r["items_per_s"]
                print(f"| {n} | {r['items_per_s']:.1f} | {r['items_per_s'] / base:.2f} |")
    finally:
        server.cleanup()


def kills(items: int, count: int, concurrency: int) -> None:
    """(c) Two workers, one killed -9 (and restarted) `count` times: every item's effect exactly once."""
    from _stub import StubProcess

    server, url = _pg()
    try:
        with StubProcess(delay_ms=200) as stub:
            env = _env(
                url,
                BENCH_STUB=stub.url.removesuffix("/v1"),
                KEEL_JOBS__QUEUES__DEFAULT__WORKER_CONCURRENCY=str(concurrency),
            )
            r = _run_job(url, env, "kills", items, 2, kills=count)
    finally:
        server.cleanup()
    ok = r["done"] == items and r["effects"] == items
    verdict = "OK" if ok else "LOST OR DOUBLED"
    # a re-run is an effect call that found its key already there (a step killed after its effect ran again);
    # a step killed before its effect re-runs without showing here
    print(f"{items} items, {count} kills: done {r['done']:.0f}, distinct effects {r['effects']:.0f},")
    print(f"effect calls {r['runs']:.0f} (re-runs after kills: {r['runs'] - r['effects']:.0f}) -> {verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["overhead", "scale", "kills"])
    parser.add_argument("--items", type=int, default=None, help="items per job (default 500, 10000, 10000)")
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=100, help="items at once per worker (scale, kills)")
    args = parser.parse_args()
    if args.what == "overhead":
        overhead(args.items or 500)
    elif args.what == "scale":
        scale(args.items or 10_000, args.concurrency)
    else:
        kills(args.items or 10_000, args.kills, args.concurrency)


if __name__ == "__main__":
    main()
