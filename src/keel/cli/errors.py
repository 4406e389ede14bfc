"""How a CLI command fails: a KeelError becomes one clear line on stderr and an exit code.

  0 ok · 1 provider failed · 2 bad input · 3 bad configuration · 4 refused by a limit or budget

Command modules import this, not `keel.cli.app` (which imports every command module to wire them).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape

from keel.errors import ConfigError, InputError, KeelError, LimitError

__all__ = ["EXIT_CONFIG", "EXIT_INPUT", "EXIT_LIMIT", "EXIT_PROVIDER", "err", "exit_code", "fail", "handle_errors"]

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

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except KeelError as error:
            raise fail(error) from None

    return wrapper
