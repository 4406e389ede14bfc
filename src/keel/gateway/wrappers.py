"""The built-in request wrappers of the pipeline (see `keel.gateway.pipeline`), outermost first.

- `Tracing` records the call on its span: the request, the answer, usage,
  cost, attempts, time to first token, or the error with what it spent.
- `KeyScope` refuses a model the caller's key may not use.
- `KeyBudget` reserves the worst case against the key's budgets and settles
  the real cost (a failed call is charged what it spent; a stream cut after
  its first piece, or a call cancelled while out, keeps the worst case, since
  the provider bills what it made).
- `KeyLimits` takes the key's requests- and tokens-per-minute slot.
- `Structured` validates JSON answers and re-asks with the problem.
- `route` is the innermost handler: the model's fallback chain.

Each takes only the callables it needs, not the Gateway, so it can be tested
and reused on its own.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from dataclasses import replace
from typing import Any, cast

from keel import tokens
from keel.errors import ConfigError
from keel.gateway.budget import Budgets, Reservation
from keel.gateway.fallback import FallbackModel
from keel.gateway.limits import KeyLimiter
from keel.gateway.pipeline import Call, Handler, Item, RequestWrapper, final_item
from keel.gateway.structured import check_streamed, run_structured
from keel.models.base import Model, StreamItem
from keel.types import ChatRequest, EmbeddingResult, Message, ModelResponse, StreamDelta, Usage

__all__ = ["KeyBudget", "KeyLimits", "KeyScope", "Structured", "Tracing", "record_usage", "route", "worst_case_cost"]


log = logging.getLogger("keel.gateway")

#: How much of each answer that failed structured validation the span keeps (a runaway one can be huge).
MAX_INVALID_OUTPUT_CHARS = 8000


def record_usage(call: Call, usage: Usage | None, cost: float | None, attempts: int) -> None:
    span = call.span
    if usage is not None:
        span.set(gen_ai__usage__input_tokens=usage.input_tokens, gen_ai__usage__output_tokens=usage.output_tokens)
        span.set(keel__usage__cached_input_tokens=usage.cached_input_tokens)
        span.set(keel__usage__reasoning_tokens=usage.reasoning_tokens)
    span.set(keel__cost_usd=cost, keel__attempts=attempts)


class Tracing(RequestWrapper):
    """The span of a call: what was asked, what came back, what it cost (or why it failed)."""

    slot = "trace"

    async def __call__(self, call: Call, next: Handler) -> AsyncGenerator[Item, None]:
        started = time.perf_counter()
        recorded = False
        try:
            async with aclosing(next(call)) as items:
                async for item in items:
                    if isinstance(item, StreamDelta):
                        if "keel.time_to_first_token_ms" not in call.span.attributes:
                            ttft = round((time.perf_counter() - started) * 1000, 2)
                            call.span.attributes["keel.time_to_first_token_ms"] = ttft
                    elif isinstance(item, ModelResponse):
                        _record_request(call)  # as the wrappers inside left it (a prompt masked, compressed)
                        recorded = True
                        _record_response(call, item)
                    else:
                        _record_embedding(call, item)
                    yield item
        except BaseException as error:
            if not recorded:
                _record_request(call)
            cost = getattr(error, "cost_usd", None)
            if cost is None:  # a wrapper inside may have charged it (a budget keeps a cut stream's worst case)
                cost = call.span.attributes.get("keel.cost_usd")
            usage = getattr(error, "usage", None)
            if isinstance(usage, Usage) and usage.estimated:
                call.span.set(keel__cost_estimated=True)
            record_usage(call, usage, cost, _attempts(error))
            raise


def _attempts(error: BaseException) -> int:
    return int(getattr(error, "attempts", 0) or 0)


def _record_request(call: Call) -> None:
    if call.request is None:
        return
    span, request = call.span, call.request
    o = request.options
    span.set(keel__model=call.model)
    for attr, value in (
        ("gen_ai.request.temperature", o.temperature), ("gen_ai.request.max_tokens", o.max_tokens),
        ("gen_ai.request.seed", o.seed), ("gen_ai.request.top_p", o.top_p),
        ("gen_ai.request.stop_sequences", list(o.stop) or None),
    ):  # fmt: skip
        if value is not None:
            span.attributes[attr] = value
    span.input = {"messages": [m.to_openai() for m in request.messages]}
    if o.tools:
        span.input["tools"] = [t.to_openai() for t in o.tools]
    if o.response_format is not None:
        span.input["response_format"] = {"name": o.response_format.name, "schema": dict(o.response_format.schema)}


def _record_response(call: Call, response: ModelResponse) -> None:
    span = call.span
    span.set(gen_ai__provider__name=response.provider, gen_ai__response__model=response.model)
    span.set(gen_ai__response__finish_reasons=[response.finish_reason], keel__model=response.deployment)
    if response.stop_reason:  # e.g. "repetition": the local model was stopped in a loop
        span.set(keel__stop_reason=response.stop_reason)
    span.set(keel__cache_hit=bool(call.state.get("cache_hit", False)))
    record_usage(call, response.usage, response.cost_usd, response.attempts)
    if response.usage.estimated:  # the provider sent no usage (or not all of it): keel counted
        span.set(keel__cost_estimated=True)
    span.output = {
        "text": response.text,
        "tool_calls": [{"id": c.id, "name": c.name, "arguments": c.arguments} for c in response.tool_calls],
    }


def _record_embedding(call: Call, result: EmbeddingResult) -> None:
    span = call.span
    span.set(gen_ai__response__model=result.model, gen_ai__usage__input_tokens=result.usage.input_tokens)
    span.set(keel__cost_usd=result.cost_usd, keel__attempts=result.attempts, keel__embedding__count=len(call.texts))


class KeyScope(RequestWrapper):
    """The key's model list: a refused key learns nothing else (this runs before the model is built)."""

    slot = "scope"

    def __init__(self, check: Callable[[str | None, str], None]) -> None:
        self.check = check

    def __call__(self, call: Call, next: Handler) -> AsyncGenerator[Item, None]:
        self.check(call.context.key, call.model)
        return next(call)


class KeyBudget(RequestWrapper):
    """Reserve a chat call's worst case against its key's budgets; settle what it really cost."""

    slot = "budget"

    def __init__(self, budgets: Budgets, worst_case: Callable[[Call], float | None]) -> None:
        self.budgets = budgets
        self.worst_case = worst_case

    def __call__(self, call: Call, next: Handler) -> AsyncGenerator[Item, None]:
        key = call.context.key
        if call.operation != "chat" or key is None or not self.budgets.limited(key):
            return next(call)
        return self._reserved(call, key, next)

    async def _reserved(self, call: Call, key: str, next: Handler) -> AsyncGenerator[Item, None]:
        reservation = await self.budgets.reserve(key, self.worst_case(call))
        streamed = False
        try:
            async with aclosing(next(call)) as items:
                async for item in items:
                    if isinstance(item, ModelResponse):
                        item = await self._charged(call, reservation, item)
                        reservation = None
                    else:
                        streamed = True
                    yield item
        except BaseException as error:
            cost = getattr(error, "cost_usd", None)
            left = isinstance(error, (asyncio.CancelledError, GeneratorExit))
            if (streamed or left) and cost is None and reservation is not None:
                # The provider had started answering a stream, or the caller left (or timed out) while
                # the request was out: it bills what it generated, which keel cannot see, so the budget
                # keeps the reserved worst case (releasing it let a key make unbounded upstream calls).
                cost = reservation.amount
                call.span.set(keel__cost_estimated=True, keel__cost_usd=cost)
            await self._charge(call, reservation, cost)
            raise

    async def _charged(self, call: Call, reservation: Reservation | None, response: ModelResponse) -> ModelResponse:
        """Charge a call's response (returned with the cost it was charged) and release its reservation."""
        if response.usage.estimated and response.usage.total_tokens == 0 and reservation is not None:
            # no usage came back and keel could not count it either: the reserved worst case is the charge
            response = replace(response, cost_usd=reservation.amount)
        await self._charge(call, reservation, response.cost_usd)
        return response

    async def _charge(self, call: Call, reservation: Reservation | None, cost: float | None) -> None:
        overrun = await self.budgets.charge(reservation, cost)
        if reservation is not None and overrun > 0:  # charged all the same; the key's next calls are refused
            call.span.set(keel__budget__overrun_usd=overrun)
            log.warning(
                "key %r passed its budget by $%.6f: the call cost $%.6f, $%.6f was reserved",
                reservation.key, overrun, cost or 0.0, reservation.amount,
            )  # fmt: skip


class KeyLimits(RequestWrapper):
    """The key's requests and tokens per minute: a slot is taken before the call, tokens settled after."""

    slot = "limits"

    def __init__(self, limiter_for: Callable[[str], KeyLimiter | None]) -> None:
        self.limiter_for = limiter_for

    def __call__(self, call: Call, next: Handler) -> AsyncGenerator[Item, None]:
        limiter = self.limiter_for(call.context.key) if call.context.key is not None else None
        if limiter is None or call.operation != "chat":
            return next(call)
        return self._limited(call, limiter, next)

    async def _limited(self, call: Call, limiter: KeyLimiter, next: Handler) -> AsyncGenerator[Item, None]:
        estimated = tokens.estimate(call.chat_request) if limiter.counts_tokens else 0
        await limiter.acquire(estimated)
        async with aclosing(next(call)) as items:
            async for item in items:
                if isinstance(item, ModelResponse):
                    await limiter.settle(estimated, item.usage)
                yield item


class Structured(RequestWrapper):
    """Structured output: validate the JSON answer; re-ask with the problem (not when streaming:
    the caller has the pieces already, so a stream is validated at its end, as OpenAI does)."""

    slot = "structured"

    def __init__(self, *, capture_content: bool = True) -> None:
        self.capture_content = capture_content

    def __call__(self, call: Call, next: Handler) -> AsyncGenerator[Item, None]:
        if call.structured is None or call.operation != "chat":
            return next(call)
        return self._streamed(call, next) if call.stream else self._asked(call, next)

    async def _asked(self, call: Call, next: Handler) -> AsyncGenerator[Item, None]:
        spec, request = call.structured, call.chat_request
        assert spec is not None  # checked by __call__

        async def ask(messages: tuple[Message, ...]) -> ModelResponse:
            final = await final_item(next(replace(call, request=replace(request, messages=messages))))
            assert isinstance(final, ModelResponse)  # a chat call's final item
            return final

        max_tokens, on_invalid = request.options.max_tokens, self._invalid_output_recorder(call)
        response, call.parsed, tries = await run_structured(
            ask, request.messages, spec, call.max_reasks, max_tokens, on_invalid
        )
        call.span.set(keel__structured__tries=tries)
        yield response

    async def _streamed(self, call: Call, next: Handler) -> AsyncGenerator[Item, None]:
        spec = call.structured
        assert spec is not None  # checked by __call__
        async with aclosing(next(call)) as items:
            async for item in items:
                if isinstance(item, ModelResponse):
                    call.span.set(keel__structured__tries=1)
                    max_tokens = call.chat_request.options.max_tokens
                    call.parsed = check_streamed(spec, item, max_tokens, self._invalid_output_recorder(call))
                yield item


    def _invalid_output_recorder(self, call: Call) -> Callable[[str, str], None]:
        """Keeps each answer that failed validation, and why, on the span: a failed structured call's
        trace then shows what the model said, not only the last error."""
        invalid: list[dict[str, Any]] = []

        def record(text: str, problem: str) -> None:
            entry: dict[str, Any] = {"try": len(invalid) + 1, "error": problem}
            if self.capture_content:  # the answer is content: kept only where inputs and outputs are
                entry["output"] = text[:MAX_INVALID_OUTPUT_CHARS]
                if len(text) > MAX_INVALID_OUTPUT_CHARS:
                    entry["output_chars"] = len(text)  # clipped: say how long it was
            invalid.append(entry)
            call.span.set(keel__structured__invalid_outputs=invalid, keel__structured__tries=len(invalid))

        return record


_Stream = AsyncGenerator[StreamItem, None]  # what a model's stream() is (typed as an iterator)


def route(router_for: Callable[[str], FallbackModel], model_for: Callable[[str], Model]) -> Handler:
    """The innermost handler: a chat call goes to its model's fallback chain, embeddings to the model."""

    async def handle(call: Call) -> AsyncGenerator[Item, None]:
        if call.operation == "embeddings":
            yield await model_for(call.model).embed(list(call.texts))
        elif call.stream:
            async with aclosing(cast(_Stream, router_for(call.model).stream(call.chat_request))) as items:
                async for item in items:
                    yield item
        else:
            yield await router_for(call.model).complete(call.chat_request)

    return handle


def worst_case_cost(
    router: FallbackModel, request: ChatRequest, model_for: Callable[[str], Any], default_max_output: int
) -> float | None:
    """The most a chat call can cost on any model of its chain: the prompt plus `max_tokens` (or the
    model's own output limit). A model that cannot be built (a fallback whose API key is missing) is
    never reached, so it costs nothing here."""
    worst: float | None = None
    prompt = router.count_tokens(request)
    for name in [*router.chain, *router.context_chain]:
        try:
            deployment = model_for(name)
        except ConfigError:
            continue
        if deployment.price is None:
            continue
        out = request.options.max_tokens or deployment.max_output_tokens or default_max_output
        cost = deployment.price.cost(Usage(input_tokens=prompt, output_tokens=out))
        worst = cost if worst is None else max(worst, cost)
    return worst

