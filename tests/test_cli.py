"""The `keel` command line, run as a user would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer
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
    trace_id = next(line for line in found.stdout.splitlines() if " t " in line).split()[0]
    shown = runner.invoke(app, ["traces", "show", trace_id[-8:]])
    assert shown.exit_code == 0, shown.output
    assert "chat t" in shown.stdout and "first question" in shown.stdout and "gen_ai.usage.input_tokens" in shown.stdout
    assert runner.invoke(app, ["traces", "show", "zzzz"]).exit_code == 2
    stats = runner.invoke(app, ["traces", "stats"])
    assert stats.exit_code == 0 and "50.0%" not in stats.stdout  # errors are per model: t has none
    row = next(line for line in stats.stdout.splitlines() if " t " in line)
    cells = row.split()
    assert cells[1:4] == ["t", "1", "0"] and cells[-1] == "$0"
    nope = next(line for line in stats.stdout.splitlines() if " unknown " in line)  # not a configured model
    assert "100.0%" in nope and " nope " not in stats.stdout
    assert runner.invoke(app, ["traces", "list", "--status", "maybe"]).exit_code == 2


def test_traces_stats_groups_invented_model_names(runner: CliRunner) -> None:
    """Any caller can name a model that does not exist: 30 invented names are one row, not 30."""
    assert runner.invoke(app, ["chat", "hi"]).exit_code == 0
    for i in range(30):
        runner.invoke(app, ["chat", "hi", "--model", f"gpt-5-turbo-{i}"])
    stats = runner.invoke(app, ["traces", "stats"])
    assert stats.exit_code == 0, stats.output
    assert "gpt-5-turbo" not in stats.stdout
    [unknown] = [line for line in stats.stdout.splitlines() if " unknown " in line]
    assert unknown.split()[2:4] == ["30", "100.0%"]


def _fits_80(output: str) -> None:
    """Every line within 80 columns, and nothing cut to an ellipsis."""
    assert all(len(line) <= 80 for line in output.splitlines()), output
    assert "…" not in output, output


def test_traces_and_models_fit_80_columns(runner: CliRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    assert runner.invoke(app, ["chat", "first question"]).exit_code == 0
    runner.invoke(app, ["chat", "second", "--model", "a-rather-long-model-name"])
    listed = runner.invoke(app, ["traces", "list"])
    assert listed.exit_code == 0, listed.output
    _fits_80(listed.stdout)
    header = next(line for line in listed.stdout.splitlines() if line.startswith("trace"))
    assert header.split() == ["trace", "time", "model", "status", "tokens", "cost", "latency"]
    ids = [line.split()[0] for line in listed.stdout.splitlines() if " ok " in line or "Unknown" in line]
    assert len(ids) == 2 and all(len(i) == 12 for i in ids)  # the short id whole, on one line
    stats = runner.invoke(app, ["traces", "stats"])
    assert stats.exit_code == 0, stats.output
    _fits_80(stats.stdout)
    assert "calls" in stats.stdout and "errors" in stats.stdout and "p50/p95" in stats.stdout
    models = runner.invoke(app, ["models"])
    assert models.exit_code == 0, models.output
    _fits_80(models.stdout)
    row = next(line for line in models.stdout.splitlines() if line.startswith("text-embedding-3-small"))
    assert row.split()[1:] == ["openai", "embed", "8,192", "0.02/0", "no"]


def test_models_table(runner: CliRunner) -> None:
    result = runner.invoke(app, ["models"], env={"OPENAI_API_KEY": ""})
    assert result.exit_code == 0
    row = next(line for line in result.stdout.splitlines() if line.startswith("gpt-4o-mini"))
    assert row.split() == ["gpt-4o-mini", "openai", "chat", "128k", "0.15/0.6", "no"]
    assert "OPENAI_API_KEY is not set, so gpt-4o-mini, gpt-4.1" in " ".join(result.stdout.split())
    ready = runner.invoke(app, ["models"], env={"OPENAI_API_KEY": "sk-test"})
    row = next(line for line in ready.stdout.splitlines() if line.startswith("gpt-4o-mini"))
    assert row.split()[-1] == "yes" and "OPENAI_API_KEY is not set" not in ready.stdout


def test_config_check(runner: CliRunner, tmp_path: Path) -> None:
    ok = runner.invoke(app, ["config", "check"])
    assert ok.exit_code == 0 and "ok" in ok.stdout
    bad = write_config(tmp_path / "bad", '[models.x]\nprovider = "openai"\nmodel = "m"\nmax_retries = "many"\n')
    result = runner.invoke(app, ["config", "check", str(bad)])
    assert result.exit_code == 3
    assert f"{bad}:4 [models.x.max_retries]" in result.stderr
    ghost = write_config(tmp_path / "ghost", 'default_model = "gpt-5"\n')
    result = runner.invoke(app, ["config", "check", str(ghost)])
    assert result.exit_code == 3 and f"{ghost}:1 [default_model]" in result.stderr
    assert "default_model names unknown model 'gpt-5'" in result.stderr
    answers = write_config(tmp_path / "answers", '[rag]\nanswer_model = "gpt-5"\n')  # RAG's default chat model
    result = runner.invoke(app, ["config", "check", str(answers)])
    assert result.exit_code == 3 and f"{answers} [rag.answer_model]" in result.stderr
    assert "rag.answer_model names unknown model 'gpt-5'" in result.stderr
    unset = write_config(tmp_path / "unset", 'default_model = "gpt-4o-mini"\n')
    warned = runner.invoke(app, ["config", "check", str(unset)], env={"OPENAI_API_KEY": ""})
    assert warned.exit_code == 0 and "default_model 'gpt-4o-mini' cannot be called: OPENAI_API_KEY is not set" in (
        " ".join(warned.stdout.split())
    )


def test_installed_entry_point_runs(tmp_path: Path) -> None:
    env = {**os.environ, "KEEL_CONFIG": str(write_config(tmp_path, TOML)), "KEEL_STORE": str(tmp_path / "k.db")}
    keel = Path(sys.executable).with_name("keel")
    done = subprocess.run([str(keel), "chat", "hello", "-q"], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "RAG answers questions from retrieved documents."


def _commands(group: Any, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = [path]
    if isinstance(getattr(group, "commands", None), dict):  # typer vendors click: no isinstance(click.Group)
        for name, command in group.commands.items():
            found += _commands(command, (*path, name))
    return found


def test_every_help_is_correct_at_80_columns(runner: CliRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    paths = _commands(typer.main.get_command(app))
    assert ("rag", "drop") in paths and ("serve",) in paths and len(paths) > 15
    for path in paths:
        result = runner.invoke(app, [*path, "--help"])
        assert result.exit_code == 0, (path, result.output)
        text = result.stdout
        assert "<bool>" not in text, (path, text)  # a flag takes no value
        assert "default:  " not in text and "\\[" not in text, (path, text)  # nothing eaten or escaped
        assert all(len(line) <= 80 for line in text.splitlines()), (path, text)
    drop = runner.invoke(app, ["rag", "drop", "--help"]).stdout
    assert "--yes " in drop and "--yes <" not in drop
    serve = " ".join(runner.invoke(app, ["serve", "--help"]).stdout.split())
    assert "(default: [server] log_format)" in serve


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
