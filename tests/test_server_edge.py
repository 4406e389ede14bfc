"""The server under bad input and bad luck: oversized bodies, slow models, clients that leave, shutdown."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import openai
import pytest

from helpers import spans, write_config
from keel import Gateway
from keel.config import ServerConfig
from keel.models.base import Model, StreamItem
from keel.types import ChatRequest, ModelResponse, StreamDelta, Usage
from serving import Server
from stubs import free_port
from test_processes import _wait_ready

BODY = {"model": "slow", "messages": [{"role": "user", "content": "hi"}]}


class SlowModel(Model):
    """Answers after `delay` seconds, or streams one piece every `every` seconds; records cancellation."""

    provider = "test"

    def __init__(self, delay: float = 5.0, pieces: int = 200, every: float = 0.05) -> None:
        super().__init__("slow")
        self.delay, self.pieces, self.every = delay, pieces, every
        self.cancelled = threading.Event()
        self.sent = 0

    async def complete(self, request: ChatRequest) -> ModelResponse:
        try:
            await asyncio.sleep(self.delay)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return ModelResponse(text="late", usage=Usage(1, 1))

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamItem]:
        try:
            for _ in range(self.pieces):
                await asyncio.sleep(self.every)
                self.sent += 1
                yield StreamDelta(text="x")
        except (asyncio.CancelledError, GeneratorExit):
            self.cancelled.set()
            raise
        yield ModelResponse(text="x" * self.pieces, usage=Usage(1, self.pieces))


def serve(model: SlowModel, **server: object) -> tuple[Server, Gateway]:
    gw = Gateway(models={"slow": model, "fast": SlowModel(delay=0)})
    gw.config = gw.config.model_copy(update={"max_retries": 0, "server": ServerConfig(**server)})  # type: ignore[arg-type]
    return Server(gw), gw


def raw_status(port: int, body: bytes, framing: str) -> int:
    """POST a body with hand-written framing headers (HTTP clients refuse to send contradictory ones)."""
    chunks = b"".join(
        b"%x\r\n%s\r\n" % (len(body[i : i + 1000]), body[i : i + 1000]) for i in range(0, len(body), 1000)
    )
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n{framing}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(head.encode() + chunks + b"0\r\n\r\n")
        return int(conn.recv(64).split()[1])


@pytest.fixture
def slow() -> Iterator[tuple[Server, Gateway, SlowModel]]:
    model = SlowModel()
    server, gw = serve(model, max_body_bytes=2048, request_timeout_s=30)
    yield server, gw, model
    server.stop()
    gw.close()


def test_an_oversized_body_is_413(slow: tuple[Server, Gateway, SlowModel]) -> None:
    server, gw, _ = slow
    big = {"model": "fast", "messages": [{"role": "user", "content": "x" * 5000}]}
    answer = httpx.post(f"{server.url}/chat/completions", json=big)
    assert answer.status_code == 413
    assert answer.json()["error"]["code"] == "request_too_large"
    assert "over the limit of 2048" in answer.json()["error"]["message"]

    def chunked() -> Iterator[bytes]:  # no Content-Length: the server counts what arrives
        data = json.dumps(big).encode()
        for i in range(0, len(data), 1000):
            yield data[i : i + 1000]

    answer = httpx.post(f"{server.url}/chat/completions", content=chunked())
    assert answer.status_code == 413
    # a small Content-Length next to Transfer-Encoding: the chunks frame the body, so they are what is counted
    assert raw_status(server.port, json.dumps(big).encode(), "Content-Length: 10\r\nTransfer-Encoding: chunked") in (
        400,
        413,
    )
    assert {s.error_type for s in spans(gw)} <= {"BodyTooLarge", "InputError"}
    small = httpx.post(
        f"{server.url}/chat/completions",
        content=iter([json.dumps({**BODY, "model": "fast"}).encode()]),
        headers={"content-type": "application/json"},
    )
    assert small.status_code == 200, small.text  # a chunked body under the limit is replayed to the app


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "not valid JSON"),
        (b'{"model": "fast", "messages": "hi"}', "messages: Input should be a valid list"),
        (b'{"model": "fast", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}', "temperature"),
        (b'{"model": "fast", "messages": [{"role": "user", "content": "hi"}], "colour": "red"}', "unknown field"),
    ],
)
def test_malformed_bodies_are_400_and_traced(
    slow: tuple[Server, Gateway, SlowModel], body: bytes, message: str
) -> None:
    server, gw, _ = slow
    answer = httpx.post(f"{server.url}/chat/completions", content=body, headers={"content-type": "application/json"})
    assert answer.status_code == 400
    assert message in answer.json()["error"]["message"]
    [span] = spans(gw)
    assert span.status == "error" and span.attributes["http.response.status_code"] == 400
    assert span.attributes["gen_ai.operation.name"] == "http"  # not counted as a model call


def test_the_request_timeout_is_504() -> None:
    model = SlowModel(delay=5)
    server, gw = serve(model, request_timeout_s=0.3)
    try:
        started = time.monotonic()
        answer = httpx.post(f"{server.url}/chat/completions", json=BODY, timeout=10)
        assert answer.status_code == 504
        assert "request_timeout_s (0.3 s)" in answer.json()["error"]["message"]
        assert time.monotonic() - started < 3
        assert model.cancelled.wait(2)  # the upstream call was cancelled, not left running
        [span] = spans(gw)
        assert (span.error_type, span.error_message) == ("Cancelled", "request timeout after 0.3 s")
    finally:
        server.stop()
        gw.close()


def test_a_client_that_leaves_cancels_the_upstream_call(slow: tuple[Server, Gateway, SlowModel]) -> None:
    server, gw, model = slow
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/chat/completions", json=BODY, timeout=0.3)
    assert model.cancelled.wait(3)
    deadline = time.monotonic() + 3
    while not (found := spans(gw)) and time.monotonic() < deadline:
        time.sleep(0.05)
    [span] = found
    assert (span.status, span.error_type, span.error_message) == ("error", "Cancelled", "client disconnected")


def test_a_stream_dropped_halfway_stops_the_upstream_stream(slow: tuple[Server, Gateway, SlowModel]) -> None:
    server, gw, model = slow
    with httpx.stream("POST", f"{server.url}/chat/completions", json={**BODY, "stream": True}) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        received = [next(lines) for _ in range(6)]
    assert any(line.startswith("data: ") for line in received)
    assert model.cancelled.wait(3)
    sent = model.sent
    time.sleep(0.3)
    assert model.sent == sent < model.pieces  # nothing more is pulled from upstream
    deadline = time.monotonic() + 3
    while not (found := spans(gw)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [(s.status, s.error_type) for s in found] == [("error", "Cancelled")]
    assert "the caller went away" in (found[0].error_message or "")


def test_the_openai_sdk_sees_a_clear_timeout_error() -> None:
    server, gw = serve(SlowModel(delay=5), request_timeout_s=0.2)
    try:
        client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0)
        with pytest.raises(openai.APIStatusError, match="request_timeout_s") as caught:
            client.chat.completions.create(model="slow", messages=[{"role": "user", "content": "hi"}])
        assert caught.value.status_code == 504
    finally:
        server.stop()
        gw.close()


# --- as a process: draining on SIGTERM, JSON logs -------------------------------------------------

SLOW_TOML = """
default_model = "slow"
[models.slow]
provider = "test"
model = "slow"
script = ["finished"]
delay_s = 1.5
[server]
log_format = "json"
"""


def test_sigterm_drains_in_flight_requests_and_logs_json(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "KEEL_CONFIG": str(write_config(tmp_path, SLOW_TOML)), "KEEL_STORE": str(tmp_path / "k.db")}
    keel = Path(sys.executable).with_name("keel")
    proc = subprocess.Popen(
        [str(keel), "serve", "--port", str(port), "--log-level", "info"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    results: list[httpx.Response] = []
    try:
        _wait_ready(f"http://127.0.0.1:{port}/healthz", proc)
        call = threading.Thread(
            target=lambda: results.append(
                httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json={**BODY}, timeout=10)
            )
        )
        call.start()
        time.sleep(0.5)  # the request is in flight
        proc.send_signal(signal.SIGTERM)
        call.join(10)
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert [r.status_code for r in results] == [200]
    assert results[0].json()["choices"][0]["message"]["content"] == "finished"
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0  # the process is gone
    records = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert records, err
    assert {"time", "level", "logger", "message"} <= records[0].keys()
    access = [r for r in records if r["logger"] == "keel.access"]
    assert [(r["path"], r["status"]) for r in access] == [("/v1/chat/completions", 200)]  # health checks: debug
    assert access[0]["duration_ms"] >= 1000
    import sqlite3

    rows = sqlite3.connect(tmp_path / "k.db").execute("SELECT status FROM spans").fetchall()
    assert rows == [("ok",)]  # the drained request's span was flushed before exit


def test_a_stream_past_the_request_timeout_ends_with_an_error_event() -> None:
    model = SlowModel(pieces=200, every=0.05)
    server, gw = serve(model, request_timeout_s=0.5)
    try:
        with httpx.stream("POST", f"{server.url}/chat/completions", json={**BODY, "stream": True}) as response:
            assert response.status_code == 200
            events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert "request_timeout_s" in json.loads(events[-2])["error"]["message"]
        assert model.cancelled.wait(2) and model.sent < model.pieces
        deadline = time.monotonic() + 3
        while not (found := spans(gw)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [(s.error_type, s.error_message) for s in found] == [("Cancelled", "request timeout")]
    finally:
        server.stop()
        gw.close()


def test_the_access_log_quotes_the_path(
    slow: tuple[Server, Gateway, SlowModel], caplog: pytest.LogCaptureFixture
) -> None:
    server, _, _ = slow
    with caplog.at_level("INFO", logger="keel.access"):
        httpx.get(f"{server.base}/x%0AWARNING%20forged%20line")
        deadline = time.monotonic() + 5  # the line is written once the answer is sent: the client may be first
        while not any(r.name == "keel.access" for r in caplog.records) and time.monotonic() < deadline:
            time.sleep(0.01)
    [record] = [r for r in caplog.records if r.name == "keel.access"]
    assert "\n" not in record.getMessage() and "/x%0AWARNING%20forged%20line" in record.getMessage()
