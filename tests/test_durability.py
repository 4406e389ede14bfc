"""No answered call without its span: a server killed with -9 right after answering keeps every charge."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import httpx
import pytest

from helpers import write_config
from keel.config import KeyConfig
from keel.gateway.budget import period_starts
from keel.keys import create_key
from keel.store import SpanFilter, open_store
from keel.trace import Span, SpanWriter, new_id, new_trace_id
from stubs import free_port
from test_processes import _wait_ready

TOML = """default_model = "t"
[models.t]
provider = "test"
model = "t"
script = ["a priced answer of a few words"]
price = { input = 10.0, output = 20.0 }
"""


def _serve(tmp_path: Path, store: Path, port: int) -> subprocess.Popen[str]:
    env = {**os.environ, "KEEL_CONFIG": str(write_config(tmp_path, TOML)), "KEEL_STORE": str(store)}
    keel = Path(sys.executable).with_name("keel")
    proc = subprocess.Popen(
        [str(keel), "serve", "--port", str(port), "--log-level", "warning"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    _wait_ready(f"http://127.0.0.1:{port}/healthz", proc)
    return proc


@pytest.mark.parametrize("streamed", [False, True])
def test_every_answered_call_survives_a_kill_9(tmp_path: Path, streamed: bool) -> None:
    store_path = tmp_path / "k.db"
    store = open_store(str(store_path))
    secret, _ = create_key(store, "team", KeyConfig(daily_budget_usd=100.0))
    store.close()
    port = free_port()
    proc = _serve(tmp_path, store_path, port)
    answered: list[tuple[str, float]] = []
    failures: list[BaseException] = []

    def caller(worker: int) -> None:
        headers = {"authorization": f"Bearer {secret}"}
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=30) as client:
            for i in range(8):
                body = {"model": "t", "messages": [{"role": "user", "content": f"call {worker}.{i}"}]}
                try:
                    if streamed:
                        body |= {"stream": True, "stream_options": {"include_usage": True}}
                        with client.stream("POST", "/v1/chat/completions", json=body) as response:
                            text = "".join(response.iter_text())
                        assert response.status_code == 200 and "[DONE]" in text, text
                        answered.append((f"call {worker}.{i}", -1.0))
                    else:
                        response = client.post("/v1/chat/completions", json=body)
                        assert response.status_code == 200, response.text
                        answered.append((f"call {worker}.{i}", float(response.headers["x-keel-cost-usd"])))
                except BaseException as exc:  # reported below, on the test's thread
                    failures.append(exc)

    threads = [threading.Thread(target=caller, args=(w,)) for w in range(6)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        proc.send_signal(signal.SIGKILL)  # at once: no shutdown, no flush
        proc.wait(timeout=20)
    assert not failures and len(answered) == 48

    store = open_store(str(store_path))  # what a restarted server reads
    try:
        stored = store.list_spans(SpanFilter(operation="chat", limit=1000))
        spans = {s.input["messages"][0]["content"]: s for s in stored}  # each call asked its own question
        missing = [asked for asked, _ in answered if asked not in spans]
        assert not missing, f"{len(missing)} of {len(answered)} answered calls have no span"
        charged = [spans[asked].attributes["keel.cost_usd"] for asked, _ in answered]
        assert all(cost > 0 for cost in charged)
        if not streamed:
            assert charged == pytest.approx([cost for _, cost in answered])
        assert store.spend("team", period_starts(time.time())["daily"]) == pytest.approx(sum(charged))
    finally:
        store.close()


async def test_durable_returns_after_the_commit_and_calls_share_commits(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "s.db"))
    batches: list[int] = []
    write_spans = store.write_spans

    def slow_write(spans: Sequence[Span]) -> None:
        time.sleep(0.02)  # a commit that takes a while: calls finishing meanwhile join the next one
        write_spans(spans)
        batches.append(len(spans))

    store.write_spans = slow_write  # type: ignore[method-assign]
    writer = SpanWriter(store, interval=60)  # left to its interval, nothing would be written during the test

    async def call(i: int) -> None:
        span = Span(new_trace_id(), new_id(), None, f"call {i}", time.time(), time.time())
        await writer.durable(writer.submit(span))
        assert store.get_trace(span.trace_id), "durable() returned before the span was committed"

    await asyncio.wait_for(asyncio.gather(*(call(i) for i in range(50))), timeout=10)
    assert sum(batches) == 50 and len(batches) <= 5
    writer.close()
    store.close()
