"""`keel jobs`: list, show, cancel, resume and retry durable jobs (run by `keel worker`)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress_bar import ProgressBar
from rich.table import Table

from keel.cli.errors import handle_errors

if TYPE_CHECKING:  # keel.jobs loads DBOS (a second of start-up): only the jobs commands pay for it
    from keel.jobs import JobRow, JobStatus

app = typer.Typer(help="Durable jobs: their progress, failures and cost; cancel, resume, retry.", no_args_is_help=True)
console = Console(highlight=False)

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
NameArg = Annotated[str, typer.Argument(help="The job's name.")]
_STATUS_STYLE = {"running": "cyan", "done": "green", "failed": "bold red", "cancelled": "yellow"}


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%m-%d %H:%M:%S")


def _runner() -> Any:
    from keel.jobs import JobRunner

    return JobRunner()


def _row_json(job: JobRow) -> dict[str, Any]:
    return {
        "name": job.name, "kind": job.kind, "queue": job.queue, "status": job.status, "total": job.total,
        "done": job.done, "failed": job.failed, "cost_usd": round(job.cost_usd, 6), "created_at": job.created_at,
        "updated_at": job.updated_at,
    }  # fmt: skip


def _bar(job: JobRow, width: int = 16) -> ProgressBar:
    return ProgressBar(total=max(job.total, 1), completed=job.done + job.failed, width=width)


def _status(job: JobRow) -> str:
    return f"[{_STATUS_STYLE.get(job.status, 'dim')}]{job.status}[/]"


@app.command("list")
@handle_errors
def list_jobs(
    status: Annotated[
        str | None, typer.Option(help="Only jobs in this state: running, done, failed, cancelled.")
    ] = None,
    kind: Annotated[str | None, typer.Option(help="Only jobs of this kind, e.g. evals.online.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=10_000, help="At most this many, latest first.")] = 50,
    as_json: JsonOption = False,
) -> None:
    """Jobs with their progress, failures and cost, most recently active first.

    Example: keel jobs list --status running --kind rag.ingest
    """
    if status is not None and status not in _STATUS_STYLE:
        raise typer.BadParameter(f"{status!r}: use running, done, failed or cancelled", param_hint="--status")
    if kind is not None and not kind.strip():
        raise typer.BadParameter("give a kind, e.g. evals.online (`keel jobs list` shows each)", param_hint="--kind")
    with _runner() as runner:
        jobs = runner.jobs(status=status, kind=kind, limit=limit)
    if as_json:
        typer.echo(json.dumps([_row_json(j) for j in jobs], indent=2))
        return
    table = Table(title=f"{len(jobs)} jobs", caption="times UTC")
    table.add_column("job", max_width=22, overflow="fold")
    table.add_column("status", no_wrap=True)
    table.add_column("progress", no_wrap=True)
    table.add_column("done", justify="right", no_wrap=True)
    table.add_column("failed", justify="right", no_wrap=True)
    table.add_column("cost $", justify="right", no_wrap=True)
    for job in jobs:
        failed = f"[red]{job.failed}[/]" if job.failed else "0"
        table.add_row(
            escape(job.name), _status(job), _bar(job), f"{job.done}/{job.total}", failed, f"{job.cost_usd:.4f}"
        )
    console.print(table)


def _show(status: JobStatus) -> None:
    job = status.job
    console.print(f"[bold]{escape(job.name)}[/]  kind {escape(job.kind)} · queue {escape(job.queue)} · {_status(job)}")
    console.print(_bar(job, width=40), f" {job.done + job.failed}/{job.total} finished")
    counts = Table(show_header=True, box=None, pad_edge=False)
    for state in ("pending", "running", "done", "failed"):
        counts.add_column(state, justify="right")
    counts.add_row(*(str(status.counts.get(state, 0)) for state in ("pending", "running", "done", "failed")))
    console.print(counts)
    console.print(
        f"cost so far ${job.cost_usd:.6f} · created {_when(job.created_at)} · updated {_when(job.updated_at)} UTC"
    )
    if status.errors:
        errors = Table(title=f"failed items (first {len(status.errors)})", title_justify="left")
        errors.add_column("item", max_width=16, overflow="fold")
        errors.add_column("tries", justify="right", no_wrap=True)
        errors.add_column("error", ratio=1, overflow="fold")
        for item in status.errors:
            errors.add_row(escape(item.key), str(item.attempts), escape(item.error or ""))
        console.print(errors)
        console.print(f"rerun them with: keel jobs retry {escape(job.name)}")


@app.command("show")
@handle_errors
def show(name: NameArg, errors: Annotated[int, typer.Option(min=0, max=1000, help="Failed items to list.")] = 10,
         as_json: JsonOption = False) -> None:  # fmt: skip
    """One job: items by status, cost so far, and its failed items with their errors.

    Example: keel jobs show ingest-2026-12 --errors 20
    """
    with _runner() as runner:
        status = runner.status(name, errors=errors)
    if as_json:
        out = {**_row_json(status.job), "items": status.counts,
               "errors": [{"item": i.key, "attempts": i.attempts, "error": i.error, "trace_id": i.trace_id}
                          for i in status.errors]}  # fmt: skip
        typer.echo(json.dumps(out, indent=2))
        return
    _show(status)


@app.command("cancel")
@handle_errors
def cancel(name: NameArg) -> None:
    """Stop a running job: no new item starts; items running now finish. `resume` continues it.

    Example: keel jobs cancel ingest-2026-12
    """
    with _runner() as runner:
        job = runner.cancel(name)
    console.print(f"cancelled {escape(job.name)}: {job.done}/{job.total} done, {job.remaining} left")


@app.command("resume")
@handle_errors
def resume(name: NameArg) -> None:
    """Continue a cancelled job: its unfinished items are queued again for the workers.

    Example: keel jobs resume ingest-2026-12
    """
    with _runner() as runner:
        job = runner.resume(name)
    console.print(f"resumed {escape(job.name)}: {job.remaining} items queued")


@app.command("retry")
@handle_errors
def retry(name: NameArg) -> None:
    """Run a job's failed items again (each keeps its idempotency key).

    Example: keel jobs retry ingest-2026-12
    """
    with _runner() as runner:
        count = runner.retry_failed(name)
    console.print(
        f"{count} failed items of {escape(name)} queued again" if count else f"{escape(name)} has no failed items"
    )
