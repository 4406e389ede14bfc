"""OTLP export, checked by a real OTLP/HTTP receiver started in the test.

The receiver decodes each POST /v1/traces with OpenTelemetry's own protobuf
schema, as a collector does; nothing of the exporter is mocked.
"""

from __future__ import annotations

import contextlib
import gzip
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as OtlpSpan
from opentelemetry.proto.trace.v1.trace_pb2 import Status

from helpers import gateway, spans, write_config
from keel import Gateway, TestModel
from keel.config import load_config
from keel.errors import ConfigError, ServerError
from keel.otlp import otel_span_id, otel_trace_id
from keel.server.app import create_app
from keel.trace import REDACTED, new_id, new_trace_id
from stubs import free_port

SECRET = "sk-live-0123456789abcdefghijKLMN"


@pytest.fixture(autouse=True)
def _no_otel_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_BSP_SCHEDULE_DELAY"):
        monkeypatch.delenv(name, raising=False)


# --- the receiver -------------------------------------------------------------------


class OtlpReceiver:
    """An OTLP/HTTP trace receiver on a free port; clear `answering` and it holds every request
    (a stuck collector) until it is set again."""

    def __init__(self) -> None:
        self.answering = threading.Event()
        self.answering.set()
        self.requests: list[ExportTraceServiceRequest] = []
        self.bodies: list[bytes] = []
        self.content_types: list[str] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1/traces"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path != "/v1/traces":
                    self.send_error(404)
                    return
                request = ExportTraceServiceRequest.FromString(body)
                receiver.answering.wait(10)
                receiver.bodies.append(body)
                receiver.content_types.append(self.headers.get("Content-Type", ""))
                receiver.requests.append(request)
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                with contextlib.suppress(ConnectionError):  # an exporter that gave up has hung up
                    self.wfile.write(answer)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler

    def spans(self) -> list[OtlpSpan]:
        return [s for r in self.requests for rs in r.resource_spans for ss in rs.scope_spans for s in ss.spans]

    def resources(self) -> list[dict[str, Any]]:
        return [attributes(rs.resource.attributes) for r in self.requests for rs in r.resource_spans]

    def stop(self) -> None:
        self.answering.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    receiver = OtlpReceiver()
    yield receiver
    receiver.stop()


def value(any_value: AnyValue) -> Any:
    kind = any_value.WhichOneof("value")
    if kind == "array_value":
        return [value(v) for v in any_value.array_value.values]
    return getattr(any_value, kind) if kind else None


def attributes(pairs: Any) -> dict[str, Any]:
    return {kv.key: value(kv.value) for kv in pairs if isinstance(kv, KeyValue)}


def otlp_gateway(tmp_path: Path, endpoint: str, otlp: str = "", extra: str = "") -> Gateway:
    toml = (
        f'{extra}\n[otlp]\nendpoint = "{endpoint}"\n{otlp}\n'
        '[models.t]\nprovider = "test"\nmodel = "t"\nscript = ["Retrieval-augmented generation."]\n'
        "price = { input = 1000.0, output = 2000.0 }\n"
    )
    return gateway(tmp_path, toml)


def by_id(received: list[OtlpSpan]) -> dict[str, OtlpSpan]:
    return {s.span_id.hex(): s for s in received}


# --- what arrives ------------------------------------------------------------------------


async def test_every_span_arrives_once_with_its_ids_tree_and_genai_attributes(
    tmp_path: Path, receiver: OtlpReceiver
) -> None:
    gw = otlp_gateway(tmp_path, receiver.url)
    with gw.tracer.span("agent plan", {"keel.agent": "planner"}):
        first = await gw.chat("What is RAG?", model="t", metadata={"feature": "faq", "tags": ["a", 1]})
        await gw.chat("And again?", model="t")
    alone = await gw.chat("Unrelated", model="t")
    assert gw.flush(5)

    stored = spans(gw)
    received = receiver.spans()
    assert len(received) == len(stored) == 4
    assert {(s.trace_id.hex(), s.span_id.hex()) for s in received} == {(s.trace_id, s.span_id) for s in stored}
    assert all("application/x-protobuf" in t for t in receiver.content_types)

    spans_by_id = by_id(received)
    chat = spans_by_id[first.span_id]
    agent = spans_by_id[chat.parent_span_id.hex()]
    assert agent.name == "agent plan" and agent.parent_span_id == b"" and agent.kind == OtlpSpan.SPAN_KIND_INTERNAL
    assert chat.trace_id == agent.trace_id and chat.trace_id.hex() == first.trace_id
    assert spans_by_id[alone.span_id].trace_id.hex() == alone.trace_id != first.trace_id
    assert spans_by_id[alone.span_id].parent_span_id == b""

    assert chat.name == "chat t" and chat.kind == OtlpSpan.SPAN_KIND_CLIENT
    assert chat.status.code == Status.STATUS_CODE_UNSET
    record = next(s for s in stored if s.span_id == first.span_id)
    assert chat.start_time_unix_nano == int(record.start_time * 1e9)
    assert chat.end_time_unix_nano == int(record.end_time * 1e9) >= chat.start_time_unix_nano
    a = attributes(chat.attributes)
    assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.request.model"] == "t"
    assert a["gen_ai.provider.name"] == "test" and a["keel.model"] == "t"
    assert a["gen_ai.usage.input_tokens"] == first.usage.input_tokens > 0
    assert a["gen_ai.usage.output_tokens"] == first.usage.output_tokens > 0
    assert first.cost_usd is not None and a["keel.cost_usd"] == pytest.approx(first.cost_usd)
    assert a["gen_ai.response.finish_reasons"] == ["stop"]
    assert a["keel.metadata.feature"] == "faq"
    assert a["keel.metadata.tags"] == '["a", 1]'  # a mixed list is not an OpenTelemetry value: sent as JSON
    assert "keel.input" not in a and "keel.output" not in a
    assert attributes(agent.attributes) == {"keel.agent": "planner"}

    assert receiver.resources() and all(r["service.name"] == "keel" for r in receiver.resources())
    assert receiver.requests[0].resource_spans[0].scope_spans[0].scope.name == "keel"
    assert gw.otlp is not None and (gw.otlp.exported, gw.otlp.failed, gw.otlp.dropped) == (4, 0, 0)
    await gw.aclose()


async def test_a_failed_call_is_an_error_span_with_its_exception_redacted(
    tmp_path: Path, receiver: OtlpReceiver
) -> None:
    gw = otlp_gateway(tmp_path, receiver.url, 'service_name = "billing-gateway"', extra="max_retries = 0")
    gw._extra["down"] = TestModel(ServerError(f"upstream down, key {SECRET}", status=503), model_id="down")
    with pytest.raises(ServerError):
        await gw.chat("hi", model="down")
    assert gw.flush(5)

    [span] = receiver.spans()
    assert span.name == "chat down"
    assert span.status.code == Status.STATUS_CODE_ERROR
    assert "upstream down" in span.status.message and SECRET not in span.status.message
    assert "[REDACTED]" in span.status.message
    [event] = span.events
    assert event.name == "exception" and event.time_unix_nano == span.end_time_unix_nano
    exception = attributes(event.attributes)
    assert exception["exception.type"] == attributes(span.attributes)["error.type"]
    assert exception["exception.message"] == span.status.message
    assert receiver.resources()[0]["service.name"] == "billing-gateway"
    assert all(SECRET.encode() not in body for body in receiver.bodies)
    await gw.aclose()


async def test_content_is_not_exported_by_default_and_attributes_are_redacted(
    tmp_path: Path, receiver: OtlpReceiver
) -> None:
    gw = otlp_gateway(tmp_path, receiver.url)
    await gw.chat("The launch code is tangerine", model="t", metadata={"note": f"key {SECRET}"})
    assert gw.flush(5)

    [span] = receiver.spans()
    a = attributes(span.attributes)
    assert "keel.input" not in a and "keel.output" not in a
    assert a["keel.metadata.note"] == "key [REDACTED]"
    body = b"".join(receiver.bodies)
    assert b"tangerine" not in body and b"Retrieval-augmented" not in body and SECRET.encode() not in body
    [stored] = spans(gw)
    assert stored.input is not None  # the store keeps content (capture_content); only the export leaves it out
    await gw.aclose()


async def test_content_when_enabled_is_redacted(tmp_path: Path, receiver: OtlpReceiver) -> None:
    gw = otlp_gateway(tmp_path, receiver.url, "export_content = true")
    await gw.chat(f"My key is {SECRET}, what is RAG?", model="t")
    assert gw.flush(5)

    a = attributes(receiver.spans()[0].attributes)
    assert "My key is [REDACTED], what is RAG?" in a["keel.input"]
    assert '"text": "Retrieval-augmented generation."' in a["keel.output"]
    assert all(SECRET.encode() not in body for body in receiver.bodies)
    await gw.aclose()


async def test_span_names_attribute_names_and_the_admin_key_are_redacted(
    tmp_path: Path, receiver: OtlpReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    admin = "admin-value-not-shaped-like-a-key"
    monkeypatch.setenv("KEEL_ADMIN_KEY", admin)
    gw = otlp_gateway(tmp_path, receiver.url, "export_content = true")
    with gw.tracer.span(f"agent {SECRET}", {f"keel.metadata.{SECRET}": "x"}):
        await gw.chat(f"the admin key is {admin}", model="t", metadata={SECRET: "y"})
    assert gw.flush(5)

    received = receiver.spans()
    assert len(received) == 2
    assert "agent [REDACTED]" in {s.name for s in received}
    assert all(f"keel.metadata.{REDACTED}" in attributes(s.attributes) for s in received)
    body = b"".join(receiver.bodies)
    assert SECRET.encode() not in body and admin.encode() not in body
    await gw.aclose()


async def test_content_export_needs_capture_content_too(tmp_path: Path, receiver: OtlpReceiver) -> None:
    gw = otlp_gateway(tmp_path, receiver.url, "export_content = true", extra="[tracing]\ncapture_content = false")
    await gw.chat("The launch code is tangerine", model="t")
    assert gw.flush(5)
    a = attributes(receiver.spans()[0].attributes)
    assert "keel.input" not in a and "keel.output" not in a and a["gen_ai.usage.input_tokens"] > 0
    await gw.aclose()


# --- a collector that is down, slow or overwhelmed ------------------------------------------


async def test_a_down_collector_neither_fails_nor_slows_calls(tmp_path: Path) -> None:
    nothing_there = f"http://127.0.0.1:{free_port()}/v1/traces"
    gw = otlp_gateway(tmp_path, nothing_there, "timeout_s = 0.5")
    started = time.perf_counter()
    results = [await gw.chat("hi", model="t") for _ in range(20)]
    elapsed = time.perf_counter() - started
    assert all(r.text == "Retrieval-augmented generation." for r in results)
    assert elapsed < 2.0  # an export on the request path would take at least 20 × 0.5 s
    assert gw.otlp is not None and not gw.otlp.flush(5)
    assert (gw.otlp.exported, gw.otlp.failed, gw.otlp.dropped) == (0, 20, 0)
    assert len(spans(gw)) == 20  # the store has every span all the same
    closing = time.perf_counter()
    await gw.aclose()
    assert time.perf_counter() - closing < 3.0


async def test_a_stuck_collector_does_not_slow_calls_and_shutdown_is_bounded(
    tmp_path: Path, receiver: OtlpReceiver
) -> None:
    receiver.answering.clear()
    gw = otlp_gateway(tmp_path, receiver.url, "timeout_s = 1")
    await gw.chat("first", model="t")
    assert gw.otlp is not None
    flushing = threading.Thread(target=gw.otlp.flush)
    flushing.start()
    while gw.otlp.pending:  # until the exporter is stuck sending the first span
        time.sleep(0.01)
    started = time.perf_counter()
    for _ in range(10):
        await gw.chat("hi", model="t")
    assert time.perf_counter() - started < 5.0  # waiting on the collector, 10 calls would take 10 x timeout_s
    closing = time.perf_counter()
    await gw.aclose()
    flushing.join(5)
    assert time.perf_counter() - closing < 5.0
    assert gw.otlp.exported == 0 and gw.otlp.failed >= 1  # the exporter gave up on the collector


async def test_a_full_queue_drops_and_counts_instead_of_waiting(tmp_path: Path, receiver: OtlpReceiver) -> None:
    receiver.answering.clear()
    gw = otlp_gateway(tmp_path, receiver.url, "max_queue = 3\ntimeout_s = 30")
    assert gw.otlp is not None
    started = time.perf_counter()
    for _ in range(10):
        await gw.chat("hi", model="t")
    assert time.perf_counter() - started < 5.0  # waiting on the collector, one call alone would take 30 s
    # At most one batch (3) is stuck at the collector and 3 more wait: the rest were dropped.
    assert 4 <= gw.otlp.dropped <= 7 and gw.otlp.submitted + gw.otlp.dropped == 10
    receiver.answering.set()
    assert gw.otlp.flush(5)
    assert len(receiver.spans()) == gw.otlp.exported == 10 - gw.otlp.dropped
    assert len(spans(gw)) == 10  # the store's queue waits instead: it has them all
    await gw.aclose()


async def test_spans_after_close_are_dropped_not_raised(tmp_path: Path, receiver: OtlpReceiver) -> None:
    gw = otlp_gateway(tmp_path, receiver.url)
    await gw.chat("hi", model="t")
    assert gw.otlp is not None
    exporter = gw.otlp
    await gw.aclose()
    assert exporter.exported == 1  # shutdown sent what was queued
    with gw.tracer.span("late"):
        pass
    assert exporter.dropped == 1 and len(receiver.spans()) == 1


@pytest.mark.slow
def test_a_script_that_never_closes_its_gateway_still_sends_its_spans(tmp_path: Path, receiver: OtlpReceiver) -> None:
    path = write_config(tmp_path / "conf", f'[otlp]\nendpoint = "{receiver.url}"\n')
    script = (
        "import sys\nfrom keel import Gateway, TestModel\n"
        "gw = Gateway(sys.argv[1], store=False, models={'t': TestModel('hi')})\n"
        "print(gw.chat_sync('hello', model='t').trace_id)\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert [s.trace_id.hex() for s in receiver.spans()] == [done.stdout.strip()]


# --- through the server ------------------------------------------------------------------


def test_a_server_request_arrives_at_the_collector(tmp_path: Path, receiver: OtlpReceiver) -> None:
    gw = otlp_gateway(tmp_path, receiver.url)
    port = free_port()
    app = create_app(gateway=gw)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.01)
        response = httpx.post(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            json={"model": "t", "messages": [{"role": "user", "content": "What is RAG?"}]},
        )
        assert response.status_code == 200, response.text
        trace_id = response.headers["x-keel-trace-id"]
        assert gw.flush(5)
        [span] = [s for s in receiver.spans() if s.trace_id.hex() == trace_id]
        a = attributes(span.attributes)
        assert span.name == "chat t" and a["gen_ai.operation.name"] == "chat"
        assert a["gen_ai.usage.output_tokens"] == response.json()["usage"]["completion_tokens"]
    finally:
        server.should_exit = True
        thread.join(timeout=5)
        gw.close()


# --- configuration and ids -------------------------------------------------------------


def test_keel_ids_map_losslessly_and_foreign_ids_stably() -> None:
    trace_id, span_id = new_trace_id(), new_id(8)
    assert f"{otel_trace_id(trace_id):032x}" == trace_id and f"{otel_span_id(span_id):016x}" == span_id
    for foreign in ("req-42", "0" * 16, "0x" + "1" * 14, ""):
        assert otel_span_id(foreign) == otel_span_id(foreign) and 0 < otel_span_id(foreign) < 2**64
    assert otel_span_id("req-42") != otel_span_id("req-43")
    assert 0 < otel_trace_id("not-hex") < 2**128


def test_endpoint_from_the_file_or_the_standard_environment(tmp_path: Path) -> None:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/"}
    assert load_config(environ=env).otlp.endpoint == "http://collector:4318/v1/traces"
    traces = {**env, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "https://otlp.example/api/traces"}
    assert load_config(environ=traces).otlp.endpoint == "https://otlp.example/api/traces"
    path = write_config(tmp_path / "conf", '[otlp]\nendpoint = "http://localhost:4318"\n')
    assert load_config(path, environ=traces).otlp.endpoint == "http://localhost:4318/v1/traces"
    assert load_config(environ={}).otlp.endpoint == ""


def test_a_bad_endpoint_is_a_config_error_naming_the_line(tmp_path: Path) -> None:
    path = write_config(tmp_path, '[otlp]\nservice_name = "x"\nendpoint = "localhost:4318"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})
    assert caught.value.field == "otlp.endpoint" and caught.value.line == 3
    assert "http:// or https:// URL" in str(caught.value)


def test_without_the_extra_the_error_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "keel.otlp")
    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.otlp.proto.http.trace_exporter", None)
    with pytest.raises(ConfigError, match=r"pip install 'keel\[otlp\]'"):
        otlp_gateway(tmp_path, "http://localhost:4318/v1/traces")


def test_no_endpoint_no_exporter(tmp_path: Path) -> None:
    gw = gateway(tmp_path)
    assert gw.otlp is None and gw.tracer.listeners == []
    gw.close()
