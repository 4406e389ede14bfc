"""keel as separate processes: the server started by `keel serve`, and a crash mid-call."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import openai

from helpers import write_config
from stubs import free_port

TOML = 'default_model = "t"\n[models.t]\nprovider = "test"\nmodel = "t"\nscript = ["served by keel"]\n'


def _wait_ready(url: str, proc: subprocess.Popen[str], timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited: {proc.communicate()}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise AssertionError("server did not start")


def test_keel_serve_answers_the_openai_sdk_and_stops_cleanly(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "KEEL_CONFIG": str(write_config(tmp_path, TOML)), "KEEL_STORE": str(tmp_path / "k.db")}
    keel = Path(sys.executable).with_name("keel")
    proc = subprocess.Popen(
        [str(keel), "serve", "--port", str(port), "--log-level", "warning"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        _wait_ready(f"http://127.0.0.1:{port}/healthz", proc)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        answer = client.chat.completions.create(model="t", messages=[{"role": "user", "content": "hi"}])
        assert answer.choices[0].message.content == "served by keel"
        assert "t" in {m.id for m in client.models.list()}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
    assert proc.returncode in (0, -signal.SIGTERM)  # uvicorn re-raises SIGTERM after a graceful shutdown
    rows = sqlite3.connect(tmp_path / "k.db").execute("SELECT status, model FROM spans").fetchall()
    assert rows == [("ok", "t")]  # the span was flushed before the process ended


CRASHING = """
import asyncio, sys
from keel import Gateway, TestModel

async def main():
    gw = Gateway(models={"slow": TestModel("late", delay=60)}, store=sys.argv[1])
    print("calling", flush=True)
    await gw.chat("never finishes", model="slow")

asyncio.run(main())
"""


def test_a_crash_mid_call_leaves_no_partial_row(tmp_path: Path) -> None:
    script = tmp_path / "crash.py"
    script.write_text(textwrap.dedent(CRASHING))
    store = tmp_path / "crash.db"
    proc = subprocess.Popen([sys.executable, str(script), str(store)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "calling"
    time.sleep(0.3)
    proc.kill()
    proc.wait(timeout=10)
    db = sqlite3.connect(store)
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert db.execute("SELECT COUNT(*) FROM spans").fetchone() == (0,)
    from keel.store.migrations import MIGRATIONS

    assert [r[0] for r in db.execute("SELECT name FROM keel_migrations")] == [m.name for m in MIGRATIONS]
