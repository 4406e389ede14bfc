"""Task functions for the evals tests, importable by a `keel eval run` subprocess (PYTHONPATH=tests).

`answer` stands in for a model: every call is appended to EVALS_CALLS (one line per case input),
and when EVALS_KILL_AT is set, the call that would be number EVALS_KILL_AT kills its own process
with SIGKILL before answering (a kill -9 in the middle of a run, at a known point).
"""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any


def _kill_due() -> bool:
    """Whether this call would be number EVALS_KILL_AT (counted in the EVALS_CALLS file, one line a call)."""
    kill_at = int(os.environ.get("EVALS_KILL_AT", "0"))
    done = 0
    if os.path.exists(os.environ["EVALS_CALLS"]):
        with open(os.environ["EVALS_CALLS"]) as seen:
            done = seen.read().count("\n")
    return bool(kill_at) and done + 1 >= kill_at


def _record(text: str) -> str:
    with open(os.environ["EVALS_CALLS"], "a") as calls:
        calls.write(f"{text}\n")
    return text.upper()


def answer(text: str) -> str:
    if _kill_due():
        os.kill(os.getpid(), signal.SIGKILL)
    return _record(text)


def length_score(output: Any, expected: Any) -> float:
    return min(1.0, len(str(output)) / 10)


def broken_score(output: Any, expected: Any) -> float:
    raise RuntimeError("this scorer is broken")


def nan_score(output: Any) -> float:
    return float("nan")


# --- async tasks: cases that overlap (a chunk's window, the suite's concurrency) -------------------------------

in_flight = 0
peak = 0


async def slow_answer(text: str) -> str:
    """Answers after 20 ms, counting how many calls overlap (`peak`)."""
    global in_flight, peak
    in_flight += 1
    peak = max(peak, in_flight)
    try:
        await asyncio.sleep(0.02)
    finally:
        in_flight -= 1
    return text.upper()


async def answer_async(text: str) -> str:
    """`answer`, but a coroutine that takes 50 ms, so that the cases of a chunk overlap. The call that would
    be number EVALS_KILL_AT waits 2 s first: cases that answered meanwhile get recorded, and the kill finds
    no case answered but unrecorded (that case would be called again, as DBOS steps are at-least-once)."""
    if _kill_due():
        await asyncio.sleep(2.0)
        os.kill(os.getpid(), signal.SIGKILL)
    await asyncio.sleep(0.05)
    return _record(text)


async def slow_answer_too(text: str) -> str:
    """`slow_answer` under another name: another task, so nothing of its outputs is cached yet."""
    return await slow_answer(text)
