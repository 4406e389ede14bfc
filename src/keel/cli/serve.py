"""`keel serve`: the HTTP server (OpenAI-compatible API, admin API, dashboard) in one process."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from keel.cli.errors import handle_errors
from keel.config import load_config
from keel.errors import ConfigError

LOGGERS = ("uvicorn", "uvicorn.error", "keel")


def log_config(log_format: str, level: str) -> dict[str, Any]:
    """Logging for uvicorn and keel: one line per record, as text or as JSON objects."""
    if log_format == "json":
        formatter = {
            "()": "pythonjsonlogger.json.JsonFormatter",
            "fmt": "%(asctime)s %(levelname)s %(name)s %(message)s",
            "rename_fields": {"asctime": "time", "levelname": "level", "name": "logger"},
        }
    else:
        formatter = {"format": "%(levelname)-8s %(name)s: %(message)s"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": formatter},
        "handlers": {
            "default": {"class": "logging.StreamHandler", "formatter": "default", "stream": "ext://sys.stderr"}
        },
        "loggers": {name: {"handlers": ["default"], "level": level.upper(), "propagate": False} for name in LOGGERS},
        "root": {"handlers": ["default"], "level": "WARNING"},  # libraries' warnings, in the same format
    }


@handle_errors
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    log_level: Annotated[str, typer.Option("--log-level", help="debug, info, warning or error.")] = "info",
    log_format: Annotated[str | None, typer.Option(help="text or json (default: [server] log_format).")] = None,
) -> None:
    """Serve the OpenAI-compatible API at /v1, the admin API at /admin and the dashboard at /.

    Example: keel serve --port 8000, then point the openai SDK at base_url="http://127.0.0.1:8000/v1"
    """
    import uvicorn

    from keel.server.app import create_app

    config = load_config()
    fmt = log_format or config.server.log_format
    if fmt not in ("text", "json"):
        raise ConfigError(f"--log-format {fmt!r}: use text or json")
    if log_level.lower() not in ("debug", "info", "warning", "error", "critical"):
        raise ConfigError(f"--log-level {log_level!r}: use debug, info, warning or error")
    uvicorn.run(
        create_app(config),
        host=host,
        port=port,
        log_config=log_config(fmt, log_level),
        access_log=False,  # keel.access logs each request, with its key and duration
        timeout_graceful_shutdown=max(1, round(config.server.drain_s)),
    )
