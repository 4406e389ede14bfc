"""`keel traces`: list, show and summarise what went through the gateway."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.tree import Tree

from keel.cli.errors import handle_errors
from keel.cli.tables import compact_table, count, latency, usd
from keel.config import load_config
from keel.errors import InputError
from keel.store import SpanFilter, Store, open_store
from keel.trace import Span

if TYPE_CHECKING:
    from keel.evals.online import TraceScore

#: Recorded once online quality created its table (as keel.evals.online.ONLINE_TABLE_MIGRATION).
ONLINE_TABLE_MIGRATION = "evals/online_0001_scores"

app = typer.Typer(
    help="Look at traces: every model call is a span in the store.", no_args_is_help=True, rich_markup_mode=None
)
console = Console(highlight=False)


def _store() -> Store:
    return open_store(load_config().store_url)


def short_id(trace_id: str) -> str:
    """The last 12 characters: the random part (the first ones are a timestamp)."""
    return trace_id[-12:]


def _since(days: float | None) -> float | None:
    return None if days is None else time.time() - days * 86400


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _cost(value: Any) -> str:
    return "-" if value is None else f"${float(value):.6f}"


@app.command("list")
@handle_errors
def list_traces(
    limit: Annotated[int, typer.Option(min=1, max=10_000, help="How many spans.")] = 20,
    model: Annotated[str | None, typer.Option(help="Only this configured model.")] = None,
    status: Annotated[str | None, typer.Option(help="ok or error.")] = None,
    key: Annotated[str | None, typer.Option(help="Only this key.")] = None,
    text: Annotated[str | None, typer.Option(help="Text in the input, output or error.")] = None,
    days: Annotated[float | None, typer.Option(help="Only the last N days.")] = None,
) -> None:
    """Recent model calls, newest first.

    Example: keel traces list --status error --days 1
    """
    if status not in (None, "ok", "error"):
        raise InputError("--status must be ok or error")
    store = _store()
    rows = store.list_spans(
        SpanFilter(model=model, status=status, api_key=key, text=text, since=_since(days), limit=limit, roots_only=True)
    )
    console.print(_traces_table(rows))


def _traces_table(rows: list[Span]) -> Table:
    """Newest first; the attempts column only when a call needed more than one."""
    retried = any(int(span.attributes.get("keel.attempts") or 1) > 1 for span in rows)
    table = compact_table(f"{len(rows)} traces", "time in UTC · tokens in/out · `keel traces show ID` for one")
    table.add_column("trace", no_wrap=True)
    table.add_column("time", no_wrap=True)
    table.add_column("model", overflow="fold")
    table.add_column("status", overflow="fold")
    for column in ("tokens", "cost", "latency", *(("att",) if retried else ())):
        table.add_column(column, justify="right", no_wrap=True)
    for span in rows:
        a = span.attributes
        status_text = "[green]ok[/]" if span.status == "ok" else f"[red]{escape(span.error_type or 'error')}[/]"
        tokens = f"{a.get('gen_ai.usage.input_tokens', '-')}/{a.get('gen_ai.usage.output_tokens', '-')}"
        cells = [
            short_id(span.trace_id), _when(span.start_time)[5:16],
            escape(str(a.get("keel.model") or a.get("gen_ai.request.model"))), status_text, tokens,
            usd(a.get("keel.cost_usd")), latency(span.duration_ms),
        ]  # fmt: skip
        table.add_row(*cells, *((str(a.get("keel.attempts", "-")),) if retried else ()))
    return table


def _span_label(span: Span) -> str:
    a = span.attributes
    status = "[green]ok[/]" if span.status == "ok" else f"[red]{span.error_type}: {escape(span.error_message or '')}[/]"
    return (
        f"[bold]{escape(span.name)}[/] {status} · {span.duration_ms:.1f} ms · "
        f"{a.get('gen_ai.usage.input_tokens', '-')} in / {a.get('gen_ai.usage.output_tokens', '-')} out · "
        f"{_cost(a.get('keel.cost_usd'))}"
    )


def _add_details(node: Tree, span: Span) -> None:
    attrs = node.add("[dim]attributes[/]")
    for key, value in sorted(span.attributes.items()):
        attrs.add(escape(f"{key} = {json.dumps(value, ensure_ascii=False)}"), highlight=False)
    if span.input is not None:
        node.add(f"[cyan]input[/] {escape(json.dumps(span.input, ensure_ascii=False, indent=1))}", highlight=False)
    if span.output is not None:
        node.add(f"[cyan]output[/] {escape(json.dumps(span.output, ensure_ascii=False, indent=1))}", highlight=False)


@app.command("show")
@handle_errors
def show(
    trace_id: Annotated[str, typer.Argument(help="Trace id, its last (or first) characters, or a span id.")],
) -> None:
    """A trace as a tree of spans with attributes, input and output.

    Example: keel traces show 3fa2c1
    """
    store = _store()
    matches = store.find_trace_ids(trace_id.strip())
    if not matches:
        raise InputError(f"no trace matches {trace_id!r}")
    if len(matches) > 1:
        shown = ", ".join(short_id(m) for m in matches)
        raise InputError(f"{trace_id!r} matches several traces: {shown}; give more characters")
    spans = store.get_trace(matches[0])
    scores = _online_scores(store, matches[0])
    tree = Tree(f"trace {matches[0]} · {_when(spans[0].start_time)} UTC")
    nodes: dict[str | None, Tree] = {}
    for span in spans:
        parent = nodes.get(span.parent_id, tree)
        nodes[span.span_id] = node = parent.add(_span_label(span))
        _add_scores(node, [s for s in scores if s.span_id == span.span_id])
        _add_details(node, span)
    console.print(tree)


def _online_scores(store: Store, trace_id: str) -> list[TraceScore]:
    """The trace's online scores; the evals app (and DBOS) is imported only when the store has any."""
    if ONLINE_TABLE_MIGRATION not in store.applied_migrations():
        return []
    from keel.evals.online import trace_scores

    return trace_scores(store, trace_id)


def _add_scores(node: Tree, scores: list[TraceScore]) -> None:
    if not scores:
        return
    branch = node.add("[magenta]online scores[/]")
    for s in scores:
        if s.value is None:
            value = f"[red]errored: {escape(s.error or '?')}[/]"
        else:
            value = f"{s.value:.3f}" + (f" (spread {s.spread:.3f})" if s.spread is not None else "")
        cost = f" · {_cost(s.cost_usd)}" if s.cost_usd else ""
        branch.add(
            f"online score {escape(s.scorer)} {value} · {escape(s.model_version)} / prompt"
            f" {escape(s.prompt_version)} · scored {_when(s.scored_at)} UTC{cost}",
            highlight=False,
        )


@app.command("stats")
@handle_errors
def stats(days: Annotated[float | None, typer.Option(help="Only the last N days.")] = None) -> None:
    """Calls, error rate, p50/p95 latency, tokens and cost by model and day.

    Example: keel traces stats --days 7
    """
    config = load_config()
    # names a client made up (any caller can send one) are one "unknown" row, as in the dashboard
    known = frozenset([*config.models, *config.aliases])
    rows = open_store(config.store_url).stats(since=_since(days), known_models=known)
    one_year = len({r.day[:4] for r in rows}) <= 1  # then the year goes in the title, not in every row
    year = f", {rows[0].day[:4]}" if rows and one_year else ""
    table = compact_table(f"chat calls by model and day (UTC{year})", "latency p50/p95 · tokens in/out")
    table.add_column("day", no_wrap=True)
    table.add_column("model", overflow="fold", ratio=1)
    for column in ("calls", "errors", "p50/p95", "tokens", "cost"):
        table.add_column(column, justify="right", no_wrap=True)
    for r in rows:
        table.add_row(
            r.day[5:] if one_year else r.day, escape(r.model), count(r.calls),
            "0" if r.error_rate == 0 else f"{r.error_rate:.1%}", f"{latency(r.p50_ms)}/{latency(r.p95_ms)}",
            f"{count(r.input_tokens)}/{count(r.output_tokens)}", usd(r.cost_usd),
        )  # fmt: skip
    console.print(table)
