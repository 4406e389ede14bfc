"""OpenAI's error shape, for every refusal the server sends: from a route, the edge middleware or a stream."""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse

from keel.errors import AllModelsFailed, ConfigError, KeelError

__all__ = ["error_body", "error_response", "keel_error_response"]


def error_body(message: str, type_: str, code: str | None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(status: int, message: str, type_: str, code: str | None, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, code, param), status_code=status)


def keel_error_response(error: KeelError) -> JSONResponse:
    """A keel error with its status, plus Retry-After for limits and the Bearer challenge for 401."""
    type_ = "invalid_request_error" if error.http_status < 500 else "api_error"
    response = error_response(error.http_status, error.message, type_, error.code)
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
