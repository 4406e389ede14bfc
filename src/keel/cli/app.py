"""`keel`: the command line, a thin client of the library.

One module per command group; this one wires them together. How a command
fails (one clear line, an exit code) is `keel.cli.errors`, which the command
modules import instead of this one, so that any of them can be imported first.
"""

from __future__ import annotations

import sys

import typer

from keel.cli.errors import err

app = typer.Typer(
    name="keel",
    help="keel: the production layer for LLM features. Every call is traced in one store.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # plain help, as click prints it: typer's rich panels show every flag as `--yes <bool>` and read
    # "[server]" in a help text as markup (and drop it)
    rich_markup_mode=None,
)


def _register() -> None:
    from keel.cli import alerts, chat, config, evals, jobs, keys, models, rag, serve, traces, worker

    app.command("chat")(chat.chat)
    app.command("models")(models.models)
    app.add_typer(traces.app, name="traces")
    app.add_typer(config.app, name="config")
    app.add_typer(keys.app, name="keys")
    app.add_typer(alerts.app, name="alerts")
    app.add_typer(rag.app, name="rag")
    app.command("serve")(serve.serve)
    app.add_typer(jobs.app, name="jobs")
    app.command("worker")(worker.worker)
    app.add_typer(evals.app, name="eval")


_register()


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
