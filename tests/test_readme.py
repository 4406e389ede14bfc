"""The README's Python, run as a newcomer would run it offline: every snippet that needs no server runs to the
end (the async one included), and every `gw.NAME(...)` the prose shows exists and is awaited if it is async."""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from keel import Gateway

README = Path(__file__).resolve().parents[1] / "README.md"

#: hosted and local models replaced by scripted ones: the snippets' API use is under test, not the models
CONFIG = """[models.local]
provider = "test"
model = "local"
script = ["RAG answers from retrieved documents."]
[models.gpt-4o-mini]
provider = "test"
model = "gpt-4o-mini"
script = ['{"name": "Oslo", "population": 709000}']
[models.local-embed]
provider = "test"
model = "local-embed"
kind = "embedding"
"""

#: run what a snippet defines but leaves to the reader to call
EPILOGUE = """
import asyncio as _asyncio
if "main" in dir():
    _asyncio.run(main())
"""


def python_snippets() -> list[str]:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    return [b for b in blocks if "127.0.0.1" not in b]  # those need `keel serve` running


def test_the_readme_has_offline_snippets() -> None:
    assert len(python_snippets()) >= 2


@pytest.mark.parametrize("snippet", python_snippets())
def test_a_readme_snippet_runs(snippet: str, tmp_path: Path) -> None:
    config = tmp_path / "keel.toml"
    config.write_text(CONFIG)
    env = {**os.environ, "KEEL_CONFIG": str(config), "KEEL_STORE": str(tmp_path / "keel.db"), "OPENAI_API_KEY": ""}
    done = subprocess.run(
        [sys.executable, "-W", "error::RuntimeWarning", "-c", snippet + EPILOGUE],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "was never awaited" not in done.stderr, done.stderr


def test_the_prose_calls_gateway_methods_as_they_are() -> None:
    calls = re.findall(r"(await )?gw\.(\w+)\(", README.read_text())
    assert calls
    for awaited, name in calls:
        method = getattr(Gateway, name, None)
        assert method is not None, f"README calls gw.{name}(), which Gateway does not have"
        if inspect.iscoroutinefunction(method):
            assert awaited, f"README calls gw.{name}() without await: it is a coroutine (gw.{name}_sync is not)"


def test_a_snippet_calling_a_hosted_model_says_which_key_it_needs() -> None:
    hosted = {"gpt-": "OPENAI_API_KEY", "claude-": "ANTHROPIC_API_KEY", "gemini-": "GEMINI_API_KEY"}
    for snippet in python_snippets():
        for prefix, env in hosted.items():
            if f'model="{prefix}' in snippet:
                assert env in snippet, f"a snippet calls a {prefix}* model without a word about {env}"
