"""Cost in USD from a response's usage, and model facts, from `genai-prices`.

Prices are resolved once per model (the lookup costs about 0.3 ms, too much
for every call); flat prices are then applied with plain arithmetic and
tiered ones through genai-prices itself. A model with no known price gets no
cost and one warning: never a made-up number. The local and test models are
free (cost 0) unless the config gives them a price.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from genai_prices import Usage as PriceUsage
from genai_prices import calc_price

from keel.config import ModelConfig, PriceConfig
from keel.types import Usage

__all__ = ["FREE_PROVIDERS", "ModelFacts", "Price", "cost_usd", "model_facts"]

log = logging.getLogger("keel.pricing")

FREE_PROVIDERS = frozenset({"local", "test", "onnx"})
_PRICE_PROVIDER = {"gemini": "google", "openai": "openai", "anthropic": "anthropic"}


@dataclass(frozen=True)
class Price:
    """USD per token, or a genai-prices ModelPrice for tiered prices."""

    input: float = 0.0
    output: float = 0.0
    cached_input: float | None = None
    tiered: Any = None  # genai_prices ModelPrice when a flat rate does not apply

    def cost(self, usage: Usage) -> float:
        if self.tiered is not None:
            priced = PriceUsage(
                input_tokens=usage.input_tokens,
                output_tokens=usage.output_tokens,
                cache_read_tokens=usage.cached_input_tokens or None,
            )
            return float(self.tiered.calc_price(priced)["total_price"])
        cached_rate = self.input if self.cached_input is None else self.cached_input
        uncached = max(0, usage.input_tokens - usage.cached_input_tokens)
        return uncached * self.input + usage.cached_input_tokens * cached_rate + usage.output_tokens * self.output

    @property
    def input_per_mtok(self) -> float:
        """USD per million input tokens (the first tier of a tiered price)."""
        return _base_rate(self.tiered, "input_mtok") if self.tiered is not None else self.input * 1e6

    @property
    def output_per_mtok(self) -> float:
        return _base_rate(self.tiered, "output_mtok") if self.tiered is not None else self.output * 1e6


def _base_rate(model_price: Any, field: str) -> float:
    value = getattr(model_price, field, None)
    return float(getattr(value, "base", value) or 0)


FREE = Price()


@dataclass(frozen=True)
class ModelFacts:
    price: Price | None  # None: unknown
    context_window: int | None


_cache: dict[tuple[str, str | None], ModelFacts] = {}
_lock = threading.Lock()


def _per_token(value: Any) -> float | None:
    return None if value is None else float(value) / 1e6


def _from_override(price: PriceConfig) -> Price:
    cached = None if price.cached_input is None else price.cached_input / 1e6
    return Price(price.input / 1e6, price.output / 1e6, cached)


def _lookup(model_ref: str, provider_id: str | None) -> ModelFacts:
    try:
        found = calc_price(PriceUsage(input_tokens=1, output_tokens=1), model_ref=model_ref, provider_id=provider_id)
    except LookupError:
        return ModelFacts(None, None)
    mp = found.model_price
    flat = [getattr(mp, "input_mtok", None), getattr(mp, "output_mtok", None), getattr(mp, "cache_read_mtok", None)]
    context = getattr(found.model, "context_window", None)
    if all(v is None or isinstance(v, Decimal) for v in flat):
        inp, out, cached = (_per_token(v) for v in flat)
        return ModelFacts(Price(inp or 0.0, out or 0.0, cached), context)
    return ModelFacts(Price(tiered=mp), context)


def model_facts(config: ModelConfig) -> ModelFacts:
    """Price and context window of a configured model (config first, then genai-prices)."""
    if config.price is not None:
        price: Price | None = _from_override(config.price)
        looked = ModelFacts(None, None)
    elif config.provider in FREE_PROVIDERS:
        price, looked = FREE, ModelFacts(None, None)
    else:
        ref = config.price_model or config.model
        # A self-hosted server (base_url) is priced only if its model id is a known model of the
        # provider's own API (e.g. a proxy in front of OpenAI); otherwise set `price` or `price_provider`.
        provider_id = config.price_provider or _PRICE_PROVIDER.get(config.provider)
        with _lock:
            key = (ref, provider_id)
            if key not in _cache:
                _cache[key] = _lookup(ref, provider_id)
            looked = _cache[key]
        price = looked.price
    return ModelFacts(price, config.context_window or looked.context_window)


_warned: set[str] = set()


def cost_usd(name: str, price: Price | None, usage: Usage) -> float | None:
    """Cost of `usage`; None (and one warning per model) when the price is unknown."""
    if price is None:
        if name not in _warned:
            _warned.add(name)
            log.warning("no known price for model %r: its calls get no cost (set [models.%s.price])", name, name)
        return None
    return price.cost(usage)
