"""A scripted OpenAI-compatible HTTP server for tests, run in a thread.

Tests push the answers they want (`stub.push(...)`): a JSON body with a
status and headers, a list of stream chunks, a delay, or a dropped
connection. The faults of a flaky upstream are scriptable too: a stream
without `[DONE]` (`done=False`), an error event as a chunk (`stream_error`),
raw SSE bytes as a chunk, and a non-SSE body (`raw`) to a stream request.
With nothing pushed it answers a fixed completion. Every request body it
receives is recorded in `stub.requests`.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def completion(
    text: str = "Hello from the stub.",
    *,
    model: str = "gpt-4o-mini-2024-07-18",
    prompt_tokens: int = 12,
    completion_tokens: int = 5,
    cached_tokens: int = 0,
    reasoning_tokens: int = 0,
    tool_calls: list[dict[str, Any]] | None = None,
    finish_reason: str | None = None,
) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": text if not tool_calls else None}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {
        "id": "chatcmpl-stub",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": 0, "message": message, "finish_reason": finish_reason or ("tool_calls" if tool_calls else "stop")}
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens},
            "completion_tokens_details": {"reasoning_tokens": reasoning_tokens},
        },
    }


def error_body(message: str, type_: str = "invalid_request_error", code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


def stream_error(message: str, type_: str = "server_error", code: str | int | None = None) -> dict[str, Any]:
    """An error event inside a 200 stream, as OpenAI (and vLLM, LiteLLM...) send it: `data: {"error": ...}`."""
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


def stream_chunks(text: str, *, model: str = "gpt-4o-mini-2024-07-18", pieces: int = 3) -> list[dict[str, Any]]:
    size = max(1, len(text) // pieces)
    parts = [text[i : i + size] for i in range(0, len(text), size)]
    base = {"id": "chatcmpl-stub", "object": "chat.completion.chunk", "created": 0, "model": model}
    chunks = [{**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}]
    chunks += [{**base, "choices": [{"index": 0, "delta": {"content": p}, "finish_reason": None}]} for p in parts]
    chunks.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    chunks.append(
        {
            **base,
            "choices": [],
            "usage": {"prompt_tokens": 9, "completion_tokens": len(parts), "total_tokens": 9 + len(parts)},
        }
    )
    return chunks


@dataclass
class Scripted:
    body: Any = None
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    stream: list[Any] | None = None  # chunks (dicts, raw SSE bytes) or "DROP" to cut the connection mid-stream
    raw: bytes | None = None  # a body that is not JSON (also answers a stream request, as a plain 200)
    done: bool = True  # end the stream with `data: [DONE]`


class OpenAIStub:
    def __init__(self) -> None:
        self.script: deque[Scripted] = deque()
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        app = Starlette(
            routes=[
                Route("/v1/chat/completions", self._chat, methods=["POST"]),
                Route("/v1/embeddings", self._embeddings, methods=["POST"]),
                Route("/v1/models", self._models, methods=["GET"]),
            ]
        )
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> OpenAIStub:
        self.thread.start()
        deadline = time.time() + 10
        while not self.server.started:
            if time.time() > deadline:
                raise RuntimeError("stub server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=5)

    def push(self, *items: Scripted | dict[str, Any]) -> None:
        for item in items:
            self.script.append(item if isinstance(item, Scripted) else Scripted(body=item))

    async def _next(self, request: Request) -> tuple[Scripted, dict[str, Any]]:
        body = json.loads(await request.body() or b"{}")
        self.requests.append(body)
        self.headers.append(dict(request.headers))
        item = self.script.popleft() if self.script else Scripted(body=completion())
        if item.delay:
            await asyncio.sleep(item.delay)
        return item, body

    def _plain(self, item: Scripted) -> Response:
        if item.raw is not None:
            return Response(item.raw, status_code=item.status, headers=item.headers, media_type="application/json")
        return JSONResponse(item.body, status_code=item.status, headers=item.headers)

    async def _chat(self, request: Request) -> Response:
        item, body = await self._next(request)
        if body.get("stream") and item.status == 200 and item.raw is None:
            chunks = (
                item.stream
                if item.stream is not None
                else stream_chunks((item.body or completion())["choices"][0]["message"]["content"] or "")
            )
            return StreamingResponse(self._sse(chunks, item.done), media_type="text/event-stream")
        return self._plain(item)

    async def _sse(self, chunks: list[Any], done: bool) -> Any:
        for chunk in chunks:
            if chunk == "DROP":
                raise ConnectionResetError("stub drops the stream")
            yield chunk if isinstance(chunk, bytes) else f"data: {json.dumps(chunk)}\n\n".encode()
            await asyncio.sleep(0)
        if done:
            yield b"data: [DONE]\n\n"

    async def _embeddings(self, request: Request) -> Response:
        item, body = await self._next(request)
        if item.body is not None and item.status != 200:
            return self._plain(item)
        inputs = body.get("input") or []
        data = [
            {"object": "embedding", "index": i, "embedding": [float(len(t)), 1.0, 0.5]} for i, t in enumerate(inputs)
        ]
        return JSONResponse(
            {
                "object": "list",
                "data": data,
                "model": body.get("model"),
                "usage": {"prompt_tokens": 7, "total_tokens": 7},
            }
        )

    async def _models(self, request: Request) -> Response:
        return JSONResponse(
            {"object": "list", "data": [{"id": "gpt-4o-mini", "object": "model", "created": 0, "owned_by": "stub"}]}
        )
