"""The keel server: an OpenAI-compatible API over the same gateway.

`POST /v1/chat/completions` (plain and server-sent events),
`POST /v1/embeddings`, `GET /v1/models` and `GET /v1/models/{id}`, so the official `openai` SDK works unchanged with
`base_url` pointed here. Errors use OpenAI's error shape with the status of
the keel error. Every response carries `x-keel-trace-id`.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import json
import logging
import struct
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from keel.alerts import start_alerts
from keel.config import Config, load_config
from keel.errors import InputError, KeelError, NoSuchModel, ProviderTimeout
from keel.gateway import ChatStream, Gateway
from keel.server import admin
from keel.server.auth import KeyRing, caller, require_admin
from keel.server.bodies import JSONBodyRoute
from keel.server.calls import attribution, guarded, logprobs_body
from keel.server.dashboard import dashboard_router, start_online_quality
from keel.server.errors import (
    error_body,
    error_response,
    http_error_response,
    keel_error_response,
    validation_error,
)
from keel.server.metrics import CONTENT_TYPE_LATEST, GatewayMetrics
from keel.server.middleware import EdgeMiddleware, trace_refusal
from keel.server.rag import rag_router
from keel.server.schemas import ChatCompletionRequest, EmbeddingRequest
from keel.types import ChatResult, StreamDelta

__all__ = ["create_app"]

T = TypeVar("T")


log = logging.getLogger("uvicorn.error")  # shown with uvicorn's own start-up lines


def _response_model(fmt: dict[str, Any] | None) -> dict[str, Any] | None:
    if not fmt or fmt.get("type") in (None, "text"):
        return None
    if fmt.get("type") == "json_object":
        return {"type": "object"}
    if fmt.get("type") == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise InputError("response_format.json_schema.schema must be a JSON schema object")
        return schema
    raise InputError(f"response_format.type {fmt.get('type')!r} is not supported (text, json_object, json_schema)")


def _tool_choice(choice: str | dict[str, Any] | None) -> str | None:
    if isinstance(choice, dict):
        function = choice.get("function")
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise InputError('tool_choice must be a string or {"type": "function", "function": {"name": ...}}')
        return str(function["name"])
    return choice


def _usage(result: ChatResult) -> dict[str, Any]:
    u = result.usage
    usage: dict[str, Any] = {
        "prompt_tokens": u.input_tokens,
        "completion_tokens": u.output_tokens,
        "total_tokens": u.total_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_input_tokens},
        "completion_tokens_details": {"reasoning_tokens": u.reasoning_tokens},
    }
    if u.estimated:  # the upstream sent no usage: keel counted the tokens (and charged them)
        usage["estimated"] = True
    return usage


def _message(result: ChatResult) -> dict[str, Any]:
    message: dict[str, Any] = {
        "role": "assistant",
        "content": result.text if result.text or not result.tool_calls else None,
    }
    if result.tool_calls:
        message["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in result.tool_calls
        ]
    return message


def _choice(result: ChatResult) -> dict[str, Any]:
    logprobs = logprobs_body(result.logprobs)
    return {"index": 0, "message": _message(result), "finish_reason": result.finish_reason, "logprobs": logprobs}


def completion_body(result: ChatResult, created: int) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{result.span_id}",
        "object": "chat.completion",
        "created": created,
        "model": result.model,
        "choices": [_choice(result)],
        "usage": _usage(result),
    }


def _headers(result: ChatResult) -> dict[str, str]:
    headers = {"x-keel-trace-id": result.trace_id, "x-keel-model": result.model}
    if result.cost_usd is not None:
        headers["x-keel-cost-usd"] = f"{result.cost_usd:.8f}"
    return headers


class Deadline:
    """`with Deadline(when, reason):` cancels the block at loop time `when`, with the reason as the
    cancellation's message (asyncio.timeout gives none, so a span would not say why), then raises
    ProviderTimeout."""

    def __init__(self, when: float, reason: str) -> None:
        self.when, self.reason = when, reason
        self.fired = False

    def __enter__(self) -> Deadline:
        task = asyncio.current_task()
        assert task is not None

        def fire() -> None:
            self.fired = True
            task.cancel(self.reason)

        self.handle = asyncio.get_running_loop().call_at(self.when, fire)
        self.task = task
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: object) -> None:
        self.handle.cancel()
        if self.fired and kind is asyncio.CancelledError and self.task.uncancel() == 0:
            raise ProviderTimeout(f"the stream took longer than server.request_timeout_s ({self.reason})") from None


def _call_kwargs(body: ChatCompletionRequest, request: Request) -> dict[str, Any]:
    messages = [m.model_dump(exclude_none=True) for m in body.messages]
    for m in messages:
        if m["role"] == "developer":
            m["role"] = "system"
    return {
        "messages": messages,
        "model": body.model,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "max_tokens": body.max_completion_tokens or body.max_tokens,
        "stop": body.stop,
        "seed": body.seed,
        "tools": body.tools,
        "tool_choice": _tool_choice(body.tool_choice),
        "logprobs": bool(body.logprobs),
        "top_logprobs": body.top_logprobs,
        "context": attribution(request, caller(request).key, body.user, body.metadata),
    }


def _model_entry(gw: Gateway, name: str) -> dict[str, Any]:
    """An OpenAI model object; one that cannot be called as configured (its API key is not set) stays listed,
    with `available: false` and the reason: SDKs ignore the extra fields, and a caller sees why it fails."""
    entry: dict[str, Any] = {"id": name, "object": "model", "created": 0, "owned_by": "keel", "available": True}
    resolved = gw.resolve(name)
    if resolved not in gw._extra and (reason := gw.config.unavailable(resolved)):  # an injected model needs no key
        entry.update(available=False, unavailable_reason=reason)
    return entry


def _base64_floats(vector: list[float]) -> str:
    """OpenAI's base64 embedding encoding: little-endian float32."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


def _sse(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


def _chunk(
    cid: str, created: int, model: str, delta: dict[str, Any], finish: str | None = None,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:  # fmt: skip
    return {
        "id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": logprobs}],
    }  # fmt: skip


def _delta_body(delta: StreamDelta) -> dict[str, Any]:
    if delta.tool_call_index is None:
        return {"content": delta.text}
    call: dict[str, Any] = {"index": delta.tool_call_index, "function": {"arguments": delta.tool_arguments}}
    if delta.tool_call_id:
        call["id"] = delta.tool_call_id
        call["type"] = "function"
    if delta.tool_name:
        call["function"]["name"] = delta.tool_name
    return {"tool_calls": [call]}


async def _open_stream(
    gw: Gateway, kwargs: dict[str, Any]
) -> tuple[ChatStream, AsyncIterator[StreamDelta], list[StreamDelta]]:
    """Start a stream and wait for its first piece, so that a refused request (bad input, unknown
    model, limits, an upstream that fails at once) gets a real HTTP status, not a 200 with an error event."""
    stream = gw.stream(kwargs.pop("messages"), kwargs.pop("model"), **kwargs)
    deltas = aiter(stream)
    try:
        first = [await anext(deltas)]
    except StopAsyncIteration:
        first = []
    return stream, deltas, first


async def _stream_events(
    stream: ChatStream,
    deltas: AsyncIterator[StreamDelta],
    first: list[StreamDelta],
    model: str,
    include_usage: bool,
    deadline: float,
) -> AsyncIterator[bytes]:
    """The SSE body. A client that goes away cancels this generator (Starlette watches for the
    disconnect), which closes the gateway's stream and so the upstream request."""
    created = int(time.time())
    cid = "chatcmpl-stream"
    try:
        yield _sse(_chunk(cid, created, model, {"role": "assistant", "content": ""}))
        for delta in first:
            yield _sse(_chunk(cid, created, model, _delta_body(delta), logprobs=logprobs_body(delta.logprobs or None)))
        while True:
            try:
                with Deadline(deadline, "request timeout"):
                    delta = await anext(deltas)
            except StopAsyncIteration:
                break
            yield _sse(_chunk(cid, created, model, _delta_body(delta), logprobs=logprobs_body(delta.logprobs or None)))
        result = stream.result
        assert result is not None
        yield _sse(_chunk(cid, created, result.model, {}, result.finish_reason))
        if include_usage:
            yield _sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": result.model,
                        "choices": [], "usage": _usage(result)})  # fmt: skip
    except KeelError as error:  # after the status line: an error event, never a clean stop
        type_ = "invalid_request_error" if error.http_status < 500 else "api_error"
        yield _sse(error_body(error.message, type_, error.code))
    except Exception:  # the status line is sent already: say so in the stream, and end it properly
        log.exception("stream failed")
        yield _sse(error_body("internal error", "api_error", "internal"))
    yield b"data: [DONE]\n\n"


def _visible_models(request: Request) -> list[str]:
    """The chat models and aliases configured, limited to what the caller's key may use."""
    gw: Gateway = request.app.state.gateway
    names = [n for n in gw.model_names if gw._model_config(n).kind == "chat"] + list(gw.config.aliases)
    key = caller(request).key
    allowed = gw.keys[key].models if key is not None and key in gw.keys else None
    if allowed is not None:  # a key sees the models it may use
        usable = {gw.resolve(m) for m in allowed}
        names = [n for n in names if gw.resolve(n) in usable]
    return names


def create_app(config: Config | None = None, *, gateway: Gateway | None = None) -> FastAPI:
    """The ASGI app; pass a gateway (tests) or let it build one from the configuration."""
    settings = (gateway.config if gateway else config or load_config()).server

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        gw = gateway or Gateway(config)
        app.state.gateway = gw
        metrics = GatewayMetrics(gw)
        gw.tracer.listeners.append(metrics.observe)
        app.state.metrics = metrics
        keyring = app.state.keyring = KeyRing(gw, admin_env=settings.admin_key_env, refresh_s=settings.key_refresh_s)
        await keyring.load()
        refresher = asyncio.create_task(keyring.run())
        alerts = start_alerts(gw.config, gw.store)  # None without [alerts.*] rules
        online = await start_online_quality(gw.config, gw.store)  # None unless [evals.online] samples calls
        log.info(
            "keel: %d models (default %s), store %s, OpenAI-compatible API at /v1, dashboard at /",
            len(gw.model_names), gw.config.default_model, gw.store.url if gw.store else "off",
        )  # fmt: skip
        # Start-up objects (SDKs, schemas, the app) never die: keep them out of the collector's full
        # passes, which otherwise scan them again and again under load (see docs/benchmarks.md).
        gc.collect()
        gc.freeze()
        if keyring.open:
            log.warning(
                "keel: no keys configured: answering localhost only, and only model calls (/v1). "
                "The dashboard's data, the admin API and /metrics need the admin key: set $%s to a secret "
                "and restart, then enter it in the dashboard. For other hosts, also create keys "
                "(keel keys create --name NAME)",
                settings.admin_key_env,
            )
        yield
        refresher.cancel()
        if alerts is not None:
            await alerts.aclose()
        if online is not None:
            await online.aclose()
        gw.tracer.listeners.remove(metrics.observe)
        if gateway is None:
            await gw.aclose()

    app = FastAPI(title="keel", version="0.1.0", lifespan=lifespan)
    app.router.route_class = JSONBodyRoute  # bodies parsed and checked before validation (server/bodies.py)
    app.state.settings = settings
    app.add_middleware(EdgeMiddleware, state=app.state, max_body_bytes=settings.max_body_bytes)
    app.include_router(admin.router())
    app.include_router(dashboard_router())
    app.include_router(rag_router())

    @app.exception_handler(KeelError)
    async def _keel_error(request: Request, error: KeelError) -> JSONResponse:
        return keel_error_response(error)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        message, param = validation_error(list(error.errors()))
        refusal = InputError(message)
        body = error.body if isinstance(error.body, dict) else {}
        model = body.get("model") if isinstance(body.get("model"), str) else None
        who = getattr(request.state, "caller", None)
        trace_refusal(request.app.state.gateway, request.url.path, refusal, getattr(who, "key", None), model)
        return error_response(400, refusal.message, "invalid_request_error", "invalid_request", param)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, error: HTTPException) -> JSONResponse:
        return http_error_response(error, request.method, request.url.path)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        """Still logged with its traceback by Starlette; the client gets the same shape as any error."""
        return error_response(500, "internal error", "api_error", "internal")

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        gw: Gateway = request.app.state.gateway
        kwargs = _call_kwargs(body, request)
        schema = _response_model(body.response_format)
        if body.stream:
            kwargs["response_model"] = schema  # streamed as text, validated at the end
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            model = kwargs["model"]
            deadline = asyncio.get_running_loop().time() + settings.request_timeout_s
            stream, deltas, first = await guarded(request, _open_stream(gw, kwargs), settings.request_timeout_s)
            events = _stream_events(stream, deltas, first, model, include_usage, deadline)
            return StreamingResponse(events, media_type="text/event-stream")
        call = gw.chat(kwargs.pop("messages"), kwargs.pop("model"), response_model=schema, **kwargs)
        result = await guarded(request, call, settings.request_timeout_s)
        return JSONResponse(completion_body(result, int(time.time())), headers=_headers(result))

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest, request: Request) -> JSONResponse:
        gw: Gateway = request.app.state.gateway
        texts = [body.input] if isinstance(body.input, str) else body.input
        if body.dimensions is not None:
            raise InputError("dimensions is not supported: keel returns the model's own size")
        call = gw.embed(texts, body.model, context=attribution(request, caller(request).key, body.user, None))
        result = await guarded(request, call, settings.request_timeout_s)
        encode = _base64_floats if body.encoding_format == "base64" else list
        data = [{"object": "embedding", "index": i, "embedding": encode(v)} for i, v in enumerate(result.vectors)]
        usage = {"prompt_tokens": result.usage.input_tokens, "total_tokens": result.usage.input_tokens}
        body_out = {"object": "list", "data": data, "model": result.model, "usage": usage}
        return JSONResponse(body_out, headers={"x-keel-trace-id": result.trace_id})

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        gw: Gateway = request.app.state.gateway
        return {"object": "list", "data": [_model_entry(gw, n) for n in _visible_models(request)]}

    @app.get("/v1/models/{model:path}")
    async def retrieve_model(model: str, request: Request) -> dict[str, Any]:
        """One model, as OpenAI answers it; 404 `model_not_found` for a model this key cannot see."""
        if model not in _visible_models(request):
            raise NoSuchModel(f"the model {model!r} does not exist or this key may not use it")
        return _model_entry(request.app.state.gateway, model)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """The process is up."""
        return {"status": "ok"}

    @app.get("/readyz", response_model=None)
    async def readyz(request: Request) -> JSONResponse:
        """Ready to serve: the store answers."""
        gw: Gateway = request.app.state.gateway
        if gw.store is not None:
            try:
                await asyncio.to_thread(gw.store.ping)
            except Exception as exc:
                return JSONResponse({"status": "unavailable", "store": str(exc)[:200]}, status_code=503)
        return JSONResponse({"status": "ready"})

    @app.get("/metrics", dependencies=[Depends(require_admin)])
    async def metrics(request: Request) -> Response:
        """Prometheus text format: calls, errors by type, tokens, cost and latency by model and key."""
        return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app
