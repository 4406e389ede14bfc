"""`keel models`: what is configured, at what price, with which context window."""

from __future__ import annotations

import os
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from keel.cli.app import handle_errors
from keel.config import load_config
from keel.pricing import model_facts

console = Console()


def _money(value: float | None, tiered: bool = False) -> str:
    if value is None:
        return "[yellow]unknown[/]"
    return "free" if value == 0 else f"${value:,.2f}" + ("+" if tiered else "")


@handle_errors
def models(
    kind: Annotated[str | None, typer.Option(help="Only 'chat' or 'embedding' models.")] = None,
) -> None:
    """List configured models: provider, model id, context window, price per million tokens, key status.

    Example: keel models --kind chat
    """
    config = load_config()
    aliases: dict[str, list[str]] = {}
    for alias, target in config.aliases.items():
        aliases.setdefault(target, []).append(alias)
    table = Table(title=f"models ({config.source or 'embedded defaults'})")
    for column in ("name", "provider", "model id", "kind", "context", "input $/M", "output $/M", "fallbacks", "key"):
        numeric = column in ("context", "input $/M", "output $/M")
        table.add_column(column, justify="right" if numeric else "left", no_wrap=column != "fallbacks")
    for name, model in config.models.items():
        if kind and model.kind != kind:
            continue
        facts = model_facts(model)
        tiered = facts.price is not None and facts.price.tiered is not None
        env = model.key_env()
        key = "-" if env is None else ("[green]set[/]" if os.environ.get(env) else f"[red]{env} unset[/]")
        label = name + (f" ({', '.join(aliases[name])})" if name in aliases else "")
        if name == config.default_model or name == config.default_embedding_model:
            label = f"[bold]{label}[/] *"
        table.add_row(
            label, model.provider, model.model, model.kind,
            f"{facts.context_window:,}" if facts.context_window else "?",
            _money(facts.price.input_per_mtok if facts.price else None, tiered),
            _money(facts.price.output_per_mtok if facts.price else None, tiered),
            ", ".join(model.fallbacks) or "-", key,
        )  # fmt: skip
    console.print(table)
    console.print("[dim]* default model · prices from genai-prices unless set in keel.toml · + tiered price[/]")
