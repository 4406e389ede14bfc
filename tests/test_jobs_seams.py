"""The job seam apps build on: a kind declares its own queue, a handler reaches its worker's store through its
context, a run finds the process's worker and stops it at once when idle, and the jobs list filters by kind."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from keel import jobs
from keel.cli.app import app
from keel.config import load_config
from keel.errors import InputError
from keel.jobs import JobRunner, Worker, current_worker, queue_limits
from keel.jobs.settings import JobQueueConfig

pytestmark = pytest.mark.slow

SEEN: list[Any] = []


@jobs.kind("seams.own-queue", queue="seams-own", worker_concurrency=2)
def own_queue(value: int, ctx: jobs.ItemContext) -> int:
    SEEN.append((ctx.store, current_worker()))
    return value + 1


@pytest.fixture
def runner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[JobRunner]:
    monkeypatch.setenv("KEEL_JOBS__POLL_S", "0.05")
    with JobRunner(load_config()) as r:
        yield r


def test_a_kind_with_its_own_queue_runs_with_an_empty_keel_toml(runner: JobRunner) -> None:
    assert "seams-own" not in runner.config.jobs.queues  # no keel.toml in the test's directory
    SEEN.clear()
    assert current_worker() is None
    with Worker(runner.config, worker_id="seams") as worker:
        row = runner.submit("seams-1", "seams.own-queue", [1, 2, 3])
        assert row.queue == "seams-own"
        job = runner.wait("seams-1", timeout=60)
    assert (job.status, job.done) == ("done", 3)
    assert [i.result for i in runner.items("seams-1")] == [2, 3, 4]
    # the handler saw the worker's store and the worker through public names
    assert SEEN and all(store is worker.store and found is worker for store, found in SEEN)
    assert current_worker() is None


def test_the_config_overrides_a_kinds_declared_limits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = load_config()
    assert queue_limits(config, "seams-own") == JobQueueConfig(worker_concurrency=2)
    (tmp_path / "keel.toml").write_text("[jobs.queues.seams-own]\nworker_concurrency = 7\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    assert queue_limits(load_config(), "seams-own") == JobQueueConfig(worker_concurrency=7)
    assert queue_limits(config, "nobody-declared-this") is None


def test_kinds_declaring_one_queue_with_other_limits_are_refused() -> None:
    with pytest.raises(InputError, match="queue 'seams-own' is declared with other limits"):
        jobs.kind("seams.other", queue="seams-own", worker_concurrency=5)(lambda item: item)
    jobs.kind("seams.same", queue="seams-own", worker_concurrency=2)(lambda item: item)  # the same limits: fine
    with pytest.raises(InputError, match="limits are for a kind's own queue"):
        jobs.kind("seams.nowhere", rpm=10)(lambda item: item)
    with pytest.raises(InputError, match="worker_concurrency"):
        jobs.kind("seams.bad", queue="seams-bad", worker_concurrency=0)(lambda item: item)


def test_stopping_an_idle_worker_skips_dbos_drain(runner: JobRunner) -> None:
    worker = Worker(runner.config, worker_id="idle").start()
    runner.submit("seams-idle", "seams.own-queue", [1])
    runner.wait("seams-idle", timeout=60)
    assert worker.idle(settle_s=2.0)
    started = time.perf_counter()
    worker.stop()
    took = time.perf_counter() - started
    assert took < 0.8, f"an idle worker took {took:.2f} s to stop"  # DBOS's drain sleeps 1 s before it looks
    # and the item's workflow was recorded as ended before the stop: nothing for a restart to recover
    from dbos import DBOS

    with Worker(runner.config, worker_id="idle"):
        assert not DBOS.list_workflows(executor_id="idle", status="PENDING", load_input=False, load_output=False)


def test_jobs_list_filters_by_kind(runner: JobRunner) -> None:
    from keel.jobs import records

    records.create_job(runner.store, "k-a", "alpha", "default", [("0", 0)])
    records.create_job(runner.store, "k-b", "beta", "default", [("0", 0)])
    assert [j.name for j in runner.jobs(kind="alpha")] == ["k-a"]
    out = CliRunner().invoke(app, ["jobs", "list", "--kind", "beta", "--json"])
    assert out.exit_code == 0, out.output
    assert [j["name"] for j in json.loads(out.output)] == ["k-b"]
    empty = CliRunner().invoke(app, ["jobs", "list", "--kind", " "])
    assert empty.exit_code == 2 and "give a kind" in empty.output


def test_a_worker_closed_when_idle_starts_no_item_and_leaves_it_for_recovery(runner: JobRunner) -> None:
    from keel.jobs import records
    from keel.jobs.engine import ItemExecutor, WorkerStopped

    records.create_job(runner.store, "seams-closed", "seams.own-queue", "seams-own", [("0", 5)])
    executor = ItemExecutor(runner.store)
    assert executor.running == 0 and executor.close_if_idle()
    with pytest.raises(WorkerStopped):  # not a failure: the item stays pending, its workflow unfinished
        executor.run_item("seams-closed", "0", 0)
    assert [i.status for i in runner.items("seams-closed")] == ["pending"]
    executor.close()
