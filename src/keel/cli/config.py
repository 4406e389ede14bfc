"""`keel config check`: validate keel.toml and the KEEL_* environment."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from keel.cli.app import handle_errors
from keel.config import load_config

app = typer.Typer(help="Check the configuration.", no_args_is_help=True)
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
    chat = [n for n, m in config.models.items() if m.kind == "chat"]
    console.print(f"[green]ok[/]: {config.source or 'embedded defaults (no keel.toml)'}")
    console.print(
        f"  {len(config.models)} models ({len(chat)} chat), {len(config.aliases)} aliases, {len(config.keys)} keys"
    )
    console.print(f"  default model: {config.default_model} · store: {config.store_url}")
