"""Spans: one per model call, retrieval, tool call...; nested by context.

Span attributes follow the OpenTelemetry GenAI semantic conventions
(`gen_ai.operation.name`, `gen_ai.provider.name`, `gen_ai.request.model`,
`gen_ai.usage.input_tokens`, `error.type`, ...) plus keel's own `keel.*`
fields (cost, attempts, cache, key). A finished span is redacted, then handed
to a `SpanWriter` that writes batches to the store from one thread. The
writer's queue is bounded: when the store falls behind, callers wait instead
of spans being dropped.
"""

from __future__ import annotations

import contextvars
import json
import logging
import math
import os
import queue
import re
import secrets
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from keel.store.base import Store

__all__ = ["Redactor", "Span", "SpanWriter", "Tracer", "current_span", "new_id"]

log = logging.getLogger("keel.trace")


def new_id(nbytes: int = 8) -> str:
    return secrets.token_hex(nbytes)


@dataclass(slots=True)
class Span:
    trace_id: str
    span_id: str
    parent_id: str | None
    name: str
    start_time: float  # epoch seconds
    end_time: float = 0.0
    status: str = "ok"  # "ok" | "error"
    error_type: str | None = None
    error_message: str | None = None
    attributes: dict[str, Any] = field(default_factory=dict)
    input: Any = None
    output: Any = None

    @property
    def duration_ms(self) -> float:
        return max(0.0, (self.end_time - self.start_time) * 1000.0)

    @property
    def day(self) -> str:
        return datetime.fromtimestamp(self.start_time, UTC).strftime("%Y-%m-%d")

    def set(self, **attributes: Any) -> None:
        """Set attributes; `gen_ai__usage__input_tokens` means `gen_ai.usage.input_tokens`."""
        for key, value in attributes.items():
            self.attributes[key.replace("__", ".")] = value

    def fail(self, error: BaseException) -> None:
        self.status = "error"
        self.error_type = getattr(error, "error_type", type(error).__name__)
        self.error_message = str(error)[:2000]
        self.attributes["error.type"] = self.error_type


_current: contextvars.ContextVar[Span | None] = contextvars.ContextVar("keel_current_span", default=None)


def current_span() -> Span | None:
    return _current.get()


DEFAULT_SECRET_PATTERNS = (
    r"sk-[A-Za-z0-9_\-]{16,}",  # OpenAI, Anthropic (sk-ant-...), keel virtual keys
    r"AIza[0-9A-Za-z_\-]{30,}",  # Google API keys
    r"[Bb][Ee][Aa][Rr][Ee][Rr]\s+[A-Za-z0-9._\-]{12,}",
)
REDACTED = "[REDACTED]"


class Redactor:
    """Replaces secrets in anything stored: configured API keys' values and patterns."""

    def __init__(self, patterns: Iterable[str] = (), secret_env_vars: Iterable[str] = ()) -> None:
        parts = [*DEFAULT_SECRET_PATTERNS, *patterns]
        values = [os.environ[v] for v in secret_env_vars if len(os.environ.get(v, "")) >= 8]
        parts += [re.escape(v) for v in sorted(values, key=len, reverse=True)]
        self._pattern = re.compile("|".join(f"(?:{p})" for p in parts))

    def text(self, value: str) -> str:
        return self._pattern.sub(REDACTED, value)

    def value(self, value: Any) -> Any:
        """Redacted, and storable on both backends (PostgreSQL refuses NUL characters and NaN in JSON)."""
        if isinstance(value, str):
            return self.text(value.replace("\x00", "")) if "\x00" in value else self.text(value)
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: self.value(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.value(v) for v in value]
        return value

    def span(self, span: Span) -> None:
        span.attributes = self.value(span.attributes)
        span.input = self.value(span.input)
        span.output = self.value(span.output)
        if span.error_message:
            span.error_message = self.text(span.error_message)


class SpanWriter:
    """Writes spans to a store in batches from one background thread.

    `submit` blocks when `max_queue` spans are waiting (backpressure, never
    loss). `flush` waits until everything submitted so far is written.
    A span that the store refuses is logged with its error, and the batch is
    retried span by span so one bad span cannot lose its neighbours.
    """

    def __init__(self, store: Store, *, max_queue: int = 10_000, max_batch: int = 512) -> None:
        self.store = store
        self.max_batch = max_batch
        self._queue: queue.Queue[Span | None] = queue.Queue(maxsize=max_queue)
        self._done = threading.Condition()
        self._submitted = 0
        self._written = 0
        self.failed = 0
        self._thread = threading.Thread(target=self._run, name="keel-span-writer", daemon=True)
        self._thread.start()

    def submit(self, span: Span) -> None:
        with self._done:
            self._submitted += 1
        self._queue.put(span)

    def try_submit(self, span: Span) -> bool:
        """Submit without blocking; False when the queue is full."""
        try:
            self._queue.put_nowait(span)
        except queue.Full:
            return False
        with self._done:
            self._submitted += 1
        return True

    def _take_batch(self) -> tuple[list[Span], bool]:
        first = self._queue.get()
        if first is None:
            return [], True
        batch = [first]
        stop = False
        while len(batch) < self.max_batch:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                stop = True
                break
            batch.append(item)
        return batch, stop

    def _write(self, batch: Sequence[Span]) -> None:
        try:
            self.store.write_spans(batch)
        except Exception:
            log.exception("writing %d spans failed; retrying one by one", len(batch))
            for span in batch:
                try:
                    self.store.write_spans([span])
                except Exception:
                    self.failed += 1
                    log.exception("span %s could not be stored", span.span_id)

    def _run(self) -> None:
        stop = False
        while not stop:
            batch, stop = self._take_batch()
            if batch:
                self._write(batch)
            with self._done:
                self._written += len(batch)
                self._done.notify_all()

    def flush(self, timeout: float | None = 30.0) -> bool:
        with self._done:
            target = self._submitted
            return self._done.wait_for(lambda: self._written >= target, timeout)

    @property
    def pending(self) -> int:
        return self._submitted - self._written

    def close(self) -> None:
        if self._thread.is_alive():
            self.flush()
            self._queue.put(None)
            self._thread.join(timeout=30)


class Tracer:
    """Creates spans, nests them by context, redacts and submits them."""

    def __init__(self, writer: SpanWriter | None, redactor: Redactor, *, capture_content: bool = True) -> None:
        self.writer = writer
        self.redactor = redactor
        self.capture_content = capture_content

    def start(self, name: str, attributes: dict[str, Any] | None = None) -> Span:
        parent = _current.get()
        return Span(
            trace_id=parent.trace_id if parent else new_id(16),
            span_id=new_id(8),
            parent_id=parent.span_id if parent else None,
            name=name,
            start_time=time.time(),
            attributes=dict(attributes or {}),
        )

    def finish(self, span: Span) -> None:
        span.end_time = span.end_time or time.time()
        if not self.capture_content:
            span.input = span.output = None
        self.redactor.span(span)
        if self.writer is not None:
            self.writer.submit(span)

    @contextmanager
    def span(self, name: str, attributes: dict[str, Any] | None = None) -> Iterator[Span]:
        """A span around a block; an exception marks it failed and propagates."""
        span = self.start(name, attributes)
        token = _current.set(span)
        try:
            yield span
        except BaseException as exc:
            span.fail(exc)
            raise
        finally:
            _current.reset(token)
            self.finish(span)


def dumps(value: Any) -> str | None:
    """JSON for the store (None stays NULL)."""
    if value is None:
        return None
    return json.dumps(value, default=str, ensure_ascii=False)
