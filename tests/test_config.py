"""keel.toml loading, KEEL_* overrides, and error locations."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import write_config
from keel.config import load_config, locate
from keel.errors import ConfigError


def test_embedded_defaults_need_no_file() -> None:
    config = load_config(environ={})
    assert config.default_model == "local" and config.models["local"].provider == "local"
    assert config.source is None and config.store_url.endswith("keel.db")


def test_user_file_merges_over_defaults(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        'default_model = "fast"\n[aliases]\nfast = "gpt-4o-mini"\n'
        '[models.local]\nprovider = "local"\nmodel = "smollm2"\ntimeout = 5\n',
    )
    config = load_config(path, environ={})
    assert config.resolve(None) == "gpt-4o-mini" and config.models["local"].timeout == 5
    assert "claude-haiku-4-5" in config.models and config.source == str(path)


@pytest.mark.parametrize(
    ("text", "line", "field", "message"),
    [
        ('[models.x]\nprovider = "openai"\nmodel = "m"\ntimout = 3\n', 4, "models.x.timout", "unknown field"),
        ('[models.x]\nprovider = "openai"\nmodel = "m"\nrpm = -1\n', 4, "models.x.rpm", "greater than 0"),
        ('[models.x]\nprovider = "nobody"\nmodel = "m"\n', 2, "models.x.provider", "Input should be"),
        (
            'timeout = 1\n\n[models.x]\nprovider = "openai"\nmodel = "m"\nfallbacks = ["ghost"]\n',
            6,
            "models.x.fallbacks",
            "unknown model 'ghost'",
        ),
        ('[aliases]\nfast = "ghost"\n', 2, "aliases.fast", "unknown model"),
        ('timeout = 5\ndefault_model = "ghost"\n', 2, "default_model", "default_model names unknown model 'ghost'"),
        ('default_embedding_model = "local"\n', 1, "default_embedding_model", "of kind 'chat'; it must be"),
        ('[keys.team]\ndaily_budget_usd = "lots"\n', 2, "keys.team.daily_budget_usd", "valid number"),
        ('[tracing]\nredact_patterns = ["("]\n', 1, "tracing", "regular expression"),
    ],
)
def test_errors_name_file_line_and_field(tmp_path: Path, text: str, line: int, field: str, message: str) -> None:
    path = write_config(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})
    error = caught.value
    assert error.file == str(path) and error.line == line and error.field == field
    assert message in str(error) and f"{path}:{line} [{field}]" in str(error)


def test_invalid_toml_reports_line(tmp_path: Path) -> None:
    path = write_config(tmp_path, 'default_model = "x"\n[models\n')
    with pytest.raises(ConfigError, match="not valid TOML") as caught:
        load_config(path, environ={})
    assert caught.value.line == 2


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.toml", environ={})


def test_environment_overrides(tmp_path: Path) -> None:
    env = {
        "KEEL_STORE": "postgresql://u@localhost/db",
        "KEEL_DEFAULT_MODEL": "gpt-4o-mini",
        "KEEL_CAPTURE_CONTENT": "false",
        "KEEL_MODELS__GPT_4O_MINI__TIMEOUT": "7.5",
        "KEEL_MODELS__GPT_4O_MINI__FALLBACKS": '["local"]',
        "KEEL_KEYS__TEAM__RPM": "10",
    }
    config = load_config(environ=env)
    assert config.store_url == "postgresql://u@localhost/db" and config.default_model == "gpt-4o-mini"
    assert config.tracing.capture_content is False
    assert config.models["gpt-4o-mini"].timeout == 7.5 and config.models["gpt-4o-mini"].fallbacks == ("local",)
    assert config.keys["team"].rpm == 10


def test_bad_environment_value_names_the_field() -> None:
    with pytest.raises(ConfigError, match=r"\[timeout\]"):
        load_config(environ={"KEEL_TIMEOUT": "soon"})


def test_environment_cannot_set_a_field_inside_a_value(tmp_path: Path) -> None:
    path = write_config(tmp_path, 'store = "keel.db"\n')  # a value where a table belongs
    with pytest.raises(ConfigError, match=r"store must be a table to set store\.url from the environment"):
        load_config(path, environ={"KEEL_STORE": "other.db"})


def test_keel_config_env_picks_the_file(tmp_path: Path) -> None:
    path = write_config(tmp_path, 'default_model = "gpt-4.1"\n')
    assert load_config(environ={"KEEL_CONFIG": str(path)}).default_model == "gpt-4.1"


def test_locate_finds_nested_keys() -> None:
    text = "a = 1\n[models.x]\nprovider = 'p'\n[models.y]\nprovider = 'q'\n"
    assert locate(text, ("models", "y", "provider")) == 5
    assert locate(text, ("models", "x")) == 2
    assert locate(text, ("nothing",)) is None


# --- each app owns its section ---------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "line", "field", "message"),
    [
        ("[rag]\ntop_k = 0\n", 2, "rag.top_k", "greater than 0"),
        ("[rag]\ntopk = 3\n", 2, "rag.topk", "unknown field"),
        ('[rag]\nembedding_model = "ghost"\n', 2, "rag.embedding_model", "unknown model 'ghost'"),
        ("[jobs]\nheartbeat_s = 20\n", 1, "jobs", "dead_after_s must exceed"),
        ("[jobs.queues.slow]\nconcurrency = -1\n", 2, "jobs.queues.slow.concurrency", "greater than 0"),
        ("[nothing]\nx = 1\n", 1, "nothing", "unknown field"),
    ],
)
def test_app_sections_are_checked_with_file_line_and_field(
    tmp_path: Path, text: str, line: int, field: str, message: str
) -> None:
    path = write_config(tmp_path, "timeout = 5\n" + text)
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})
    error = caught.value
    assert (error.line, error.field) == (line + 1, field) and message in str(error)


def test_rag_and_jobs_sections_are_defined_by_their_apps(tmp_path: Path) -> None:
    import keel.config

    path = write_config(tmp_path, "[rag]\ntop_k = 3\n[jobs.queues.slow]\nrpm = 6\n")
    config = load_config(path, environ={"KEEL_RAG__CANDIDATES": "50"})
    assert (config.rag.top_k, config.rag.candidates, config.jobs.queues["slow"].rpm) == (3, 50, 6)
    assert type(config.rag).__module__ == "keel.rag.settings" and type(config.jobs).__module__ == "keel.jobs.settings"
    assert not hasattr(keel.config, "RagConfig") and not hasattr(keel.config, "JobsConfig")
    assert load_config(write_config(tmp_path, "timeout = 5\n"), environ={}).rag.top_k == 8  # no [rag]: defaults


def test_an_app_registers_its_own_section(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import BaseModel, ConfigDict, Field

    import keel.config

    class NotesConfig(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)
        size: int = Field(default=1, gt=0)
        model: str = "local"

    def check(config: keel.config.Config, notes: NotesConfig) -> None:
        if config.resolve_name(notes.model) is None:
            raise keel.config.FieldProblem(("notes", "model"), f"notes.model names unknown model {notes.model!r}")

    monkeypatch.setattr(keel.config, "_SECTIONS", dict(keel.config._SECTIONS))
    keel.config.register_section("notes", NotesConfig, check=check)
    config = load_config(write_config(tmp_path, "[notes]\nsize = 3\n"), environ={})
    assert config.section("notes") == NotesConfig(size=3)
    assert load_config(write_config(tmp_path, "timeout = 5\n"), environ={}).section("notes") == NotesConfig()
    for text, field, message in (("[notes]\nsize = 0\n", "notes.size", "greater than 0"),
                                 ('[notes]\nmodel = "ghost"\n', "notes.model", "unknown model 'ghost'")):  # fmt: skip
        with pytest.raises(ConfigError, match=message) as caught:
            load_config(write_config(tmp_path, text), environ={})
        assert (caught.value.line, caught.value.field) == (2, field)
    with pytest.raises(ConfigError, match="core field"):
        keel.config.register_section("models", NotesConfig)
