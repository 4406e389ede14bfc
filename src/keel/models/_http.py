"""Small pieces every HTTP provider adapter needs."""

from __future__ import annotations

import time
from collections.abc import Mapping
from email.utils import parsedate_to_datetime
from typing import Any

from keel.errors import MalformedResponse, ProviderConnectionError, ProviderError, ProviderTimeout, error_for_status

__all__ = ["connection_error", "malformed_error", "parse_retry_after", "status_error", "timeout_error"]


def status_error(
    provider: str, model: str, status: int, message: str, *, retry_after: float | None = None, body: Any = None
) -> ProviderError:
    """The keel error for an HTTP error status from a provider."""
    return error_for_status(status)(
        f"{provider} answered {status}: {message}",
        provider=provider,
        model=model,
        status=status,
        retry_after=retry_after,
        body=body,
    )


def timeout_error(provider: str, model: str) -> ProviderTimeout:
    return ProviderTimeout(f"{provider} did not answer in time", provider=provider, model=model)


def connection_error(provider: str, model: str, reason: object) -> ProviderConnectionError:
    return ProviderConnectionError(f"cannot reach {provider}: {reason}", provider=provider, model=model)


def malformed_error(provider: str, model: str, reason: object) -> MalformedResponse:
    return MalformedResponse(f"{provider} sent an answer keel cannot read: {reason}", provider=provider, model=model)


def parse_retry_after(headers: Mapping[str, str] | None) -> float | None:
    """Seconds to wait from `retry-after-ms` or `Retry-After` (seconds or an HTTP date)."""
    if not headers:
        return None
    millis = headers.get("retry-after-ms")
    if millis:
        try:
            return max(0.0, float(millis) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None
