"""`keel worker`: a process that runs job items from every keel queue until stopped."""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Annotated

import typer
from rich.console import Console

from keel.cli.errors import handle_errors
from keel.config import load_config

err = Console(stderr=True, highlight=False)


@handle_errors
def worker(
    worker_id: Annotated[
        str | None, typer.Option("--id", help="Worker id, unique among live workers (default: the host name).")
    ] = None,
    imports: Annotated[
        list[str] | None,
        typer.Option("--import", help="A module that registers job kinds (repeatable; adds to [jobs] imports)."),
    ] = None,
    drain_s: Annotated[int, typer.Option(min=0, help="On SIGTERM or Ctrl-C, seconds running items may finish.")] = 10,
) -> None:
    """Run job items from every keel queue. Start any number, on any machines sharing one PostgreSQL
    store; when one dies, a live one takes over its unfinished items. Stop with SIGTERM or Ctrl-C.

    Example: keel worker --id worker-1 --import myapp.jobs
    """
    logging.basicConfig(level=logging.INFO, format="%(levelname)-8s %(name)s: %(message)s")
    config = load_config()
    from keel.jobs.worker import Worker, default_worker_id, import_kinds  # DBOS: loaded by this command only

    # keel's own kinds (rag.ingest: `keel rag ingest --job`, evals.online: [evals.online]), then the user's
    import_kinds(("keel.rag.jobs", "keel.evals.online", *(imports or ())))
    from keel.evals.online import OnlineThread, online_config

    running = Worker(config, worker_id=worker_id or default_worker_id()).start()
    err.print(f"worker {running.worker_id} running; store {config.store_url}")
    # every worker hands out the calls [evals.online] samples; the job layer runs each interval's job once
    online = OnlineThread(config, running.store).start() if online_config(config).enabled else None
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    stop.wait()
    err.print(f"worker {running.worker_id} stopping (up to {drain_s} s for running items)")
    if online is not None:
        online.stop()
    running.stop(drain_s=drain_s)
