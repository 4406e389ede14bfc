"""`keel eval quality`: online quality ([evals.online]) by period, model version and prompt version."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from keel.cli.errors import handle_errors
from keel.cli.tables import compact_table
from keel.config import load_config
from keel.errors import InputError

console = Console(highlight=False)
PERIODS = {"hour": 3600.0, "day": 86400.0, "week": 7 * 86400.0}


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _cost(usd: float) -> str:
    return f"${usd:.4f}" if usd else ""


def _period(ts: float, period_s: float) -> str:
    moment = datetime.fromtimestamp(ts, UTC)
    return moment.strftime("%Y-%m-%d %H:00") if period_s < 86400 else moment.strftime("%Y-%m-%d")


def _span(since: str, start: float) -> str:
    """The range in words: "in the last 14d", or the start for epoch seconds."""
    try:
        float(since)
    except ValueError:
        return f"in the last {since.strip()}"
    return f"since {_period(start, 3600)} UTC"


def register(app: typer.Typer) -> None:
    """Add `quality` to a typer group (`keel eval`)."""

    @app.command("quality")
    @handle_errors
    def quality_command(
        since: Annotated[str, typer.Option(help="How far back: 30m, 12h, 14d... or epoch seconds.")] = "14d",
        period: Annotated[str, typer.Option(help="hour, day or week.")] = "day",
        scorer: Annotated[str | None, typer.Option(help="Only this scorer.")] = None,
        model: Annotated[str | None, typer.Option(help="Only this model version.")] = None,
        as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    ) -> None:
        """Quality of production calls scored by [evals.online]: per period, model version, prompt version
        and scorer, the number of scores, their mean and its 95% CI; then the latest version change per
        scorer with the mean before and after and a one-sided Welch t-test.

        Example: keel eval quality --since 7d --period day --scorer faithfulness
        """
        from keel.evals.online import drop_test, parse_since, quality
        from keel.store import open_store

        if period not in PERIODS:
            raise InputError(f"--period {period!r}: use hour, day or week")
        until = time.time()
        try:
            start = parse_since(since, until)
        except InputError as exc:
            raise InputError(f"--{exc}") from None
        if start >= until:
            raise InputError(f"--since {since!r} is not in the past")
        span = _span(since, start)
        config = load_config()
        store = open_store(config.store_url)
        try:
            report = quality(store, since=start, until=until, period_s=PERIODS[period], scorer=scorer, model=model)
            tests = [drop_test(store, name, since=start, until=until, model=model) for name in report.scorers]
        finally:
            store.close()
        if as_json:
            typer.echo(json.dumps(report.to_json(), indent=2))
            return
        if not report.rows:
            hint = escape("is [evals.online] sample above 0, and a worker or keel serve running?")
            console.print(f"no online scores {escape(span)} ({hint})")
            return
        table = compact_table(f"online quality {span}, by {period}")
        for column in ("period", "model", "prompt", "scorer", "n", "errored", "mean", "95% CI", "cost"):
            table.add_column(column, justify="right" if column in ("n", "errored", "mean", "cost") else "left")
        for r in report.rows:
            ci = "-" if r.low is None else f"[{r.low:.3f}, {r.high:.3f}]"
            table.add_row(_period(r.period, PERIODS[period]), escape(r.model_version), escape(r.prompt_version),
                          escape(r.scorer), str(r.n), str(r.errors) if r.errors else "", _fmt(r.mean), ci,
                          _cost(r.cost_usd))  # fmt: skip
        console.print(table)
        console.print(f"scoring cost {_cost(report.cost_usd) or '$0'} (the judges' calls; other scorers are free)")
        for t in tests:
            if t.change is None:
                continue
            p = "-" if t.p_value is None else f"{t.p_value:.3g}"
            console.print(
                f"{escape(t.scorer)}: since {_period(t.change.time, 3600)} {escape(t.change.model_version)} / prompt"
                f" {escape(t.change.prompt_version)}: mean {_fmt(t.mean_after)} (n {t.n_after}) against"
                f" {_fmt(t.mean_before)} before (n {t.n_before}); one-sided Welch t-test p = {p}"
            )
