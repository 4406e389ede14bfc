"""The edge of every request: authentication, a bounded body, one access-log line.

A plain ASGI middleware (no per-request objects beyond what it needs), so
the hot path stays cheap. A request it refuses gets OpenAI's error shape,
and a refused model call (`/v1/...`) is recorded as a failed span, so the
trace, the metrics and the dashboard see it like any other failure.
"""

from __future__ import annotations

import logging
import time
from urllib.parse import quote

from starlette.datastructures import State
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from keel.errors import BodyTooLarge, InputError, KeelError
from keel.gateway import Gateway
from keel.server.auth import KeyRing, Presented, is_proxy_header
from keel.server.errors import keel_error_response

__all__ = ["EdgeMiddleware", "trace_refusal"]

access_log = logging.getLogger("keel.access")

PUBLIC = frozenset({"/", "/healthz", "/readyz", "/favicon.ico", "/openapi.json", "/docs"})
QUIET = frozenset({"/healthz", "/readyz", "/metrics"})  # probes and scrapes: access-logged at debug only
MODEL_PATHS = frozenset({"/v1/chat/completions", "/v1/embeddings"})


def trace_refusal(gateway: Gateway, path: str, error: KeelError, key: str | None, model: str | None = None) -> None:
    """A model call refused before it reached the gateway (auth, body, validation) is a failed span too.

    Its operation is "http", not "chat": it is in the trace list, the metrics and the logs, but not in
    the model statistics or alert rules, which anyone without a key could otherwise skew.
    """
    if path not in MODEL_PATHS:
        return
    span = gateway.tracer.start(f"POST {path}")
    span.set(gen_ai__operation__name="http", http__request__method="POST", url__path=path)
    span.set(http__response__status_code=error.http_status)
    if model:
        span.set(gen_ai__request__model=model)
    if key is not None:
        span.attributes["keel.api_key"] = key
    span.fail(error)
    gateway.tracer.finish(span)


class EdgeMiddleware:
    """Reads the key ring and gateway from the app's state, where the lifespan puts them."""

    def __init__(self, app: ASGIApp, *, state: State, max_body_bytes: int) -> None:
        self.app = app
        self.state = state
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        path: str = scope["path"]
        status = 0
        key: str | None = None

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if path not in PUBLIC and not path.startswith("/static/"):
                headers = _headers(scope)
                client = scope.get("client")
                keyring: KeyRing = self.state.keyring
                presented = Presented(
                    authorization=headers.get("authorization"), client=client[0] if client else None,
                    host=headers.get("host"), origin=headers.get("origin"), forwarded=keyring.open and _proxied(scope),
                )  # fmt: skip
                try:
                    who = await keyring.authenticate(presented)
                    key = who.key
                    receive = await self._bounded(headers, receive)
                except KeelError as error:
                    trace_refusal(self.state.gateway, path, error, key)
                    await keel_error_response(error)(scope, receive, send_status)
                    return
                scope.setdefault("state", {})["caller"] = who
            await self.app(scope, receive, send_status)
        finally:
            level = logging.DEBUG if path in QUIET else logging.INFO
            if access_log.isEnabledFor(level):
                access_log.log(
                    level,
                    "%s %s %d %.1f ms",
                    scope["method"], quote(path), status, (time.perf_counter() - started) * 1000,
                    extra={"method": scope["method"], "path": quote(path), "status": status, "key": key,
                           "duration_ms": round((time.perf_counter() - started) * 1000, 2)},
                )  # fmt: skip

    async def _bounded(self, headers: dict[str, str], receive: Receive) -> Receive:
        """Refuse a body over the limit: by its Content-Length, or, when chunked, by reading it first.

        With Transfer-Encoding the body is framed by its chunks whatever Content-Length says, so it is
        always counted then."""
        length = headers.get("content-length")
        chunked = "transfer-encoding" in headers
        if length is not None and not chunked:
            if not length.isdigit():
                raise InputError("Content-Length is not a number")
            if int(length) > self.max_body_bytes:
                raise BodyTooLarge(f"request body of {int(length)} bytes is over the limit of {self.max_body_bytes}")
            return receive
        if not chunked:
            return receive
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body_bytes:
                raise BodyTooLarge(f"request body is over the limit of {self.max_body_bytes} bytes")
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay


def _headers(scope: Scope) -> dict[str, str]:
    wanted = (b"authorization", b"content-length", b"transfer-encoding", b"host", b"origin")
    return {k.decode().lower(): v.decode("latin-1") for k, v in scope["headers"] if k.lower() in wanted}


def _proxied(scope: Scope) -> bool:
    """Whether any header says a proxy or relay stands in front (the open mode then refuses)."""
    return any(is_proxy_header(k.decode("latin-1")) for k, _ in scope["headers"])
