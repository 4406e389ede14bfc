"""JSON request bodies: read once, parsed off the event loop when large, and checked before pydantic.

FastAPI parses and validates a body on the event loop. A 3.1 MB body of 100,000 short messages held
every other request (even `/healthz`) for seconds: pydantic-core holds the GIL while it validates,
so moving validation to a thread would not help. Instead the route class here reads the body, parses
it (in a worker thread when large) and walks it once, refusing before any validation:

- a JSON array or object with more than `MAX_ITEMS` entries, or a top-level list over the body
  model's own `max_length` (`messages`: `MAX_MESSAGES`), so validation stays bounded;
- nesting deeper than `MAX_DEPTH` (RAG metadata 900 levels deep crashed the store's encoder);
- a lone surrogate (`"\\ud800"`), which JSON can escape but UTF-8 cannot encode: neither the
  store nor a provider can take it, so the call failed after it was charged, or left no span.

Each refusal is a 400 that names the field (`param`). What passes is handed to FastAPI already
parsed, so it is never parsed twice.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel

from keel.errors import BodyError
from keel.server.middleware import trace_refusal

__all__ = ["MAX_DEPTH", "MAX_ITEMS", "JSONBodyRoute", "check_json", "parse_json"]

MAX_DEPTH = 64  # deeper JSON than any tool schema or metadata needs
MAX_ITEMS = 10_000  # entries of one JSON array or object (RAG takes 10,000 documents per request)
OFF_LOOP_BYTES = 64 * 1024  # smaller bodies parse in well under a millisecond: not worth a thread


def _where(path: list[str | int]) -> str:
    """`messages.0.content`, as the validation errors name fields; very deep paths are shortened."""
    parts = [str(p) for p in path]
    return ".".join(parts[:8]) + (".…" if len(parts) > 8 else "") if parts else "body"


def _has_surrogate(text: str) -> bool:
    if text.isascii():
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def check_json(value: Any) -> None:
    """Walk a parsed body once (iteratively: no recursion limit to hit) and raise BodyError at the
    first lone surrogate, over-long array or object, or nesting deeper than MAX_DEPTH."""
    stack: list[tuple[Any, list[str | int]]] = [(value, [])]
    while stack:
        node, path = stack.pop()
        if isinstance(node, str):
            if _has_surrogate(node):
                raise BodyError("contains a lone surrogate (such as \\ud800), which is not valid Unicode", _where(path))
            continue
        if not isinstance(node, (dict, list)):
            continue
        if len(path) >= MAX_DEPTH:
            raise BodyError(f"nested deeper than {MAX_DEPTH} levels", _where(path))
        if len(node) > MAX_ITEMS:
            raise BodyError(f"has {len(node)} entries, more than the limit of {MAX_ITEMS}", _where(path))
        if isinstance(node, list):
            stack.extend((item, [*path, i]) for i, item in enumerate(node))
            continue
        for key, item in node.items():
            if _has_surrogate(key):
                raise BodyError("a key contains a lone surrogate (such as \\ud800), which is not valid Unicode",
                                _where(path))  # fmt: skip
            stack.append((item, [*path, key]))


def _check_lengths(value: Any, model: type[BaseModel] | None) -> None:
    """Top-level lists over the body model's `max_length`, refused before pydantic validates every item
    (it checks the length only after validating them all)."""
    if model is None or not isinstance(value, dict):
        return
    for name, field in model.model_fields.items():
        items = value.get(field.alias or name)
        limit = next((m.max_length for m in field.metadata if getattr(m, "max_length", None) is not None), None)
        if isinstance(items, list) and limit is not None and len(items) > limit:
            raise BodyError(f"has {len(items)} items; at most {limit} are accepted", name)


def parse_json(raw: bytes, model: type[BaseModel] | None = None) -> Any:
    """Decode, parse and check a body: UTF-8 only (what OpenAI's API takes), then `check_json`."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        bad = f"byte {raw[error.start]:#04x} at offset {error.start}"
        raise BodyError(f"the request body is not valid UTF-8 ({bad})") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise BodyError(
            f"the request body is not valid JSON: {error.msg} (line {error.lineno}, column {error.colno})"
        ) from None
    except RecursionError:
        raise BodyError(f"the request body is nested deeper than {MAX_DEPTH} levels") from None
    _check_lengths(value, model)
    check_json(value)
    return value


def _is_json(content_type: str | None) -> bool:
    """JSON or unlabelled: FastAPI decides which of these it parses; this only parses them first."""
    if not content_type:
        return True
    kind = content_type.split(";", 1)[0].strip().lower()
    return kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))


class _ParsedRequest(Request):
    """The request with its body read and parsed already (Starlette's documented way to change how
    a route reads its body is a Request subclass, as in FastAPI's custom-request example)."""

    def __init__(self, request: Request, raw: bytes, parsed: Any) -> None:
        super().__init__(request.scope, request.receive)
        self._raw, self._parsed = raw, parsed

    async def body(self) -> bytes:
        return self._raw

    async def json(self) -> Any:
        return self._parsed


def _typed(content_type: str | None) -> str:
    """Why a body labelled other than JSON is refused. It is not parsed anyway: a web page may send a
    form or text/plain to a local server without the browser asking it first (no CORS preflight)."""
    return f"send the body as JSON with Content-Type: application/json (this one was {content_type})"


def _body_model(route: APIRoute) -> type[BaseModel] | None:
    field = route.body_field
    annotation = getattr(getattr(field, "field_info", None), "annotation", None)
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


class JSONBodyRoute(APIRoute):
    """A route whose JSON body is parsed and checked by `parse_json` (see the module docstring)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        if self.body_field is None:
            return handler
        model = _body_model(self)

        async def parse_first(request: Request) -> Response:
            raw = await request.body()
            if not raw:
                return await handler(request)
            try:
                content_type = request.headers.get("content-type")
                if not _is_json(content_type):  # `curl -d` sends a form; never parsed as JSON (see _typed)
                    raise BodyError(_typed(content_type))
                if len(raw) >= OFF_LOOP_BYTES:
                    parsed = await asyncio.to_thread(parse_json, raw, model)
                else:
                    parsed = parse_json(raw, model)
            except BodyError as error:
                who = getattr(request.state, "caller", None)
                trace_refusal(request.app.state.gateway, request.url.path, error, getattr(who, "key", None))
                raise
            return await handler(_ParsedRequest(request, raw, parsed))

        return parse_first
