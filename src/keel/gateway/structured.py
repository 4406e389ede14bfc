"""Structured output: a pydantic model (or a JSON schema) in, a validated value out.

Each adapter asks its provider's native mechanism for JSON (OpenAI
json_schema, Anthropic forced tool use, Gemini response schema, a llama.cpp
grammar). The answer is validated here; a failure is sent back to the model
with the validation error, up to `max_reasks` times. Usage and cost add up
over all attempts.

An answer cut off by the token limit (finish reason "length") is not sent
back: the same limit would cut the next one too, so the error says so at once.
A streamed answer has reached the caller piece by piece already: it is
validated at its end, as OpenAI does, and never re-asked.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import jsonschema
from pydantic import BaseModel, ValidationError

from keel.errors import InputError, InvalidSchema, KeelError, StructuredOutputError
from keel.types import Message, ModelResponse, ResponseFormat

__all__ = ["StructuredSpec", "check_streamed", "run_structured", "spec_for"]

_FENCE = re.compile(r"^\s*```(?:json)?\s*(.*?)\s*```\s*$", re.DOTALL)


def _strict_compatible(schema: Any) -> bool:
    """OpenAI strict mode needs every object closed and every property required."""
    if isinstance(schema, Mapping):
        if schema.get("type") == "object" or "properties" in schema:
            props = schema.get("properties", {})
            if schema.get("additionalProperties", True) is not False or set(schema.get("required", [])) != set(props):
                return False
        return all(_strict_compatible(v) for v in schema.values())
    if isinstance(schema, list):
        return all(_strict_compatible(v) for v in schema)
    return True


def _closed(schema: Any) -> Any:
    """A copy with objects closed (additionalProperties false), for pydantic schemas."""
    if isinstance(schema, Mapping):
        out = {k: _closed(v) for k, v in schema.items()}
        if out.get("type") == "object" and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_closed(v) for v in schema]
    return schema


@dataclass(frozen=True)
class StructuredSpec:
    format: ResponseFormat
    validate: Callable[[Any], Any]  # raises ValidationError / jsonschema.ValidationError



def spec_for(target: type[BaseModel] | Mapping[str, Any], name: str | None = None) -> StructuredSpec:
    """The response format and validator for a pydantic model class or a JSON schema."""
    if isinstance(target, type) and issubclass(target, BaseModel):
        schema = _closed(target.model_json_schema())
        fmt = ResponseFormat(name or target.__name__, schema, _strict_compatible(schema))
        return StructuredSpec(fmt, target.model_validate)
    if not isinstance(target, Mapping):
        raise InvalidSchema(f"response_model must be a pydantic model class or a JSON schema dict, got {target!r}")
    try:
        validator_cls = jsonschema.validators.validator_for(target)
        validator_cls.check_schema(target)
    except jsonschema.SchemaError as exc:
        raise InvalidSchema(
            f"not a valid JSON schema: {exc.message} (at {'/'.join(map(str, exc.path)) or 'root'})"
        ) from None
    if target.get("type") not in (None, "object"):
        raise InvalidSchema("the schema's top level must be an object")
    validator = validator_cls(target)

    def validate(value: Any) -> Any:
        validator.validate(value)
        return value

    title = name or str(target.get("title") or "response")
    return StructuredSpec(
        ResponseFormat(re.sub(r"[^A-Za-z0-9_-]", "_", title)[:64], target, _strict_compatible(target)), validate
    )


def parse_json(text: str) -> Any:
    fenced = _FENCE.match(text)
    return json.loads(fenced.group(1) if fenced else text)


def _problem(error: Exception) -> str:
    if isinstance(error, json.JSONDecodeError):
        return f"it is not valid JSON ({error.msg} at character {error.pos})"
    if isinstance(error, ValidationError):
        parts = [f"{'.'.join(map(str, e['loc'])) or '(root)'}: {e['msg']}" for e in error.errors()[:10]]
        return "it does not match the schema: " + "; ".join(parts)
    if isinstance(error, jsonschema.ValidationError):
        return f"it does not match the schema: {'/'.join(map(str, error.absolute_path)) or '(root)'}: {error.message}"
    return str(error)


def _add(total: ModelResponse | None, response: ModelResponse) -> ModelResponse:
    if total is None:
        return response
    cost = None if total.cost_usd is None or response.cost_usd is None else total.cost_usd + response.cost_usd
    return replace(
        response, usage=total.usage + response.usage, cost_usd=cost, attempts=total.attempts + response.attempts
    )


def _invalid(spec: StructuredSpec, text: str) -> tuple[Any, str | None]:
    """(the validated value, None), or (None, what is wrong with the text)."""
    try:
        return spec.validate(parse_json(text)), None
    except (json.JSONDecodeError, ValidationError, jsonschema.ValidationError) as error:
        return None, _problem(error)


def _cut_off(spec: StructuredSpec, problem: str, max_tokens: int | None, text: str) -> StructuredOutputError:
    """The error for an answer the token limit cut short: it names the limit, the real cause."""
    limit = f"max_tokens={max_tokens}" if max_tokens is not None else "the model's own output limit (no max_tokens)"
    error = StructuredOutputError(
        f"the {spec.format.name} answer was cut off by the token limit, {limit} (finish_reason length), "
        f"so {problem}; raise max_tokens",
        last_text=text,
    )
    error.code = "structured_output_truncated"
    return error


async def run_structured(
    call: Callable[[tuple[Message, ...]], Awaitable[ModelResponse]],
    messages: tuple[Message, ...],
    spec: StructuredSpec,
    max_reasks: int,
    max_tokens: int | None = None,
    on_invalid: Callable[[str, str], None] | None = None,
) -> tuple[ModelResponse, Any, int]:
    """Call until the answer validates; returns the summed response, the value and the tries.

    `on_invalid(text, problem)` hears of each answer that did not validate (the trace keeps them).
    """
    if max_reasks < 0:
        raise InputError(f"max_reasks must be 0 or more, got {max_reasks}")
    total: ModelResponse | None = None
    problem = ""
    for tries in range(1, max_reasks + 2):
        try:
            response = await call(messages)
        except KeelError as error:
            raise _with_spent(error, total) from None
        total = _add(total, response)
        value, found = _invalid(spec, response.text)
        if found is None:
            return total, value, tries
        problem = found
        if on_invalid is not None:
            on_invalid(response.text, problem)
        if response.finish_reason == "length":  # asking again with the same limit gets cut again
            raise _with_spent(_cut_off(spec, problem, max_tokens, response.text), total)
        messages = (
            *messages,
            Message.assistant(response.text),
            Message.user(f"That answer cannot be used: {problem}. Answer again with only the JSON object."),
        )
    error_out = StructuredOutputError(
        f"no valid {spec.format.name} after {max_reasks + 1} tries: {problem}", last_text=total.text if total else None
    )
    error_out.attempts = 0
    raise _with_spent(error_out, total)


def check_streamed(
    spec: StructuredSpec,
    response: ModelResponse,
    max_tokens: int | None,
    on_invalid: Callable[[str, str], None] | None = None,
) -> Any:
    """The validated value of a streamed answer, checked at its end (its text reached the caller already,
    so there is no re-ask); raises StructuredOutputError carrying what the answer cost."""
    value, problem = _invalid(spec, response.text)
    if problem is None:
        return value
    if on_invalid is not None:
        on_invalid(response.text, problem)
    if response.finish_reason == "length":
        error = _cut_off(spec, problem, max_tokens, response.text)
    else:
        error = StructuredOutputError(
            f"the streamed {spec.format.name} is not valid: {problem}", last_text=response.text
        )
    raise _with_spent(error, response)


def _with_spent(error: KeelError, spent: ModelResponse | None) -> KeelError:
    """Add what the earlier tries spent to an error, so the trace and the budget see all of it."""
    if spent is not None:
        error.attempts += spent.attempts
        error.usage = spent.usage if error.usage is None else spent.usage + error.usage
        error.cost_usd = spent.cost_usd if error.cost_usd is None else (spent.cost_usd or 0) + error.cost_usd
    return error
