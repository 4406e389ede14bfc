"""Metadata filters: one small query language, compiled to each backend's SQL.

A filter is a JSON object of conditions that must all hold, on a chunk's
metadata (its document's fields, `source`, `title` when set, `section`,
`page`, and any custom field) or on `doc_id`:

    {"source": "handbook/setup.md"}                 equal
    {"page": {"$gte": 3, "$lte": 5}}                 compare ($gt $gte $lt $lte)
    {"lang": {"$in": ["en", "fr"]}}                  one of ($nin: none of)
    {"draft": {"$ne": true}}                         not equal (also true when the field is absent)
    {"section": {"$exists": true}}                   present

Values are strings, numbers or booleans. Anything else is an `InvalidFilter`
naming the field, raised before any SQL runs.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from keel.errors import InvalidFilter

__all__ = ["Condition", "parse_filter", "sql_filter"]

_KEY = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,63}$")
_OPS = ("$eq", "$ne", "$gt", "$gte", "$lt", "$lte", "$in", "$nin", "$exists")
_SQL_OPS = {"$eq": "=", "$ne": "<>", "$gt": ">", "$gte": ">=", "$lt": "<", "$lte": "<="}


@dataclass(frozen=True, slots=True)
class Condition:
    key: str
    op: str
    value: Any


def _scalar(key: str, value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidFilter(f"filter {key!r}: {value} is not a usable number")
    if value is None or not isinstance(value, (str, int, float, bool)):
        raise InvalidFilter(f"filter {key!r}: values must be strings, numbers or booleans, not {value!r}")
    return value


def parse_filter(raw: Mapping[str, Any] | str | None) -> tuple[Condition, ...]:
    """Conditions of a filter given as a dict or JSON text; () for none."""
    if raw is None or raw == "" or raw == {}:
        return ()
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise InvalidFilter(f"filter is not JSON: {exc.msg} at column {exc.colno}") from None
    if not isinstance(raw, Mapping):
        raise InvalidFilter('a filter is a JSON object such as {"source": "guide.md"}')
    conditions = []
    for key, spec in raw.items():
        if not isinstance(key, str) or not _KEY.match(key):
            raise InvalidFilter(f"filter field {key!r} is not a valid name (letters, digits, _ . -)")
        if not isinstance(spec, Mapping):
            conditions.append(Condition(key, "$eq", _scalar(key, spec)))
            continue
        if not spec:
            raise InvalidFilter(f"filter {key!r} has no condition")
        for op, value in spec.items():
            if op not in _OPS:
                raise InvalidFilter(f"filter {key!r}: unknown operator {op!r}; known: {', '.join(_OPS)}")
            if op in ("$in", "$nin"):
                if not isinstance(value, list) or not value:
                    raise InvalidFilter(f"filter {key!r}: {op} takes a non-empty list")
                conditions.append(Condition(key, op, tuple(_scalar(key, v) for v in value)))
            elif op == "$exists":
                if not isinstance(value, bool):
                    raise InvalidFilter(f"filter {key!r}: $exists takes true or false")
                conditions.append(Condition(key, op, value))
            else:
                conditions.append(Condition(key, op, _scalar(key, value)))
    return tuple(conditions)


def sql_filter(conditions: tuple[Condition, ...], dialect: str, alias: str = "c") -> tuple[str, list[Any]]:
    """(" AND ..." clause, parameters) for the chunks table aliased `alias`; placeholders are `?`."""
    clauses: list[str] = []
    params: list[Any] = []
    for condition in conditions:
        clause, values = _condition_sql(condition, dialect, alias)
        clauses.append(clause)
        params.extend(values)
    return "".join(f" AND {c}" for c in clauses), params


def _field(key: str, dialect: str, alias: str) -> str:
    if key == "doc_id":
        return f"{alias}.doc_id"
    if dialect == "postgres":
        return f"({alias}.metadata -> '{key}')"
    return f"json_extract({alias}.metadata, '$.\"{key}\"')"


def _param(value: Any, dialect: str, key: str) -> tuple[str, Any]:
    """A placeholder and its value: JSONB on PostgreSQL (typed comparison), plain on SQLite."""
    if dialect == "postgres" and key != "doc_id":
        return "CAST(? AS jsonb)", json.dumps(value)
    if dialect == "sqlite" and isinstance(value, bool):
        return "?", int(value)  # json_extract gives 1/0 for true/false
    return "?", value


def _condition_sql(condition: Condition, dialect: str, alias: str) -> tuple[str, list[Any]]:
    key, op, value = condition.key, condition.op, condition.value
    field = _field(key, dialect, alias)
    if op == "$exists":
        return (f"{field} IS NOT NULL" if value else f"{field} IS NULL"), []
    if op in ("$in", "$nin"):
        marks, params = zip(*(_param(v, dialect, key) for v in value), strict=True)
        test = f"{field} IN ({', '.join(marks)})"
        return (test if op == "$in" else f"({field} IS NULL OR NOT {test})"), list(params)
    mark, param = _param(value, dialect, key)
    if op == "$ne":
        return f"({field} IS NULL OR {field} <> {mark})", [param]
    return f"{field} {_SQL_OPS[op]} {mark}", [param]
