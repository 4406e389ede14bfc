"""The fastest OpenAI-compatible server we can write in Python: a fixed answer.

A raw asyncio protocol speaking just enough HTTP/1.1 (keep-alive, pipelining,
Content-Length bodies) to answer `POST .../chat/completions` with one
pre-encoded chat.completion (with usage), and 404 to anything else. No JSON
parsing, no routing table, no sleep unless asked (`--delay-ms`, a fixed delay
before each answer, to model an upstream's latency): the benchmark measures the
clients, so the server must cost as little as possible. It runs as its own process (see
`StubProcess`) so that it never competes with the clients for the GIL.

Measured here against uvicorn + starlette (h11; httptools is not installed)
with the openai SDK as client: see benchmarks/README.md.

Run alone: `python benchmarks/_stub.py [--port N] [--delay-ms MS] [--uvicorn]`; it prints
`READY <port>` once listening and stops on SIGTERM or when stdin closes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

COMPLETION: dict[str, Any] = {
    "id": "chatcmpl-bench",
    "object": "chat.completion",
    "created": 1_700_000_000,
    "model": "gpt-4o-mini-2024-07-18",
    "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "Hello from the stub."}, "finish_reason": "stop"}
    ],
    "usage": {
        "prompt_tokens": 21,
        "completion_tokens": 5,
        "total_tokens": 26,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0},
    },
}
BODY = json.dumps(COMPLETION, separators=(",", ":")).encode()


def _response(status: str, body: bytes) -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
        "connection: keep-alive\r\n\r\n"
    )
    return head.encode() + body


OK = _response("200 OK", BODY)
NOT_FOUND = _response("404 Not Found", b'{"error":{"message":"not found","type":"invalid_request_error"}}')
BAD = _response("400 Bad Request", b'{"error":{"message":"only Content-Length bodies","type":"invalid_request_error"}}')


class StubProtocol(asyncio.Protocol):
    """One connection: parse request heads and bodies out of a buffer, answer each."""

    delay_s = 0.0  # answer this long after the request (in order: every answer waits the same)

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            head = bytes(self.buffer[:end]).lower()
            length = 0
            close = b"\r\nconnection: close" in head
            if b"transfer-encoding: chunked" in head:
                self._answer(BAD, close=True)
                return
            if (at := head.find(b"\r\ncontent-length:")) >= 0:
                line_end = head.find(b"\r\n", at + 2)
                length = int(head[at + 17 : line_end if line_end >= 0 else None])
            total = end + 4 + length
            if len(self.buffer) < total:
                return  # the body is still on its way
            request_line = head[: head.find(b"\r\n")] if b"\r\n" in head else head
            del self.buffer[:total]
            ok = request_line.startswith(b"post ") and b"/chat/completions" in request_line
            self._answer(OK if ok else NOT_FOUND, close=close)
            if close:
                return

    def _answer(self, response: bytes, *, close: bool) -> None:
        if self.delay_s > 0:
            asyncio.get_running_loop().call_later(self.delay_s, self._write, response, close)
        else:
            self._write(response, close)

    def _write(self, response: bytes, close: bool) -> None:
        assert self.transport is not None
        if self.transport.is_closing():
            return  # the client went away while we waited
        self.transport.write(response)
        if close:
            self.transport.close()


async def serve_raw(port: int, delay_ms: float = 0.0) -> None:
    StubProtocol.delay_s = delay_ms / 1000
    loop = asyncio.get_running_loop()
    server = await loop.create_server(StubProtocol, "127.0.0.1", port, backlog=1024, reuse_address=True)
    bound = server.sockets[0].getsockname()[1]
    await _run_until_stopped(loop, bound)
    server.close()


async def serve_uvicorn(port: int) -> None:
    """The same answer from uvicorn + starlette, to compare stub speeds."""
    import socket

    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route

    async def chat(_: Any) -> Response:
        return Response(BODY, media_type="application/json")

    app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    config = uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False, backlog=1024)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        await asyncio.sleep(0.01)
    await _run_until_stopped(asyncio.get_running_loop(), sock.getsockname()[1])
    server.should_exit = True
    await task


async def _run_until_stopped(loop: asyncio.AbstractEventLoop, port: int) -> None:
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    # stdin closing means the benchmark died: never outlive it
    loop.add_reader(sys.stdin.fileno(), lambda: stop.set() if not os.read(sys.stdin.fileno(), 1024) else None)
    print(f"READY {port}", flush=True)
    await stop.wait()


def package_version(package: str) -> str:
    """The installed version of `package` for a benchmark's report, "-" when it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "-"


def stop_group(process: subprocess.Popen[Any]) -> None:
    """SIGTERM to the process group of `process` (started with start_new_session=True), so a server and its
    workers shut down gracefully and flush what they hold; SIGKILL after 60 s."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


class StubProcess:
    """Starts the stub in a child process on a free loopback port; a context manager."""

    def __init__(self, *, uvicorn: bool = False, delay_ms: float = 0.0) -> None:
        if uvicorn and delay_ms:
            raise ValueError("--delay-ms is for the raw stub only")
        self.uvicorn = uvicorn
        self.delay_ms = delay_ms
        self.process: subprocess.Popen[str] | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> StubProcess:
        args = [sys.executable, str(Path(__file__).resolve()), "--port", "0", "--delay-ms", str(self.delay_ms)]
        args += ["--uvicorn"] if self.uvicorn else []
        self.process = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line.startswith("READY "):
            self.stop()
            raise RuntimeError(f"the stub did not start (said {line!r})")
        self.port = int(line.split()[1])
        return self

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                stream.close()
        self.process = None

    def __enter__(self) -> StubProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--port", type=int, default=0, help="0: any free port (printed as READY <port>)")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="wait this long before each answer (default 0)")
    parser.add_argument("--uvicorn", action="store_true", help="serve with uvicorn + starlette instead")
    args = parser.parse_args()
    if args.uvicorn and args.delay_ms:
        parser.error("--delay-ms is for the raw stub only")
    asyncio.run(serve_uvicorn(args.port) if args.uvicorn else serve_raw(args.port, args.delay_ms))


if __name__ == "__main__":
    main()
