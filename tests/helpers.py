"""Small builders shared by tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from keel import Gateway
from keel.config import load_config
from keel.store import SpanFilter
from keel.trace import Span


def write_config(tmp_path: Path, text: str) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "keel.toml"
    path.write_text(text)
    return path


def gateway(tmp_path: Path, toml: str = "", **kwargs: Any) -> Gateway:
    """A gateway over a keel.toml written from `toml` (fast retries for tests)."""
    text = "retry_base_s = 0.01\n" + ("" if "retry_max_s" in toml else "retry_max_s = 2.0\n") + toml
    return Gateway(load_config(write_config(tmp_path, text)), **kwargs)


def spans(gw: Gateway, **filters: Any) -> list[Span]:
    gw.flush()
    assert gw.store is not None
    return gw.store.list_spans(SpanFilter(**filters))


def openai_model(name: str, url: str, model: str = "gpt-4o-mini", extra: str = "") -> str:
    head = f'[models.{name}]\nprovider = "openai"\nmodel = "{model}"\n'
    return head + f'base_url = "{url}"\napi_key_env = "OPENAI_API_KEY"\n{extra}\n'
