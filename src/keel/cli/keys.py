"""`keel keys`: virtual keys for the server (create, list, revoke).

Keys live in the store, hashed; a running server sees a change within
`[server] key_refresh_s`.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from keel.cli.errors import handle_errors
from keel.config import KeyConfig, load_config
from keel.errors import InputError
from keel.gateway.budget import period_starts
from keel.keys import KeyRecord, create_key, list_keys, parse_budget, revoke_key
from keel.store import Store, open_store

app = typer.Typer(
    help="Virtual keys for the server: each with its models, limits and budget.",
    no_args_is_help=True,
    rich_markup_mode=None,
)
console = Console(highlight=False)


def _store() -> Store:
    return open_store(load_config().store_url)


def _names(text: str | None) -> tuple[str, ...] | None:
    """A comma-separated list; None when the option is not given."""
    return tuple(n.strip() for n in text.split(",") if n.strip()) if text is not None else None


def _limits(
    rpm: int | None, tpm: int | None, budgets: list[str], models: str | None, collections: tuple[str | None, str | None]
) -> KeyConfig:
    config = load_config()
    allowed = _names(models) if models else None
    for model in allowed or ():
        if config.resolve_name(model) is None:
            raise InputError(f"unknown model {model!r} in --models; `keel models` lists them")
    periods: dict[str, float] = {}
    for text in budgets:
        period, amount = parse_budget(text)
        if period in periods:
            raise InputError(f"two {period} budgets given")
        periods[period] = amount
    return KeyConfig(
        rpm=rpm, tpm=tpm, daily_budget_usd=periods.get("daily"), monthly_budget_usd=periods.get("monthly"),
        models=allowed, collections=_names(collections[0]), collections_write=_names(collections[1]),
    )  # fmt: skip


def _meta(pairs: list[str]) -> dict[str, str]:
    meta: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise InputError(f"--meta {pair!r} is not NAME=VALUE")
        meta[name.strip()] = value.strip()
    return meta


@app.command("create")
@handle_errors
def create(
    name: Annotated[str, typer.Option(help="Who the key is for (a team, a feature); traces and budgets use it.")],
    rpm: Annotated[int | None, typer.Option(min=1, help="Requests per minute.")] = None,
    tpm: Annotated[int | None, typer.Option(min=1, help="Tokens per minute.")] = None,
    budget_usd: Annotated[
        list[str] | None, typer.Option("--budget-usd", help="AMOUNT/day or AMOUNT/month; may be given twice.")
    ] = None,
    models: Annotated[str | None, typer.Option(help="Comma-separated models or aliases the key may use.")] = None,
    collections: Annotated[
        str | None, typer.Option(help="Comma-separated RAG collections the key may read (default: all).")
    ] = None,
    collections_write: Annotated[
        str | None, typer.Option(help="Comma-separated RAG collections the key may add to or delete (default: none).")
    ] = None,
    meta: Annotated[list[str] | None, typer.Option(help="NAME=VALUE kept with the key.")] = None,
) -> None:
    """Create a key and print it once (only its hash is stored).

    Example: keel keys create --name team-a --rpm 60 --tpm 100000 --budget-usd 50/month --models gpt-4o-mini,local
    --collections docs,faq --collections-write faq
    """
    limits = _limits(rpm, tpm, budget_usd or [], models, (collections, collections_write))
    secret, record = create_key(_store(), name, limits, _meta(meta or []))
    console.print(f"created key [bold]{escape(record.name)}[/] ({record.key_id}): {_describe(record)}")
    console.print("The key is shown once; keep it now:")
    print(secret)


def _describe(record: KeyRecord) -> str:
    lim = record.limits
    parts = [
        f"{lim.rpm} rpm" if lim.rpm else "",
        f"{lim.tpm:,} tpm" if lim.tpm else "",
        f"${lim.daily_budget_usd:g}/day" if lim.daily_budget_usd is not None else "",
        f"${lim.monthly_budget_usd:g}/month" if lim.monthly_budget_usd is not None else "",
        ("models " + ",".join(lim.models)) if lim.models is not None else "all models",
        ("reads " + (",".join(lim.collections) or "no collection")) if lim.collections is not None else "",
        ("writes " + ",".join(lim.collections_write)) if lim.collections_write else "",
    ]
    return " · ".join(p for p in parts if p)


def _when(ts: float | None) -> str:
    return "-" if ts is None else datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M")


@app.command("list")
@handle_errors
def list_(
    all_: Annotated[bool, typer.Option("--all", help="Revoked keys too.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="JSON instead of a table.")] = False,
) -> None:
    """Keys with their limits and this month's spend (never the keys themselves)."""
    store = _store()
    records = list_keys(store, include_revoked=all_)
    month = period_starts(time.time())["monthly"]
    spent = {name: store.spend(name, month) for name in {r.name for r in records}}
    if as_json:
        print(json.dumps([{**r.to_json(), "spent_month_usd": spent[r.name]} for r in records], indent=1))
        return
    table = Table(title=f"{len(records)} keys", caption="ids and creation times: --json")
    table.add_column("name", no_wrap=True)
    table.add_column("key", no_wrap=True)
    table.add_column("limits", ratio=1)
    table.add_column("spent (month)", justify="right", no_wrap=True)
    table.add_column("state", no_wrap=True)
    for r in records:
        state = "[green]active[/]" if r.active else f"[red]revoked {_when(r.revoked_at)[:10]}[/]"
        table.add_row(escape(r.name), f"{r.prefix}...", escape(_describe(r)), f"${spent[r.name]:.4f}", state)
    console.print(table)


@app.command("revoke")
@handle_errors
def revoke(name: Annotated[str, typer.Argument(help="The key's name, id or shown prefix.")]) -> None:
    """Revoke a key: requests with it get 401 (a running server sees it within seconds)."""
    record = revoke_key(_store(), name)
    console.print(f"revoked key [bold]{escape(record.name)}[/] ({record.key_id}, {record.prefix}...)")
