"""Job kinds: the handlers apps register, one per kind of item.

A handler takes an item's JSON input and returns a JSON result; it may be a
plain function or a coroutine function, and may take a second argument, the
`ItemContext`, for the item's idempotency key (to key its side effects: DBOS
runs an item's workflow at least once), the worker's store, and to report what the item cost. A kind may
declare a queue of its own with its limits, so that an app needs no `[jobs.queues]` entry (one there
overrides the declared limits). Registering is
importing: `keel worker` imports the modules named in `[jobs] imports` (or
`--import`), whose `@kind(...)` decorators fill the registry.

    from keel import jobs

    @jobs.kind("rag.ingest", queue="embed", worker_concurrency=8)
    async def ingest_file(item: dict, ctx: jobs.ItemContext) -> dict:
        ...
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import ValidationError

from keel.errors import InputError, UnknownJobKind
from keel.jobs.settings import JobQueueConfig

if TYPE_CHECKING:
    from keel.config import Config
    from keel.store.base import Store

__all__ = ["ItemContext", "Kind", "declared_queues", "get_kind", "kind", "queue_limits", "registered_kinds"]

Handler = Callable[..., Any]
H = TypeVar("H", bound=Handler)


@dataclass
class ItemContext:
    """What a handler may know of the item it runs: whose it is, which attempt, and its cost so far."""

    job: str
    key: str  # the idempotency key: the same on every run of this item; key side effects by it
    attempt: int  # 1 on the first run, more after a crash, a retry or a resume
    trace_id: str  # spans of model calls made by the handler join this trace
    cost_usd: float = 0.0
    store: Store | None = None  # keel's store of the worker running the item (None: the handler called directly)

    def add_cost(self, usd: float | None) -> None:
        """Count a model call's cost (e.g. `ctx.add_cost(result.cost_usd)`) into the item and its job."""
        if usd:
            self.cost_usd += float(usd)


@dataclass(frozen=True)
class Kind:
    name: str
    handler: Handler
    queue: str | None = None  # None: the job's queue, else [jobs] default_queue
    attempts: int = 1  # runs of a raising handler before the item fails for good
    takes_context: bool = field(default=False)

    @property
    def is_async(self) -> bool:
        """The handler is a coroutine function (it runs on an event loop)."""
        return inspect.iscoroutinefunction(self.handler)

    async def run(self, value: Any, ctx: ItemContext) -> Any:
        """Call the handler: a coroutine in this loop, a plain function in a thread (it may block)."""
        if self.is_async:
            return await self.handler(*self._args(value, ctx))
        return await asyncio.to_thread(self.call, value, ctx)

    def call(self, value: Any, ctx: ItemContext) -> Any:
        """Call a plain handler in this thread (a coroutine function gives its coroutine: use `run`)."""
        return self.handler(*self._args(value, ctx))

    def _args(self, value: Any, ctx: ItemContext) -> tuple[Any, ...]:
        return (value, ctx) if self.takes_context else (value,)


_KINDS: dict[str, Kind] = {}


def _takes_context(handler: Handler) -> bool:
    params = [
        p for p in inspect.signature(handler).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]  # fmt: skip
    if not 1 <= len(params) <= 2:
        raise InputError(f"a job handler takes the item's input (and optionally an ItemContext), not {len(params)}")
    return len(params) == 2


def kind(
    name: str,
    *,
    queue: str | None = None,
    attempts: int = 1,
    concurrency: int | None = None,
    worker_concurrency: int | None = None,
    rpm: int | None = None,
) -> Callable[[H], H]:
    """Register the decorated function as the handler of job items of kind `name`.

    `queue` is where its items go unless a submission names another; with
    `concurrency` (across workers), `worker_concurrency` (per worker) or `rpm`
    the kind declares that queue's default limits, so it needs no entry in
    `[jobs.queues]` (an entry there overrides them)."""
    if not name or not name.strip():
        raise InputError("a job kind needs a name")
    if attempts < 1:
        raise InputError(f"attempts must be at least 1, not {attempts}")
    if queue is not None:
        _declare(queue, _limits(concurrency, worker_concurrency, rpm))
    elif (concurrency, worker_concurrency, rpm) != (None, None, None):
        raise InputError(f"job kind {name!r}: limits are for a kind's own queue; give queue= too")

    def register(handler: H) -> H:
        _KINDS[name] = Kind(name, handler, queue, attempts, _takes_context(handler))
        return handler

    return register


_QUEUES: dict[str, JobQueueConfig] = {}  # queues kinds declared, with their default limits


def _limits(concurrency: int | None, worker_concurrency: int | None, rpm: int | None) -> JobQueueConfig:
    try:
        return JobQueueConfig(concurrency=concurrency, worker_concurrency=worker_concurrency, rpm=rpm)
    except ValidationError as exc:
        problem = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'limits'}: {e['msg']}" for e in exc.errors())
        raise InputError(f"job queue limits: {problem}") from None


def _declare(queue: str, limits: JobQueueConfig) -> None:
    """Record a kind's queue; kinds sharing a queue must agree on its limits (else which would hold?)."""
    if not queue.strip():
        raise InputError("a job queue needs a name")
    known = _QUEUES.setdefault(queue, limits)
    if known != limits and limits != JobQueueConfig():
        if known == JobQueueConfig():  # declared first by a kind that named the queue without limits
            _QUEUES[queue] = limits
            return
        raise InputError(
            f"job queue {queue!r} is declared with other limits by another kind ({known.model_dump(exclude_none=True)})"
        )


def declared_queues() -> dict[str, JobQueueConfig]:
    """The queues registered kinds declared, with their default limits."""
    return dict(_QUEUES)


def queue_limits(config: Config, queue: str) -> JobQueueConfig | None:
    """A queue's limits: `[jobs.queues.NAME]` if configured, else what a registered kind declared; None if
    neither knows it."""
    return config.jobs.queues.get(queue) or _QUEUES.get(queue)


def get_kind(name: str) -> Kind:
    found = _KINDS.get(name)
    if found is None:
        known = ", ".join(sorted(_KINDS)) or "none"
        raise UnknownJobKind(
            f"no handler for job kind {name!r} in this process (registered: {known}); import the module that"
            " defines it, e.g. with `keel worker --import MODULE` or [jobs] imports"
        )
    return found


def registered_kinds() -> list[str]:
    return sorted(_KINDS)
