"""What an evaluation run produced, case by case: the values that runs, comparisons, reports and the
RAG debugger pass between them.

A run is one suite under one variant (a model, a prompt template, parameters). It holds one
`CaseResult` per case and repeat. A score is a float in [0, 1] for a metric (a scorer may give
several metrics), or None when the scorer errored on that case: an errored score is never a pass
and never a silent NaN. Metrics are reducers over these per-case scores, computed after the run,
never inside the loop (STYLE.md 12).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["CaseResult", "RunResult", "ScorerError", "run_from_json", "run_to_json"]


@dataclass(frozen=True, slots=True)
class ScorerError:
    """A scorer that raised on a case: recorded as errored, with why."""

    scorer: str
    message: str


@dataclass(frozen=True, slots=True)
class CaseResult:
    """One case of a run (one repeat of it).

    `scores` maps a metric name to its value in [0, 1], or None when its scorer errored.
    `passed` is whether every metric with a threshold met it (None when the task itself errored).
    `details` holds task-specific evidence that later tools read, e.g. for a RAG task:
    `{"retrieved": [{"doc_id", "rank", "score", "in_context"}], "gold_docs": [...],
      "answer_kind": "generated|extractive|abstained", "sentences": [{"text", "supported", "support"}]}`.
    """

    case_id: str
    repeat: int = 0
    output: Any = None
    scores: Mapping[str, float | None] = field(default_factory=dict)
    passed: bool | None = None
    error: str | None = None  # the task failed on this case (model error, timeout): no output
    scorer_errors: Sequence[ScorerError] = ()
    tags: Sequence[str] = ()
    expected: Any = None
    input: Any = None
    latency_s: float | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    cost_usd: float | None = None
    trace_id: str | None = None
    details: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RunResult:
    """A finished (or partial) run: its identity, its variant and its cases."""

    run_id: str
    suite: str
    variant: str  # a readable name of the variant, e.g. "model=local prompt=v2 temperature=0"
    variant_params: Mapping[str, Any] = field(default_factory=dict)
    thresholds: Mapping[str, float] = field(default_factory=dict)  # metric -> pass threshold
    cases: Sequence[CaseResult] = ()
    created_at: float = 0.0
    status: str = "done"  # running | done | failed | cancelled

    def metric_names(self) -> list[str]:
        names: dict[str, None] = {}
        for case in self.cases:
            names.update(dict.fromkeys(case.scores))
        return list(names)


# --- a run as a JSON file (`keel eval compare a.json b.json`, `keel eval report a.json`) ---------


def _adapter() -> Any:
    from pydantic import TypeAdapter

    return TypeAdapter(RunResult)


def run_to_json(run: RunResult) -> str:
    """The run as JSON; outputs that are not JSON values are written as their str(), NaN as null."""
    return str(_adapter().dump_json(run, fallback=str).decode())


def run_from_json(text: str | bytes, *, source: str = "run") -> RunResult:
    """A run from `run_to_json`'s JSON. Raises InputError naming `source` and the first bad field."""
    from pydantic import ValidationError

    from keel.errors import InputError

    try:
        run: RunResult = _adapter().validate_json(text)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "(top level)"
        more = f" (and {error.error_count() - 1} more)" if error.error_count() > 1 else ""
        raise InputError(f"{source}: {where}: {first['msg']}{more}") from None
    return run
