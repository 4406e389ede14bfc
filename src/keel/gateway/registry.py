"""From a `[models.NAME]` entry to a wrapped, ready deployment.

Adapters are imported only when a model of their provider is first used, so
a gateway that only calls the local model never imports the Gemini SDK, and
a missing key is reported when (and only if) the model is called, where a
fallback can still answer.
"""

from __future__ import annotations

import os

from keel.config import Config, ModelConfig
from keel.errors import ConfigError, MissingAPIKey
from keel.gateway.circuit import CircuitBreakerModel
from keel.gateway.deployment import Deployment
from keel.gateway.limits import Limiter, RateLimitModel
from keel.gateway.retry import RetryModel
from keel.gateway.timeout import TimeoutModel
from keel.models.base import Model
from keel.pricing import model_facts

__all__ = ["build_adapter", "wrap"]


def _api_key(name: str, config: ModelConfig) -> str:
    env = config.key_env()
    value = os.environ.get(env) if env else None
    if value:
        return value
    if config.base_url and not config.api_key_env:
        return "not-needed"  # self-hosted OpenAI-compatible servers usually take no key
    raise MissingAPIKey(env or "an api_key_env", name)


def build_adapter(name: str, config: ModelConfig, *, timeout: float, context_window: int | None) -> Model:
    """The bare adapter (no wrappers) for a configured model."""
    provider = config.provider
    if provider == "openai":
        from keel.models.openai import OpenAIModel

        return OpenAIModel(
            config.model,
            api_key=_api_key(name, config),
            base_url=config.base_url,
            timeout=timeout,
            context_window=context_window,
        )
    if provider == "anthropic":
        from keel.models.anthropic import AnthropicModel

        return AnthropicModel(
            config.model,
            api_key=_api_key(name, config),
            base_url=config.base_url,
            timeout=timeout,
            context_window=context_window,
            max_output_tokens=config.max_output_tokens or 4096,
        )
    if provider == "gemini":
        from keel.models.gemini import GeminiModel

        return GeminiModel(
            config.model, api_key=_api_key(name, config), base_url=config.base_url, timeout=timeout,
            context_window=context_window,
        )  # fmt: skip
    if provider == "local":
        from keel.models.local import DEFAULT_MAX_OUTPUT_TOKENS, LocalModel

        max_output = config.max_output_tokens or DEFAULT_MAX_OUTPUT_TOKENS  # a call without max_tokens stops here
        return LocalModel(config.model, context_window=context_window, max_output_tokens=max_output)
    if provider == "onnx":
        from keel.models.onnx import OnnxEmbeddingModel

        return OnnxEmbeddingModel(config.model)
    if provider == "test":
        from keel.models.test import TestModel

        script = list(config.script) or ["ok"]
        return TestModel(script, model_id=config.model, context_window=context_window, delay=config.delay_s)
    raise ConfigError(f"unknown provider {provider!r}", field=f"models.{name}.provider")


def wrap(name: str, adapter: Model, model: ModelConfig, config: Config) -> Deployment:
    """Deployment(Retry(CircuitBreaker(RateLimit(Timeout(adapter)))))."""
    facts = model_facts(model)
    if adapter.context_window is None:
        adapter.context_window = facts.context_window
    inner: Model = TimeoutModel(adapter, timeout=model.timeout or config.timeout)
    limiter = Limiter(f"model {name}", rpm=model.rpm, tpm=model.tpm)
    if limiter.active:
        inner = RateLimitModel(inner, limiter)
    inner = CircuitBreakerModel(
        inner, name=name, failures=config.circuit_breaker.failures, cooldown=config.circuit_breaker.cooldown_s
    )
    inner = RetryModel(
        inner,
        max_retries=config.max_retries if model.max_retries is None else model.max_retries,
        base_delay=config.retry_base_s,
        max_delay=config.retry_max_s,
    )
    return Deployment(inner, name=name, price=facts.price, max_output_tokens=model.max_output_tokens)
