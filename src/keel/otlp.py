"""OTLP export: every finished span, to any OpenTelemetry collector (`[otlp]`, extra `keel[otlp]`).

keel's spans are finished when a tracer listener sees them, so rather than
re-run them through an OpenTelemetry tracer, `OtlpExporter` turns each into
the SDK's `ReadableSpan` (the same trace, span and parent ids, times in ns,
status, attributes) and hands it to the SDK's `BatchSpanProcessor` and
`OTLPSpanExporter` (HTTP/protobuf): the official batching and wire format.

Off the request path: the listener only copies ids, times and attributes.
Redaction, JSON encoding and the HTTP request happen on the processor's
thread. The queue is bounded: when the collector is slow or down, spans past
`max_queue` are dropped and counted (`dropped`), never waited for. Unlike the
store, a collector is optional, and a call must not wait on it.

Content: listeners see spans before the store redacts them, so everything
exported goes through the gateway's `Redactor` (span names, attribute names
and values, error messages, and content). Inputs and outputs are exported only when both
`otlp.export_content` and `tracing.capture_content` are on, as the JSON
attributes `keel.input` and `keel.output`.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import re
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.util.types import AttributeValue

from keel import __version__
from keel.config import OtlpConfig
from keel.trace import Redactor, Span

__all__ = ["OtlpExporter", "otel_span_id", "otel_trace_id"]

log = logging.getLogger("keel.otlp")

_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_CLIENT_OPERATIONS = frozenset({"chat", "embeddings"})  # calls to a model: CLIENT spans in the GenAI conventions
_INT64 = range(-(2**63), 2**63)
_MAX_BATCH = 512  # spans per export request: the SDK's default
_EXIT_TIMEOUT_S = 5.0


def otel_trace_id(trace_id: str) -> int:
    """keel's 32-hex-digit trace id as OpenTelemetry's 128-bit one (see `_otel_id`)."""
    return _otel_id(trace_id, 32)


def otel_span_id(span_id: str) -> int:
    """keel's 16-hex-digit span id as OpenTelemetry's 64-bit one (see `_otel_id`)."""
    return _otel_id(span_id, 16)


def _otel_id(value: str, digits: int) -> int:
    """The same number when `value` is a valid id of that size (every id keel makes), so the
    collector's ids match the store's; else a stable hash, so that a foreign id still maps to
    one valid (non-zero) id."""
    if re.fullmatch(f"[0-9a-fA-F]{{{digits}}}", value) and (number := int(value, 16)):
        return number
    digest = hashlib.blake2b(value.encode(), digest_size=digits // 2).digest()
    return int.from_bytes(digest, "big") or 1


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


def _context(trace_id: str, span_id: str) -> SpanContext:
    return SpanContext(otel_trace_id(trace_id), otel_span_id(span_id), is_remote=False, trace_flags=_SAMPLED)


def _exception_events(span: Span) -> tuple[Event, ...]:
    """A failed span's error as OpenTelemetry's `exception` event (status ERROR says the rest)."""
    if span.status != "error":
        return ()
    exception = {"exception.type": span.error_type or "error", "exception.message": span.error_message or ""}
    return (Event("exception", exception, _ns(span.end_time)),)


class OtlpExporter:
    """A tracer listener that sends every finished span to an OTLP/HTTP collector.

    >>> exporter = OtlpExporter(OtlpConfig(endpoint="http://localhost:4318/v1/traces"), redactor=Redactor())
    >>> tracer.listeners.append(exporter.observe)
    >>> exporter.shutdown()  # sends what is queued, then stops
    """

    def __init__(self, config: OtlpConfig, *, redactor: Redactor) -> None:
        self.export_content = config.export_content
        self.max_queue = config.max_queue
        self.submitted = 0
        self.dropped = 0
        self._closed = False
        self._lock = threading.Lock()
        self._resource = Resource.create({"service.name": config.service_name, "service.version": __version__})
        self._scope = InstrumentationScope("keel", __version__)
        headers = dict(config.headers) or None
        otlp = OTLPSpanExporter(endpoint=config.endpoint, headers=headers, timeout=config.timeout_s)
        self._sender = _RedactingSender(otlp, redactor)
        # The processor's own queue is as large as ours, so it never drops a span uncounted.
        batch = min(config.max_queue, _MAX_BATCH)
        self._processor = BatchSpanProcessor(self._sender, max_queue_size=config.max_queue, max_export_batch_size=batch)
        _open_exporters.add(self)

    @property
    def exported(self) -> int:
        """Spans the collector accepted."""
        return self._sender.exported

    @property
    def failed(self) -> int:
        """Spans lost to a failed export (collector down, refused, or too slow)."""
        return self._sender.failed

    @property
    def pending(self) -> int:
        """Spans queued and not yet handed to the collector."""
        return self.submitted - self._sender.taken

    def observe(self, span: Span) -> None:
        """Queue one finished span (a tracer listener); a full queue drops it, counted."""
        with self._lock:
            dropped = self._closed or self.pending >= self.max_queue
            if dropped:
                self.dropped += 1
            else:
                self.submitted += 1
        if not dropped:
            self._processor.on_end(self._readable(span))
        elif self.dropped == 1 or self.dropped % 1000 == 0:
            log.warning("OTLP export: %d spans dropped so far (a full queue, or a closed exporter)", self.dropped)

    def _readable(self, span: Span) -> ReadableSpan:
        """The span as the SDK's, with keel's values as they are: `_RedactingSender` cleans them later.
        Success is status UNSET, not OK: OpenTelemetry leaves OK to an application's own override."""
        attributes = dict(span.attributes)
        if self.export_content:
            if span.input is not None:
                attributes["keel.input"] = span.input
            if span.output is not None:
                attributes["keel.output"] = span.output
        client = attributes.get("gen_ai.operation.name") in _CLIENT_OPERATIONS
        return ReadableSpan(
            name=span.name,
            context=_context(span.trace_id, span.span_id),
            parent=_context(span.trace_id, span.parent_id) if span.parent_id else None,
            resource=self._resource,
            attributes=attributes,
            events=_exception_events(span),
            kind=SpanKind.CLIENT if client else SpanKind.INTERNAL,
            status=Status(StatusCode.ERROR, span.error_message) if span.status == "error" else Status(StatusCode.UNSET),
            start_time=_ns(span.start_time),
            end_time=_ns(max(span.end_time, span.start_time)),
            instrumentation_scope=self._scope,
        )

    def flush(self, timeout: float = 30.0) -> bool:
        """Send every span queued so far; False if that failed or took longer than `timeout` seconds."""
        failed = self.failed
        done: list[bool] = []
        # The SDK's force_flush ignores its timeout; a thread of its own bounds the wait for a dead collector.
        flusher = threading.Thread(target=lambda: done.append(self._processor.force_flush()), daemon=True)
        flusher.start()
        flusher.join(timeout)
        return bool(done) and done[0] and self.failed == failed

    def shutdown(self, timeout: float = 10.0) -> None:
        """Send what is queued, waiting at most about `timeout` seconds for the collector, then stop."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        started = time.monotonic()
        if not self.flush(timeout):
            self._sender.shutdown()  # cut an unreachable collector's retries short, so that the processor stops now
        # an export in flight to a collector that never answers would hold shutdown for its own timeout
        stopper = threading.Thread(target=self._processor.shutdown, daemon=True)
        stopper.start()
        stopper.join(max(0.1, timeout - (time.monotonic() - started)))


_open_exporters: weakref.WeakSet[OtlpExporter] = weakref.WeakSet()


@atexit.register
def _send_before_exit() -> None:
    """A script that never closes its gateway still sends its spans (the processor waits seconds between batches)."""
    for exporter in list(_open_exporters):
        exporter.shutdown(_EXIT_TIMEOUT_S)


class _RedactingSender(SpanExporter):
    """Runs on the processor's thread: redacts each span, makes its attributes valid OpenTelemetry
    values, sends the batch, and counts what happened to it."""

    def __init__(self, otlp: SpanExporter, redactor: Redactor) -> None:
        self._otlp = otlp
        self._redactor = redactor
        self._stopped = False
        self.taken = 0
        self.exported = 0
        self.failed = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.taken += len(spans)
        batch = []
        for span in spans:
            try:
                batch.append(self._clean(span))
            except Exception:  # never send what could not be redacted
                self.failed += 1
                log.exception("span %s could not be redacted; it is not exported", span.name)
        result = self._otlp.export(batch) if batch else SpanExportResult.SUCCESS
        if result is SpanExportResult.SUCCESS:
            self.exported += len(batch)
        else:
            self.failed += len(batch)
        return result

    def _clean(self, span: ReadableSpan) -> ReadableSpan:
        status = span.status
        if status.description:
            status = Status(status.status_code, self._redactor.text(status.description))
        events = [Event(e.name, self._attributes(e.attributes or {}), e.timestamp) for e in span.events]
        return ReadableSpan(
            name=self._redactor.text(span.name),
            context=span.context,
            parent=span.parent,
            resource=span.resource,
            attributes=self._attributes(span.attributes or {}),
            events=events,
            kind=span.kind,
            status=status,
            start_time=span.start_time,
            end_time=span.end_time,
            instrumentation_scope=span.instrumentation_scope,
        )

    def _attributes(self, attributes: Mapping[str, Any]) -> dict[str, AttributeValue]:
        redacted = self._redactor.value(dict(attributes))
        return {key: value for key, raw in redacted.items() if (value := _attribute_value(raw)) is not None}

    def shutdown(self) -> None:
        if not self._stopped:
            self._stopped = True
            self._otlp.shutdown()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return True


def _attribute_value(value: Any) -> AttributeValue | None:
    """A valid OpenTelemetry attribute value: a scalar, a list of one scalar type, else JSON; None is left out."""
    if value is None or isinstance(value, bool | str | float):
        return value
    if isinstance(value, int):
        return value if value in _INT64 else str(value)
    if isinstance(value, list | tuple) and _homogeneous(value):
        return list(value)
    return json.dumps(value, default=str, ensure_ascii=False)


def _homogeneous(values: Sequence[Any]) -> bool:
    kinds = {type(v) for v in values}
    if len(kinds) != 1 or not kinds <= {str, bool, int, float}:
        return False
    return kinds != {int} or all(v in _INT64 for v in values)
