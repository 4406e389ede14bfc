"""keel.jobs in one process: item outcomes, bad input, cancel and resume (kill -9 and takeover: test_jobs_kill.py)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import jobs_app
from keel.config import load_config
from keel.errors import InputError, JobConflict, UnknownJob, UnknownJobKind, WorkerIdInUse
from keel.jobs import JobRunner, Worker, heartbeats, records
from keel.jobs.schema import ensure_tables
from keel.store import Store, open_store
from keel.trace import Span, new_id

pytestmark = pytest.mark.slow


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("JOBS_EFFECTS", str(tmp_path / "effects.db"))
    monkeypatch.setenv("JOBS_RUNS", str(tmp_path / "runs.txt"))
    monkeypatch.setenv("KEEL_JOBS__POLL_S", "0.05")
    return tmp_path


@pytest.fixture
def runner(env: Path) -> Iterator[JobRunner]:
    with JobRunner(load_config()) as r:
        yield r


@pytest.fixture
def worker(runner: JobRunner) -> Iterator[Worker]:
    with Worker(runner.config, worker_id="in-process") as w:
        yield w


def test_items_run_once_and_the_job_finishes_with_counts_and_cost(runner: JobRunner, worker: Worker, env: Path) -> None:
    runner.submit("squares", "test.effect", list(range(20)))
    job = runner.wait("squares", timeout=60)
    assert (job.status, job.done, job.failed) == ("done", 20, 0)
    assert job.cost_usd == pytest.approx(0.02)
    items = runner.items("squares")
    assert [i.result for i in items] == [{"square": v * v} for v in range(20)]
    assert all(i.status == "done" and i.attempts == 1 and i.trace_id for i in items)
    # the item span is in the store, under the trace id the item records
    assert runner.store.get_trace(items[0].trace_id)[0].name == "job.item"


def test_a_failing_item_is_recorded_the_job_goes_on_and_retry_reruns_it(runner: JobRunner, worker: Worker) -> None:
    jobs_app.FAIL_ONCE.update({3, 7})
    try:
        runner.submit("flaky", "test.flaky", list(range(10)))
        job = runner.wait("flaky", timeout=60)
        assert (job.status, job.done, job.failed) == ("failed", 8, 2)
        status = runner.status("flaky")
        assert sorted(e.key for e in status.errors) == ["3", "7"]
        assert status.errors[0].error == "ValueError: item 3 fails"
    finally:
        jobs_app.FAIL_ONCE.clear()
    assert runner.retry_failed("flaky") == 2
    job = runner.wait("flaky", timeout=60)
    assert (job.status, job.done, job.failed) == ("done", 10, 0)
    assert [i.result for i in runner.items("flaky")] == [v + 1 for v in range(10)]
    assert runner.retry_failed("flaky") == 0


def test_a_handler_finding_its_database_unreachable_waits_and_reruns_instead_of_failing(
    runner: JobRunner, worker: Worker
) -> None:
    # a connection refused (server full, restarting, killed worker's connections not yet gone) passes:
    # it neither fails the item for good nor uses up its attempts (the kind has one)
    jobs_app.UNREACHABLE.update({2: 2, 5: 1})
    try:
        runner.submit("unreachable", "test.unreachable", list(range(8)))
        job = runner.wait("unreachable", timeout=60)
    finally:
        jobs_app.UNREACHABLE.clear()
    assert (job.status, job.done, job.failed) == ("done", 8, 0)
    assert [i.result for i in runner.items("unreachable")] == [v * 10 for v in range(8)]


def test_on_sqlite_the_dbos_system_database_runs_in_wal_with_one_connection(runner: JobRunner, worker: Worker) -> None:
    # DBOS's default (rollback journal, 20 connections in busy-wait) cost 20-37 ms per no-op item here
    import sqlite3

    from keel.jobs.engine import system_database_url

    path = system_database_url(runner.config).removeprefix("sqlite:///")
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert worker._engine is not None and worker._engine.pool.size() == 1
    runner.submit("wal", "test.flaky", list(range(5)))
    assert runner.wait("wal", timeout=60).done == 5


def test_a_name_resubmitted_with_other_inputs_is_refused_and_same_inputs_resume(runner: JobRunner) -> None:
    runner.submit("once", "test.flaky", [1, 2, 3])
    with pytest.raises(JobConflict, match="different inputs"):
        runner.submit("once", "test.flaky", [1, 2, 4])
    with pytest.raises(JobConflict, match="kind"):
        runner.submit("once", "test.effect", [1, 2, 3])
    again = runner.submit("once", "test.flaky", [1, 2, 3])
    assert (again.name, again.total) == ("once", 3)
    assert runner.status("once").counts == {"pending": 3}


@pytest.mark.parametrize(
    ("name", "kind", "items", "error"),
    [
        ("", "test.flaky", [1], InputError),
        ("bad name with spaces", "test.flaky", [1], InputError),
        ("ok", "no.such.kind", [1], UnknownJobKind),
        ("ok", "test.flaky", [], InputError),
        ("ok", "test.flaky", {"": 1}, InputError),
    ],
)
def test_bad_submissions_get_a_specific_error(
    runner: JobRunner, name: str, kind: str, items: object, error: type
) -> None:
    with pytest.raises(error):
        runner.submit(name, kind, items)  # type: ignore[arg-type]


def test_a_job_queue_of_its_own_polls_at_its_poll_s_until_the_job_is_settled(runner: JobRunner) -> None:
    # a worker starts items only when it polls: short items want a short poll while their job runs
    runner.submit("quick", "test.effect", [1, 2, 3], concurrency=2, poll_s=0.01)
    queue = runner._dbos().retrieve_queue("job:quick")
    assert queue is not None and queue.polling_interval_sec == 0.01
    runner.settle("quick")  # still running: left alone
    assert queue.polling_interval_sec == 0.01
    with Worker(runner.config, worker_id="settler"):
        assert runner.wait("quick", timeout=60).status == "done"
    runner.settle("quick")  # over: back on [jobs] poll_s, which every worker keeps polling
    assert queue.polling_interval_sec == 0.05
    runner.submit("shared", "test.effect", [1])
    runner.settle("shared")  # a shared queue keeps its poll whatever its jobs do
    assert runner._dbos().retrieve_queue("default").polling_interval_sec == 0.05  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("options", "message"),
    [({"concurrency": 2, "poll_s": 0}, "poll_s must be in"), ({"concurrency": 2, "poll_s": 61}, "poll_s must be in"),
     ({"poll_s": 0.01}, "queue of its own")],
)  # fmt: skip
def test_a_bad_poll_s_is_refused(runner: JobRunner, options: dict[str, float], message: str) -> None:
    with pytest.raises(InputError, match=message):
        runner.submit("polled", "test.effect", [1], **options)  # type: ignore[arg-type]


def test_unknown_jobs_and_wrong_states_are_refused(runner: JobRunner) -> None:
    for action in (runner.status, runner.cancel, runner.resume, runner.retry_failed):
        with pytest.raises(UnknownJob):
            action("nope")
    runner.submit("fresh", "test.flaky", [1])
    runner.cancel("fresh")
    with pytest.raises(JobConflict, match="only a running job"):
        runner.cancel("fresh")
    with pytest.raises(JobConflict, match="resume it first"):
        runner.retry_failed("fresh")
    records.set_job_status(runner.store, "fresh", "done", only_from=["cancelled"])
    with pytest.raises(JobConflict, match="only a cancelled job"):
        runner.resume("fresh")


def test_cancel_while_items_run_starts_no_new_item_and_resume_finishes(runner: JobRunner, worker: Worker) -> None:
    runner.submit("slow", "test.slow", list(range(60)), concurrency=4)
    deadline = time.monotonic() + 30
    while runner.get("slow").done < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    runner.cancel("slow")
    time.sleep(1.0)  # items running at the cancel finish (0.2 s each)
    settled = runner.status("slow")
    assert settled.job.status == "cancelled"
    assert settled.counts.get("running", 0) == 0
    time.sleep(0.6)
    assert runner.status("slow").counts == settled.counts, "an item started after the cancel"
    assert 4 <= settled.job.done < 60
    runner.resume("slow")
    job = runner.wait("slow", timeout=60)
    assert (job.status, job.done) == ("done", 60)
    assert sorted(i.result for i in runner.items("slow")) == list(range(60))


def test_a_second_worker_with_a_live_id_is_refused(env: Path) -> None:
    store = open_store(load_config().store_url)
    try:
        heartbeats.register(store, "w-same", dead_after_s=30)
        with pytest.raises(WorkerIdInUse, match="in use by a live worker"):
            heartbeats.register(store, "w-same", dead_after_s=30)
        heartbeats.register(store, "w-other", dead_after_s=30)
    finally:
        store.close()


def test_a_stale_worker_is_claimed_by_exactly_one_live_worker(env: Path) -> None:
    store = open_store(load_config().store_url)
    try:
        heartbeats.register(store, "dead-one", dead_after_s=30)
        with store.transaction() as cur:
            cur.execute("UPDATE keel_workers SET heartbeat_at = heartbeat_at - 100, host = 'elsewhere'")
        assert heartbeats.claim_dead(store, "live-a", dead_after_s=30) == ["dead-one"]
        assert heartbeats.claim_dead(store, "live-b", dead_after_s=30) == []
        assert {w.worker_id: w.recovered_by for w in heartbeats.list_workers(store)} == {"dead-one": "live-a"}
    finally:
        store.close()


def test_an_item_takes_two_store_transactions_one_dbos_commit_and_no_thread_hop(
    runner: JobRunner, worker: Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the per-item overhead was CPU and SQLite's busy handler: 3 store transactions (start, outcome, span),
    # 3 DBOS transactions (step check, step record, outcome), ~9 hops between DBOS's event loop and its
    # thread pool, and the items' threads sleeping in SQLite's busy handler for the store's write lock
    import asyncio
    import threading

    import sqlalchemy as sa

    hops: list[str] = []
    to_thread = asyncio.to_thread

    async def counted(func, /, *args, **kwargs):  # type: ignore[no-untyped-def]
        hops.append(getattr(func, "__qualname__", repr(func)))
        return await to_thread(func, *args, **kwargs)

    monkeypatch.setattr(asyncio, "to_thread", counted)
    transactions: list[str] = []
    inside = [0, 0]  # store transactions of item threads open now, and the most at once
    transaction = worker.store.transaction

    @contextlib.contextmanager
    def counting(**kwargs):  # type: ignore[no-untyped-def]
        if not threading.current_thread().name.startswith("dbos-executor"):
            with transaction(**kwargs) as cur:
                yield cur
            return
        transactions.append("tx")
        inside[0] += 1
        inside[1] = max(inside)
        try:
            time.sleep(0.005)  # long enough for item threads to overlap unless they take turns
            with transaction(**kwargs) as cur:
                yield cur
        finally:
            inside[0] -= 1

    monkeypatch.setattr(worker.store, "transaction", counting)
    commits: list[str] = []

    def on_commit(conn: object) -> None:
        if threading.current_thread().name.startswith("dbos-executor"):
            commits.append("commit")

    assert worker._engine is not None
    sa.event.listen(worker._engine, "commit", on_commit)
    try:
        runner.submit("lean", "test.where", list(range(10)))
        assert runner.wait("lean", timeout=60).done == 10
    finally:
        sa.event.remove(worker._engine, "commit", on_commit)
    assert hops == []
    assert len(transactions) == 2 * 10 + 1  # start and outcome per item, and the job's kind once
    assert inside[1] == 1  # on SQLite the items' writes take turns in the process
    assert len(commits) == 10  # each workflow's outcome: no DBOS step record around the item
    items = runner.items("lean")
    assert all(i.result["thread"].startswith("dbos-executor") for i in items)
    assert all(i.result["trace"] == i.trace_id for i in items)  # the handler runs under the item's span
    spans = runner.store.get_trace(items[0].trace_id)
    assert [(s.name, s.attributes["keel.job.item"]) for s in spans] == [("job.item", "0")]


def test_a_coroutine_handler_runs_on_the_workers_loop_under_the_items_span(runner: JobRunner, worker: Worker) -> None:
    runner.submit("loop", "test.where_async", list(range(6)))
    assert runner.wait("loop", timeout=60).done == 6
    items = runner.items("loop")
    assert {i.result["thread"] for i in items} == {"keel-jobs-loop"}
    assert all(i.result["trace"] == i.trace_id for i in items)


def test_coroutine_handlers_blocking_calls_in_threads_are_not_held_to_asyncios_few_threads(
    runner: JobRunner, worker: Worker
) -> None:
    # asyncio's default pool (cpu_count + 4 threads, 6 here) would run 16 items' blocking calls 6 at a time
    jobs_app.BLOCKING.update(now=0, most=0)
    runner.submit("blocking", "test.to_thread", list(range(16)))
    assert runner.wait("blocking", timeout=60).done == 16
    assert jobs_app.BLOCKING["most"] > 10


def test_a_worker_stopped_while_coroutine_items_run_leaves_them_to_run_again(
    runner: JobRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    # cancelled mid-item, a handler has not failed: the items stay unrecorded (no attempt spent on a failure)
    # and the worker started again under its id takes them back
    monkeypatch.setenv("JOBS_STUCK_S", "30")
    worker = Worker(runner.config, worker_id="stopper").start()
    try:
        runner.submit("stuck", "test.stuck", list(range(3)))
        deadline = time.monotonic() + 30
        while runner.status("stuck").counts.get("running", 0) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        worker.stop(drain_s=0)
    status = runner.status("stuck")
    assert (status.counts, status.job.failed) == ({"running": 3}, 0)
    monkeypatch.setenv("JOBS_STUCK_S", "0.01")
    with Worker(runner.config, worker_id="stopper"):
        job = runner.wait("stuck", timeout=60)
    assert (job.status, job.done, job.failed) == ("done", 3, 0)
    assert [i.attempts for i in runner.items("stuck")] == [2, 2, 2]


def test_an_items_start_and_outcome_are_one_statement_each_and_a_second_outcome_changes_nothing(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    # on PostgreSQL each is sent alone (one round trip, not BEGIN ... COMMIT); the outcome carries the span
    ensure_tables(store)
    records.create_job(store, "j", "test.flaky", "default", [("a", 1), ("b", 2), ("c", 3)])
    transactions: list[str] = []
    transaction = store.transaction

    def counting(**kwargs):  # type: ignore[no-untyped-def]
        transactions.append("tx")
        return transaction(**kwargs)

    monkeypatch.setattr(store, "transaction", counting)

    def span(trace_id: str) -> Span:
        made = Span(trace_id, new_id(8), None, "job.item", time.time(), attributes={"keel.job.item": "a"})
        made.end_time = made.start_time + 0.01
        return made

    item = records.start_item(store, "j", "a", 0, "t1")
    assert item is not None and (item.status, item.attempts, item.input, item.trace_id) == ("running", 1, 1, "t1")
    assert records.finish_item(store, "j", "a", 0, result={"x": 1}, cost_usd=0.5, span=span("t1")) is True
    # a run DBOS repeats after a crash: its span is kept (it ran), its outcome is not
    assert records.finish_item(store, "j", "a", 0, result={"x": 2}, cost_usd=0.5, span=span("t1")) is False
    assert records.start_item(store, "j", "a", 0, "t2") is None  # done
    assert records.start_item(store, "j", "b", 1, "t3") is None  # another run owns it
    assert records.start_item(store, "j", "b", 0, "t4") is not None
    assert records.finish_item(store, "j", "b", 0, error="ValueError: no", span=span("t4")) is True
    monkeypatch.setattr(store, "transaction", transaction)
    assert transactions == ([] if store.dialect == "postgres" else ["tx"] * 7)
    job = records.get_job(store, "j")
    assert (job.status, job.done, job.failed, job.cost_usd) == ("running", 1, 1, 0.5)
    items = {i.key: i for i in records.list_items(store, "j")}
    assert (items["a"].status, items["a"].result, items["b"].status, items["b"].error) == (
        "done", {"x": 1}, "failed", "ValueError: no",
    )  # fmt: skip
    assert [s.name for s in store.get_trace("t1")] == ["job.item", "job.item"]
    assert store.get_trace("t4")[0].attributes["keel.job.item"] == "a"
    records.set_job_status(store, "j", "cancelled", only_from=["running"])
    assert records.start_item(store, "j", "c", 0, "t5") is None  # its job is cancelled
    records.set_job_status(store, "j", "running", only_from=["cancelled"])
    assert records.start_item(store, "j", "c", 0, "t6") is not None
    assert records.finish_item(store, "j", "c", 0, result=None) is True
    assert records.get_job(store, "j").status == "failed"  # the last item finished it, one item failed


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_items_claimed_just_before_the_system_database_went_away_are_queued_again_by_their_live_worker(
    env: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest, backend: str
) -> None:
    # DBOS claims a batch (PENDING under this worker, committed), then reads the claimed workflows back to start
    # them. The database gone in between (PostgreSQL stopped: its socket file is gone, an error DBOS's db_retry does
    # not wait out) drops the dispatch: nothing runs them, and no recovery looks at a live worker's workflows.
    import psycopg
    import sqlalchemy as sa
    from dbos._dbos import _get_dbos_instance

    if backend == "postgres":  # keel's store and DBOS's tables in one PostgreSQL database, as in production
        from keel.jobs import runner as runner_module

        monkeypatch.setenv("KEEL_STORE", request.getfixturevalue("pg_database_url"))
        # the database is emptied for the next test under the same URL: it must not be taken for migrated then
        monkeypatch.setattr(runner_module, "_migrated", set())
    monkeypatch.setenv("KEEL_JOBS__HEARTBEAT_S", "0.2")
    monkeypatch.setenv("KEEL_JOBS__DEAD_AFTER_S", "1")
    gone = psycopg.OperationalError('connection is bad: connection to server on socket "/tmp/.s.PGSQL.5432" failed')
    lost: list[str] = []
    outage = {"until": 0.0}
    with JobRunner(load_config()) as runner, Worker(runner.config, worker_id="in-process") as worker:
        sys_db = _get_dbos_instance()._sys_db
        read_back = sys_db.get_workflow_statuses

        def away_after_the_claim(ids: list[str]) -> Any:
            if not lost:  # the first batch claimed: the database goes away for 0.3 s now
                lost.extend(ids)
                outage["until"] = time.monotonic() + 0.3
            if time.monotonic() < outage["until"]:
                raise sa.exc.OperationalError("SELECT ...", {}, gone)
            return read_back(ids)

        monkeypatch.setattr(sys_db, "get_workflow_statuses", away_after_the_claim)
        runner.submit("claimed", "test.effect", list(range(8)))
        job = runner.wait("claimed", timeout=30)
        assert (job.status, job.done, job.failed) == ("done", 8, 0)
        assert lost and worker.orphans_recovered >= len(lost)
        assert sorted(jobs_app_effects(env), key=int) == [str(i) for i in range(8)]


def jobs_app_effects(env: Path) -> list[str]:
    import sqlite3

    with sqlite3.connect(env / "effects.db") as conn:
        return [row[0] for row in conn.execute("SELECT key FROM effects")]
