"""`keel rag ingest PATH -c C --job NAME`: a large ingest as a durable job (the kind is in keel.rag.jobs).

In the foreground the command runs a worker of its own, for this job's queue
only, and shows the job's progress; `keel worker` processes on any machine
sharing the store take items of the same queue meanwhile. With `--detach` it
submits and returns. Killed (even with -9), the same command resumes the job:
the worker id is the same, so DBOS hands it back the items it was running.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from keel.cli.errors import EXIT_INPUT
from keel.config import Config, load_config
from keel.errors import JobConflict
from keel.jobs import JobRow, JobRunner, Worker
from keel.jobs.runner import check_job_name
from keel.jobs.worker import default_worker_id
from keel.rag import RAG
from keel.rag import jobs as rag_jobs

__all__ = ["run"]

out = Console(highlight=False)
info = Console(stderr=True, highlight=False)
POLL_S = 0.5
SUMMED = ("added", "updated", "unchanged", "deleted", "chunks", "embedded", "cached")


def worker_id(job: str) -> str:
    """The same on every run of the command for this job, so a re-run takes back the items a killed run held."""
    host = default_worker_id()[:100]
    wid = f"{host}:rag.ingest:{job}"
    return wid if len(wid) <= 200 else f"{host}:rag.ingest:{hashlib.sha256(job.encode()).hexdigest()[:24]}"


def run(
    path: Path,
    collection: str,
    job: str,
    settings_args: dict[str, Any],
    metadata: dict[str, str],
    *,
    detach: bool,
    concurrency: int,
    as_json: bool,
) -> None:
    check_job_name(job)  # before the collection is created for it
    config = load_config()
    rag = rag_jobs.shared_rag()
    try:
        custom = any(v is not None for v in settings_args.values())
        plan = rag_jobs.plan_ingest(
            rag, path, collection, settings=rag.settings(**settings_args) if custom else None, metadata=metadata
        )
        with JobRunner(config) as runner:
            row = _submit(runner, job, plan, path, concurrency)
            if detach:
                _print_submitted(row, plan, as_json)
                return
            final = _work(config, runner, rag, row, collection, as_json)
            _print_summary(runner, final, collection, as_json)
    finally:
        rag_jobs.close()
    if final.failed:
        raise typer.Exit(EXIT_INPUT)


def _submit(runner: JobRunner, job: str, plan: rag_jobs.IngestPlan, path: Path, concurrency: int) -> JobRow:
    try:
        return runner.submit(job, rag_jobs.KIND, plan.items, concurrency=concurrency)
    except JobConflict:
        if runner.get(job).kind != rag_jobs.KIND:
            raise  # another kind of job holds the name: its message says so
        chunking = plan.settings.chunking
        raise JobConflict(
            f"job {job!r} holds another ingest: other files, collection or settings than these {len(plan.items)}"
            f" files under {str(path)!r} into {plan.collection!r} ({plan.settings.embedding_model}, chunking"
            f" {chunking.strategy} {chunking.size}/{chunking.overlap}). The same command resumes a job; give"
            " --job a new name to ingest these"
        ) from None


def _work(config: Config, runner: JobRunner, rag: RAG, row: JobRow, collection: str, as_json: bool) -> JobRow:
    """Run this job's items in a worker of this process until it is finished, showing its progress."""
    worker = Worker(config, worker_id=worker_id(row.name), queues=[row.queue]).start()
    try:
        return _watch(runner, rag, row, collection, as_json)
    except KeyboardInterrupt:
        info.print(
            f"interrupted: the job keeps what is done; run the same command again (or `keel worker`) to go on, and"
            f" `keel jobs show {escape(row.name)}` to see it"
        )
        raise typer.Exit(130) from None
    finally:
        worker.stop(drain_s=5)


def _watch(runner: JobRunner, rag: RAG, row: JobRow, collection: str, as_json: bool) -> JobRow:
    columns = (
        TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("files · {task.fields[failed]} failed · {task.fields[chunks]} chunks in the collection"),
        TimeElapsedColumn(), TimeRemainingColumn(),
    )  # fmt: skip
    shown: set[str] = set()
    with Progress(*columns, console=info, transient=True, disable=as_json) as progress:
        task = progress.add_task(f"job {escape(row.name)}", total=row.total, failed=0, chunks=0)
        while True:
            status = runner.status(row.name, errors=50)
            job = status.job
            chunks = rag.collection(collection).n_chunks
            progress.update(task, completed=job.done + job.failed, failed=job.failed, chunks=chunks)
            for item in status.errors:
                if item.key not in shown and not as_json:
                    shown.add(item.key)
                    progress.console.print(f"[red]failed[/] {escape(item.key)}: {escape(item.error or '')}")
            if job.finished or job.status == "cancelled":
                return job
            time.sleep(POLL_S)


def _print_submitted(row: JobRow, plan: rag_jobs.IngestPlan, as_json: bool) -> None:
    if as_json:
        out.print_json(data={"job": row.name, "status": row.status, "files": row.total, "done": row.done,
                             "collection": plan.collection, "queue": row.queue, "detached": True})  # fmt: skip
        return
    out.print(
        f"job [bold]{escape(row.name)}[/]: {row.total} files into {escape(plan.collection)} ({row.done} done so far,"
        f" {row.status}); `keel worker` processes ingest them. Follow it: keel jobs show {escape(row.name)}"
    )


def _print_summary(runner: JobRunner, job: JobRow, collection: str, as_json: bool) -> None:
    totals = dict.fromkeys(SUMMED, 0)
    for item in runner.items(job.name, status="done"):
        if isinstance(item.result, dict):
            for name in SUMMED:
                totals[name] += int(item.result.get(name) or 0)
    errors = runner.items(job.name, status="failed")
    if as_json:
        out.print_json(data={
            "job": job.name, "collection": collection, "status": job.status, "files": job.total, "done": job.done,
            "failed": job.failed, **totals, "cost_usd": round(job.cost_usd, 8),
            "errors": [{"file": i.key, "error": i.error, "trace_id": i.trace_id} for i in errors],
        })  # fmt: skip
        return
    out.print(
        f"job [bold]{escape(job.name)}[/] {job.status}: {job.done}/{job.total} files into {escape(collection)} ·"
        f" {totals['added']} added, {totals['updated']} updated, {totals['unchanged']} unchanged documents ·"
        f" {totals['chunks']} chunks ({totals['embedded']} embedded, {totals['cached']} from the cache) ·"
        f" ${job.cost_usd:.6f}"
    )
    for item in errors[:20]:
        out.print(f"[red]failed[/] {escape(item.key)}: {escape(item.error or '')}")
    if errors:
        out.print(f"{len(errors)} files failed; fix them and rerun them with: keel jobs retry {escape(job.name)}")
