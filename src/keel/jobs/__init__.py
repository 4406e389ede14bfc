"""Durable jobs: named sets of items of one kind, run by workers on DBOS (see docs/jobs.md).

    from keel import jobs

    @jobs.kind("thumbnail")
    def make_thumbnail(item: dict, ctx: jobs.ItemContext) -> dict: ...

    runner = jobs.JobRunner()
    runner.submit("thumbs-2026-12", "thumbnail", [{"path": p} for p in paths])

and `keel worker` (or `jobs.Worker().start()` in-process) runs the items.
"""

from __future__ import annotations

from keel.jobs.kinds import ItemContext, Kind, kind, queue_limits, registered_kinds
from keel.jobs.records import ItemRow, JobRow
from keel.jobs.runner import JobRunner, JobStatus
from keel.jobs.worker import Worker, current_worker

__all__ = [
    "ItemContext",
    "ItemRow",
    "JobRow",
    "JobRunner",
    "JobStatus",
    "Kind",
    "Worker",
    "current_worker",
    "kind",
    "queue_limits",
    "registered_kinds",
]
