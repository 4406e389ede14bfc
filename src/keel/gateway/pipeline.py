"""The request pipeline: one ordered stack of request-level wrappers for every gateway call.

A call (chat, streamed chat or embeddings) is a `Call` value: what is asked,
of which configured model, for whom (`CallContext`: key, tenant, user,
session, tags, metadata) and under which span. Each `RequestWrapper` takes
the call and the next handler and returns the stream of items the call
produces: `StreamDelta`s, then one final `ModelResponse` (an
`EmbeddingResult` for embeddings). A non-streamed chat is the same stream
with no deltas, so `chat` and `stream` run the same wrappers and a cache, a
cascade or a budget is written once for both.

Wrappers sit in named slots, outermost first (`SLOTS`). The built-in ones
fill `trace`, `scope`, `limits`, `budget` and `structured`; `cache`,
`cascade` and `compression` are where those levers go; a user's own
wrappers default to the `user` slot, after the key's model scope is checked
and before the cache (so a prompt rewritten there is what the cache sees).
The innermost handler routes the call to the model's fallback chain.

A wrapper with nothing to do for a call returns `next(call)` itself instead
of wrapping it: that costs one function call, not a generator per item.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, Callable, Iterable, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from keel.errors import ConfigError, MalformedResponse
from keel.types import ChatRequest, EmbeddingResult, ModelResponse, StreamDelta

if TYPE_CHECKING:
    from keel.gateway.structured import StructuredSpec
    from keel.trace import Span

__all__ = [
    "SLOTS",
    "Call",
    "CallContext",
    "Handler",
    "Item",
    "Pipeline",
    "RequestWrapper",
    "final_item",
]

Item = StreamDelta | ModelResponse | EmbeddingResult
"""What a handler yields: deltas (streamed chat only), then exactly one final response."""

Handler = Callable[["Call"], AsyncGenerator[Item, None]]

SLOTS: tuple[str, ...] = ("trace", "scope", "user", "cache", "budget", "limits", "cascade", "compression", "structured")
"""The pipeline's positions, outermost first."""


@dataclass(frozen=True, slots=True)
class CallContext:
    """Who and what a call is for. Every wrapper and every span sees it: a cache can be scoped by
    tenant, a cost report grouped by tag."""

    key: str | None = None
    tenant: str | None = None
    user: str | None = None
    session: str | None = None
    tags: tuple[str, ...] = ()
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def span_attributes(self) -> dict[str, Any]:
        """The context as span attributes (`keel.*`), leaving out what is unset."""
        out: dict[str, Any] = {}
        for name in ("key", "tenant", "user", "session"):
            value = getattr(self, name)
            if value is not None:
                out["keel.api_key" if name == "key" else f"keel.{name}"] = value
        if self.tags:
            out["keel.tags"] = list(self.tags)
        for k, v in self.metadata.items():
            out[f"keel.metadata.{k}"] = v
        return out


@dataclass(slots=True)
class Call:
    """One gateway call as it passes through the pipeline. Wrappers may replace `request` or
    `model` for the wrappers inside them (a cascade picks a model, compression shortens the
    messages) and keep their own notes in `state`."""

    operation: Literal["chat", "embeddings"]
    model: str  # the configured model name the call resolved to
    context: CallContext
    span: Span
    request: ChatRequest | None = None  # chat
    texts: tuple[str, ...] = ()  # embeddings
    stream: bool = False
    structured: StructuredSpec | None = None
    max_reasks: int = 2
    parsed: Any = None  # the validated value of a structured call
    state: dict[str, Any] = field(default_factory=dict)

    @property
    def chat_request(self) -> ChatRequest:
        if self.request is None:
            raise TypeError(f"a {self.operation} call has no chat request")
        return self.request


class RequestWrapper(ABC):
    """A request-level wrapper: behaviour around every call, with one interface for chat, stream and
    embeddings. Subclasses implement `__call__`, usually as an async generator:

        class Tagger(RequestWrapper):
            async def __call__(self, call, next):
                call.span.attributes["my.tag"] = "x"
                async with aclosing(next(call)) as items:
                    async for item in items:
                        yield item

    `contextlib.aclosing` closes the inner wrappers at once when the caller leaves a stream early, so
    a budget or a limit inside settles then, not whenever the garbage collector gets to it.
    """

    #: The slot it goes in unless another is named when it is added (see `SLOTS`).
    slot: ClassVar[str] = "user"

    @abstractmethod
    def __call__(self, call: Call, next: Handler) -> AsyncGenerator[Item, None]:
        """Handle `call`, delegating to `next` (or answering without it, as a cache hit does)."""


async def final_item(items: AsyncGenerator[Item, None]) -> ModelResponse | EmbeddingResult:
    """Read a call's items to the end and return the final response (a non-streamed call)."""
    final: ModelResponse | EmbeddingResult | None = None
    async with aclosing(items):
        async for item in items:
            if not isinstance(item, StreamDelta):
                final = item
    if final is None:
        raise MalformedResponse("the call ended without a final response")
    return final


class Pipeline:
    """Wrappers in slot order around an innermost handler; `handler` is rebuilt when one is added."""

    def __init__(self, innermost: Handler, wrappers: Iterable[tuple[str, RequestWrapper]] = ()) -> None:
        self._innermost = innermost
        self._slots: dict[str, list[RequestWrapper]] = {slot: [] for slot in SLOTS}
        for slot, wrapper in wrappers:
            self._slots[_check_slot(slot)].append(wrapper)
        self.handler: Handler = self._compose()

    def add(self, wrapper: RequestWrapper, slot: str | None = None, *, first: bool = False) -> None:
        """Put a wrapper in its slot (`wrapper.slot` unless named): last in the slot, or first."""
        if not isinstance(wrapper, RequestWrapper):
            raise ConfigError(f"a pipeline wrapper must be a keel.RequestWrapper, got {type(wrapper).__name__}")
        wrappers = self._slots[_check_slot(slot or wrapper.slot)]
        wrappers.insert(0, wrapper) if first else wrappers.append(wrapper)
        self.handler = self._compose()

    def remove(self, wrapper: RequestWrapper) -> None:
        for wrappers in self._slots.values():
            if wrapper in wrappers:
                wrappers.remove(wrapper)
        self.handler = self._compose()

    @property
    def wrappers(self) -> list[tuple[str, RequestWrapper]]:
        """(slot, wrapper) pairs, outermost first."""
        return [(slot, w) for slot in SLOTS for w in self._slots[slot]]

    def _compose(self) -> Handler:
        handler = self._innermost
        for _, wrapper in reversed(self.wrappers):
            handler = _bind(wrapper, handler)
        return handler


def _bind(wrapper: RequestWrapper, next: Handler) -> Handler:
    def handle(call: Call) -> AsyncGenerator[Item, None]:
        return wrapper(call, next)

    return handle


def _check_slot(slot: str) -> str:
    if slot not in SLOTS:
        raise ConfigError(f"unknown pipeline slot {slot!r}; the slots are: {', '.join(SLOTS)}")
    return slot


def wrappers_from_config(entries: Sequence[Mapping[str, Any]]) -> list[tuple[str, RequestWrapper]]:
    """Instantiate `[[gateway.wrappers]]` entries: `path = "package.module:Class"`, optional `slot` and
    `options` (keyword arguments of the class)."""
    import importlib

    out: list[tuple[str, RequestWrapper]] = []
    for i, entry in enumerate(entries):
        where = f"gateway.wrappers[{i}]"
        path = str(entry.get("path", ""))
        module_name, _, attr = path.partition(":")
        if not module_name or not attr:
            raise ConfigError(f"{where}.path must look like 'package.module:Class', got {path!r}", field=where)
        try:
            cls = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"{where}.path {path!r} cannot be imported: {exc}", field=where) from None
        try:
            wrapper = cls(**dict(entry.get("options") or {}))
        except TypeError as exc:
            raise ConfigError(f"{where}.options do not fit {path}: {exc}", field=where) from None
        if not isinstance(wrapper, RequestWrapper):
            raise ConfigError(f"{where}.path {path!r} is not a keel RequestWrapper", field=where)
        out.append((_check_slot(str(entry.get("slot") or wrapper.slot)), wrapper))
    return out
