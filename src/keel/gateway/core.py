"""`Gateway`: the one object an application talks to.

It resolves a model name or alias to a fallback chain of deployments, applies
the caller key's limits and budget, runs structured output, and records one
span per call (success or failure) with usage, cost, latency and attempts.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Mapping, Sequence
from contextlib import aclosing
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict, Unpack

from pydantic import BaseModel

from keel.config import Config, KeyConfig, ModelConfig, load_config
from keel.errors import ConfigError, InputError, MalformedResponse, ModelNotAllowed, UnknownModel
from keel.gateway.budget import Budgets, BudgetTracker
from keel.gateway.deployment import Deployment
from keel.gateway.fallback import FallbackModel
from keel.gateway.limits import KeyLimiter, Limiter
from keel.gateway.pipeline import Call, CallContext, Pipeline, RequestWrapper, final_item, wrappers_from_config
from keel.gateway.registry import build_adapter, wrap
from keel.gateway.structured import spec_for
from keel.gateway.sync import LoopThread
from keel.gateway.wrappers import KeyBudget, KeyLimits, KeyScope, Structured, Tracing, route, worst_case_cost
from keel.models.base import Model
from keel.store import Store, open_store
from keel.trace import Redactor, Span, SpanWriter, Tracer, enter_span, exit_span
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
    check_unicode,
    parse_messages,
)

if TYPE_CHECKING:
    from keel.otlp import OtlpExporter
    from keel.store.postgres import PostgresStore

__all__ = ["ChatArgs", "ChatStream", "EmbedArgs", "Gateway", "SyncChatStream"]


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
    check_unicode(list(o.stop), "stop")
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


class ChatArgs(TypedDict, total=False):
    """The keyword arguments of `Gateway.chat` (and `chat_sync`, `stream`, `stream_sync`)."""

    system: str | None
    temperature: float | None
    max_tokens: int | None
    stop: Sequence[str] | str | None
    seed: int | None
    top_p: float | None
    tools: Sequence[Tool | Mapping[str, Any]] | None
    tool_choice: str | None
    timeout: float | None
    logprobs: bool
    top_logprobs: int | None
    response_model: type[BaseModel] | Mapping[str, Any] | None
    max_reasks: int
    key: str | None
    metadata: Mapping[str, Any] | None
    context: CallContext | None


class EmbedArgs(TypedDict, total=False):
    """The keyword arguments of `Gateway.embed` (and `embed_sync`)."""

    key: str | None
    metadata: Mapping[str, Any] | None
    context: CallContext | None


class Gateway:
    """Every configured model behind one typed API (async, with `*_sync` twins).

    >>> gw = Gateway()                                # keel.toml or the embedded defaults
    >>> result = gw.chat_sync("What is RAG?", model="local")
    >>> result.text, result.usage, result.cost_usd, result.trace_id

    Every call passes `gw.pipeline`, one ordered stack of request wrappers (see
    `keel.gateway.pipeline`); `wrappers` adds your own, as does `[[gateway.wrappers]]` in keel.toml.
    """

    def __init__(
        self,
        config: Config | str | Path | None = None,
        *,
        store: Store | str | bool | None = None,
        models: Mapping[str, Model] | None = None,
        key: str | None = None,
        wrappers: Sequence[RequestWrapper] = (),
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
        self._key_limiters: dict[str, KeyLimiter] = {}
        self._ledger_store: PostgresStore | None = None
        #: Limits, budgets and model lists by key name: `[keys.*]` of the configuration, plus the
        #: virtual keys a server registers (`set_key`). The budget tracker reads the same dict.
        self.keys: dict[str, KeyConfig] = dict(self.config.keys)
        #: Key budgets: in this process, or on PostgreSQL shared by every replica and worker (atomically).
        self.budgets: Budgets = self._budgets()
        # the providers' keys and the server's admin key are never stored nor exported in clear
        secret_envs = {env for m in self.config.models.values() if (env := m.key_env())}
        secret_envs.add(self.config.server.admin_key_env)
        tracing = self.config.tracing
        #: What every stored or exported string goes through (spans, OTLP, metric labels).
        self.redactor = redactor = Redactor(tracing.redact_patterns, secret_envs)
        writer = SpanWriter(self.store, redactor=redactor, max_queue=tracing.max_queue) if self.store else None
        self.tracer = Tracer(writer, capture_content=tracing.capture_content)
        #: `[otlp]`: the exporter sending every span to an OpenTelemetry collector too, or None.
        self.otlp = _otlp_exporter(self.config, redactor)
        if self.otlp is not None:
            self.tracer.listeners.append(self.otlp.observe)
        self._loop_thread: LoopThread | None = None
        #: The request pipeline every call passes; `pipeline.add(wrapper, slot)` adds one.
        self.pipeline = self._build_pipeline(wrappers)

    def _build_pipeline(self, extra: Sequence[RequestWrapper]) -> Pipeline:
        built_in: list[tuple[str, RequestWrapper]] = [
            ("trace", Tracing()),
            ("scope", KeyScope(self._check_key_model)),
            ("budget", KeyBudget(self.budgets, self._worst_case)),
            ("limits", KeyLimits(self._key_limiter)),
            ("structured", Structured(capture_content=self.tracer.capture_content)),
        ]
        configured = wrappers_from_config([w.model_dump() for w in self.config.gateway.wrappers])
        pipeline = Pipeline(route(self._router, self.deployment), [*built_in, *configured])
        for wrapper in extra:
            pipeline.add(wrapper)
        return pipeline

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

    def _shared_store(self) -> PostgresStore | None:
        """Where key limits are counted when several processes may share the store (PostgreSQL): the
        same database, on connections of its own (`keel.gateway.shared_limits.ledger_store`)."""
        if self._ledger_store is None and self.store is not None and self.store.dialect == "postgres":
            from keel.gateway.shared_limits import ledger_store
            from keel.store.postgres import PostgresStore

            if isinstance(self.store, PostgresStore):
                self._ledger_store = ledger_store(self.store)
        return self._ledger_store

    def _budgets(self) -> Budgets:
        shared = self._shared_store()
        if shared is None:
            return BudgetTracker(self.store, self.keys)
        from keel.gateway.shared_limits import SharedBudgets

        return SharedBudgets(shared, self.keys)

    def _key_limiter(self, key: str) -> KeyLimiter | None:
        key_config = self.keys.get(key)
        if key_config is None or not (key_config.rpm or key_config.tpm):
            return None
        limiter = self._key_limiters.get(key)
        if limiter is None:
            subject, shared = f"key {key}", self._shared_store()
            if shared is None:
                limiter = Limiter(subject, rpm=key_config.rpm, tpm=key_config.tpm)
            else:
                from keel.gateway.shared_limits import SharedLimiter

                limiter = SharedLimiter(shared, subject, rpm=key_config.rpm, tpm=key_config.tpm)
            self._key_limiters[key] = limiter
        return limiter

    def _check_key_model(self, key: str | None, name: str) -> None:
        allowed = self.keys[key].models if key is not None and key in self.keys else None
        if allowed is not None and name not in {self.resolve(m) for m in allowed}:
            raise ModelNotAllowed(f"key {key!r} may not use model {name!r}; allowed: {', '.join(allowed)}")

    async def _durable(self, span: Span, ticket: int | None) -> None:
        """Hold the answer of a call that was charged until its span is in the store, so that its spend
        survives a crash right after (the writer's group commit makes concurrent calls share one commit)."""
        writer = self.tracer.writer
        if writer is not None and ticket is not None and (span.attributes.get("keel.cost_usd") or 0) > 0:
            await writer.durable(ticket)

    def _worst_case(self, call: Call) -> float | None:
        return worst_case_cost(self._router(call.model), call.chat_request, self.deployment, DEFAULT_MAX_OUTPUT)

    # --- calls ------------------------------------------------------------------

    def _context(
        self, key: str | None, metadata: Mapping[str, Any] | None, context: CallContext | None
    ) -> CallContext:
        """The call's context: `context` if given, with `key` and `metadata` filled in or added."""
        base = context or CallContext()
        key = key or base.key or self.key
        if metadata:
            base = replace(base, metadata={**base.metadata, **metadata})
        return base if key == base.key else replace(base, key=key)

    def _start_span(self, operation: str, model: str | None, context: CallContext) -> Span:
        span = self.tracer.start(f"{operation} {model or self.config.default_model}")
        span.set(gen_ai__operation__name=operation, gen_ai__request__model=model or self.config.default_model)
        span.attributes.update(context.span_attributes())
        return span

    def _chat_call(
        self,
        span: Span,
        context: CallContext,
        messages: str | Sequence[MessageLike],
        model: str | None,
        stream: bool,
        args: ChatArgs,
    ) -> Call:
        """Validate a chat call's arguments into a `Call` (or raise the caller's mistake)."""
        _check_context(context)  # else the call is made and charged but its span cannot be stored
        name = self.resolve(model)
        response_model = args.get("response_model")
        spec = spec_for(response_model) if response_model is not None else None
        stop = args.get("stop")
        options = ChatOptions(
            temperature=args.get("temperature"), max_tokens=args.get("max_tokens"),
            stop=(stop,) if isinstance(stop, str) else tuple(stop or ()),
            seed=args.get("seed"), top_p=args.get("top_p"), tools=_tools(args.get("tools")),
            tool_choice=args.get("tool_choice"), timeout=args.get("timeout"),
            response_format=spec.format if spec else None,
            logprobs=args.get("logprobs", False), top_logprobs=args.get("top_logprobs"),
        )  # fmt: skip
        max_reasks = args.get("max_reasks", 2)
        if isinstance(max_reasks, bool) or not isinstance(max_reasks, int) or max_reasks < 0:
            raise InputError(f"max_reasks must be 0 or more, got {max_reasks!r}")
        request = self._request(messages, name, args.get("system"), options)
        return Call(
            "chat", name, context, span, request=request, stream=stream, structured=spec, max_reasks=max_reasks
        )

    def _request(
        self, messages: str | Sequence[MessageLike], name: str, system: str | None, options: ChatOptions
    ) -> ChatRequest:
        parsed = parse_messages(messages)
        if system is not None:
            parsed = (Message.system(system), *parsed)
        _check_options(options)
        return ChatRequest(name, parsed, options)

    def _result(self, call: Call, response: ModelResponse, started: float) -> ChatResult:
        return ChatResult(
            text=response.text, tool_calls=response.tool_calls, finish_reason=response.finish_reason,
            usage=response.usage, cost_usd=response.cost_usd, latency_s=time.perf_counter() - started,
            model=response.deployment, response_model=response.model, provider=response.provider,
            attempts=response.attempts, trace_id=call.span.trace_id, span_id=call.span.span_id, parsed=call.parsed,
            logprobs=response.logprobs, stop_reason=response.stop_reason,
        )  # fmt: skip

    @staticmethod
    def _failed(span: Span, error: BaseException) -> None:
        span.fail(error)
        if isinstance(error, asyncio.CancelledError):
            span.error_type = span.attributes["error.type"] = "Cancelled"
            reason = str(error)
            if not reason or reason.startswith("Cancelled via cancel scope"):  # anyio's, when a client leaves
                reason = "cancelled before it finished (the caller went away or the server stopped)"
            span.error_message = reason

    async def chat(
        self, messages: str | Sequence[MessageLike], model: str | None = None, **args: Unpack[ChatArgs]
    ) -> ChatResult:
        """One chat call: messages in, a `ChatResult` out (or a `KeelError`).

        Options: system, temperature, max_tokens, stop, seed, top_p, tools, tool_choice, timeout,
        logprobs and top_logprobs (where the model gives them; an InputError elsewhere), response_model
        (a pydantic class or a JSON schema) with max_reasks, and who the call is for: key, metadata, or a
        whole `CallContext` (tenant, user, session, tags).
        """
        _check_args(args, ChatArgs)
        context = self._context(args.get("key"), args.get("metadata"), args.get("context"))
        span = self._start_span("chat", model, context)
        token = enter_span(span)
        started = time.perf_counter()
        try:
            call = self._chat_call(span, context, messages, model, False, args)
            response = await final_item(self.pipeline.handler(call))
            assert isinstance(response, ModelResponse)  # a chat call's final item
            result = self._result(call, response, started)
        except BaseException as error:
            self._failed(span, error)
            raise
        finally:
            exit_span(token)
            ticket = self.tracer.finish(span)
        await self._durable(span, ticket)
        return result

    def stream(
        self, messages: str | Sequence[MessageLike], model: str | None = None, **args: Unpack[ChatArgs]
    ) -> ChatStream:
        """Stream a chat call: iterate for `StreamDelta`s, then read `.result` (same options as `chat`;
        with `response_model` the answer streams as JSON and is validated at its end)."""
        _check_args(args, ChatArgs)
        return ChatStream(self._stream(messages, model, args))

    async def _stream(
        self, messages: str | Sequence[MessageLike], model: str | None, args: ChatArgs
    ) -> AsyncGenerator[StreamDelta | ChatResult, None]:
        context = self._context(args.get("key"), args.get("metadata"), args.get("context"))
        span = self._start_span("chat", model, context)
        span.set(keel__stream=True)
        started = time.perf_counter()
        finished = False
        token: contextvars.Token[Span | None] | None = enter_span(span)
        try:
            call = self._chat_call(span, context, messages, model, True, args)
            final: ModelResponse | None = None
            async with aclosing(self.pipeline.handler(call)) as items:  # a caller leaving early closes them all
                async for item in items:
                    if isinstance(item, ModelResponse):
                        final = item
                        continue
                    if token is not None:  # the caller's code runs between our yields: not under this span
                        exit_span(token)
                        token = None
                    assert isinstance(item, StreamDelta)  # a chat call yields deltas, then its response
                    yield item
            if final is None:
                raise MalformedResponse("the stream ended without a final response", provider=call.model)
            result = self._result(call, final, started)
            finished = True  # charged and recorded: nothing after this is the call's failure
            await self._durable(span, self.tracer.finish(span))
            yield result
        except BaseException as error:
            if not finished:
                self._failed(span, error)
            raise
        finally:
            if token is not None:
                exit_span(token)
            if not finished:
                self.tracer.finish(span)

    # --- embeddings and tokens -----------------------------------------------------

    async def embed(
        self, texts: Sequence[str], model: str | None = None, **args: Unpack[EmbedArgs]
    ) -> EmbeddingResult:
        """Embed `texts` with an embedding model (the configured default unless named)."""
        _check_args(args, EmbedArgs)
        context = self._context(args.get("key"), args.get("metadata"), args.get("context"))
        span = self._start_span("embeddings", model or self.config.default_embedding_model, context)
        token = enter_span(span)
        try:
            if isinstance(texts, str) or not isinstance(texts, Sequence) or not all(isinstance(t, str) for t in texts):
                raise InputError("texts must be a list of strings")
            _check_context(context)
            check_unicode(list(texts), "texts")
            name = self.resolve(model, kind="embedding")
            if name in self.config.models and self.config.models[name].kind != "embedding":
                raise InputError(f"{name!r} is a chat model; embed with an embedding model (see `keel models`)")
            if not texts:
                raise InputError("texts is empty")
            span.set(keel__model=name)
            call = Call("embeddings", name, context, span, texts=tuple(texts))
            result = await final_item(self.pipeline.handler(call))
            assert isinstance(result, EmbeddingResult)  # an embeddings call's final item
            span.set(gen_ai__provider__name=self.deployment(name).provider)
        except BaseException as error:
            span.fail(error)
            span.set(keel__attempts=getattr(error, "attempts", 0))
            raise
        finally:
            exit_span(token)
            ticket = self.tracer.finish(span)
        await self._durable(span, ticket)
        return replace(result, trace_id=span.trace_id)

    def count_tokens(self, messages: str | Sequence[MessageLike], model: str | None = None) -> int:
        """Input tokens of `messages` for `model`, counted offline (see keel.tokens)."""
        name = self.resolve(model)
        return self.deployment(name).count_tokens(ChatRequest(name, parse_messages(messages)))

    # --- sync twins and lifecycle ------------------------------------------------------

    def _loop(self) -> LoopThread:
        if self._loop_thread is None:
            self._loop_thread = LoopThread()
        return self._loop_thread

    def chat_sync(
        self, messages: str | Sequence[MessageLike], model: str | None = None, **args: Unpack[ChatArgs]
    ) -> ChatResult:
        """`chat` for synchronous code."""
        return self._loop().run(self.chat(messages, model, **args))

    def stream_sync(
        self, messages: str | Sequence[MessageLike], model: str | None = None, **args: Unpack[ChatArgs]
    ) -> SyncChatStream:
        """`stream` for synchronous code: iterate for deltas, then read `.result`."""
        return SyncChatStream(self.stream(messages, model, **args), self._loop())

    def embed_sync(
        self, texts: Sequence[str], model: str | None = None, **args: Unpack[EmbedArgs]
    ) -> EmbeddingResult:
        """`embed` for synchronous code."""
        return self._loop().run(self.embed(texts, model, **args))

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
        self.budgets.close()
        if self._ledger_store is not None:
            self._ledger_store.close()
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


def _check_context(context: CallContext) -> None:
    check_unicode(dict(context.metadata), "metadata")
    for name in ("tenant", "user", "session"):
        check_unicode(getattr(context, name), name)
    check_unicode(list(context.tags), "tags")


def _check_args(args: Mapping[str, Any], kind: type) -> None:
    """Unknown keyword arguments are the caller's mistake (typos included), said as such."""
    unknown = args.keys() - kind.__annotations__.keys()  # on every call: no copies of either
    if unknown:
        raise InputError(
            f"unknown argument(s) {', '.join(sorted(unknown))}; accepted: {', '.join(kind.__annotations__)}"
        )


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

    def __init__(self, source: AsyncGenerator[StreamDelta | ChatResult, None]) -> None:
        self._source = source
        self.result: ChatResult | None = None
        self.text = ""

    def __aiter__(self) -> AsyncIterator[StreamDelta]:
        return self._deltas()

    async def _deltas(self) -> AsyncIterator[StreamDelta]:
        # closing the deltas (a caller leaving early) closes the call at once: its budget settles and
        # its span is finished now, not when the garbage collector finds the source
        async with aclosing(self._source) as items:
            async for item in items:
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
        await self._source.aclose()


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
