"""The `keel` command line, run as a user would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from helpers import spans, write_config
from keel import Gateway
from keel.cli.app import app

TOML = """default_model = "t"
[models.t]
provider = "test"
model = "t"
script = ["RAG answers questions from retrieved documents."]

[models.j]
provider = "test"
model = "j"
script = ["{\\"answer\\": \\"yes\\"}"]
"""


@pytest.fixture
def runner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.setenv("KEEL_CONFIG", str(write_config(tmp_path, TOML)))
    monkeypatch.setenv("COLUMNS", "200")
    return CliRunner()


def test_chat_streams_and_prints_a_summary(runner: CliRunner) -> None:
    result = runner.invoke(app, ["chat", "What is RAG?"])
    assert result.exit_code == 0, result.output
    assert "RAG answers questions from retrieved documents." in result.stdout
    assert "attempts 1" in result.stderr and "trace" in result.stderr


def test_chat_json_schema(runner: CliRunner, tmp_path: Path) -> None:
    schema = tmp_path / "schema.json"
    schema.write_text(
        json.dumps({"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]})
    )
    result = runner.invoke(app, ["chat", "Is it?", "--model", "j", "--json-schema", str(schema), "-q"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"answer": "yes"}


def test_chat_errors_have_messages_and_exit_codes(runner: CliRunner, tmp_path: Path) -> None:
    unknown = runner.invoke(app, ["chat", "hi", "--model", "nope"])
    assert unknown.exit_code == 2 and "unknown model or alias 'nope'" in unknown.stderr
    bad_schema = tmp_path / "bad.json"
    bad_schema.write_text('{"type": "object", "properties": {"a": {"type": 12}}}')
    invalid = runner.invoke(app, ["chat", "hi", "--json-schema", str(bad_schema)])
    assert invalid.exit_code == 2 and "not a valid JSON schema" in invalid.stderr
    not_json = tmp_path / "x.json"
    not_json.write_text("{")
    assert runner.invoke(app, ["chat", "hi", "--json-schema", str(not_json)]).exit_code == 2
    missing_key = runner.invoke(app, ["chat", "hi", "--model", "gpt-4o-mini"], env={"OPENAI_API_KEY": ""})
    assert missing_key.exit_code == 3 and "OPENAI_API_KEY" in missing_key.stderr
    assert runner.invoke(app, ["chat", "  "]).exit_code == 2


def test_traces_list_show_stats(runner: CliRunner) -> None:
    assert runner.invoke(app, ["chat", "first question"]).exit_code == 0
    runner.invoke(app, ["chat", "second", "--model", "nope"])
    listed = runner.invoke(app, ["traces", "list"])
    assert listed.exit_code == 0 and "2 traces" in listed.stdout and "UnknownModel" in listed.stdout
    errors_only = runner.invoke(app, ["traces", "list", "--status", "error"])
    assert "1 traces" in errors_only.stdout
    found = runner.invoke(app, ["traces", "list", "--text", "first question"])
    assert "1 traces" in found.stdout
    trace_id = found.stdout.split("\n")[4].split("│")[1].strip().rstrip("…")
    shown = runner.invoke(app, ["traces", "show", trace_id[-8:]])
    assert shown.exit_code == 0, shown.output
    assert "chat t" in shown.stdout and "first question" in shown.stdout and "gen_ai.usage.input_tokens" in shown.stdout
    assert runner.invoke(app, ["traces", "show", "zzzz"]).exit_code == 2
    stats = runner.invoke(app, ["traces", "stats"])
    assert stats.exit_code == 0 and "50.0%" not in stats.stdout  # errors are per model: t has none
    row = next(line for line in stats.stdout.splitlines() if "│ t " in line)
    cells = [c.strip() for c in row.split("│")[1:-1]]
    assert cells[2] == "1" and cells[3] == "0.0%" and cells[8] == "0.000000"
    nope = next(line for line in stats.stdout.splitlines() if "│ nope " in line)
    assert "100.0%" in nope
    assert runner.invoke(app, ["traces", "list", "--status", "maybe"]).exit_code == 2


def test_models_table(runner: CliRunner) -> None:
    result = runner.invoke(app, ["models"])
    assert result.exit_code == 0
    assert "gpt-4o-mini" in result.stdout and "$0.15" in result.stdout and "128,000" in result.stdout
    assert "OPENAI_API_KEY unset" in result.stdout


def test_config_check(runner: CliRunner, tmp_path: Path) -> None:
    ok = runner.invoke(app, ["config", "check"])
    assert ok.exit_code == 0 and "ok" in ok.stdout
    bad = write_config(tmp_path / "bad", '[models.x]\nprovider = "openai"\nmodel = "m"\nmax_retries = "many"\n')
    result = runner.invoke(app, ["config", "check", str(bad)])
    assert result.exit_code == 3
    assert f"{bad}:4 [models.x.max_retries]" in result.stderr


def test_installed_entry_point_runs(tmp_path: Path) -> None:
    env = {**os.environ, "KEEL_CONFIG": str(write_config(tmp_path, TOML)), "KEEL_STORE": str(tmp_path / "k.db")}
    keel = Path(sys.executable).with_name("keel")
    done = subprocess.run([str(keel), "chat", "hello", "-q"], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "RAG answers questions from retrieved documents."


def test_chat_defaults_max_tokens_to_the_models_max_output_tokens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    toml = 'default_model = "t"\n[models.t]\nprovider = "test"\nmodel = "t"\nmax_output_tokens = 77\n'
    monkeypatch.setenv("KEEL_CONFIG", str(write_config(tmp_path, toml)))
    runner = CliRunner()
    assert runner.invoke(app, ["chat", "hi"]).exit_code == 0
    assert runner.invoke(app, ["chat", "hi", "--max-tokens", "5"]).exit_code == 0
    assert runner.invoke(app, ["chat", "hi", "--max-tokens", "0"]).exit_code == 2
    with Gateway() as gw:
        sent = sorted(s.attributes.get("gen_ai.request.max_tokens") for s in spans(gw))
    assert sent == [5, 77]


@pytest.mark.local_model
def test_chat_says_when_the_answer_was_cut(runner: CliRunner) -> None:
    result = runner.invoke(app, ["chat", "Write a long story about a dragon.", "--model", "local", "--max-tokens", "5"])
    assert result.exit_code == 0, result.output
    assert "cut at 5 tokens (max_tokens)" in result.stderr and "5 out" in result.stderr
