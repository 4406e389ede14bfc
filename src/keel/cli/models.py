"""`keel models`: what is configured, at what price, with which context window."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from keel.cli.errors import handle_errors
from keel.cli.tables import compact_table
from keel.config import Config, ModelConfig, load_config
from keel.errors import InputError
from keel.pricing import model_facts

console = Console(highlight=False)


def _price(value: float | None) -> str:
    return "?" if value is None else f"{value:,.2f}".rstrip("0").rstrip(".") if value else "0"


def _prices(model: ModelConfig) -> str:
    """Input/output USD per million tokens; "free", "?" when unknown, + when the price has tiers."""
    price = model_facts(model).price
    if price is None:
        return "[yellow]?[/]"
    if price.input_per_mtok == 0 and price.output_per_mtok == 0:
        return "free"
    tiered = "+" if price.tiered is not None else ""
    return f"{_price(price.input_per_mtok)}/{_price(price.output_per_mtok)}{tiered}"


def _context(tokens: int | None) -> str:
    if not tokens:
        return "?"
    if tokens >= 1_000_000:
        return f"{tokens / 1_000_000:.2f}".rstrip("0").rstrip(".") + "M"
    return f"{round(tokens / 1000)}k" if tokens >= 10_000 else f"{tokens:,}"


def _name(name: str, model: ModelConfig, config: Config, aliases: list[str]) -> str:
    label = escape(name) + (f" ({escape(', '.join(aliases))})" if aliases else "")
    if name in (config.default_model, config.default_embedding_model):
        label = f"[bold]{label}[/] *"
    if model.fallbacks:
        label += f"\n[dim]→ {escape(', '.join(model.fallbacks))}[/]"
    return label


@handle_errors
def models(
    kind: Annotated[str | None, typer.Option(help="Only 'chat' or 'embedding' models.")] = None,
) -> None:
    """List configured models: where they run, context window, price per million tokens, and whether they can
    be called (a model whose API key is not set cannot).

    Example: keel models --kind chat
    """
    if kind not in (None, "chat", "embedding"):
        raise InputError("--kind must be chat or embedding")
    config = load_config()
    aliases: dict[str, list[str]] = {}
    for alias, target in config.aliases.items():
        aliases.setdefault(target, []).append(alias)
    table = compact_table(f"models ({escape(config.source or 'embedded defaults')})")
    table.add_column("name", overflow="fold")
    table.add_column("runs on", overflow="fold")
    table.add_column("kind", no_wrap=True)
    table.add_column("context", justify="right", no_wrap=True)
    table.add_column("$/M", justify="right", no_wrap=True)
    table.add_column("ready", no_wrap=True)
    missing: dict[str, list[str]] = {}
    for name, model in config.models.items():
        if kind and model.kind != kind:
            continue
        runs_on = model.provider if model.model == name else f"{model.provider} {model.model}"
        if env := model.missing_key():
            missing.setdefault(env, []).append(name)
        table.add_row(
            _name(name, model, config, aliases.get(name, [])), escape(runs_on),
            "chat" if model.kind == "chat" else "embed", _context(model_facts(model).context_window), _prices(model),
            "[red]no[/]" if env else "[green]yes[/]",
        )  # fmt: skip
    console.print(table)
    console.print(
        "[dim]* default · → fallbacks · $/M: USD per million tokens in/out (genai-prices unless set in keel.toml),"
        " + tiered[/]"
    )
    for env, names in missing.items():
        console.print(f"[red]not ready[/]: {env} is not set, so {escape(', '.join(names))} cannot be called")
