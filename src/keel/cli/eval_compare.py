"""`keel eval compare` and `keel eval report`: paired statistics between runs, and an HTML report.

These two commands join the `keel eval` group (src/keel/cli/evals.py) through `register(app)`, so
the group's module stays with the suite runner. A run is named by its id in the store, or by a
JSON file written with `keel.evals.results.run_to_json` (any path ending in .json, or any file
that exists).

Exit codes: 0 ok (and no significant drop); 1 a metric drops significantly and
--fail-on-regression was given; 2 bad input (unknown run, malformed file, runs that share no case).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from keel.cli.errors import handle_errors
from keel.errors import InputError

if TYPE_CHECKING:  # keel.evals loads scipy and DBOS (seconds): only `compare` and `report` pay for it
    from keel.evals.compare import Comparison, MetricDelta
    from keel.evals.results import RunResult

__all__ = ["RunLoader", "load_run_ref", "register"]

RunLoader = Callable[[str], "RunResult"]
EXIT_REGRESSION = 1
console = Console(highlight=False)
_VERDICT_STYLE = {"worse": "bold red", "better": "green", "higher": "yellow", "lower": "green"}
MAX_FLIPS_SHOWN = 20


def _from_store(run_id: str) -> RunResult:
    """A run saved by `keel eval run`, read from keel's store."""
    from keel.config import load_config
    from keel.evals import load_run
    from keel.store import open_store

    store = open_store(load_config().store_url)
    try:
        return load_run(store, run_id)
    finally:
        store.close()


def load_run_ref(ref: str) -> RunResult:
    """A run from a JSON file (a path ending in .json, or any existing file), else from the store by id."""
    path = Path(ref)
    if path.suffix.lower() == ".json" or path.exists():
        if not path.is_file():
            raise InputError(f"{ref}: no such run file")
        try:
            text = path.read_bytes()
        except OSError as error:
            raise InputError(f"{ref}: cannot read: {error.strerror}") from None
        from keel.evals.results import run_from_json

        return run_from_json(text, source=ref)
    return _from_store(ref)


# --- printing ----------------------------------------------------------------------------------


def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _signed(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:+.{digits}f}"


def _p(value: float | None) -> str:
    if value is None:
        return "-"
    return "<0.0001" if value < 1e-4 else f"{value:.4f}"


def _verdict(delta: MetricDelta) -> str:
    verdict = delta.verdict()
    style = _VERDICT_STYLE.get(verdict, "dim")
    short = {"no significant change": "n.s.", "not enough data": "n/a"}.get(verdict, verdict)
    return f"[{style}]{short}[/]"


def _n(delta: MetricDelta) -> str:
    """Paired cases, and how many shared cases were left out (errored in A or B)."""
    return f"{delta.n} [yellow](-{delta.excluded})[/]" if delta.excluded else str(delta.n)


def _ci(delta: MetricDelta, digits: int = 3) -> str:
    return "-" if delta.ci is None else f"[{delta.ci[0]:+.{digits}f}, {delta.ci[1]:+.{digits}f}]"


def _table() -> Table:
    """A borderless table that fits 80 columns: one line under the header, two spaces between columns."""
    return Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1), collapse_padding=True)


def _metrics_table(c: Comparison) -> Table:
    level = round(100 * (1 - c.alpha), 1)
    table = _table()
    for name in ("metric", "n", "A", "B", "B-A", f"{level:g}% CI", "p", "verdict"):
        left = name in ("metric", "verdict")
        table.add_column(name, justify="left" if left else "right", no_wrap=name not in ("metric", "p"))
    for m in c.metrics:
        label = m.metric if m.kind == "score" else "pass rate"
        table.add_row(
            escape(label), _n(m), _num(m.mean_a), _num(m.mean_b), _signed(m.delta), _ci(m), _p(m.p_value), _verdict(m)
        )
    return table


def _spend_table(c: Comparison) -> Table | None:
    rows = [(label, d) for label, d in (("cost USD", c.cost), ("latency s", c.latency)) if d]
    if not rows:
        return None
    table = _table()
    for name in ("", "n", "A", "B", "B-A", "CI", "verdict"):
        table.add_column(name, justify="left" if name in ("", "verdict") else "right", no_wrap=name in ("CI", "n"))
    for label, d in rows:
        digits = 6 if d.kind == "cost" else 3
        table.add_row(label, _n(d), _num(d.mean_a, digits), _num(d.mean_b, digits), _signed(d.delta, digits),
                      _ci(d, digits), _verdict(d))  # fmt: skip
    return table


def _flips(label: str, ids: Sequence[str]) -> str:
    shown = ", ".join(escape(i) for i in ids[:MAX_FLIPS_SHOWN])
    more = f" ... and {len(ids) - MAX_FLIPS_SHOWN} more" if len(ids) > MAX_FLIPS_SHOWN else ""
    return f"{label} ({len(ids)}): {shown or '-'}{more}"


def print_comparison(c: Comparison) -> None:
    console.print(f"[bold]B {escape(c.run_b)}[/] ({escape(c.variant_b)}) against [bold]A {escape(c.run_a)}[/] "
                  f"({escape(c.variant_a)}): {c.shared} shared cases")  # fmt: skip
    console.print(_metrics_table(c))
    console.print("[dim]n: paired cases (-k: left out, errored in A or B); n.s.: no significant change; "
                  "n/a: too few cases[/]")  # fmt: skip
    try:
        passed = c.metric("pass")
    except KeyError:
        passed = None
    if passed is not None and passed.mcnemar is not None:
        t = passed.mcnemar
        ties = f", {passed.ties} tie(s) left out" if passed.ties else ""
        console.print(f"McNemar: {t.pass_to_fail} pass->fail, {t.fail_to_pass} fail->pass "
                      f"({t.both_pass} pass in both, {t.both_fail} fail in both{ties})")  # fmt: skip
        console.print(_flips("[red]pass->fail[/]", c.pass_to_fail))
        console.print(_flips("[green]fail->pass[/]", c.fail_to_pass))
    spend = _spend_table(c)
    if spend is not None:
        console.print("\n[bold]Cost and latency[/] (paired, per case)")
        console.print(spend)
    for note in c.notes:
        console.print(f"[yellow]note:[/] {escape(note)}")
    regressions = c.regressions()
    if regressions:
        names = ", ".join(m.metric for m in regressions)
        console.print(f"[bold red]regression[/]: {escape(names)} dropped significantly (alpha {c.alpha:g})")
    else:
        console.print(f"no significant drop (alpha {c.alpha:g})")


# --- the commands --------------------------------------------------------------------------------


def register(app: typer.Typer, loader: RunLoader = load_run_ref) -> None:
    """Add `compare` and `report` to a typer group (`keel eval`). `loader` turns a run reference
    (an id or a file) into a RunResult."""

    @app.command("compare")
    @handle_errors
    def compare_runs(
        run_a: Annotated[str, typer.Argument(help="The baseline run: its id, or a run JSON file.")],
        run_b: Annotated[str, typer.Argument(help="The run to judge against it.")],
        cluster: Annotated[
            str | None, typer.Option("--cluster", help="Resample clusters of cases sharing a tag PREFIX:value.")
        ] = None,
        alpha: Annotated[float, typer.Option(help="Significance level; intervals are 1 - alpha.")] = 0.05,
        fail_on_regression: Annotated[
            bool, typer.Option("--fail-on-regression", help="Exit 1 when a metric drops significantly.")
        ] = False,
        n_boot: Annotated[int, typer.Option("--n-boot", help="Bootstrap resamples.")] = 2000,
        seed: Annotated[int, typer.Option(help="Seed of the bootstrap (the same runs give the same CIs).")] = 0,
        as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
    ) -> None:
        """Paired comparison of run B against run A: per metric the delta with a 95% CI (BCa bootstrap for
        scores; Tango's score interval for pass/fail), McNemar's exact test on pass/fail, the flipped cases,
        cost and latency deltas.

        Example: keel eval compare run-main run-pr42 --cluster topic --fail-on-regression
        """
        from keel.evals.compare import compare

        comparison = compare(loader(run_a), loader(run_b), cluster_by=cluster, alpha=alpha, n_boot=n_boot, seed=seed)
        if as_json:
            typer.echo(json.dumps(comparison.to_dict(), indent=2))
        else:
            print_comparison(comparison)
        if fail_on_regression and comparison.regressions():
            raise typer.Exit(EXIT_REGRESSION)

    @app.command("report")
    @handle_errors
    def report_runs(
        runs: Annotated[list[str], typer.Argument(help="Run ids or run JSON files; the first is the baseline.")],
        out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the HTML file.")] = Path("report.html"),
        cluster: Annotated[str | None, typer.Option("--cluster", help="Cluster tag prefix for the comparison.")] = None,
    ) -> None:
        """A self-contained HTML report (no network needed to open it): score distributions, cost against
        quality per variant, a per-tag breakdown and, for two runs, the paired comparison and flipped cases.

        Example: keel eval report run-main run-pr42 --out report.html
        """
        from keel.evals.report import write_report

        loaded = [loader(ref) for ref in runs]
        path = write_report(loaded, out, cluster_by=cluster)
        console.print(f"wrote {escape(str(path))} ({path.stat().st_size // 1024} KiB, {len(loaded)} run(s))")
