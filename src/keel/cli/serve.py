"""`keel serve`: the HTTP server (OpenAI-compatible API) in one process."""

from __future__ import annotations

from typing import Annotated

import typer

from keel.cli.app import handle_errors


@handle_errors
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    log_level: Annotated[str, typer.Option("--log-level", help="uvicorn log level.")] = "info",
) -> None:
    """Serve the OpenAI-compatible API (POST /v1/chat/completions, POST /v1/embeddings, GET /v1/models).

    Example: keel serve --port 8000, then point the openai SDK at base_url="http://127.0.0.1:8000/v1"
    """
    import uvicorn

    from keel.server.app import create_app

    app = create_app()
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False)
