"""Datasets of an evaluation: JSONL or CSV rows turned into `Case`s.

A case is one row: an id, the input, the expected output, optional gold
documents and gold spans (what retrieval and citations are scored against),
whether the question is answerable from the documents at all (a RAG case
whose evidence is not in the collection should be answered "not in the
documents"), tags, and every column of the row (prompt templates fill their
{placeholders} from them). Column names that differ from these are mapped
(`columns: {input: claim, gold_docs: evidence_ids}`).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from keel.errors import DatasetError

__all__ = ["Case", "DatasetError", "cases_from_rows", "load_rows"]

#: The roles a dataset column can play; only `input` is required.
ROLES = ("id", "input", "expected", "gold_docs", "gold_spans", "tags", "answerable", "unanswerable")

_TRUE = ("true", "yes", "y", "1", "answerable")
_FALSE = ("false", "no", "n", "0", "unanswerable")


@dataclass(frozen=True)
class Case:
    id: str
    input: Any
    expected: Any = None
    gold_docs: tuple[str, ...] = ()
    gold_spans: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    fields: Mapping[str, Any] = field(default_factory=dict)  # the whole row, for prompt placeholders
    answerable: bool | None = None  # None: not said (a case is taken as answerable)

    def to_json(self) -> dict[str, Any]:
        out = {
            "id": self.id, "input": self.input, "expected": self.expected, "gold_docs": list(self.gold_docs),
            "gold_spans": list(self.gold_spans), "tags": list(self.tags), "fields": dict(self.fields),
        }  # fmt: skip
        if self.answerable is not None:  # only when said, so that older suites keep their digest (and their runs)
            out["answerable"] = self.answerable
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Case:
        return cls(
            str(data["id"]), data.get("input"), data.get("expected"), tuple(data.get("gold_docs") or ()),
            tuple(data.get("gold_spans") or ()), tuple(data.get("tags") or ()), dict(data.get("fields") or {}),
            data.get("answerable"),
        )  # fmt: skip


def load_rows(path: Path, fmt: str | None = None) -> list[dict[str, Any]]:
    """The rows of a JSONL or CSV file (by `fmt`, else by the file's suffix)."""
    fmt = fmt or ("csv" if path.suffix.lower() in (".csv", ".tsv") else "jsonl")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read the dataset: {exc.strerror}") from None
    if fmt == "csv":
        dialect = "excel-tab" if path.suffix.lower() == ".tsv" else "excel"
        return [dict(row) for row in csv.DictReader(text.splitlines(), dialect=dialect)]
    rows: list[dict[str, Any]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path}:{number}: not valid JSON: {exc.msg}") from None
        if not isinstance(row, dict):
            raise DatasetError(f"{path}:{number}: each line must be a JSON object, not {type(row).__name__}")
        rows.append(row)
    return rows


def _as_list(value: Any) -> tuple[str, ...]:
    """A list column: a JSON list, or (in CSV) a JSON array string or values separated by `|`."""
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                return (text,)
        else:
            return tuple(part.strip() for part in text.split("|") if part.strip())
    if isinstance(value, (list, tuple)):
        return tuple(str(v) for v in value)
    return (str(value),)


def _as_flag(value: Any, where: str) -> bool | None:
    """An answerable flag: a JSON boolean, or (in CSV) true/false, yes/no, 1/0, answerable/unanswerable."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise DatasetError(f"{where}: {value!r} is not a yes/no flag (true/false, yes/no, 1/0, answerable/unanswerable)")


def cases_from_rows(
    rows: Sequence[Mapping[str, Any]], columns: Mapping[str, str], *, source: str, required: Iterable[str] = ()
) -> list[Case]:
    """Cases from rows; `columns` maps a role (input, expected, ...) to the column that holds it.

    A role that is mapped, or required by the suite (a scorer needs `expected`), must be a column of
    every row; an empty dataset is an error, not a run with nothing in it.
    """
    if not rows:
        raise DatasetError(f"{source}: the dataset is empty: an evaluation needs at least one case")
    names = {role: columns.get(role, role) for role in ROLES}
    needed = {"input", *required, *(role for role in columns if role in ROLES)}
    seen: set[str] = set()
    cases = []
    for number, row in enumerate(rows, start=1):
        for role in sorted(needed):
            if names[role] not in row:
                mapped = f" (mapped from {role!r})" if names[role] != role else ""
                present = ", ".join(sorted(row)) or "none"
                raise DatasetError(
                    f"{source}: row {number} has no column {names[role]!r}{mapped}; its columns: {present}"
                )
        case_id = str(row[names["id"]]) if names["id"] in row else str(number)
        if case_id in seen:
            raise DatasetError(f"{source}: row {number}: case id {case_id!r} appears twice; ids must be unique")
        seen.add(case_id)
        answerable = _as_flag(row.get(names["answerable"]), f"{source}: row {number}, column {names['answerable']!r}")
        if answerable is None and "unanswerable" in columns:  # the inverted flag (SQuAD 2.0's is_impossible)
            where = f"{source}: row {number}, column {names['unanswerable']!r}"
            flag = _as_flag(row.get(names["unanswerable"]), where)
            answerable = None if flag is None else not flag
        cases.append(Case(
            case_id, row[names["input"]], row.get(names["expected"]), _as_list(row.get(names["gold_docs"])),
            _as_list(row.get(names["gold_spans"])), _as_list(row.get(names["tags"])), dict(row), answerable,
        ))  # fmt: skip
    return cases
