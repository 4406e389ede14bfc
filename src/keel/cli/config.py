"""`keel config check`: validate keel.toml and the KEEL_* environment."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from keel.cli.errors import handle_errors
from keel.config import Config, load_config
from keel.errors import ConfigError

app = typer.Typer(help="Check the configuration.", no_args_is_help=True, rich_markup_mode=None)
console = Console(highlight=False)


@app.command("check")
@handle_errors
def check(
    path: Annotated[
        Path | None, typer.Argument(help="keel.toml to check (default: $KEEL_CONFIG or ./keel.toml).")
    ] = None,
) -> None:
    """Validate the configuration; a mistake is reported with its file, line and field.

    Example: keel config check keel.toml
    """
    config = load_config(path)
    # checked here, not on load: a library Gateway may answer with a model it injects (models={...})
    answer = config.rag.answer_model
    if answer is not None and config.resolve_name(answer) is None:
        message = f"rag.answer_model names unknown model {answer!r}"
        raise ConfigError(message, file=config.source, field="rag.answer_model")
    chat = [n for n, m in config.models.items() if m.kind == "chat"]
    console.print(f"[green]ok[/]: {escape(config.source or 'embedded defaults (no keel.toml)')}")
    console.print(
        f"  {len(config.models)} models ({len(chat)} chat), {len(config.aliases)} aliases, {len(config.keys)} keys"
    )
    console.print(
        f"  default model: {escape(config.default_model)} · embedding model: {escape(config.default_embedding_model)}"
        f" · store: {escape(config.store_url)}"
    )
    _print_unavailable(config)


def _print_unavailable(config: Config) -> None:
    """Models that cannot be called as configured (an API key not set): valid, but worth knowing before a call."""
    for field in ("default_model", "default_embedding_model"):
        name = getattr(config, field)
        if reason := config.unavailable(name):
            console.print(f"  [yellow]warning[/]: {field} {escape(repr(name))} cannot be called: {escape(reason)}")
    missing: dict[str, list[str]] = {}
    for name, model in config.models.items():
        if env := model.missing_key():
            missing.setdefault(env, []).append(name)
    for env, names in missing.items():
        console.print(f"  [dim]{env} is not set: {escape(', '.join(names))} cannot be called until it is[/]")
