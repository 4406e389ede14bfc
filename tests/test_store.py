"""The store's contract, run identically against SQLite and PostgreSQL.

Every test takes the `store` fixture (tests/fixtures_pg.py), so it runs once per
backend; the few PostgreSQL-only tests at the end cover what SQLite has no
counterpart for (a pool, connections that drop).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest

from keel.errors import InputError
from keel.jobs.schema import JOBS_MIGRATIONS
from keel.jobs.schema import ensure_tables as ensure_job_tables
from keel.store import Migration, SpanFilter, StatsRow, Store, open_store
from keel.store.migrations import MIGRATIONS
from keel.store.postgres import PostgresStore
from keel.trace import Span, SpanWriter, Tracer

T0 = 1_699_923_600.0  # 2023-11-14 01:00:00 UTC
DAY = 86_400.0
ALL_MIGRATIONS = [m.name for m in MIGRATIONS]


def approx_ms(value: float) -> Any:
    """A duration in ms: epoch seconds near 1.7e9 keep only about 0.5 µs of precision."""
    return pytest.approx(value, abs=0.01)


def usd(value: float) -> Any:
    return pytest.approx(value)


def make_span(
    span_id: str,
    *,
    trace_id: str = "t1",
    parent_id: str | None = None,
    start: float = T0,
    ms: float = 10.0,
    model: str | None = "m1",
    operation: str = "chat",
    status: str = "ok",
    error: str | None = None,
    key: str | None = None,
    cost: float | None = None,
    tokens: tuple[int, int] | None = (10, 5),
    input: Any = None,
    output: Any = None,
) -> Span:
    attributes: dict[str, Any] = {"gen_ai.operation.name": operation}
    if model is not None:
        attributes["keel.model"] = model
    if tokens is not None:
        attributes["gen_ai.usage.input_tokens"], attributes["gen_ai.usage.output_tokens"] = tokens
    if cost is not None:
        attributes["keel.cost_usd"] = cost
    if key is not None:
        attributes["keel.api_key"] = key
    return Span(
        trace_id=trace_id, span_id=span_id, parent_id=parent_id, name=operation, start_time=start,
        end_time=start + ms / 1000.0, status=status, error_type="TimeoutError" if error else None,
        error_message=error, attributes=attributes, input=input, output=output,
    )  # fmt: skip


def ids(spans: list[Span]) -> list[str]:
    return [s.span_id for s in spans]


def count_spans(store: Store) -> int:
    return len(store.list_spans(SpanFilter(limit=100_000)))


# --- migrations -----------------------------------------------------------------


def test_migrate_applies_every_migration_once(unmigrated_store: Store) -> None:
    assert unmigrated_store.migrate() == ALL_MIGRATIONS
    assert unmigrated_store.applied_migrations() == ALL_MIGRATIONS
    assert unmigrated_store.migrate() == []
    assert unmigrated_store.applied_migrations() == ALL_MIGRATIONS


def test_a_second_process_finds_the_store_migrated(store: Store, store_url: str) -> None:
    other = open_store(store_url, migrate=False)
    try:
        assert other.migrate() == []
        assert other.applied_migrations() == ALL_MIGRATIONS
    finally:
        other.close()


# --- writing and reading back ---------------------------------------------------


def test_spans_round_trip_with_attributes_and_unicode_content(store: Store) -> None:
    root = make_span(
        "root", start=T0, ms=1234.5, key="k1", cost=0.00042,
        input={"messages": [{"role": "user", "content": "naïve café — 東京 🚀 \"quoted\"\nnew line"}]},
        output={"text": "Ünïcödé ✓", "n": [1, 2.5, None, True]},
    )  # fmt: skip
    root.attributes.update({"keel.attempts": 2, "nested": {"b": 1, "a": [1, {"z": None}]}, "ratio": 0.1})
    child = make_span("child", parent_id="root", start=T0 + 0.5, operation="execute_tool", input="42", output=42)
    failed = make_span("failed", parent_id="root", start=T0 + 0.7, status="error", error="boom: délai dépassé")
    store.write_spans([child, root, failed])

    assert store.get_trace("t1") == [root, child, failed]  # oldest first, every field equal
    assert store.get_trace("t1")[1].input == "42"  # a JSON string stays a string
    assert store.get_trace("nope") == []


def test_content_capture_off_stores_no_input_or_output(store: Store) -> None:
    writer = SpanWriter(store)
    tracer = Tracer(writer, capture_content=False)
    with tracer.span("chat", {"gen_ai.operation.name": "chat", "keel.model": "m1"}) as span:
        span.input = {"messages": [{"role": "user", "content": "secret"}]}
        span.output = "answer"
    assert writer.flush()
    writer.close()

    (stored,) = store.get_trace(span.trace_id)
    assert stored.input is None and stored.output is None
    assert stored.attributes["keel.model"] == "m1"


# --- listing ---------------------------------------------------------------------


@pytest.fixture
def populated(store: Store) -> Store:
    store.write_spans([
        make_span("a", trace_id="t1", start=T0, key="k1",
                  input={"q": "Where is the Gare du Nord?"}, output="The station is north."),
        make_span("b", trace_id="t1", parent_id="a", start=T0 + 1, model="m2", operation="embeddings", key="k1"),
        make_span("c", trace_id="t2", start=T0 + 2, model="m2", status="error", key="k2",
                  error="Upstream Timeout after 30s"),
        make_span("d", trace_id="t3", start=T0 + 3, output={"answer": "café au lait"}),
        make_span("e", trace_id="t4", start=T0 + DAY, operation="execute_tool"),
    ])  # fmt: skip
    return store


LIST_CASES: dict[str, tuple[SpanFilter, list[str]]] = {
    "everything": (SpanFilter(), ["e", "d", "c", "b", "a"]),
    "model m1": (SpanFilter(model="m1"), ["e", "d", "a"]),
    "model m2": (SpanFilter(model="m2"), ["c", "b"]),
    "status": (SpanFilter(status="error"), ["c"]),
    "api key": (SpanFilter(api_key="k1"), ["b", "a"]),
    "operation": (SpanFilter(operation="embeddings"), ["b"]),
    "trace": (SpanFilter(trace_id="t1"), ["b", "a"]),
    "since": (SpanFilter(since=T0 + 1), ["e", "d", "c", "b"]),
    "until (exclusive)": (SpanFilter(until=T0 + 2), ["b", "a"]),
    "since and until": (SpanFilter(since=T0 + 1, until=T0 + 3), ["c", "b"]),
    "text in input": (SpanFilter(text="gare du"), ["a"]),
    "text in output, any case": (SpanFilter(text="STATION"), ["a"]),
    "text in error": (SpanFilter(text="timeout"), ["c"]),
    "unicode text": (SpanFilter(text="café"), ["d"]),
    "text nowhere": (SpanFilter(text="nowhere"), []),
    "roots only": (SpanFilter(roots_only=True), ["e", "d", "c", "a"]),
    "limit keeps the newest": (SpanFilter(limit=2), ["e", "d"]),
    "combined": (SpanFilter(model="m1", roots_only=True, since=T0 + 1), ["e", "d"]),
}


def test_list_spans_filters_newest_first(populated: Store) -> None:
    # One store for every case (a fresh PostgreSQL database costs ~0.15 s); the dict diff names a failing case.
    got = {case: ids(populated.list_spans(span_filter)) for case, (span_filter, _) in LIST_CASES.items()}
    assert got == {case: expected for case, (_, expected) in LIST_CASES.items()}


def test_find_trace_ids_by_prefix_of_trace_or_span_id(store: Store) -> None:
    store.write_spans([
        make_span("s1", trace_id="abc111"), make_span("s2", trace_id="abc222", start=T0 + 1),
        make_span("s3", trace_id="abd333", start=T0 + 2), make_span("s4", parent_id="s3", trace_id="abd333"),
        make_span("fff999", trace_id="xyz", start=T0 + 3),
    ])  # fmt: skip
    assert sorted(store.find_trace_ids("abc")) == ["abc111", "abc222"]
    assert store.find_trace_ids("abd") == ["abd333"]  # two spans, one trace
    assert store.find_trace_ids("fff") == ["xyz"]  # a span id finds its trace
    assert len(store.find_trace_ids("ab", limit=2)) == 2
    assert store.find_trace_ids("zzz") == []
    assert store.find_trace_ids("222") == ["abc222"]  # the CLI shows the end of a trace id


# --- stats and spend ---------------------------------------------------------------


def _stats_spans() -> list[Span]:
    day1 = [
        # m1 on day 1: 10, 20, ..., 200 ms; two errors; every other call priced at 0.001
        make_span(f"m1-{k}", start=T0 + k, ms=10.0 * k, status="error" if k in (3, 7) else "ok",
                  cost=0.001 if k % 2 else None)
        for k in (7, 1, 20, 13, 2, 19, 5, 11, 3, 17, 4, 9, 15, 6, 10, 18, 8, 12, 16, 14)
    ]  # fmt: skip
    day1 += [
        make_span(f"m2-{k}", start=T0 + 100 + k, ms=d, model="m2", tokens=None) for k, d in enumerate([30, 10, 20])
    ]
    day1 += [make_span("no-model", start=T0 + 200, ms=7.0, model=None)]
    day1 += [make_span("embed", start=T0 + 300, ms=999.0, operation="embeddings", cost=1.0)]
    return [*day1, make_span("m1-day2", start=T0 + DAY, ms=5.0, cost=0.5, tokens=(100, 1))]


def test_stats_by_model_and_day_with_nearest_rank_percentiles(store: Store) -> None:
    store.write_spans(_stats_spans())
    rows = store.stats()
    assert [(r.day, r.model) for r in rows] == [
        ("2023-11-15", "m1"), ("2023-11-14", "?"), ("2023-11-14", "m1"), ("2023-11-14", "m2"),
    ]  # fmt: skip
    day2, unknown, m1, m2 = rows
    # nearest rank: p50 of 20 values is the 10th, p95 the 19th
    assert m1 == StatsRow("m1", "2023-11-14", 20, 2, approx_ms(100.0), approx_ms(190.0), 200, 100, usd(0.010))
    assert m1.error_rate == pytest.approx(0.1)
    # p50 of 3 values is the 2nd, p95 the 3rd; no price known anywhere -> cost None, no tokens -> 0
    assert m2 == StatsRow("m2", "2023-11-14", 3, 0, approx_ms(20.0), approx_ms(30.0), 0, 0, None)
    assert unknown == StatsRow("?", "2023-11-14", 1, 0, approx_ms(7.0), approx_ms(7.0), 10, 5, None)
    assert day2 == StatsRow("m1", "2023-11-15", 1, 0, approx_ms(5.0), approx_ms(5.0), 100, 1, usd(0.5))


def test_stats_filters_by_time_and_operation(store: Store) -> None:
    store.write_spans(_stats_spans())
    assert [(r.day, r.model, r.calls) for r in store.stats(since=T0 + DAY)] == [("2023-11-15", "m1", 1)]
    every_operation = {(r.day, r.model): r for r in store.stats(operation=None)}
    assert every_operation["2023-11-14", "m1"].calls == 21  # the embeddings span counts too
    assert every_operation["2023-11-14", "m1"].p95_ms == approx_ms(200.0)
    assert every_operation["2023-11-14", "m1"].cost_usd == pytest.approx(1.010)
    assert store.stats(operation="nothing") == []


def test_spend_sums_model_calls_of_one_key_since_a_time(store: Store) -> None:
    store.write_spans([
        make_span("r1", trace_id="t1", start=T0, key="k1", cost=0.05, operation="retrieval"),  # not a model call
        make_span("c1", trace_id="t1", parent_id="r1", start=T0 + 1, key="k1", cost=0.25),  # a call inside a trace
        make_span("r2", trace_id="t2", start=T0 + 10, key="k1", cost=0.5),
        make_span("r3", trace_id="t3", start=T0 + 20, key="k1"),  # no price known
        make_span("old", trace_id="t4", start=T0 - 10, key="k1", cost=9.0),
        make_span("other", trace_id="t5", start=T0, key="k2", cost=4.0),
    ])  # fmt: skip
    assert store.spend("k1", since=T0) == pytest.approx(0.75)
    assert store.spend("k1", since=T0 + 5) == pytest.approx(0.5)
    assert store.spend("k2", since=T0) == pytest.approx(4.0)
    assert store.spend("nobody", since=T0) == 0.0


# --- atomicity ------------------------------------------------------------------------


def test_a_batch_that_fails_midway_leaves_no_rows(store: Store) -> None:
    batch = [make_span("x1"), make_span("x2", start=T0 + 1), make_span("x1", start=T0 + 2)]  # duplicate span_id
    with pytest.raises(Exception, match=r"(?i)unique|duplicate"):
        store.write_spans(batch)
    assert count_spans(store) == 0

    store.write_spans([make_span("kept")])
    with pytest.raises(Exception, match=r"(?i)unique|duplicate"):
        store.write_spans([make_span("new", start=T0 + 1), make_span("kept", start=T0 + 2)])
    assert ids(store.list_spans()) == ["kept"]

    store.write_spans([make_span("after", start=T0 + 3)])  # the store is still usable
    assert ids(store.list_spans()) == ["after", "kept"]


# --- the background writer -----------------------------------------------------------


def test_span_writer_keeps_every_span_from_concurrent_submitters(store: Store) -> None:
    writer = SpanWriter(store, max_queue=64, max_batch=16)
    threads_n, per_thread = 6, 100

    def submit_many(t: int) -> None:
        for i in range(per_thread):
            writer.submit(make_span(f"s{t}-{i}", trace_id=f"t{t}", start=T0 + i))

    threads = [threading.Thread(target=submit_many, args=(t,)) for t in range(threads_n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert writer.flush(timeout=30) is True
    assert writer.pending == 0 and writer.failed == 0
    writer.close()

    stored = store.list_spans(SpanFilter(limit=10_000))
    assert sorted(ids(stored)) == sorted(f"s{t}-{i}" for t in range(threads_n) for i in range(per_thread))


def _wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_span_writer_blocks_submitters_when_its_queue_is_full(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    writing, release = threading.Event(), threading.Event()
    write_spans = store.write_spans

    def slow_write(spans: list[Span]) -> None:
        writing.set()
        release.wait(10)
        write_spans(spans)

    monkeypatch.setattr(store, "write_spans", slow_write)
    writer = SpanWriter(store, max_queue=2, max_batch=1)
    writer.submit(make_span("s0"))
    assert writing.wait(10)  # the writer holds s0; the buffer is empty again
    writer.submit(make_span("s1", start=T0 + 1))
    writer.submit(make_span("s2", start=T0 + 2))  # the buffer is now full

    blocked = threading.Thread(target=writer.submit, args=(make_span("s3", start=T0 + 4),))
    blocked.start()
    time.sleep(0.2)
    assert blocked.is_alive()  # waiting for room, not dropping
    release.set()
    blocked.join(10)
    assert not blocked.is_alive()
    assert writer.flush(timeout=10) is True
    writer.close()
    assert ids(store.list_spans()) == ["s3", "s2", "s1", "s0"]
    assert writer.failed == 0


# --- PostgreSQL only: the pool and dropped connections ------------------------------


def _pg_store(url: str, **options: Any) -> PostgresStore:
    store = PostgresStore(url, **options)
    store.migrate()
    return store


def _terminate_keel_connections(admin_url: str, database_url: str) -> int:
    database = urlsplit(database_url).path.lstrip("/")
    sql = """SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity
             WHERE datname = %s AND application_name = 'keel'"""
    with psycopg.connect(admin_url, autocommit=True) as admin:
        return len(admin.execute(sql, (database,)).fetchall())


def _hold_transactions(store: PostgresStore, n: int) -> None:
    """Make the pool open `n` connections by running `n` transactions at once."""
    barrier = threading.Barrier(n)

    def hold() -> None:
        with store.transaction() as cur:
            cur.execute("SELECT 1")
            barrier.wait(10)

    threads = [threading.Thread(target=hold) for _ in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)


@pytest.mark.postgres
def test_postgres_reconnects_when_idle_connections_were_dropped(pg_url: str, pg_database_url: str) -> None:
    store = _pg_store(pg_database_url)
    try:
        store.write_spans([make_span("a")])
        _hold_transactions(store, 3)
        assert _terminate_keel_connections(pg_url, pg_database_url) == 3
        assert ids(store.list_spans()) == ["a"]  # the very next transaction works
        store.write_spans([make_span("b", start=T0 + 1)])
        assert ids(store.list_spans()) == ["b", "a"]
    finally:
        store.close()


@pytest.mark.postgres
def test_postgres_recovers_after_a_connection_drops_inside_a_transaction(pg_url: str, pg_database_url: str) -> None:
    store = _pg_store(pg_database_url)
    try:
        with pytest.raises(psycopg.OperationalError), store.transaction() as cur:
            cur.execute("INSERT INTO keel_migrations (name, applied_at) VALUES ('x', 'now')")
            _terminate_keel_connections(pg_url, pg_database_url)
            cur.execute("SELECT 1")
        assert store.applied_migrations() == ALL_MIGRATIONS  # the insert was not committed
    finally:
        store.close()


@pytest.mark.postgres
def test_postgres_migrations_are_safe_when_processes_start_together(pg_database_url: str) -> None:
    stores = [PostgresStore(pg_database_url) for _ in range(4)]
    barrier = threading.Barrier(len(stores))
    applied: list[list[str]] = []
    errors: list[BaseException] = []

    def run(store: PostgresStore) -> None:
        barrier.wait(10)
        try:
            applied.append(store.migrate())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(s,)) for s in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    for store in stores:
        store.close()
    assert errors == []
    assert sorted(name for names in applied for name in names) == ALL_MIGRATIONS  # each applied exactly once


@pytest.mark.postgres
def test_postgres_pool_is_bounded(pg_database_url: str) -> None:
    store = _pg_store(pg_database_url, max_connections=1, pool_timeout=0.2)
    try:
        with store.transaction(), pytest.raises(TimeoutError):
            store.list_spans()
        assert store.list_spans() == []  # the slot came back
    finally:
        store.close()


# --- apps' own tables: namespaced migrations and the public query API ------------------

NOTES = (
    Migration("0001_notes", ("CREATE TABLE app_notes (id TEXT PRIMARY KEY, body {json}, score {real})",)),
    Migration("0002_tag", ("ALTER TABLE app_notes ADD COLUMN tag TEXT",)),
)


def test_an_app_migration_is_recorded_in_its_namespace_and_runs_once(store: Store, store_url: str) -> None:
    assert store.migrate(NOTES[:1], namespace="notes") == ["notes/0001_notes"]
    assert store.migrate(NOTES, namespace="notes") == ["notes/0002_tag"]  # the list grows by appending
    assert store.migrate(NOTES, namespace="notes") == []
    other = open_store(store_url, migrate=False)  # another process finds both recorded
    try:
        assert other.migrate(NOTES, namespace="notes") == []
    finally:
        other.close()
    assert store.applied_migrations() == sorted([*ALL_MIGRATIONS, "notes/0001_notes", "notes/0002_tag"])


def test_the_public_query_api_takes_question_marks_on_both_backends(store: Store) -> None:
    store.migrate(NOTES, namespace="notes")
    insert = "INSERT INTO app_notes (id, body, score, tag) VALUES (?, ?, ?, ?)"
    assert store.execute(insert, ["a", store.json_param('{"k": 1}'), 0.5, "50%"]) == 1
    with store.transaction() as cur:
        cur.executemany(insert, [("b", None, 1.5, "x?"), ("c", None, 2.5, None)])
        cur.execute("UPDATE app_notes SET score = score + ? WHERE tag LIKE ? ESCAPE '\\' OR id = 'c'", [1, "%\\%%"])
        assert cur.rowcount == 2
    assert store.query("SELECT id, score, tag FROM app_notes WHERE tag = '50%' OR tag = ? ORDER BY id", ["x?"]) == [
        ("a", 1.5, "50%"), ("b", 1.5, "x?"),
    ]  # fmt: skip
    with pytest.raises(RuntimeError), store.transaction() as cur:
        cur.execute("DELETE FROM app_notes WHERE id = ?", ["a"])
        raise RuntimeError("rolled back")
    assert [r[0] for r in store.query("SELECT id FROM app_notes ORDER BY id")] == ["a", "b", "c"]


def test_an_app_s_migrations_need_a_valid_namespace(unmigrated_store: Store) -> None:
    with pytest.raises(InputError, match="namespace"):
        unmigrated_store.migrate(NOTES)
    with pytest.raises(InputError, match="namespace"):
        unmigrated_store.migrate(NOTES, namespace="My/App")
    with pytest.raises(InputError, match="repeat"):
        unmigrated_store.migrate((NOTES[0], NOTES[0]), namespace="notes")


def test_a_store_with_the_old_core_jobs_migration_upgrades_without_running_it_again(unmigrated_store: Store) -> None:
    """Stores made before the jobs app owned its tables have them as core migration `0005_jobs`."""
    store = unmigrated_store
    store.migrate()
    with store.transaction() as cur:  # what such a store holds: the tables, a job, the old record
        for statement in JOBS_MIGRATIONS[0].for_dialect(store.dialect):
            cur.execute(statement.format(**store.types))
        cur.execute("INSERT INTO keel_migrations (name, applied_at) VALUES ('0005_jobs', '2026-12-01')")
        cur.execute(
            "INSERT INTO keel_jobs (name, kind, queue, inputs_hash, status, total, done, failed, cost_usd,"
            " created_at, updated_at) VALUES ('old', 'k', 'default', 'h', 'done', 1, 1, 0, 0.0, 1.0, 1.0)"
        )
    assert "0005_jobs" not in ALL_MIGRATIONS  # the core list no longer has it
    # recorded under its new name, not re-run (the later jobs migrations do run)
    assert store.migrate(JOBS_MIGRATIONS[:1], namespace="jobs") == []
    assert "jobs/0001_jobs" in store.applied_migrations() and "0005_jobs" in store.applied_migrations()
    assert store.query("SELECT name FROM keel_jobs") == [("old",)]


def test_a_new_store_gets_the_jobs_tables_from_the_jobs_app(store: Store) -> None:
    assert not any(name.startswith(("0005", "jobs/")) for name in store.applied_migrations())
    ensure_job_tables(store)
    assert "jobs/0001_jobs" in store.applied_migrations()
    assert store.query("SELECT COUNT(*) FROM keel_workers") == [(0,)]
