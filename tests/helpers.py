"""Small builders shared by tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from keel import FunctionModel, Gateway
from keel.config import load_config
from keel.errors import (
    AuthenticationFailed,
    BadRequest,
    ModelNotFound,
    PermissionDenied,
    ProviderError,
    ProviderRateLimited,
    ProviderTimeout,
    ServerError,
)
from keel.models.base import Model, StreamItem
from keel.models.test import Responder
from keel.store import SpanFilter
from keel.trace import Span
from keel.types import ChatRequest, ModelResponse, StreamDelta


def write_config(tmp_path: Path, text: str) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "keel.toml"
    path.write_text(text)
    return path


def gateway(tmp_path: Path, toml: str = "", **kwargs: Any) -> Gateway:
    """A gateway over a keel.toml written from `toml` (fast retries for tests)."""
    text = "retry_base_s = 0.01\n" + ("" if "retry_max_s" in toml else "retry_max_s = 2.0\n") + toml
    return Gateway(load_config(write_config(tmp_path, text)), **kwargs)


def rag_gateway(tmp_path: Path, store: str, answer: Responder) -> Gateway:
    """A gateway on `store` whose RAG answers come from `answer` (a FunctionModel named "answers")."""
    return gateway(
        tmp_path, '[rag]\nanswer_model = "answers"\n', store=store, models={"answers": FunctionModel(answer)}
    )


def spans(gw: Gateway, **filters: Any) -> list[Span]:
    gw.flush()
    assert gw.store is not None
    return gw.store.list_spans(SpanFilter(**filters))


def openai_model(name: str, url: str, model: str = "gpt-4o-mini", extra: str = "") -> str:
    head = f'[models.{name}]\nprovider = "openai"\nmodel = "{model}"\n'
    return head + f'base_url = "{url}"\napi_key_env = "OPENAI_API_KEY"\n{extra}\n'


#: HTTP statuses every provider adapter must map, and the keel error for each.
ERROR_STATUSES: list[tuple[int, type[ProviderError]]] = [
    (400, BadRequest),
    (401, AuthenticationFailed),
    (403, PermissionDenied),
    (404, ModelNotFound),
    (408, ProviderTimeout),
    (429, ProviderRateLimited),
    (500, ServerError),
    (503, ServerError),
]


async def collect(model: Model, request: ChatRequest) -> tuple[list[StreamDelta], ModelResponse]:
    """A model's stream read to the end: deltas only, then exactly one final response."""
    items: list[StreamItem] = [item async for item in model.stream(request)]
    final = items[-1]
    assert isinstance(final, ModelResponse)
    deltas = [d for d in items[:-1] if isinstance(d, StreamDelta)]
    assert len(deltas) == len(items) - 1
    return deltas, final


def check_status_error(
    error: ProviderError, error_class: type[ProviderError], status: int, provider: str, model: str
) -> None:
    """What a status error must carry, whatever the provider."""
    assert type(error) is error_class
    assert error.status == status
    assert error.provider == provider
    assert error.model == model
    assert "went wrong" in error.message
    assert isinstance(error.body, dict)
