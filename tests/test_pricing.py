"""Cost from usage and genai-prices; an unknown price is no cost and a warning, never a guess."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from helpers import gateway, openai_model, spans
from keel.config import ModelConfig
from keel.pricing import model_facts
from keel.types import Usage
from stubs import OpenAIStub, completion


def test_known_flat_and_tiered_prices() -> None:
    mini = model_facts(ModelConfig(provider="openai", model="gpt-4o-mini"))
    assert mini.price is not None and mini.context_window == 128_000
    assert mini.price.cost(Usage(1_000_000, 0)) == pytest.approx(0.15)
    assert mini.price.cost(Usage(1_000_000, 0, cached_input_tokens=1_000_000)) == pytest.approx(0.075)
    sonnet = model_facts(ModelConfig(provider="anthropic", model="claude-sonnet-4-5"))
    assert sonnet.price is not None and sonnet.price.tiered is not None
    assert sonnet.price.cost(Usage(1000, 1000)) == pytest.approx(1000 * 3e-6 + 1000 * 15e-6)


def test_configured_price_wins_and_local_is_free() -> None:
    own = ModelConfig(provider="openai", model="gpt-4o-mini", price={"input": 1.0, "output": 2.0})  # type: ignore[arg-type]
    assert model_facts(own).price.cost(Usage(1_000_000, 1_000_000)) == pytest.approx(3.0)  # type: ignore[union-attr]
    assert model_facts(ModelConfig(provider="local", model="smollm2")).price.cost(Usage(10**6, 10**6)) == 0  # type: ignore[union-attr]


async def test_unknown_price_gives_no_cost_and_one_warning(
    tmp_path: Path, openai_stub: OpenAIStub, caplog: pytest.LogCaptureFixture
) -> None:
    openai_stub.push(completion("a"), completion("b"))
    gw = gateway(tmp_path, openai_model("mine", openai_stub.url, model="my-finetune-v3"))
    with caplog.at_level(logging.WARNING, logger="keel.pricing"):
        first = await gw.chat("hi", model="mine")
        second = await gw.chat("hi", model="mine")
    assert first.cost_usd is None and second.cost_usd is None
    assert first.usage.input_tokens == 12  # usage is still reported
    warnings = [r for r in caplog.records if "no known price" in r.getMessage()]
    assert len(warnings) == 1 and "mine" in warnings[0].getMessage()
    assert all(s.attributes["keel.cost_usd"] is None for s in spans(gw))
    await gw.aclose()
