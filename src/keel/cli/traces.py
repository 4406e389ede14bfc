"""`keel traces`: list, show and summarise what went through the gateway."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.tree import Tree

from keel.cli.app import handle_errors
from keel.config import load_config
from keel.errors import InputError
from keel.store import SpanFilter, Store, open_store
from keel.trace import Span

app = typer.Typer(help="Look at traces: every model call is a span in the store.", no_args_is_help=True)
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
    table = Table(title=f"{len(rows)} traces")
    for column in ("trace", "time (UTC)", "model", "status", "in", "out", "cost", "ms", "att"):
        table.add_column(
            column, justify="right" if column in ("in", "out", "cost", "ms", "att") else "left", no_wrap=True
        )
    for span in rows:
        a = span.attributes
        status_text = "[green]ok[/]" if span.status == "ok" else f"[red]{span.error_type}[/]"
        table.add_row(
            short_id(span.trace_id), _when(span.start_time),
            escape(str(a.get("keel.model") or a.get("gen_ai.request.model"))),
            status_text, str(a.get("gen_ai.usage.input_tokens", "-")), str(a.get("gen_ai.usage.output_tokens", "-")),
            _cost(a.get("keel.cost_usd")), f"{span.duration_ms:.0f}", str(a.get("keel.attempts", "-")),
        )  # fmt: skip
    console.print(table)


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
    tree = Tree(f"trace {matches[0]} · {_when(spans[0].start_time)} UTC")
    nodes: dict[str | None, Tree] = {}
    for span in spans:
        parent = nodes.get(span.parent_id, tree)
        nodes[span.span_id] = node = parent.add(_span_label(span))
        _add_details(node, span)
    console.print(tree)


@app.command("stats")
@handle_errors
def stats(days: Annotated[float | None, typer.Option(help="Only the last N days.")] = None) -> None:
    """Calls, error rate, p50/p95 latency, tokens and cost by model and day.

    Example: keel traces stats --days 7
    """
    rows = _store().stats(since=_since(days))
    table = Table(title="chat calls by model and day (UTC)", caption="latency in ms · tokens in/out · cost in USD")
    for column in ("day", "model", "calls", "errors", "p50", "p95", "in", "out", "cost"):
        table.add_column(column, justify="left" if column in ("day", "model") else "right", no_wrap=True)
    for r in rows:
        table.add_row(
            r.day, escape(r.model), str(r.calls), f"{r.error_rate:.1%}",
            "-" if r.p50_ms is None else f"{r.p50_ms:.0f}", "-" if r.p95_ms is None else f"{r.p95_ms:.0f}",
            f"{r.input_tokens:,}", f"{r.output_tokens:,}", "-" if r.cost_usd is None else f"{r.cost_usd:.6f}",
        )  # fmt: skip
    console.print(table)
