"""In-process HTTP stubs that speak the Anthropic and Gemini wire APIs.

Adapter tests drive the official SDKs (`anthropic`, `google-genai`) against
these stubs instead of mocking the SDKs, so the request bodies, headers, SSE
framing and error handling are exercised exactly as in production, without a
network. A test scripts the next replies (JSON body, status, headers, an SSE
stream, a delay, a dropped connection) and reads back the requests received.

The wire shapes follow the installed SDK sources (anthropic `types/raw_*`,
`_streaming.py`; google.genai `_api_client.py` SSE reader, `types.py`).
"""

from __future__ import annotations

import json
import socket
import struct
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from keel.types import ResponseFormat, Tool

__all__ = [
    "RecordedRequest",
    "Reply",
    "StubServer",
    "anthropic_error",
    "anthropic_message",
    "anthropic_stream",
    "closed_port_url",
    "gemini_embeddings",
    "gemini_error",
    "gemini_response",
    "gemini_stream",
    "sse",
]


@dataclass
class Reply:
    """One scripted answer.

    `body` is JSON-encoded unless it is `bytes` (sent as is, for malformed
    answers). `events` makes a chunked SSE answer instead; `abort` then drops
    the connection after the events, without the final chunk. `reset` drops
    the connection (TCP RST) before answering. `delay` waits before the status
    line; `event_delay` waits before each event.
    """

    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    events: Sequence[bytes] | None = None
    delay: float = 0.0
    event_delay: float = 0.0
    reset: bool = False
    abort: bool = False


@dataclass
class RecordedRequest:
    method: str
    path: str  # without the query string
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-case names
    raw: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.raw)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # quiet test output
        pass

    def do_POST(self) -> None:
        self._handle()

    def do_GET(self) -> None:
        self._handle()

    def _handle(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        raw = self.rfile.read(length) if length else b""
        parts = urlsplit(self.path)
        stub = self.server.stub
        stub.requests.append(
            RecordedRequest(
                self.command, parts.path, parse_qs(parts.query), {k.lower(): v for k, v in self.headers.items()}, raw
            )
        )
        reply = stub.next_reply()
        if reply.delay and stub.stopping.wait(reply.delay):
            return
        if reply.reset:
            self._reset()
        elif reply.events is not None:
            self._send_stream(reply)
        else:
            self._send_body(reply)

    def _reset(self) -> None:
        # SO_LINGER 0 makes close() send RST: the client sees "connection reset".
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True

    def _send_body(self, reply: Reply) -> None:
        body = reply.body if isinstance(reply.body, bytes) else json.dumps(reply.body).encode()
        self.send_response(reply.status)
        headers = {"content-type": "application/json", **reply.headers}
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()

    def _send_stream(self, reply: Reply) -> None:
        self.send_response(reply.status)
        headers = {"content-type": "text/event-stream", "cache-control": "no-cache", **reply.headers}
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        for event in reply.events or ():
            if reply.event_delay and self.server.stub.stopping.wait(reply.event_delay):
                return
            self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
            self.wfile.flush()
        if reply.abort:
            self._reset()
            return
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    stub: StubServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients that time out or drop a stream reset the connection: expected here.
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


class StubServer:
    """A scripted HTTP server on 127.0.0.1 in a background thread.

    Replies are served in order; the last scripted reply is not repeated: an
    unscripted request gets a 599 so a test notices it.
    """

    def __init__(self) -> None:
        self.requests: list[RecordedRequest] = []
        self.stopping = threading.Event()
        self._replies: list[Reply] = []
        self._lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.stub = self
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> StubServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> StubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def reset(self) -> None:
        with self._lock:
            self._replies.clear()
            self.requests.clear()

    def push(self, *replies: Reply) -> None:
        with self._lock:
            self._replies.extend(replies)

    def reply_json(self, body: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> None:
        self.push(Reply(status=status, body=body, headers=dict(headers or {})))

    def reply_stream(self, events: Sequence[bytes], **kwargs: Any) -> None:
        self.push(Reply(events=events, **kwargs))

    def next_reply(self) -> Reply:
        with self._lock:
            if self._replies:
                return self._replies.pop(0)
        return Reply(status=599, body={"error": {"message": "the stub has no scripted reply"}})

    @property
    def last(self) -> RecordedRequest:
        return self.requests[-1]


def closed_port_url() -> str:
    """A base URL where nothing listens: connections are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def sse(data: Any, event: str | None = None) -> bytes:
    """One server-sent event; `data` is JSON-encoded unless it is bytes."""
    payload = data if isinstance(data, bytes) else json.dumps(data).encode()
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + payload + b"\n\n"


# --- Anthropic Messages API (POST /v1/messages) -----------------------------------


def _anthropic_usage(usage: Mapping[str, int] | None) -> dict[str, int]:
    base = {"input_tokens": 10, "output_tokens": 5, "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0}
    return {**base, **(usage or {})}


def _anthropic_blocks(text: str | None, tool_uses: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = [{"type": "text", "text": text}] if text is not None else []
    blocks += [{"type": "tool_use", "id": t["id"], "name": t["name"], "input": t.get("input", {})} for t in tool_uses]
    return blocks


def anthropic_message(
    text: str | None = "Hello!",
    *,
    tool_uses: Sequence[Mapping[str, Any]] = (),
    stop_reason: str = "end_turn",
    usage: Mapping[str, int] | None = None,
    model: str = "claude-test-1",
) -> dict[str, Any]:
    """A Messages API answer; `tool_uses` items are {"id", "name", "input"}."""
    return {
        "id": "msg_01",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": _anthropic_blocks(text, tool_uses),
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": _anthropic_usage(usage),
    }


def _anthropic_tool_events(index: int, tool: Mapping[str, Any], pieces: Sequence[str]) -> Iterator[bytes]:
    block = {"type": "tool_use", "id": tool["id"], "name": tool["name"], "input": {}}
    yield sse({"type": "content_block_start", "index": index, "content_block": block}, "content_block_start")
    for piece in pieces:
        delta = {"type": "input_json_delta", "partial_json": piece}
        yield sse({"type": "content_block_delta", "index": index, "delta": delta}, "content_block_delta")
    yield sse({"type": "content_block_stop", "index": index}, "content_block_stop")


def anthropic_stream(
    text_pieces: Sequence[str] = ("Hel", "lo", "!"),
    *,
    tool_uses: Sequence[Mapping[str, Any]] = (),
    stop_reason: str = "end_turn",
    usage: Mapping[str, int] | None = None,
    model: str = "claude-test-1",
    ping: bool = True,
    stop: bool = True,
) -> list[bytes]:
    """The SSE events of a streamed answer.

    `tool_uses` items are {"id", "name", "pieces": [partial JSON strings]}.
    message_start carries the input usage; message_delta the final output count.
    """
    full = _anthropic_usage(usage)
    start_usage = {**full, "output_tokens": 1}
    message = {**anthropic_message(None, model=model), "content": [], "stop_reason": None, "usage": start_usage}
    events = [sse({"type": "message_start", "message": message}, "message_start")]
    if ping:
        events.append(sse({"type": "ping"}, "ping"))
    index = 0
    if text_pieces:
        events.append(
            sse(
                {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
                "content_block_start",
            )
        )
        for piece in text_pieces:
            delta = {"type": "text_delta", "text": piece}
            events.append(sse({"type": "content_block_delta", "index": 0, "delta": delta}, "content_block_delta"))
        events.append(sse({"type": "content_block_stop", "index": 0}, "content_block_stop"))
        index = 1
    for offset, tool in enumerate(tool_uses):
        events += _anthropic_tool_events(index + offset, tool, tool.get("pieces", ()))
    delta_usage = {"output_tokens": full["output_tokens"]}
    message_delta = {"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": None}}
    events.append(sse({**message_delta, "usage": delta_usage}, "message_delta"))
    if stop:
        events.append(sse({"type": "message_stop"}, "message_stop"))
    return events


_ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


def anthropic_error(status: int, message: str = "boom", headers: Mapping[str, str] | None = None) -> Reply:
    body = {"type": "error", "error": {"type": _ANTHROPIC_ERROR_TYPES.get(status, "api_error"), "message": message}}
    return Reply(status=status, body=body, headers={"request-id": "req_01", **(headers or {})})


# --- Gemini API (POST /v1beta/models/{model}:generateContent, ...) ------------------


def _gemini_usage(usage: Mapping[str, int] | None) -> dict[str, int]:
    base = {"promptTokenCount": 10, "candidatesTokenCount": 5, "totalTokenCount": 15}
    return {**base, **(usage or {})}


def gemini_response(
    text: str | None = "Hello!",
    *,
    function_calls: Sequence[Mapping[str, Any]] = (),
    finish_reason: str | None = "STOP",
    usage: Mapping[str, int] | None = None,
    model_version: str = "gemini-test-001",
    thought: str | None = None,
) -> dict[str, Any]:
    """A generateContent answer. `function_calls` items are {"name", "args", ["id"], ["thoughtSignature"]}."""
    parts: list[dict[str, Any]] = [{"text": thought, "thought": True}] if thought else []
    if text is not None:
        parts.append({"text": text})
    for call in function_calls:
        part: dict[str, Any] = {"functionCall": {k: v for k, v in call.items() if k in ("name", "args", "id")}}
        if "thoughtSignature" in call:
            part["thoughtSignature"] = call["thoughtSignature"]
        parts.append(part)
    candidate: dict[str, Any] = {"content": {"role": "model", "parts": parts}, "index": 0}
    if finish_reason is not None:
        candidate["finishReason"] = finish_reason
    out: dict[str, Any] = {"candidates": [candidate], "modelVersion": model_version, "responseId": "resp_01"}
    if usage is not None or finish_reason is not None:
        out["usageMetadata"] = _gemini_usage(usage)
    return out


def gemini_stream(chunks: Sequence[Mapping[str, Any]]) -> list[bytes]:
    """`?alt=sse` framing: each chunk is one `data:` line of a GenerateContentResponse."""
    return [b"data: " + json.dumps(chunk).encode() + b"\r\n\r\n" for chunk in chunks]


_GEMINI_STATUS_NAMES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    408: "DEADLINE_EXCEEDED",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
}


def gemini_error(
    status: int,
    message: str = "boom",
    headers: Mapping[str, str] | None = None,
    details: Sequence[Mapping[str, Any]] = (),
) -> Reply:
    error: dict[str, Any] = {"code": status, "message": message, "status": _GEMINI_STATUS_NAMES.get(status, "UNKNOWN")}
    if details:
        error["details"] = list(details)
    return Reply(status=status, body={"error": error}, headers=dict(headers or {}))


def gemini_embeddings(vectors: Sequence[Sequence[float]], usage: Mapping[str, int] | None = None) -> dict[str, Any]:
    """A batchEmbedContents answer."""
    out: dict[str, Any] = {"embeddings": [{"values": list(v)} for v in vectors]}
    if usage is not None:
        out["usageMetadata"] = dict(usage)
    return out


# --- shared by the provider test modules ---------------------------------------------------

WEATHER = Tool("get_weather", "Weather of a city", {"type": "object", "properties": {"city": {"type": "string"}}})
PERSON = ResponseFormat(
    "person", {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}}}
)
