"""Spans: one per model call, retrieval, tool call...; nested by context.

Span attributes follow the OpenTelemetry GenAI semantic conventions
(`gen_ai.operation.name`, `gen_ai.provider.name`, `gen_ai.request.model`,
`gen_ai.usage.input_tokens`, `error.type`, ...) plus keel's own `keel.*`
fields (cost, attempts, cache, key). A finished span is handed to a
`SpanWriter`, which redacts it and writes batches to the store from one
thread, off the request path. The writer's buffer is bounded: when the store
falls behind, callers wait instead of spans being dropped. A span the store
refuses (text that is not valid Unicode, nesting its encoder cannot take) is
stored sanitised, or at least with its cost, tokens and key: budgets read spend
from the store, so a lost span would be a call never charged.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import math
import os
import random
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from keel.store.base import Store

__all__ = [
    "Redactor",
    "Span",
    "SpanWriter",
    "Tracer",
    "current_span",
    "enter_span",
    "exit_span",
    "new_id",
    "new_trace_id",
    "use_span",
]

log = logging.getLogger("keel.trace")


def new_id(nbytes: int = 8) -> str:
    """A random hex id (not for secrets: OpenTelemetry ids need only be unique)."""
    return f"{random.getrandbits(nbytes * 8):0{nbytes * 2}x}"


def new_trace_id() -> str:
    """A 128-bit trace id: 48 bits of milliseconds, then 80 random bits.

    Time first keeps the store's (trace_id, span_id) index append-only; the
    random right part is what W3C Trace Context asks of a random trace id.
    """
    return f"{int(time.time() * 1000) & 0xFFFFFFFFFFFF:012x}{random.getrandbits(80):020x}"


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


def enter_span(span: Span) -> contextvars.Token[Span | None]:
    """Make `span` the parent of the spans started in this context (a model call's, a tool's) until
    `exit_span(token)`; for a span whose scope is not one block (a stream that yields), else `use_span`."""
    return _current.set(span)


def exit_span(token: contextvars.Token[Span | None]) -> None:
    """Give back the parent `enter_span` replaced."""
    _current.reset(token)


@contextmanager
def use_span(span: Span) -> Iterator[Span]:
    """`span` is the parent of the spans started in this block (it is not finished here: see `Tracer.span`)."""
    token = _current.set(span)
    try:
        yield span
    finally:
        _current.reset(token)


DEFAULT_SECRET_PATTERNS = (
    r"sk-[A-Za-z0-9_\-]{16,}",  # OpenAI, Anthropic (sk-ant-...), keel virtual keys
    r"AIza[0-9A-Za-z_\-]{30,}",  # Google API keys
    r"[Bb][Ee][Aa][Rr][Ee][Rr]\s+[A-Za-z0-9._\-]{12,}",
)
REDACTED = "[REDACTED]"
#: Secrets redacted wherever they appear, configured or not: the server's admin key and the
#: providers' standard key variables (a model may name its own with `api_key_env`; that one is added).
ALWAYS_SECRET_ENV_VARS = (
    "KEEL_ADMIN_KEY", "OPENAI_API_KEY", "ANTHROPIC_API_KEY", "GEMINI_API_KEY", "GOOGLE_API_KEY",
)  # fmt: skip
MIN_SECRET_CHARS = 8  # shorter values would redact ordinary words


class Redactor:
    """Replaces secrets in every string stored or exported: span names, attribute keys and values,
    content, error types and messages. The secrets are the configured API keys' values (the admin
    key and the providers' keys always) and anything shaped like a key (`DEFAULT_SECRET_PATTERNS`)."""

    def __init__(self, patterns: Iterable[str] = (), secret_env_vars: Iterable[str] = ()) -> None:
        parts = [*DEFAULT_SECRET_PATTERNS, *patterns]
        names = dict.fromkeys([*ALWAYS_SECRET_ENV_VARS, *secret_env_vars])
        values = {value for v in names if len(value := os.environ.get(v, "").strip()) >= MIN_SECRET_CHARS}
        parts += [re.escape(v) for v in sorted(values, key=len, reverse=True)]
        self._pattern = re.compile("|".join(f"(?:{p})" for p in parts))

    def text(self, value: str) -> str:
        return self._pattern.sub(REDACTED, value)

    def value(self, value: Any) -> Any:
        """Redacted, and storable on both backends (PostgreSQL refuses NUL characters and NaN in JSON).
        Keys of mappings are redacted too: a header `x-keel-meta-<secret>` becomes an attribute's name."""
        if isinstance(value, str):
            return self.text(value.replace("\x00", "")) if "\x00" in value else self.text(value)
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {self.value(k) if isinstance(k, str) else k: self.value(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.value(v) for v in value]
        return value

    def span(self, span: Span) -> None:
        span.name = self.value(span.name)
        span.attributes = self.value(span.attributes)
        span.input = self.value(span.input)
        span.output = self.value(span.output)
        if span.error_type:
            span.error_type = self.value(span.error_type)
        if span.error_message:
            span.error_message = self.value(span.error_message)


class SpanWriter:
    """Writes spans to a store in batches from one background thread.

    Like OpenTelemetry's batch processor: `submit` only appends to a buffer;
    the thread wakes when a batch is full or every `interval` seconds, then
    redacts and writes what has gathered, one transaction per batch. Waking a
    thread and committing once per span cost about 1 ms per call; batching
    makes both rare. The buffer is bounded: when `max_queue` spans wait,
    `submit` blocks (backpressure, never loss). `flush` writes everything
    submitted so far and waits for it. A batch the store refuses is retried
    span by span, so one bad span cannot lose its neighbours.

    A span that records a charge must be in the store before its call is
    answered, or a crash right after the answer loses the spend (a kill -9
    lost the spans of the last 0.2 s). `await durable(ticket)` (the ticket
    `submit` returned) wakes the thread at once and returns when the span's
    batch is committed: a group commit, as databases do for their log. The
    calls that finish while one batch is being written wait for the next,
    and share its single transaction, so the cost per call falls as load
    rises.
    """

    def __init__(
        self,
        store: Store,
        *,
        redactor: Redactor | None = None,
        max_queue: int = 10_000,
        max_batch: int = 512,
        interval: float = 0.2,
    ) -> None:
        self.store = store
        self.redactor = redactor
        self.max_queue = max_queue
        self.max_batch = max_batch
        self.interval = interval
        self._buffer: deque[Span] = deque()
        self._lock = threading.Lock()
        self._progress = threading.Condition(self._lock)  # spans written, room freed
        self._wake = threading.Event()
        self._submitted = 0
        self._written = 0
        self._waiters: list[tuple[int, asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._closing = False
        self.failed = 0  # spans lost: not even their cost could be stored
        self.salvaged = 0  # spans stored without their content
        self.max_depth = 0
        self._thread = threading.Thread(target=self._run, name="keel-span-writer", daemon=True)
        self._thread.start()

    def submit(self, span: Span) -> int:
        """Queue a span; returns its ticket for `durable`."""
        with self._lock:
            if len(self._buffer) >= self.max_queue and not self._closing:
                self._wake.set()
                self._progress.wait_for(lambda: len(self._buffer) < self.max_queue or self._closing)
            queued = not self._closing
            if queued:
                self._buffer.append(span)
                self._submitted += 1
                ticket = self._submitted
                depth = len(self._buffer)
                self.max_depth = max(self.max_depth, depth)
        if not queued:  # the thread has stopped or is stopping: write it here rather than lose it
            self._write([span])
            return 0  # written already
        if depth >= self.max_batch:
            self._wake.set()
        return ticket

    async def durable(self, ticket: int) -> None:
        """Return once the span with this ticket is committed to the store (or could not be stored)."""
        with self._lock:
            if self._written >= ticket or not self._thread.is_alive():
                return
            loop = asyncio.get_running_loop()
            done: asyncio.Future[None] = loop.create_future()
            self._waiters.append((ticket, loop, done))
            self._wake.set()  # a caller is waiting: write now, not at the next interval
        await done

    def _release(self) -> None:
        """Wake the callers whose spans are written (called with the lock held), one hop per event loop."""
        if not self._waiters:
            return
        ready: dict[asyncio.AbstractEventLoop, list[asyncio.Future[None]]] = {}
        waiting = []
        for ticket, loop, done in self._waiters:
            if ticket <= self._written or self._closing:
                ready.setdefault(loop, []).append(done)
            else:
                waiting.append((ticket, loop, done))
        self._waiters = waiting
        for loop, futures in ready.items():
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody is waiting any more
                loop.call_soon_threadsafe(_resolve, futures)

    def _take(self, limit: int) -> list[Span]:
        with self._lock:
            count = min(len(self._buffer), self.max_batch, limit)
            return [self._buffer.popleft() for _ in range(count)]

    def _redact(self, batch: Sequence[Span]) -> list[Span]:
        if self.redactor is None:
            return list(batch)
        kept = []
        for span in batch:
            try:
                self.redactor.span(span)
            except Exception:  # never store what could not be redacted, but keep what it charged
                log.exception("span %s could not be redacted; it is stored without its content", span.span_id)
                span = self._salvage(span)
            kept.append(span)
            time.sleep(0)  # let the event loop's thread take the GIL between spans
        return kept

    def _salvage(self, span: Span) -> Span:
        """The span with no content: ids, times, status, numbers and the few names that say whose call
        it was (each redacted on its own, dropped if even that fails)."""
        self.salvaged += 1
        kept = salvaged(span)
        names = {k: v for k, v in kept.attributes.items() if isinstance(v, str)}
        for name, value in names.items():
            try:
                kept.attributes[name] = self.redactor.text(value) if self.redactor else value
            except Exception:
                del kept.attributes[name]
        try:
            kept.name = self.redactor.text(kept.name) if self.redactor else kept.name
        except Exception:
            kept.name = str(kept.attributes.get("gen_ai.operation.name", "span"))
        return kept

    def _write(self, batch: Sequence[Span]) -> None:
        batch = self._redact(batch)
        try:
            self.store.write_spans(batch)
        except Exception:
            log.exception("writing %d spans failed; retrying one by one", len(batch))
            for span in batch:
                self._write_one(span)

    def _write_one(self, span: Span) -> None:
        """One span, as it is; else with unencodable text replaced; else without its content."""
        for attempt in ("as is", "sanitised", "salvaged"):
            try:
                if attempt == "sanitised":
                    span = sanitised(span)
                elif attempt == "salvaged":
                    span = self._salvage(span)
                self.store.write_spans([span])
                if attempt != "as is":
                    log.warning("span %s was stored %s: the store refused it as it was", span.span_id, attempt)
                return
            except Exception:
                log.exception("span %s could not be stored %s", span.span_id, attempt)
        self.failed += 1

    def _drain(self) -> None:
        """Write what was waiting when the thread woke; newer spans wait for the next wake,
        so that a steady trickle becomes a few large batches, not many one-span commits."""
        with self._lock:
            remaining = len(self._buffer)
        while remaining > 0 and (batch := self._take(remaining)):
            remaining -= len(batch)
            try:
                self._write(batch)
            finally:
                with self._lock:
                    self._written += len(batch)
                    self._release()
                    self._progress.notify_all()

    def _run(self) -> None:
        while True:
            self._wake.wait(self.interval)
            self._wake.clear()
            try:
                self._drain()
            except Exception:  # the thread must outlive any one batch, or every later span is lost
                log.exception("span writer: a batch failed")
            if self._closing:
                self._drain()
                with self._lock:
                    self._release()
                return

    def flush(self, timeout: float | None = 30.0) -> bool:
        """Write everything submitted so far; False if that took longer than `timeout`."""
        with self._lock:
            target = self._submitted
            self._wake.set()
            return (
                self._progress.wait_for(lambda: self._written >= target or not self._thread.is_alive(), timeout)
                and self._written >= target
            )

    @property
    def pending(self) -> int:
        return self._submitted - self._written

    def close(self) -> None:
        if self._thread.is_alive():
            self.flush()
            with self._lock:
                self._closing = True
                self._progress.notify_all()
            self._wake.set()
            self._thread.join(timeout=30)
        self._drain()  # whatever slipped in while the thread was stopping
        with self._lock:
            self._closing = True
            self._release()  # nobody waits on a closed writer


def _resolve(futures: list[asyncio.Future[None]]) -> None:
    for done in futures:
        if not done.done():  # its caller may have been cancelled meanwhile
            done.set_result(None)


_SURROGATE = re.compile("[\ud800-\udfff]")


def _storable(value: Any) -> Any:
    """`value` with text every store encodes: lone surrogates become U+FFFD, NUL characters go,
    non-finite floats become null, anything else becomes its text."""
    if isinstance(value, str):
        return _SURROGATE.sub("\ufffd", value).replace("\x00", "")
    if isinstance(value, bool) or value is None or isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {_storable(str(k)): _storable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_storable(v) for v in value]
    return _storable(str(value))


def sanitised(span: Span) -> Span:
    """A copy of the span that any store takes (see `_storable`); marked `keel.span.sanitised`."""
    copy = replace(
        span,
        name=_storable(span.name),
        error_message=_storable(span.error_message),
        attributes=_storable(span.attributes),
        input=_storable(span.input),
        output=_storable(span.output),
    )
    copy.attributes["keel.span.sanitised"] = True
    return copy


#: Text attributes a span keeps when its content is dropped: what the call was, for whom, and how it ended.
SALVAGED_NAMES = frozenset({
    "gen_ai.operation.name", "gen_ai.request.model", "gen_ai.response.model", "gen_ai.provider.name",
    "keel.model", "keel.api_key", "error.type",
})  # fmt: skip


def salvaged(span: Span) -> Span:
    """A copy with no content: its ids, times, status, numeric attributes (cost, tokens, attempts)
    and SALVAGED_NAMES, each made storable. Marked `keel.span.content_dropped`."""
    attributes: dict[str, Any] = {}
    for name, value in span.attributes.items():
        if isinstance(value, (int, float)) or (name in SALVAGED_NAMES and isinstance(value, str)):  # bools too
            attributes[_storable(name)] = _storable(value)
    attributes["keel.span.content_dropped"] = True
    message = _storable(span.error_message[:2000]) if span.error_message else None
    return replace(
        span, name=_storable(span.name), error_message=message, attributes=attributes, input=None, output=None
    )


SpanListener = Callable[[Span], None]


class Tracer:
    """Creates spans and nests them by context; finished spans go to the writer.

    Listeners (metrics, exporters) see every finished span on the caller's
    thread, before redaction: they must be quick and must not keep content.
    """

    def __init__(self, writer: SpanWriter | None, *, capture_content: bool = True) -> None:
        self.writer = writer
        self.capture_content = capture_content
        self.listeners: list[SpanListener] = []

    def start(self, name: str, attributes: dict[str, Any] | None = None) -> Span:
        parent = _current.get()
        return Span(
            trace_id=parent.trace_id if parent else new_trace_id(),
            span_id=new_id(8),
            parent_id=parent.span_id if parent else None,
            name=name,
            start_time=time.time(),
            attributes=dict(attributes or {}),
        )

    def finish(self, span: Span) -> int | None:
        """End the span and hand it to the writer; returns the writer's ticket (None without a writer)."""
        span.end_time = span.end_time or time.time()
        if not self.capture_content:
            span.input = span.output = None
        for listener in self.listeners:
            try:
                listener(span)
            except Exception:  # an observer must never fail the call it observes
                log.exception("span listener %r failed", listener)
        return self.writer.submit(span) if self.writer is not None else None

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
