"""OpenAI's error shape, for every refusal the server sends: from a route, the edge middleware, a stream,
the router itself (404, 405) or an unexpected failure (500). Nothing answers `{"detail": ...}`."""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from keel.errors import AllModelsFailed, ConfigError, KeelError

__all__ = ["error_body", "error_response", "http_error_response", "keel_error_response", "validation_error"]


def error_body(message: str, type_: str, code: str | None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(status: int, message: str, type_: str, code: str | None, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, code, param), status_code=status)


def keel_error_response(error: KeelError) -> JSONResponse:
    """A keel error with its status, plus Retry-After for limits and the Bearer challenge for 401."""
    type_ = "invalid_request_error" if error.http_status < 500 else "api_error"
    response = error_response(error.http_status, error.message, type_, error.code, getattr(error, "param", None))
    retry_after = getattr(error, "retry_after", None)
    if retry_after:
        response.headers["retry-after"] = str(max(1, round(retry_after)))
    if error.http_status == 401:
        response.headers["www-authenticate"] = "Bearer"
    if isinstance(error.last if isinstance(error, AllModelsFailed) and error.errors else error, ConfigError):
        # the server's own configuration (a missing API key): the same request fails again, so tell the
        # openai SDK (and every SDK generated like it) not to retry, whatever the status
        response.headers["x-should-retry"] = "false"
    return response


def http_error_response(error: HTTPException, method: str, path: str) -> JSONResponse:
    """Starlette's own refusals: no such route (404), a method the route does not take (405)."""
    if error.status_code == 404:
        message, code = f"no route {method} {path}; the API is under /v1 (see /docs)", "not_found"
    elif error.status_code == 405:
        allowed = next((v for k, v in (error.headers or {}).items() if k.lower() == "allow"), "")
        message = f"{method} is not allowed on {path}" + (f" (allowed: {allowed})" if allowed else "")
        code = "method_not_allowed"
    else:
        message, code = str(error.detail), f"http_{error.status_code}"
    type_ = "invalid_request_error" if error.status_code < 500 else "api_error"
    response = error_response(error.status_code, message, type_, code)
    for name, value in (error.headers or {}).items():
        response.headers[name] = value
    return response


def validation_error(errors: list[Any]) -> tuple[str, str | None]:
    """The message and `param` of a refused body, query or path: the first error, its field named
    without pydantic's `body.` prefix (`messages.0.role`, `query.limit`)."""
    first: dict[str, Any] = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    if first.get("type") == "extra_forbidden":
        message = "unknown field"
    elif first.get("type") == "json_invalid":  # FastAPI's own parse (a body the route class left to it)
        return f"the request body is not valid JSON: {first.get('ctx', {}).get('error', 'decode error')}", None
    else:
        message = str(first.get("msg", "invalid"))
    return f"{param or 'body'}: {message}", param
