"""Fallback chains: on failure, the next model answers.

A chain is the requested model followed by its `fallbacks`. Errors that
another model could fix move on (provider failures, local limits, an open
circuit, a missing key); the caller's mistakes (a 400, an invalid schema)
do not. When the prompt does not fit a model's context window (counted
before the call, or reported by the provider) the model's
`context_fallbacks`, larger-context models, come next. Attempts add up
across the chain.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import replace

from keel.errors import (
    AllModelsFailed,
    BadRequest,
    ConfigError,
    ContextWindowExceeded,
    KeelError,
    LimitError,
    ProviderError,
)
from keel.gateway.deployment import Deployment
from keel.models.base import Model, StreamItem
from keel.types import ChatRequest, ModelResponse

__all__ = ["FallbackModel", "should_fall_back"]


def should_fall_back(error: KeelError) -> bool:
    if isinstance(error, BadRequest):
        return False
    return isinstance(error, (ProviderError, LimitError, ConfigError, ContextWindowExceeded))


class _Plan:
    """The order to try models in, growing when a context overflow is seen."""

    def __init__(self, chain: Sequence[str], context_chain: Sequence[str]) -> None:
        self.queue = list(dict.fromkeys(chain))
        self.context_chain = [n for n in context_chain if n not in self.queue]
        self.errors: list[tuple[str, KeelError]] = []
        self.attempts = 0

    def overflowed(self) -> None:
        self.queue[0:0] = self.context_chain
        self.context_chain = []

    def failed(self, name: str, error: KeelError) -> None:
        self.attempts += error.attempts
        self.errors.append((name, error))
        if isinstance(error, ContextWindowExceeded):
            self.overflowed()

    def final_error(self) -> KeelError:
        if all(isinstance(e, ContextWindowExceeded) for _, e in self.errors):
            windows = ", ".join(f"{n} ({getattr(e, 'context_window', None) or '?'} tokens)" for n, e in self.errors)
            tokens = max((e.tokens or 0) for _, e in self.errors if isinstance(e, ContextWindowExceeded))
            error: KeelError = ContextWindowExceeded(
                f"the prompt ({tokens} tokens with max_tokens) is longer than every model's context window: {windows}",
                tokens=tokens or None,
            )
        elif len(self.errors) == 1:
            error = self.errors[0][1]
        else:
            error = AllModelsFailed(self.errors)
        error.attempts = self.attempts
        return error


class FallbackModel(Model):
    """Tries deployments in order; `get` builds a deployment by name (lazily)."""

    def __init__(self, chain: Sequence[str], context_chain: Sequence[str], get: Callable[[str], Deployment]) -> None:
        self.chain = list(chain)
        self.context_chain = list(context_chain)
        self.get = get
        first = get(chain[0])
        super().__init__(first.model_id, context_window=first.context_window)
        self.provider = first.provider

    def _next(self, plan: _Plan, request: ChatRequest) -> Deployment | None:
        """The next deployment whose context window fits, recording those that do not."""
        while plan.queue:
            name = plan.queue.pop(0)
            try:
                deployment = self.get(name)
            except ConfigError as error:
                plan.failed(name, error)
                continue
            fits, prompt = deployment.fits(request)
            if fits:
                return deployment
            assert prompt is not None  # a prompt that does not fit has been counted
            plan.failed(
                name,
                ContextWindowExceeded(
                    f"{prompt} prompt tokens + {request.options.max_tokens or 0} max_tokens do not fit "
                    f"{name}'s context window of {deployment.context_window}",
                    tokens=prompt + (request.options.max_tokens or 0),
                    context_window=deployment.context_window,
                ),
            )
        return None

    async def complete(self, request: ChatRequest) -> ModelResponse:
        plan = _Plan(self.chain, self.context_chain)
        while (deployment := self._next(plan, request)) is not None:
            try:
                response = await deployment.complete(request)
            except KeelError as error:
                if not should_fall_back(error):
                    error.attempts += plan.attempts
                    raise
                plan.failed(deployment.name, error)
                continue
            return replace(response, attempts=response.attempts + plan.attempts) if plan.attempts else response
        raise plan.final_error()

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamItem]:
        plan = _Plan(self.chain, self.context_chain)
        while (deployment := self._next(plan, request)) is not None:
            started = False
            try:
                async for item in deployment.stream(request):
                    started = True
                    if isinstance(item, ModelResponse) and plan.attempts:
                        item = replace(item, attempts=item.attempts + plan.attempts)
                    yield item
                return
            except KeelError as error:
                if started or not should_fall_back(error):
                    error.attempts += plan.attempts
                    raise
                plan.failed(deployment.name, error)
        raise plan.final_error()

    def count_tokens(self, request: ChatRequest) -> int:
        return self.get(self.chain[0]).count_tokens(request)
