"""Task functions for the evals tests, importable by a `keel eval run` subprocess (PYTHONPATH=tests).

`answer` stands in for a model: every call is appended to EVALS_CALLS (one line per case input),
and when EVALS_KILL_AT is set, the call that would be number EVALS_KILL_AT kills its own process
with SIGKILL before answering (a kill -9 in the middle of a run, at a known point).
"""

from __future__ import annotations

import os
import signal
from typing import Any


def answer(text: str) -> str:
    path = os.environ["EVALS_CALLS"]
    kill_at = int(os.environ.get("EVALS_KILL_AT", "0"))
    done = 0
    if os.path.exists(path):
        with open(path) as seen:
            done = seen.read().count("\n")
    if kill_at and done + 1 >= kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    with open(path, "a") as calls:
        calls.write(f"{text}\n")
    return text.upper()


def length_score(output: Any, expected: Any) -> float:
    return min(1.0, len(str(output)) / 10)


def broken_score(output: Any, expected: Any) -> float:
    raise RuntimeError("this scorer is broken")


def nan_score(output: Any) -> float:
    return float("nan")
