"""Spans: nesting by context, redaction, the bounded writer."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import pytest

from keel.trace import Redactor, Span, SpanWriter, Tracer


class SlowStore:
    """A store that takes its time, to show the writer blocks instead of dropping."""

    def __init__(self) -> None:
        self.spans: list[Span] = []

    def write_spans(self, spans: Sequence[Span]) -> None:
        time.sleep(0.005)
        self.spans.extend(spans)


def test_spans_nest_by_context() -> None:
    store = SlowStore()
    tracer = Tracer(SpanWriter(store))  # type: ignore[arg-type]
    with tracer.span("outer") as outer, tracer.span("inner") as inner:
        pass
    with tracer.span("next") as other:
        pass
    assert tracer.writer is not None and tracer.writer.flush()
    assert inner.parent_id == outer.span_id and inner.trace_id == outer.trace_id
    assert other.parent_id is None and other.trace_id != outer.trace_id
    assert {s.name for s in store.spans} == {"outer", "inner", "next"}


def test_failed_block_marks_span() -> None:
    store = SlowStore()
    tracer = Tracer(SpanWriter(store))  # type: ignore[arg-type]
    with pytest.raises(ValueError), tracer.span("boom"):
        raise ValueError("bad thing")
    assert tracer.writer is not None and tracer.writer.flush()
    [span] = store.spans
    assert span.status == "error" and span.error_type == "ValueError" and span.attributes["error.type"] == "ValueError"


def test_redactor_patterns_and_env_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MY_KEY", "very-secret-value-123")
    redactor = Redactor([r"\d{3}-\d{2}-\d{4}"], ["MY_KEY"])
    text = "key very-secret-value-123, ssn 123-45-6789, openai sk-abcdefghijklmnopqrstu, Bearer abc.def.ghijklmnop"
    cleaned = redactor.text(text)
    assert (
        "very-secret" not in cleaned
        and "123-45" not in cleaned
        and "sk-abc" not in cleaned
        and "abc.def" not in cleaned
    )
    assert redactor.value({"a": [text], "n": 3}) == {"a": [cleaned], "n": 3}
    assert redactor.value({"nul": "a\x00b", "nan": float("nan"), "inf": float("inf")}) == {
        "nul": "ab",
        "nan": None,
        "inf": None,
    }


def test_bounded_writer_blocks_rather_than_drops() -> None:
    store = SlowStore()
    writer = SpanWriter(store, max_queue=4, max_batch=2)  # type: ignore[arg-type]
    total = 200

    def produce(offset: int) -> None:
        for i in range(total // 4):
            writer.submit(Span("t", f"{offset}-{i}", None, "s", time.time()))

    threads = [threading.Thread(target=produce, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert writer.flush(timeout=30)
    assert len(store.spans) == total and len({s.span_id for s in store.spans}) == total
    assert writer.max_depth <= 4
    writer.close()


def test_writer_redacts_off_the_request_path() -> None:
    store = SlowStore()
    writer = SpanWriter(store, redactor=Redactor(["secret-\\d+"]))  # type: ignore[arg-type]
    span = Span("t", "s1", None, "chat", time.time(), input={"messages": [{"content": "my secret-42"}]})
    writer.submit(span)
    assert writer.flush()
    assert store.spans[0].input == {"messages": [{"content": "my [REDACTED]"}]}
    writer.close()


def test_flush_writes_a_partial_batch_at_once() -> None:
    store = SlowStore()
    writer = SpanWriter(store, interval=60)  # type: ignore[arg-type]
    writer.submit(Span("t", "s1", None, "chat", time.time()))
    started = time.perf_counter()
    assert writer.flush(timeout=5) and len(store.spans) == 1
    assert time.perf_counter() - started < 5
    writer.close()


class Unredactable(Redactor):
    def span(self, span: Span) -> None:
        if span.name == "bad":
            raise RecursionError("too deep")
        super().span(span)


def test_a_span_that_cannot_be_redacted_loses_its_content_not_its_charge_nor_the_writer() -> None:
    store = SlowStore()
    writer = SpanWriter(store, redactor=Unredactable())  # type: ignore[arg-type]
    for name in ("good", "bad", "also good"):
        span = Span("t", name, None, name, time.time(), input={"messages": ["secret"]})
        span.set(keel__cost_usd=0.5, keel__api_key="team")
        writer.submit(span)
    assert writer.flush(timeout=5)
    assert [s.name for s in store.spans] == ["good", "bad", "also good"] and writer.failed == 0
    bad = store.spans[1]
    assert bad.input is None and bad.attributes["keel.span.content_dropped"] is True and writer.salvaged == 1
    assert bad.attributes["keel.cost_usd"] == 0.5 and bad.attributes["keel.api_key"] == "team"
    writer.submit(Span("t", "later", None, "later", time.time()))
    assert writer.flush(timeout=5) and store.spans[-1].name == "later"
    writer.close()


def test_spans_after_close_are_written_not_lost() -> None:
    store = SlowStore()
    writer = SpanWriter(store)  # type: ignore[arg-type]
    writer.close()
    writer.submit(Span("t", "late", None, "late", time.time()))
    assert writer.flush(timeout=1) and [s.name for s in store.spans] == ["late"]


def test_a_failing_listener_does_not_fail_the_call() -> None:
    store = SlowStore()
    tracer = Tracer(SpanWriter(store))  # type: ignore[arg-type]
    seen: list[str] = []

    def broken(span: Span) -> None:
        raise RuntimeError("observer bug")

    tracer.listeners += [broken, lambda span: seen.append(span.name)]
    with tracer.span("call"):
        pass
    assert seen == ["call"]
    assert tracer.writer is not None and tracer.writer.flush() and [s.name for s in store.spans] == ["call"]
