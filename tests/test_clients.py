"""Clients nobody here wrote, against `keel serve` on a socket: simonw's `llm` CLI and LangChain's `ChatOpenAI`.

Both stream structured output by default (`llm --schema`, `with_structured_output(...).stream()`), which keel
once refused with a 400.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import BaseModel

from helpers import spans
from keel import Gateway, TestModel
from serving import Server

CITY = '{"name": "Oslo", "population": 709000}'


class City(BaseModel):
    name: str
    population: int


@pytest.fixture
def served() -> Iterator[tuple[Server, Gateway, TestModel]]:
    model = TestModel(CITY, chunk_chars=6)
    gw = Gateway(models={"t": model})
    server = Server(gw)
    yield server, gw, model
    server.stop()
    gw.close()


def test_llm_cli_schema_streams_against_keel(served: tuple[Server, Gateway, TestModel], tmp_path: Path) -> None:
    server, gw, model = served
    home = tmp_path / "llm-home"
    home.mkdir()
    # llm's documented way to reach an OpenAI-compatible server: extra-openai-models.yaml in its user dir
    (home / "extra-openai-models.yaml").write_text(
        f"- model_id: keel-t\n  model_name: t\n  api_base: {server.url}\n  supports_schema: true\n"
    )
    llm = Path(sys.executable).parent / "llm"
    env = {**os.environ, "LLM_USER_PATH": str(home)}
    done = subprocess.run(
        [str(llm), "-m", "keel-t", "--schema", "name, population int", "Biggest city in Norway?"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"name": "Oslo", "population": 709000}
    sent = model.requests[-1].options.response_format
    assert sent is not None and set(sent.schema["properties"]) == {"name", "population"}
    [span] = spans(gw)
    assert span.attributes["keel.stream"] is True and span.status == "ok"  # llm streams unless told not to


def test_langchain_structured_output_streams_against_keel(served: tuple[Server, Gateway, TestModel]) -> None:
    from langchain_openai import ChatOpenAI

    server, gw, model = served
    chat = ChatOpenAI(model="t", base_url=server.url, api_key="unused", max_retries=0)  # type: ignore[arg-type]
    pieces = list(chat.with_structured_output(City).stream("Biggest city in Norway?"))
    assert pieces and pieces[-1] == City(name="Oslo", population=709000)
    assert model.requests[-1].options.response_format is not None
    [span] = spans(gw)
    assert span.attributes["keel.stream"] is True and span.status == "ok"
