"""`keel alerts`: the alert rules of keel.toml and their state, as the server sees it."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from keel.alerts import AlertEvaluator, describe, format_value, measure_rule
from keel.cli.errors import handle_errors
from keel.config import Config, load_config
from keel.store import Store, open_store
from keel.store.alerts import AlertRow, read_alerts

app = typer.Typer(
    help="Alert rules (alerts.NAME tables of keel.toml): their state, or evaluate them now.",
    no_args_is_help=True,
    rich_markup_mode=None,
)
console = Console(highlight=False)

_STATE_STYLE = {"ok": "green", "pending": "yellow", "firing": "bold red"}
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def _when(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _states(config: Config, rows: dict[str, AlertRow]) -> list[dict[str, Any]]:
    """One entry per configured rule; a rule never evaluated has no state yet."""
    out = []
    for name, rule in config.alerts.items():
        row = rows.get(name)
        out.append({
            "name": name, "condition": describe(rule), "state": row.state if row else None,
            "value": row.value if row else None,
            "shown_value": "-" if row is None or row.value is None else format_value(rule.metric, row.value),
            "since": _when(row.since) if row else None, "last_evaluated": _when(row.last_evaluated) if row else None,
            "message": row.message if row else "not evaluated yet (by keel serve or keel alerts check)",
        })  # fmt: skip
    return out


def _print_states(config: Config, rows: dict[str, AlertRow], as_json: bool) -> None:
    states = _states(config, rows)
    if as_json:
        typer.echo(json.dumps([{k: v for k, v in s.items() if k != "shown_value"} for s in states], indent=2))
        return
    evaluated = max((s["last_evaluated"] for s in states if s["last_evaluated"]), default=None)
    caption = f"last evaluated {evaluated} UTC" if evaluated else "never evaluated"
    table = Table(title=f"{len(states)} alert rules", caption=caption)
    # the state and value first and never wrapped: they are what an 80-column terminal must show
    table.add_column("rule", no_wrap=True, max_width=24)
    table.add_column("state", no_wrap=True)
    table.add_column("value", justify="right", no_wrap=True)
    table.add_column("since (UTC)", no_wrap=True)
    table.add_column("now", ratio=1)
    for s in states:
        state = s["state"] or "-"
        table.add_row(
            escape(s["name"]), f"[{_STATE_STYLE.get(state, 'dim')}]{state}[/]", s["shown_value"],
            (s["since"] or "-")[5:16], escape(s["message"]),
        )  # fmt: skip
    console.print(table)


def _setup() -> tuple[Config, Store | None]:
    config = load_config()
    if not config.alerts:
        where = escape(config.source or "the configuration")
        console.print(f"no alert rules in {where}: add \\[alerts.NAME] tables (see docs/configuration.md)")
        return config, None
    return config, open_store(config.store_url)


@app.command("list")
@handle_errors
def list_alerts(as_json: JsonOption = False) -> None:
    """Each rule with its state (ok, pending, firing) as last evaluated, by any process.

    Example: keel alerts list --json
    """
    config, store = _setup()
    if store is not None:
        _print_states(config, read_alerts(store), as_json)


async def _evaluate_once(config: Config, store: Store) -> dict[str, AlertRow]:
    evaluator = AlertEvaluator(config, store)
    try:
        return {row.name: row for row in await evaluator.evaluate_once()}
    finally:
        await evaluator.aclose()


def _print_dry_run(config: Config, store: Store, as_json: bool) -> None:
    now = time.time()
    results = {name: measure_rule(config, rule, store, now) for name, rule in config.alerts.items()}
    if as_json:
        measured = [{"name": n, "holds": e.holds, "value": e.value, "message": e.message} for n, e in results.items()]
        typer.echo(json.dumps(measured, indent=2))
        return
    table = Table(title="alert rules, measured now (nothing recorded or sent)")
    for column in ("rule", "holds", "message"):
        table.add_column(column, no_wrap=column != "message")
    for name, evaluation in results.items():
        holds = "[bold red]yes[/]" if evaluation.holds else "[green]no[/]"
        table.add_row(escape(name), holds, escape(evaluation.message))
    console.print(table)


@app.command("check")
@handle_errors
def check(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only measure: record, log and send nothing.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Evaluate the rules now, as a server does every alerting.interval_s: record each state, and log
    and send to the webhook what fires or resolves. Run it from cron to alert without a server.

    Example: keel alerts check --dry-run
    """
    config, store = _setup()
    if store is None:
        return
    if dry_run:
        _print_dry_run(config, store, as_json)
    else:
        _print_states(config, asyncio.run(_evaluate_once(config, store)), as_json)
