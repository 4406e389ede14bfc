"""What every model call made for an HTTP request shares: who it is for, a timeout, and cancellation
when the client leaves."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence
from typing import Any, TypeVar

from fastapi import Request

from keel.errors import ClientDisconnected, ProviderTimeout
from keel.gateway.pipeline import CallContext
from keel.types import TokenLogprob

__all__ = ["attribution", "guarded", "logprobs_body"]

T = TypeVar("T")


async def guarded(request: Request, call: Awaitable[T], timeout_s: float) -> T:
    """Run a model call within the request timeout, cancelled if the client goes away first.

    The call is cancelled with the reason, which its span records as its error message.
    """
    task = asyncio.ensure_future(call)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait((task, watcher), timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # the server itself is stopping this request
        task.cancel("the server stopped the request")
        raise
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    reason = "client disconnected" if watcher in done else f"request timeout after {timeout_s:g} s"
    task.cancel(reason)
    await asyncio.gather(task, return_exceptions=True)  # its span is finished before we answer
    if watcher in done:
        raise ClientDisconnected("the client disconnected; the model call was cancelled")
    raise ProviderTimeout(f"the request took longer than server.request_timeout_s ({timeout_s:g} s)")


def attribution(
    request: Request, key: str | None, user: str | None, metadata: dict[str, str] | None
) -> CallContext:
    """Who and what a call is for, from the caller's key, the body (`user`, `metadata`) and headers:
    `x-keel-user`, `x-keel-session-id`, `x-keel-tenant`, `x-keel-tags` (comma-separated) and
    `x-keel-meta-NAME`."""
    headers = request.headers
    found: dict[str, Any] = dict(metadata or {})
    for name, value in headers.items():
        if name.startswith("x-keel-meta-") and len(found) < 64:
            found[name.removeprefix("x-keel-meta-")[:64]] = value[:256]
    tags = headers.get("x-keel-tags") or ""
    return CallContext(
        key=key,
        tenant=_header(headers.get("x-keel-tenant")),
        user=user or _header(headers.get("x-keel-user")),
        session=_header(headers.get("x-keel-session-id")),
        tags=tuple(t.strip()[:64] for t in tags.split(",") if t.strip())[:32],
        metadata=found,
    )


def _header(value: str | None) -> str | None:
    return value[:256] if value else None


def logprobs_body(logprobs: Sequence[TokenLogprob] | None) -> dict[str, Any] | None:
    """OpenAI's `choices[0].logprobs`: {"content": [{token, logprob, bytes, top_logprobs}, ...], "refusal": None}."""
    if logprobs is None:
        return None
    return {"content": [t.to_openai() for t in logprobs], "refusal": None}
