"""`keel eval`: run a suite (durable, resumable), list and show runs, re-score them, check a judge."""

from __future__ import annotations

import atexit
import csv
import json
import os
import sys
import threading
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from keel.cli import eval_compare, eval_quality
from keel.cli.errors import handle_errors
from keel.errors import InputError

app = typer.Typer(
    help="Evaluation: run suites, show, re-score, compare and report runs, check judges.", no_args_is_help=True
)
console = Console(highlight=False)

RunArg = Annotated[str, typer.Argument(help="A run id (see `keel eval list`).")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _summary_json(summary: Any) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(summary)


def _print_summary(summary: Any) -> None:
    console.print(f"[bold]{escape(summary.run_id)}[/]  {escape(summary.variant)}")
    table = Table("metric", "mean", "stderr", "95% CI", "pass rate", "threshold", "n", "errored")
    for m in summary.metrics:
        ci = "-" if m.ci_low is None else f"[{m.ci_low:.3f}, {m.ci_high:.3f}]"
        table.add_row(escape(m.name), _fmt(m.mean), _fmt(m.stderr), ci, _fmt(m.pass_rate), _fmt(m.threshold, 2),
                      str(m.n), str(m.errored) if m.errored else "")  # fmt: skip
    console.print(table)
    at_k = "  ".join(f"pass@{k} {v:.3f}  pass^{k} {summary.pass_hat_k[k]:.3f}" for k, v in summary.pass_at_k.items())
    console.print(
        f"cases {summary.cases} x {summary.repeats} repeats · passed {_fmt(summary.pass_rate)} · {at_k}"
        f" · task errors {summary.task_errors} · cost ${summary.cost_usd:.4f}"
        f" · latency p50 {_fmt(summary.latency_p50_s)} s p95 {_fmt(summary.latency_p95_s)} s"
        f" · tokens {summary.input_tokens} in / {summary.output_tokens} out"
    )
    if summary.flaky:
        shown = ", ".join(summary.flaky[:20]) + (" ..." if len(summary.flaky) > 20 else "")
        console.print(f"[yellow]flaky cases ({len(summary.flaky)}):[/] {escape(shown)}")


def _exit_now(code: int) -> NoReturn:
    """Leave without the interpreter's teardown: freeing the ~200,000 objects of a run's imports took 2.5 s of
    a 1,000-case run here. Called once what must outlive the process is written (the cases, their spans, DBOS's
    records) and closed; output is flushed and atexit handlers (OTLP export, a shared RAG) still run."""
    sys.stdout.flush()
    sys.stderr.flush()
    atexit._run_exitfuncs()
    os._exit(code)


def _can_exit_now() -> bool:
    """Only as a command of its own (output to the process's own streams, not a test runner's or a host
    application's) and when nothing else is still working (the interpreter would wait for a non-daemon thread)."""
    if sys.stdout is not sys.__stdout__ or sys.stderr is not sys.__stderr__:
        return False
    return all(t.daemon or t is threading.main_thread() or not t.is_alive() for t in threading.enumerate())


@app.command("run")
@handle_errors
def run(
    suite: Annotated[Path, typer.Argument(help="The suite's YAML file.")],
    limit: Annotated[int | None, typer.Option(min=1, help="Only the first N cases (a quick run).")] = None,
    cases_per_item: Annotated[
        int | None,
        typer.Option(
            min=1,
            max=100_000,
            help="Case repeats per job item (default: at least 4 items per unit of"
            " concurrency, at most 64 cases each). A resumed run keeps its split.",
        ),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Run every case x variant x repeat of a suite as a durable job; running it again resumes it.

    Example: keel eval run examples/scifact_rag.yaml --limit 20
    """
    from keel.evals.runner import start_suite
    from keel.gateway.core import Gateway

    gateway = Gateway()
    try:
        handle = start_suite(suite, gateway=gateway, limit=limit, cases_per_item=cases_per_item)
        try:
            runs = _wait(handle, as_json)
        finally:
            handle.close()
    finally:
        gateway.close()
    _print_runs(runs, as_json)
    if _can_exit_now():
        _exit_now(0)


def _wait(handle: Any, as_json: bool) -> list[Any]:
    """Wait for the run, with a progress bar per case repeat (on stderr, unless --json)."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[cost]}"), TimeElapsedColumn())  # fmt: skip
    with Progress(*columns, console=Console(stderr=True), disable=as_json) as progress:
        task = progress.add_task(handle.job, total=handle.total, cost="")

        def show(now: Any) -> None:
            errored = f" · {now.errored} errored" if now.errored else ""
            failed = f" · {now.failed_items} items failed" if now.failed_items else ""
            progress.update(task, total=now.total, completed=now.done, cost=f"${now.cost_usd:.4f}{errored}{failed}")

        return list(handle.wait(show))


def _print_runs(runs: list[Any], as_json: bool) -> None:
    from keel.evals.metrics import summarize

    summaries = [summarize(r) for r in runs]
    if as_json:
        console.print_json(json.dumps([_summary_json(s) for s in summaries], default=str))
        return
    for summary in summaries:
        _print_summary(summary)


@app.command("list")
@handle_errors
def list_runs(
    limit: Annotated[int, typer.Option(min=1, max=10_000, help="At most this many, latest first.")] = 50,
    as_json: JsonOption = False,
) -> None:
    """Evaluation runs (one per suite variant), latest first.

    Example: keel eval list
    """
    from keel.config import load_config
    from keel.evals import storage
    from keel.store import open_store

    store = open_store(load_config().store_url)
    try:
        rows = storage.list_runs(store, limit=limit)
    finally:
        store.close()
    if as_json:
        console.print_json(json.dumps(rows, default=str))
        return
    table = Table("run", "suite", "variant", "recorded", "passed", "cost")
    for r in rows:
        table.add_row(escape(r["run_id"]), escape(r["suite"]), escape(r["variant"]), f"{r['recorded']}/{r['total']}",
                      str(r["passed"] or 0), f"${(r['cost_usd'] or 0):.4f}")  # fmt: skip
    console.print(table)


@app.command("show")
@handle_errors
def show(run_id: RunArg, as_json: JsonOption = False) -> None:
    """Per metric: mean, stderr and 95% CI over cases, pass rate; pass@k, pass^k, flaky cases, cost, latency.

    Example: keel eval show scifact-rag-1a2b3c4d5e6f-v0
    """
    from keel.config import load_config
    from keel.evals import storage
    from keel.evals.metrics import summarize
    from keel.store import open_store

    store = open_store(load_config().store_url)
    try:
        summary = summarize(storage.load_run(store, run_id))
    finally:
        store.close()
    if as_json:
        console.print_json(json.dumps(_summary_json(summary), default=str))
        return
    _print_summary(summary)


@app.command("rescore")
@handle_errors
def rescore(
    run_id: RunArg,
    suite: Annotated[
        Path | None, typer.Option(help="Score with this suite's scorers (default: the run's suite file).")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Re-score a stored run with the suite's current scorers; the task is not called again.

    Example: keel eval rescore qa-1a2b3c4d5e6f-v0
    """
    from keel.evals.metrics import summarize
    from keel.evals.runner import rescore as rescore_run
    from keel.gateway.core import Gateway

    gateway = Gateway()
    try:
        assert gateway.store is not None  # Gateway() opens the configured store
        result = rescore_run(gateway.store, run_id, suite=suite, gateway=gateway)
    finally:
        gateway.close()
    summary = summarize(result)
    if as_json:
        console.print_json(json.dumps(_summary_json(summary), default=str))
        return
    _print_summary(summary)


def read_labels(path: Path) -> dict[str, str]:
    """case id -> human label, from a CSV or JSONL file with columns `id` (or case_id) and `label`."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(f"{path}: cannot read the labels: {exc.strerror}") from None
    if path.suffix.lower() == ".csv":
        rows: list[dict[str, Any]] = list(csv.DictReader(text.splitlines()))
    else:
        try:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}: not valid JSONL: {exc.msg}") from None
    labels = {}
    for number, row in enumerate(rows, start=1):
        case_id = row.get("id", row.get("case_id")) if isinstance(row, dict) else None
        if case_id is None or "label" not in row:
            raise InputError(f"{path}: row {number} needs `id` (or `case_id`) and `label`")
        labels[str(case_id)] = str(row["label"])
    return labels


@app.command("judge-check")
@handle_errors
def judge_check(
    run_id: RunArg,
    labels: Annotated[
        Path, typer.Option(help="Human labels: CSV or JSONL with `id` and `label` (pass/fail or 1..scale).")
    ],
    scorer: Annotated[str | None, typer.Option(help="The judge metric (default: the run's only judge).")] = None,
) -> None:
    """Agreement and Cohen's kappa between a run's judge and human labels of the same cases.

    Example: keel eval judge-check qa-1a2b3c4d5e6f-v0 --labels human.csv
    """
    from keel.config import load_config
    from keel.evals.judge import run_agreement
    from keel.store import open_store

    store = open_store(load_config().store_url)
    try:
        report = run_agreement(store, run_id, read_labels(labels), scorer)
    finally:
        store.close()
    console.print(report.describe())
    table = Table("human \\ judge", *report.labels)
    for label, row in zip(report.labels, report.confusion, strict=True):
        table.add_row(label, *(str(n) for n in row))
    console.print(table)


eval_compare.register(app)  # `keel eval compare` and `keel eval report`
eval_quality.register(app)  # `keel eval quality`
