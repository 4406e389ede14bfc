"""`keel`: the command line, a thin client of the library.

One module per command group; this one wires them together and turns keel
errors into one clear line and an exit code:

  0 ok · 1 provider failed · 2 bad input · 3 bad configuration · 4 refused by a limit or budget
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape

from keel.errors import ConfigError, InputError, KeelError, LimitError

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
err = Console(stderr=True)

EXIT_PROVIDER, EXIT_INPUT, EXIT_CONFIG, EXIT_LIMIT = 1, 2, 3, 4


def exit_code(error: KeelError) -> int:
    if isinstance(error, ConfigError):
        return EXIT_CONFIG
    if isinstance(error, InputError):
        return EXIT_INPUT
    if isinstance(error, LimitError):
        return EXIT_LIMIT
    return EXIT_PROVIDER


def fail(error: KeelError) -> typer.Exit:
    err.print(f"[bold red]error[/] ({error.error_type}): {escape(error.message)}", highlight=False, soft_wrap=True)
    return typer.Exit(exit_code(error))


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run a command, turning a KeelError into a message and an exit code."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except KeelError as error:
            raise fail(error) from None

    return wrapper


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
