"""Jobs survive kill -9: a restarted worker resumes (SQLite); a live worker takes over a dead one's items (PostgreSQL).

Every item writes a side effect keyed by its idempotency key (tests/jobs_app.py):
the check counts those keys, not the job's status. A handler may run twice (the
step running at the kill runs again: DBOS steps are at-least-once); its keyed
effect and the item's `done` mark happen once.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from keel.config import load_config
from keel.jobs import JobRunner

pytestmark = pytest.mark.slow
TESTS = Path(__file__).parent
SRC = TESTS.parent / "src"
N = 120
KEEL = [sys.executable, "-c", "from keel.cli.app import main; main()"]


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    monkeypatch.setenv("JOBS_EFFECTS", str(tmp_path / "effects.db"))
    monkeypatch.setenv("JOBS_RUNS", str(tmp_path / "runs.txt"))
    monkeypatch.setenv("JOBS_ITEM_S", "0.05")
    monkeypatch.setenv("KEEL_JOBS__POLL_S", "0.05")
    monkeypatch.setenv("KEEL_JOBS__HEARTBEAT_S", "0.5")
    monkeypatch.setenv("KEEL_JOBS__DEAD_AFTER_S", "2")
    monkeypatch.setenv("KEEL_JOBS__QUEUES__DEFAULT__WORKER_CONCURRENCY", "4")
    return {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{TESTS}"}


def start_worker(env: dict[str, str], worker_id: str, log: Path) -> subprocess.Popen[bytes]:
    command = [*KEEL, "worker", "--id", worker_id, "--import", "jobs_app"]
    return subprocess.Popen(command, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT)


def wait_done(runner: JobRunner, name: str, at_least: int, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while (done := runner.get(name).done) < at_least:
        assert time.monotonic() < deadline, f"only {done} items of {name} done after {timeout} s"
        time.sleep(0.05)
    return done


def effects(path: str) -> list[str]:
    with sqlite3.connect(path) as conn:
        return [row[0] for row in conn.execute("SELECT key FROM effects")]


def assert_exactly_once(runner: JobRunner, name: str, env: dict[str, str]) -> list[str]:
    job = runner.wait(name, timeout=90)
    assert (job.status, job.done, job.failed) == ("done", N, 0)
    keys = effects(env["JOBS_EFFECTS"])
    assert sorted(keys, key=int) == [str(i) for i in range(N)]  # none lost; the key is unique, so none twice
    items = runner.items(name)
    assert all(i.status == "done" and i.result == {"square": int(i.key) ** 2} for i in items)
    assert job.cost_usd == pytest.approx(N * 0.001)  # each item's cost counted once
    return Path(env["JOBS_RUNS"]).read_text().split("\n")[:-1]


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


def test_a_worker_killed_with_sigkill_resumes_its_job_on_restart(
    env: dict[str, str], tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    import jobs_app  # noqa: F401 - registers the kinds in this process too

    with JobRunner(load_config()) as runner:
        runner.submit("kill-sqlite", "test.effect", list(range(N)))
        procs.append(start_worker(env, "w1", tmp_path / "w1.log"))
        wait_done(runner, "kill-sqlite", 20)
        procs[0].send_signal(signal.SIGKILL)
        procs[0].wait(timeout=10)
        assert runner.get("kill-sqlite").done < N
        procs.append(start_worker(env, "w1", tmp_path / "w1.log"))  # same id, same host: resumes at once
        runs = assert_exactly_once(runner, "kill-sqlite", env)
    assert len({r.split()[1] for r in runs}) == 2  # both processes ran items


@pytest.mark.postgres
def test_on_postgres_a_live_worker_takes_over_a_killed_ones_items(
    env: dict[str, str], tmp_path: Path, procs: list[subprocess.Popen[bytes]], pg_database_url: str
) -> None:
    import jobs_app  # noqa: F401

    env["KEEL_STORE"] = pg_database_url
    os.environ["KEEL_STORE"] = pg_database_url
    with JobRunner(load_config()) as runner:
        runner.submit("kill-pg", "test.effect", list(range(N)))
        procs.append(start_worker(env, "w1", tmp_path / "w1.log"))
        procs.append(start_worker(env, "w2", tmp_path / "w2.log"))
        wait_done(runner, "kill-pg", 20)
        procs[0].send_signal(signal.SIGKILL)
        procs[0].wait(timeout=10)
        killed_at = runner.get("kill-pg").done
        runs = assert_exactly_once(runner, "kill-pg", env)
        assert killed_at < N
        # a third worker under a live id refuses to start, with a message and the input-error exit code
        duplicate = subprocess.run(
            [*KEEL, "worker", "--id", "w2", "--import", "jobs_app"],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert duplicate.returncode == 2
        assert "worker id 'w2' is in use by a live worker" in duplicate.stderr
        from keel.jobs import heartbeats

        rows = {w.worker_id: w for w in heartbeats.list_workers(runner.store)}
    assert (rows["w1"].state, rows["w1"].recovered_by) == ("dead", "w2")
    assert len({r.split()[1] for r in runs}) == 2


@pytest.mark.postgres
def test_postgres_going_away_mid_job_the_worker_waits_and_resumes_nothing_lost(
    env: dict[str, str], tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    import tempfile

    from pgserver._commands import pg_ctl

    import jobs_app  # noqa: F401
    from fixtures_pg import _start_server

    # a server of its own: stopping the session's would break every other test's database
    server = _start_server(Path(tempfile.mkdtemp(prefix="keel-pg-outage-")) / "pgdata")
    try:
        url = server.get_uri()
        env["KEEL_STORE"] = url
        os.environ["KEEL_STORE"] = url
        with JobRunner(load_config()) as runner:
            runner.submit("outage", "test.effect", list(range(N)))
            procs.append(start_worker(env, "w1", tmp_path / "w1.log"))
            wait_done(runner, "outage", 15)
            # "fast" drops every connection at once
            pg_ctl(["-w", "-m", "fast", "stop"], pgdata=server.pgdata, user=server.system_user)
            time.sleep(4)  # items finish their work meanwhile and wait to record it; heartbeats fail
            assert procs[0].poll() is None  # the worker waits rather than exiting
            server.ensure_postgres_running()
            assert server.get_uri() == url
            runs = assert_exactly_once(runner, "outage", env)
        assert procs[0].poll() is None
        assert len({r.split()[1] for r in runs}) == 1  # one worker process did it all
    finally:
        server.cleanup()
