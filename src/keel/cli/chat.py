"""`keel chat`: one question, the answer streamed, the cost and trace id after it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from keel.cli.errors import handle_errors
from keel.errors import InvalidSchema, UnknownModel
from keel.gateway import Gateway
from keel.types import ChatResult

out = Console(highlight=False)
info = Console(stderr=True, highlight=False)


def _load_schema(path: Path) -> dict[str, Any]:
    try:
        schema = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InvalidSchema(f"cannot read {path}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise InvalidSchema(f"{path} is not JSON: {exc.msg} at line {exc.lineno}") from None
    if not isinstance(schema, dict):
        raise InvalidSchema(f"{path} must hold a JSON schema object")
    return schema


def _default_max_tokens(gw: Gateway, model: str | None) -> int | None:
    """The model's `max_output_tokens`: a question from the shell should not run until the context is full."""
    try:
        config = gw.config.models.get(gw.resolve(model))
    except UnknownModel:
        return None  # the call itself refuses it, with a trace
    return config.max_output_tokens if config is not None else None


def _cut_note(result: ChatResult) -> str | None:
    if result.finish_reason != "length":
        return None
    if result.stop_reason == "repetition":
        return f"stopped after {result.usage.output_tokens} tokens: the model was repeating itself"
    return f"cut at {result.usage.output_tokens} tokens (max_tokens); ask for more with --max-tokens"


def _summary(result: ChatResult) -> str:
    cost = "unknown price" if result.cost_usd is None else f"${result.cost_usd:.6f}"
    return (
        f"{result.model} ({result.response_model}) · {result.usage.input_tokens} in / {result.usage.output_tokens} out"
        f" · {cost} · {result.latency_s * 1000:.0f} ms · attempts {result.attempts} · trace {result.trace_id[-12:]}"
    )


@handle_errors
def chat(
    question: Annotated[str, typer.Argument(help="What to ask.")],
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="Model name or alias (default: default_model).")
    ] = None,
    system: Annotated[str | None, typer.Option("--system", "-s", help="System prompt.")] = None,
    json_schema: Annotated[
        Path | None, typer.Option("--json-schema", help="Answer as JSON valid against this JSON schema file.")
    ] = None,
    temperature: Annotated[float | None, typer.Option(help="Sampling temperature, 0-2.")] = None,
    max_tokens: Annotated[
        int | None,
        typer.Option("--max-tokens", min=1, help="Most tokens to generate (default: the model's max_output_tokens)."),
    ] = None,
    no_stream: Annotated[
        bool, typer.Option("--no-stream", help="Print the answer at the end, not as it comes.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only the answer, no summary line.")] = False,
) -> None:
    """Ask a model a question. The answer streams; a summary line (tokens, cost, trace id) follows on stderr.

    Example: keel chat "What is RAG?" --model local
    """
    if not question.strip():
        raise typer.BadParameter("the question is empty", param_hint="QUESTION")
    with Gateway() as gw:
        max_tokens = max_tokens or _default_max_tokens(gw, model)
        options: dict[str, Any] = {"system": system, "temperature": temperature, "max_tokens": max_tokens}
        if json_schema is not None:
            result = gw.chat_sync(question, model, response_model=_load_schema(json_schema), **options)
            out.print_json(data=result.parsed)
        elif no_stream:
            result = gw.chat_sync(question, model, **options)
            out.print(result.text, markup=False)
        else:
            stream = gw.stream_sync(question, model, **options)
            for delta in stream:
                out.print(delta.text, end="", markup=False, soft_wrap=True)
            out.print()
            assert stream.result is not None
            result = stream.result
    if not quiet:
        if note := _cut_note(result):
            info.print(f"[yellow]{note}[/]")
        info.print(f"[dim]{_summary(result)}[/]")
