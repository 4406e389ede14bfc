"""`Gateway`: the one object an application talks to.

It resolves a model name or alias to a fallback chain of deployments, applies
the caller key's limits and budget, runs structured output, and records one
span per call (success or failure) with usage, cost, latency and attempts.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from keel import tokens
from keel.config import Config, KeyConfig, ModelConfig, load_config
from keel.errors import ConfigError, InputError, KeelError, MalformedResponse, ModelNotAllowed, UnknownModel
from keel.gateway.budget import BudgetTracker, Reservation
from keel.gateway.deployment import Deployment
from keel.gateway.fallback import FallbackModel
from keel.gateway.limits import Limiter
from keel.gateway.registry import build_adapter, wrap
from keel.gateway.structured import StructuredSpec, run_structured, spec_for
from keel.gateway.sync import LoopThread
from keel.models.base import Model
from keel.store import Store, open_store
from keel.trace import Redactor, Span, SpanWriter, Tracer, _current
from keel.types import (
    ChatOptions,
    ChatRequest,
    ChatResult,
    EmbeddingResult,
    Message,
    MessageLike,
    ModelResponse,
    StreamDelta,
    Tool,
    Usage,
    parse_messages,
)

if TYPE_CHECKING:
    from keel.otlp import OtlpExporter

__all__ = ["ChatStream", "Gateway"]

DEFAULT_MAX_OUTPUT = 4096
_PROVIDERS = {"openai", "anthropic", "gemini", "local", "test", "onnx"}


def _tools(tools: Sequence[Tool | Mapping[str, Any]] | None) -> tuple[Tool, ...]:
    out = []
    for i, tool in enumerate(tools or ()):
        if isinstance(tool, Tool):
            out.append(tool)
            continue
        fn = tool.get("function", tool) if isinstance(tool, Mapping) else None
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
            raise InputError(f"tools[{i}] needs a function name")
        parameters = fn.get("parameters") or {"type": "object"}
        if not isinstance(parameters, Mapping):
            raise InputError(f"tools[{i}].parameters must be a JSON schema object")
        out.append(Tool(fn["name"], str(fn.get("description", "")), dict(parameters)))
    return tuple(out)


def _number(name: str, value: object, kind: type = float) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int)):
        raise InputError(f"{name} must be {'a number' if kind is float else 'an integer'}, got {value!r}")


def _check_options(o: ChatOptions) -> None:
    for name in ("temperature", "timeout", "top_p"):
        _number(name, getattr(o, name))
    for name in ("max_tokens", "seed"):
        _number(name, getattr(o, name), int)
    if any(not isinstance(s, str) for s in o.stop):
        raise InputError("stop must be a string or a list of strings")
    if o.tool_choice is not None and not isinstance(o.tool_choice, str):
        raise InputError("tool_choice must be auto, none, required or a tool name")
    if o.temperature is not None and not 0 <= o.temperature <= 2:
        raise InputError(f"temperature must be between 0 and 2, got {o.temperature}")
    if o.max_tokens is not None and o.max_tokens <= 0:
        raise InputError(f"max_tokens must be positive, got {o.max_tokens}")
    if o.timeout is not None and o.timeout <= 0:
        raise InputError(f"timeout must be positive, got {o.timeout}")
    if o.top_p is not None and not 0 < o.top_p <= 1:
        raise InputError(f"top_p must be in (0, 1], got {o.top_p}")
    if not isinstance(o.logprobs, bool):
        raise InputError(f"logprobs must be true or false, got {o.logprobs!r}")
    _number("top_logprobs", o.top_logprobs, int)
    if o.top_logprobs is not None and not 0 <= o.top_logprobs <= 20:
        raise InputError(f"top_logprobs must be between 0 and 20, got {o.top_logprobs}")
    if o.top_logprobs is not None and not o.logprobs:
        raise InputError("top_logprobs needs logprobs=True")


@dataclass
class _Admission:
    """What a call reserved before it was sent, to settle after."""

    reservation: Reservation | None = None
    limiter: Limiter | None = None
    estimated: int = 0


class Gateway:
    """Every configured model behind one typed API (async, with `*_sync` twins).

    >>> gw = Gateway()                                # keel.toml or the embedded defaults
    >>> result = gw.chat_sync("What is RAG?", model="local")
    >>> result.text, result.usage, result.cost_usd, result.trace_id
    """

    def __init__(
        self,
        config: Config | str | Path | None = None,
        *,
        store: Store | str | bool | None = None,
        models: Mapping[str, Model] | None = None,
        key: str | None = None,
    ) -> None:
        self.config = config if isinstance(config, Config) else load_config(config)
        self.store: Store | None
        if store is False:
            self.store = None
        elif isinstance(store, Store):
            self.store = store
        else:
            self.store = open_store(store if isinstance(store, str) else self.config.store_url)
        self.key = key
        self._extra: dict[str, Model] = dict(models or {})
        self._deployments: dict[str, Deployment] = {}
        self._routers: dict[str, FallbackModel] = {}
        self._key_limiters: dict[str, Limiter] = {}
        #: Limits, budgets and model lists by key name: `[keys.*]` of the configuration, plus the
        #: virtual keys a server registers (`set_key`). The budget tracker reads the same dict.
        self.keys: dict[str, KeyConfig] = dict(self.config.keys)
        self.budgets = BudgetTracker(self.store, self.keys)
        secret_envs = {env for m in self.config.models.values() if (env := m.key_env())}
        tracing = self.config.tracing
        redactor = Redactor(tracing.redact_patterns, secret_envs)
        writer = SpanWriter(self.store, redactor=redactor, max_queue=tracing.max_queue) if self.store else None
        self.tracer = Tracer(writer, capture_content=tracing.capture_content)
        #: `[otlp]`: the exporter sending every span to an OpenTelemetry collector too, or None.
        self.otlp = _otlp_exporter(self.config, redactor)
        if self.otlp is not None:
            self.tracer.listeners.append(self.otlp.observe)
        self._loop_thread: LoopThread | None = None

    # --- models ---------------------------------------------------------------

    @property
    def model_names(self) -> list[str]:
        return [*self.config.models, *self._extra]

    def resolve(self, model: str | None, kind: str = "chat") -> str:
        if model is not None and model in self._extra:
            return model
        try:
            return self.config.resolve(model, kind=kind)
        except UnknownModel as exc:
            raise UnknownModel(exc.name, [*self.model_names, *self.config.aliases]) from None

    def _model_config(self, name: str) -> ModelConfig:
        if name in self.config.models:
            return self.config.models[name]
        model = self._extra[name]
        provider = model.provider if model.provider in _PROVIDERS else "test"
        return ModelConfig(provider=provider, model=model.model_id, context_window=model.context_window)  # type: ignore[arg-type]

    def deployment(self, name: str) -> Deployment:
        """The wrapped deployment of a configured model (built on first use)."""
        deployment = self._deployments.get(name)
        if deployment is None:
            model_config = self._model_config(name)
            adapter = self._extra.get(name) or build_adapter(
                name,
                model_config,
                timeout=model_config.timeout or self.config.timeout,
                context_window=model_config.context_window,
            )
            deployment = self._deployments[name] = wrap(name, adapter, model_config, self.config)
        return deployment

    def _router(self, name: str) -> FallbackModel:
        router = self._routers.get(name)
        if router is None:
            model_config = self.config.models.get(name)
            chain = [name]
            context_chain: list[str] = []
            if model_config is not None:
                chain += [self.resolve(n) for n in model_config.fallbacks]
                context_chain = [self.resolve(n) for n in model_config.context_fallbacks]
            router = self._routers[name] = FallbackModel(chain, context_chain, self.deployment)
        return router

    # --- per-key limits and budgets ---------------------------------------------

    def set_key(self, name: str, key_config: KeyConfig | None) -> None:
        """Register (or, with None, forget) the limits of a key; a changed key starts new limiters."""
        if key_config is None:
            self.keys.pop(name, None)
        elif self.keys.get(name) != key_config:
            self.keys[name] = key_config
        else:
            return
        self._key_limiters.pop(name, None)
        if self.tracer.writer is not None:  # the spend re-read next must include calls still in the writer's queue
            self.tracer.writer.flush(timeout=5.0)
        self.budgets.forget(name)

    def _key_limiter(self, key: str) -> Limiter | None:
        key_config = self.keys.get(key)
        if key_config is None or not (key_config.rpm or key_config.tpm):
            return None
        if key not in self._key_limiters:
            self._key_limiters[key] = Limiter(f"key {key}", rpm=key_config.rpm, tpm=key_config.tpm)
        return self._key_limiters[key]

    def _check_key_model(self, key: str | None, name: str) -> None:
        allowed = self.keys[key].models if key is not None and key in self.keys else None
        if allowed is not None and name not in {self.resolve(m) for m in allowed}:
            raise ModelNotAllowed(f"key {key!r} may not use model {name!r}; allowed: {', '.join(allowed)}")

    def _worst_case(self, router: FallbackModel, request: ChatRequest) -> float | None:
        worst: float | None = None
        prompt = router.count_tokens(request)
        for name in [*router.chain, *router.context_chain]:
            deployment = self.deployment(name)
            if deployment.price is None:
                continue
            out = request.options.max_tokens or deployment.max_output_tokens or DEFAULT_MAX_OUTPUT
            cost = deployment.price.cost(Usage(input_tokens=prompt, output_tokens=out))
            worst = cost if worst is None else max(worst, cost)
        return worst

    async def _admit(self, key: str | None, name: str, router: FallbackModel, request: ChatRequest) -> _Admission:
        """Reserve the key's budget and take its rate-limit slot before anything is sent
        (its model list is checked earlier, before the model is built)."""
        admission = _Admission()
        if key is None:
            return admission
        budget = self.keys.get(key)
        if budget is not None and (budget.daily_budget_usd is not None or budget.monthly_budget_usd is not None):
            admission.reservation = await self.budgets.reserve(key, self._worst_case(router, request))
        limiter = self._key_limiter(key)
        if limiter is not None:
            estimated = tokens.estimate(request) if limiter.tpm else 0
            try:
                await limiter.acquire(estimated)
            except KeelError:
                self.budgets.settle(admission.reservation, None)
                admission.reservation = None
                raise
            admission.limiter, admission.estimated = limiter, estimated
        return admission

    async def _settle(self, admission: _Admission, response: ModelResponse) -> None:
        self.budgets.settle(admission.reservation, response.cost_usd)
        if admission.limiter is not None:
            await admission.limiter.settle(admission.estimated, response.usage)

    # --- chat -------------------------------------------------------------------

    def _request(
        self, messages: str | Sequence[MessageLike], name: str, system: str | None, options: ChatOptions
    ) -> ChatRequest:
        parsed = parse_messages(messages)
        if system is not None:
            parsed = (Message.system(system), *parsed)
        _check_options(options)
        return ChatRequest(name, parsed, options)

    def _start_span(
        self, operation: str, model: str | None, key: str | None, metadata: Mapping[str, Any] | None
    ) -> Span:
        span = self.tracer.start(f"{operation} {model or self.config.default_model}")
        span.set(gen_ai__operation__name=operation, gen_ai__request__model=model or self.config.default_model)
        if key is not None:
            span.attributes["keel.api_key"] = key
        for k, v in (metadata or {}).items():
            span.attributes[f"keel.metadata.{k}"] = v
        return span

    def _record_request(self, span: Span, request: ChatRequest) -> None:
        o = request.options
        span.set(keel__model=request.model)
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

    def _record_usage(self, span: Span, usage: Usage | None, cost: float | None, attempts: int) -> None:
        if usage is not None:
            span.set(gen_ai__usage__input_tokens=usage.input_tokens, gen_ai__usage__output_tokens=usage.output_tokens)
            span.set(keel__usage__cached_input_tokens=usage.cached_input_tokens)
            span.set(keel__usage__reasoning_tokens=usage.reasoning_tokens)
        span.set(keel__cost_usd=cost, keel__attempts=attempts)

    def _result(self, span: Span, response: ModelResponse, started: float, parsed: Any = None) -> ChatResult:
        latency = time.perf_counter() - started
        span.set(gen_ai__provider__name=response.provider, gen_ai__response__model=response.model)
        span.set(gen_ai__response__finish_reasons=[response.finish_reason], keel__model=response.deployment)
        if response.stop_reason:  # e.g. "repetition": the local model was stopped in a loop
            span.set(keel__stop_reason=response.stop_reason)
        span.set(keel__cache_hit=False)
        self._record_usage(span, response.usage, response.cost_usd, response.attempts)
        span.output = {
            "text": response.text,
            "tool_calls": [{"id": c.id, "name": c.name, "arguments": c.arguments} for c in response.tool_calls],
        }
        return ChatResult(
            text=response.text, tool_calls=response.tool_calls, finish_reason=response.finish_reason,
            usage=response.usage, cost_usd=response.cost_usd, latency_s=latency, model=response.deployment,
            response_model=response.model, provider=response.provider, attempts=response.attempts,
            trace_id=span.trace_id, span_id=span.span_id, parsed=parsed, logprobs=response.logprobs,
            stop_reason=response.stop_reason,
        )  # fmt: skip

    def _failed(self, span: Span, error: BaseException, admission: _Admission, *, streamed: bool = False) -> None:
        span.fail(error)
        if isinstance(error, asyncio.CancelledError):
            span.error_type = span.attributes["error.type"] = "Cancelled"
            reason = str(error)
            if not reason or reason.startswith("Cancelled via cancel scope"):  # anyio's, when a client leaves
                reason = "cancelled before it finished (the caller went away or the server stopped)"
            span.error_message = reason
        cost = getattr(error, "cost_usd", None)
        if streamed and cost is None and admission.reservation is not None:
            # The caller left a stream the provider had started answering: it bills what it
            # generated, which keel cannot see, so the budget keeps the reserved worst case.
            cost = admission.reservation.amount
            span.set(keel__cost_estimated=True)
        self._record_usage(span, getattr(error, "usage", None), cost, getattr(error, "attempts", 0))
        self.budgets.settle(admission.reservation, cost)

    async def chat(
        self,
        messages: str | Sequence[MessageLike],
        model: str | None = None,
        *,
        system: str | None = None,
        temperature: float | None = None,
        max_tokens: int | None = None,
        stop: Sequence[str] | str | None = None,
        seed: int | None = None,
        top_p: float | None = None,
        tools: Sequence[Tool | Mapping[str, Any]] | None = None,
        tool_choice: str | None = None,
        timeout: float | None = None,
        logprobs: bool = False,
        top_logprobs: int | None = None,
        response_model: type[BaseModel] | Mapping[str, Any] | None = None,
        max_reasks: int = 2,
        key: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> ChatResult:
        """One chat call: messages in, a `ChatResult` out (or a `KeelError`)."""
        key = key or self.key
        span = self._start_span("chat", model, key, metadata)
        token = _current.set(span)
        admission = _Admission()
        started = time.perf_counter()
        try:
            name = self.resolve(model)
            self._check_key_model(key, name)  # before the model is built: a refused key learns nothing else
            spec = spec_for(response_model) if response_model is not None else None
            options = ChatOptions(
                temperature=temperature, max_tokens=max_tokens,
                stop=(stop,) if isinstance(stop, str) else tuple(stop or ()),
                seed=seed, top_p=top_p, tools=_tools(tools), tool_choice=tool_choice, timeout=timeout,
                response_format=spec.format if spec else None, logprobs=logprobs, top_logprobs=top_logprobs,
            )  # fmt: skip
            request = self._request(messages, name, system, options)
            self._record_request(span, request)
            router = self._router(name)
            admission = await self._admit(key, name, router, request)
            response, parsed = await self._complete(router, request, spec, max_reasks, span)
            await self._settle(admission, response)
            return self._result(span, response, started, parsed)
        except BaseException as error:
            self._failed(span, error, admission)
            raise
        finally:
            _current.reset(token)
            self.tracer.finish(span)

    async def _complete(
        self, router: FallbackModel, request: ChatRequest, spec: StructuredSpec | None, max_reasks: int, span: Span
    ) -> tuple[ModelResponse, Any]:
        if spec is None:
            return await router.complete(request), None

        async def call(messages: tuple[Message, ...]) -> ModelResponse:
            return await router.complete(replace(request, messages=messages))

        response, parsed, tries = await run_structured(call, request.messages, spec, max_reasks)
        span.set(keel__structured__tries=tries)
        return response, parsed

    def stream(self, messages: str | Sequence[MessageLike], model: str | None = None, **kwargs: Any) -> ChatStream:
        """Stream a chat call: iterate for `StreamDelta`s, then read `.result`."""
        if "response_model" in kwargs:
            raise InputError("structured output cannot be streamed; use chat()")
        return ChatStream(self._stream(messages, model, **kwargs))

    async def _stream(
        self,
        messages: str | Sequence[MessageLike],
        model: str | None,
        *,
        system: str | None = None,
        key: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        stop: Sequence[str] | str | None = None,
        tools: Sequence[Tool | Mapping[str, Any]] | None = None,
        **options: Any,
    ) -> AsyncIterator[StreamDelta | ChatResult]:
        key = key or self.key
        span = self._start_span("chat", model, key, metadata)
        span.set(keel__stream=True)
        admission = _Admission()
        started = time.perf_counter()
        token: contextvars.Token[Span | None] | None = _current.set(span)
        try:
            name = self.resolve(model)
            self._check_key_model(key, name)
            stop_t = (stop,) if isinstance(stop, str) else tuple(stop or ())
            request = self._request(messages, name, system, ChatOptions(stop=stop_t, tools=_tools(tools), **options))
            self._record_request(span, request)
            router = self._router(name)
            admission = await self._admit(key, name, router, request)
            # the caller's code runs between our yields: it must not see this span as its parent
            if token is not None:
                _current.reset(token)
                token = None
            final: ModelResponse | None = None
            async for item in router.stream(request):  # read to the end, so every wrapper closes cleanly
                if isinstance(item, ModelResponse):
                    final = item
                    continue
                if "keel.time_to_first_token_ms" not in span.attributes:
                    span.attributes["keel.time_to_first_token_ms"] = round((time.perf_counter() - started) * 1000, 2)
                yield item
            if final is None:
                raise MalformedResponse("the stream ended without a final response", provider=router.provider)
            await self._settle(admission, final)
            yield self._result(span, final, started)
        except BaseException as error:
            streamed = "keel.time_to_first_token_ms" in span.attributes  # a first piece reached the caller
            self._failed(span, error, admission, streamed=streamed)
            raise
        finally:
            if token is not None:
                _current.reset(token)
            self.tracer.finish(span)

    # --- embeddings and tokens -----------------------------------------------------

    async def embed(
        self,
        texts: Sequence[str],
        model: str | None = None,
        *,
        key: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> EmbeddingResult:
        key = key or self.key
        span = self._start_span("embeddings", model or self.config.default_embedding_model, key, metadata)
        token = _current.set(span)
        try:
            if isinstance(texts, str) or not isinstance(texts, Sequence) or not all(isinstance(t, str) for t in texts):
                raise InputError("texts must be a list of strings")
            name = self.resolve(model, kind="embedding")
            if name in self.config.models and self.config.models[name].kind != "embedding":
                raise InputError(f"{name!r} is a chat model; embed with an embedding model (see `keel models`)")
            if not texts:
                raise InputError("texts is empty")
            self._check_key_model(key, name)
            deployment = self.deployment(name)
            span.set(keel__model=name, gen_ai__provider__name=deployment.provider)
            result = await deployment.embed(list(texts))
            span.set(gen_ai__response__model=result.model, gen_ai__usage__input_tokens=result.usage.input_tokens)
            span.set(keel__cost_usd=result.cost_usd, keel__attempts=result.attempts, keel__embedding__count=len(texts))
            return replace(result, trace_id=span.trace_id)
        except BaseException as error:
            span.fail(error)
            span.set(keel__attempts=getattr(error, "attempts", 0))
            raise
        finally:
            _current.reset(token)
            self.tracer.finish(span)

    def count_tokens(self, messages: str | Sequence[MessageLike], model: str | None = None) -> int:
        """Input tokens of `messages` for `model`, counted offline (see keel.tokens)."""
        name = self.resolve(model)
        return self.deployment(name).count_tokens(ChatRequest(name, parse_messages(messages)))

    # --- sync twins and lifecycle ------------------------------------------------------

    def _loop(self) -> LoopThread:
        if self._loop_thread is None:
            self._loop_thread = LoopThread()
        return self._loop_thread

    def chat_sync(self, messages: str | Sequence[MessageLike], model: str | None = None, **kwargs: Any) -> ChatResult:
        return self._loop().run(self.chat(messages, model, **kwargs))

    def stream_sync(
        self, messages: str | Sequence[MessageLike], model: str | None = None, **kwargs: Any
    ) -> SyncChatStream:
        return SyncChatStream(self.stream(messages, model, **kwargs), self._loop())

    def embed_sync(self, texts: Sequence[str], model: str | None = None, **kwargs: Any) -> EmbeddingResult:
        return self._loop().run(self.embed(texts, model, **kwargs))

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every span so far is in the store (and at the OTLP collector, if one is configured)."""
        stored = self.tracer.writer.flush(timeout) if self.tracer.writer else True
        exported = self.otlp.flush(timeout) if self.otlp else True
        return stored and exported

    async def aclose(self) -> None:
        for deployment in self._deployments.values():
            await deployment.aclose()
        self._deployments.clear()
        self._routers.clear()
        if self.tracer.writer:  # the store first: a slow collector must not hold up the trace store
            await asyncio.to_thread(self.tracer.writer.close)
        if self.otlp is not None:
            await asyncio.to_thread(self.otlp.shutdown)
        if self.store is not None:
            self.store.close()

    def close(self) -> None:
        if self._loop_thread is not None:
            self._loop_thread.run(self.aclose())
            self._loop_thread.stop()
            self._loop_thread = None
        else:
            asyncio.run(self.aclose())

    async def __aenter__(self) -> Gateway:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __enter__(self) -> Gateway:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _otlp_exporter(config: Config, redactor: Redactor) -> OtlpExporter | None:
    """The exporter `[otlp]` asks for; imported only then, so that the extra stays optional."""
    if not config.otlp.endpoint:
        return None
    try:
        from keel.otlp import OtlpExporter
    except ImportError as exc:
        if not (exc.name or "").startswith("opentelemetry"):
            raise
        raise ConfigError(
            "otlp.endpoint is set but OpenTelemetry is not installed: pip install 'keel[otlp]'", field="otlp.endpoint"
        ) from exc
    return OtlpExporter(config.otlp, redactor=redactor)


class ChatStream:
    """Async iterator of `StreamDelta`s; `.result` holds the `ChatResult` at the end."""

    def __init__(self, source: AsyncIterator[StreamDelta | ChatResult]) -> None:
        self._source = source
        self.result: ChatResult | None = None
        self.text = ""

    def __aiter__(self) -> AsyncIterator[StreamDelta]:
        return self._deltas()

    async def _deltas(self) -> AsyncIterator[StreamDelta]:
        async for item in self._source:
            if isinstance(item, ChatResult):
                self.result = item
            else:
                self.text += item.text
                yield item

    async def collect(self) -> ChatResult:
        """Read the whole stream and return its result."""
        async for _ in self:
            pass
        assert self.result is not None
        return self.result

    async def aclose(self) -> None:
        await self._source.aclose()  # type: ignore[attr-defined]


class SyncChatStream:
    """`ChatStream` for synchronous code: a plain iterator of deltas."""

    def __init__(self, stream: ChatStream, loop: LoopThread) -> None:
        self._stream = stream
        self._loop = loop
        self._iterator = aiter(stream)

    def __iter__(self) -> Iterator[StreamDelta]:
        while True:
            try:
                yield self._loop.run(anext(self._iterator))
            except StopAsyncIteration:
                return

    @property
    def result(self) -> ChatResult | None:
        return self._stream.result
