"""`[jobs]` of keel.toml: the jobs app's own section of the configuration.

Registered with keel.config at import (keel.config imports this module when
a file has `[jobs]` or `config.jobs` is read), so the core does not define it.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from keel.config import register_section

__all__ = ["JobQueueConfig", "JobsConfig"]


class JobQueueConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    """A queue of job items: how many run at once and how often they may start."""

    concurrency: int | None = Field(default=None, gt=0)  # across every worker
    worker_concurrency: int | None = Field(default=None, gt=0)  # in one worker process
    rpm: int | None = Field(default=None, gt=0)  # items started per minute, across every worker

    @model_validator(mode="after")
    def _worker_within_global(self) -> JobQueueConfig:
        if self.concurrency and self.worker_concurrency and self.worker_concurrency > self.concurrency:
            raise ValueError("worker_concurrency cannot exceed concurrency")
        return self


class JobsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    """`keel.jobs` and `keel worker`: durable batch jobs on DBOS (see docs/jobs.md)."""

    # DBOS's system database; empty: `sqlite:///` beside a SQLite store, the store's own database on PostgreSQL
    system_database_url: str = ""
    default_queue: str = Field(default="default", min_length=1)
    queues: dict[str, JobQueueConfig] = {"default": JobQueueConfig(worker_concurrency=16)}
    poll_s: float = Field(default=0.2, gt=0, le=60)  # how often a worker looks for queued items
    heartbeat_s: float = Field(default=5.0, gt=0)  # how often a worker says it is alive
    dead_after_s: float = Field(default=30.0, gt=0)  # a heartbeat older than this: the worker is dead
    imports: tuple[str, ...] = ()  # modules `keel worker` imports so their job kinds are registered

    @model_validator(mode="after")
    def _timeouts_make_sense(self) -> JobsConfig:
        if self.dead_after_s <= 2 * self.heartbeat_s:
            raise ValueError("dead_after_s must exceed twice heartbeat_s, or live workers would be taken for dead")
        return self


register_section("jobs", JobsConfig)
