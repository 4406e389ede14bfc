"""The sync twins' event loop: one private loop in a daemon thread.

Async SDK clients bind their connection pools to the loop that first used
them, so the sync API must run every call on the same loop, not a fresh
`asyncio.run` each time.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["LoopThread"]

T = TypeVar("T")


class LoopThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="keel-sync-loop", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T] | Any) -> T:
        if not asyncio.iscoroutine(coro):

            async def wrap() -> Any:
                return await coro

            coro = wrap()
        result: T = asyncio.run_coroutine_threadsafe(coro, self.loop).result()
        return result

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()
