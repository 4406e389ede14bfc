"""The numbers of an eval report, computed once: `keel eval report` draws them into an HTML file and the
dashboard's `/api/evals/*` routes serve them as JSON for its Evals page.

One data model for both, so the file and the page never disagree: `build_report_data(runs)` reduces the
runs (summary per run, score histograms, quality against cost and latency, a per-tag breakdown, failing
cases) and, with two runs or more, compares each run with the first through `keel.evals.compare` (the
same paired statistics as `keel eval compare`) and picks the flipped cases with their outputs and traces.
Nothing here draws or formats: renderers take `ReportData` (report.py) or its `to_dict()` (the API).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from keel.errors import InputError
from keel.evals.compare import Comparison, compare
from keel.evals.results import CaseResult, RunResult

__all__ = [
    "CaseView",
    "ComparedRun",
    "Distribution",
    "ReportData",
    "RunStats",
    "SpendPoint",
    "TagRow",
    "build_report_data",
    "failing_cases",
    "run_stats",
]

MAX_TAGS = 15
MAX_FLIPS = 25  # per direction: the report's table is evidence to read, the full list is in the comparison
MAX_FAILING = 25
BINS = 10  # score histograms over [0, 1]

Direction = Literal["pass_to_fail", "fail_to_pass"]


def finite(value: object) -> float | None:
    """A number that can enter a mean; None, NaN, infinities and non-numbers are errored (None)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _mean(values: Sequence[float | None]) -> float | None:
    usable = [v for v in values if v is not None]
    return float(np.mean(usable)) if usable else None


# --- one run -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RunStats:
    """A run reduced to the numbers of the report's and the dashboard's runs tables."""

    label: str  # the run id, made unique when a report shows the same run twice
    run_id: str
    suite: str
    variant: str
    status: str
    created_at: float
    cases: int  # distinct case ids
    repeats: int
    recorded: int  # case repeats recorded
    pass_rate: float | None  # share of case repeats that passed
    means: dict[str, float | None]  # metric -> mean over scored case repeats
    errored: dict[str, int]  # metric -> errored scores
    task_errors: int
    cost_total: float | None
    cost_per_case: float | None
    latency_p50: float | None
    latency_p95: float | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label, "run_id": self.run_id, "suite": self.suite, "variant": self.variant,
            "status": self.status, "created_at": self.created_at, "cases": self.cases, "repeats": self.repeats,
            "recorded": self.recorded, "pass_rate": self.pass_rate, "means": self.means, "errored": self.errored,
            "task_errors": self.task_errors, "cost_usd": self.cost_total, "cost_per_case": self.cost_per_case,
            "latency_p50_s": self.latency_p50, "latency_p95_s": self.latency_p95,
        }  # fmt: skip


def run_stats(run: RunResult, label: str | None = None) -> RunStats:
    metrics = run.metric_names()
    scores = {m: [finite(c.scores.get(m)) for c in run.cases] for m in metrics}
    costs = [v for v in (finite(c.cost_usd) for c in run.cases) if v is not None]
    latencies = [v for v in (finite(c.latency_s) for c in run.cases) if v is not None]
    return RunStats(
        label=label or run.run_id, run_id=run.run_id, suite=run.suite, variant=run.variant, status=run.status,
        created_at=run.created_at, cases=len({c.case_id for c in run.cases}),
        repeats=max((c.repeat for c in run.cases), default=0) + 1, recorded=len(run.cases),
        pass_rate=_mean([None if c.passed is None else float(c.passed) for c in run.cases]),
        means={m: _mean(v) for m, v in scores.items()},
        errored={m: sum(1 for v in values if v is None) for m, values in scores.items()},
        task_errors=sum(1 for c in run.cases if c.error), cost_total=sum(costs) if costs else None,
        cost_per_case=float(np.mean(costs)) if costs else None,
        latency_p50=float(np.percentile(latencies, 50)) if latencies else None,
        latency_p95=float(np.percentile(latencies, 95)) if latencies else None,
    )  # fmt: skip


# --- plots' data -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Distribution:
    """One metric's histogram over [0, 1], per run: counts per bin, scored cases, the mean."""

    metric: str
    edges: tuple[float, ...]
    counts: tuple[tuple[int, ...], ...]  # per run, per bin
    n: tuple[int, ...]  # per run
    means: tuple[float | None, ...]  # per run

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "edges": list(self.edges), "counts": [list(c) for c in self.counts],
                "n": list(self.n), "means": list(self.means)}  # fmt: skip


@dataclass(frozen=True, slots=True)
class SpendPoint:
    """A run (a variant) as a point: its quality against its mean cost and latency per case."""

    run: int  # index into ReportData.runs
    quality: float
    cost_per_case: float | None
    latency_p50: float | None

    def to_dict(self) -> dict[str, Any]:
        return {"run": self.run, "quality": self.quality, "cost_per_case": self.cost_per_case,
                "latency_p50_s": self.latency_p50}  # fmt: skip


@dataclass(frozen=True, slots=True)
class TagRow:
    tag: str
    quality: tuple[float | None, ...]  # per run
    n: tuple[int, ...]  # case repeats with the tag, per run

    def to_dict(self) -> dict[str, Any]:
        return {"tag": self.tag, "quality": list(self.quality), "n": list(self.n)}


@dataclass(frozen=True, slots=True)
class CaseView:
    """A case as a table shows it: a failing case of one run, or a flipped case of two (A and B)."""

    case_id: str
    input: Any
    expected: Any
    output: Any
    scores: Mapping[str, float | None]
    trace_id: str | None
    error: str | None = None
    repeat: int = 0
    direction: Direction | None = None  # flipped cases only
    output_b: Any = None
    scores_b: Mapping[str, float | None] = field(default_factory=dict)
    trace_id_b: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {
            "case_id": self.case_id, "repeat": self.repeat, "input": self.input, "expected": self.expected,
            "output": self.output, "scores": {m: finite(v) for m, v in self.scores.items()},
            "trace_id": self.trace_id, "error": self.error,
        }  # fmt: skip
        if self.direction is not None:
            out.update(direction=self.direction, output_b=self.output_b, trace_id_b=self.trace_id_b,
                       scores_b={m: finite(v) for m, v in self.scores_b.items()})  # fmt: skip
        return out


@dataclass(frozen=True, slots=True)
class ComparedRun:
    """One run against the baseline: the comparison as `keel eval compare` computes it, and its flips."""

    run: int  # index into ReportData.runs (the baseline is 0)
    comparison: Comparison
    flips: tuple[CaseView, ...]  # at most MAX_FLIPS each way, pass->fail first
    hidden_flips: int  # flipped cases beyond those

    def to_dict(self) -> dict[str, Any]:
        return {"run": self.run, "comparison": self.comparison.to_dict(), "flips": [f.to_dict() for f in self.flips],
                "hidden_flips": self.hidden_flips}  # fmt: skip


@dataclass(frozen=True, slots=True)
class ReportData:
    runs: tuple[RunStats, ...]
    quality_metric: str | None  # None: quality is the pass rate
    distributions: tuple[Distribution, ...]
    spend: tuple[SpendPoint, ...]
    tags: tuple[TagRow, ...]
    compared: tuple[ComparedRun, ...]
    problems: tuple[str, ...]  # comparisons that could not be made, and why
    failing: tuple[tuple[CaseView, ...], ...]  # per run: its first failing cases
    failing_total: tuple[int, ...]  # per run

    @property
    def quality_label(self) -> str:
        return "pass rate" if self.quality_metric is None else f"mean {self.quality_metric}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "runs": [r.to_dict() for r in self.runs], "quality_metric": self.quality_metric,
            "quality_label": self.quality_label, "distributions": [d.to_dict() for d in self.distributions],
            "spend": [p.to_dict() for p in self.spend], "tags": [t.to_dict() for t in self.tags],
            "compared": [c.to_dict() for c in self.compared], "problems": list(self.problems),
            "failing": [[c.to_dict() for c in cases] for cases in self.failing],
            "failing_total": list(self.failing_total),
        }  # fmt: skip


def _quality(case: CaseResult, metric: str | None) -> float | None:
    """The case's quality: its pass/fail when the runs have one, else the main metric."""
    if metric is None:
        return None if case.passed is None else float(case.passed)
    return finite(case.scores.get(metric))


def _quality_metric(runs: Sequence[RunResult]) -> str | None:
    """None (pass rate) when any case carries pass/fail, else the first metric."""
    if any(c.passed is not None for r in runs for c in r.cases):
        return None
    names = [m for r in runs for m in r.metric_names()]
    return names[0] if names else None


def _distributions(runs: Sequence[RunResult], stats: Sequence[RunStats]) -> tuple[Distribution, ...]:
    edges = np.linspace(0, 1, BINS + 1)
    out = []
    for metric in dict.fromkeys(m for s in stats for m in s.means):
        counts, sizes = [], []
        for run in runs:
            values = [v for v in (finite(c.scores.get(metric)) for c in run.cases) if v is not None]
            histogram, _ = np.histogram(np.clip(values, 0, 1), bins=edges)
            counts.append(tuple(int(k) for k in histogram))
            sizes.append(len(values))
        means = tuple(s.means.get(metric) for s in stats)
        out.append(Distribution(metric, tuple(float(e) for e in edges), tuple(counts), tuple(sizes), means))
    return tuple(out)


def _spend(stats: Sequence[RunStats], metric: str | None) -> tuple[SpendPoint, ...]:
    points = []
    for i, s in enumerate(stats):
        quality = s.pass_rate if metric is None else s.means.get(metric)
        if quality is not None and (s.cost_per_case is not None or s.latency_p50 is not None):
            points.append(SpendPoint(i, quality, s.cost_per_case, s.latency_p50))
    return tuple(points)


def _tags(runs: Sequence[RunResult], metric: str | None) -> tuple[TagRow, ...]:
    """The most frequent tags, each with its quality and size per run."""
    counts: Counter[str] = Counter(t for r in runs for c in r.cases for t in c.tags)
    rows = []
    for tag, _ in counts.most_common(MAX_TAGS):
        per_run = [[_quality(c, metric) for c in r.cases if tag in c.tags] for r in runs]
        rows.append(TagRow(tag, tuple(_mean(v) for v in per_run), tuple(len(v) for v in per_run)))
    return tuple(rows)


def _labels(runs: Sequence[RunResult]) -> list[str]:
    """Run ids, made unique when the same id is given twice."""
    counts = Counter(r.run_id for r in runs)
    return [r.run_id if counts[r.run_id] == 1 else f"{r.run_id} #{i + 1}" for i, r in enumerate(runs)]


# --- cases ---------------------------------------------------------------------------------------


def _first_repeats(run: RunResult) -> dict[str, CaseResult]:
    return {c.case_id: c for c in run.cases if c.repeat == 0}


def _flip(case_id: str, direction: Direction, a: CaseResult | None, b: CaseResult | None) -> CaseView:
    shown = a or b  # input and expected are the dataset's: the same in both runs
    return CaseView(
        case_id=case_id, input=shown.input if shown else None, expected=shown.expected if shown else None,
        output=a.output if a else None, scores=dict(a.scores) if a else {}, trace_id=a.trace_id if a else None,
        direction=direction, output_b=b.output if b else None, scores_b=dict(b.scores) if b else {},
        trace_id_b=b.trace_id if b else None,
    )  # fmt: skip


def _compared(index: int, comparison: Comparison, a: RunResult, b: RunResult, max_flips: int) -> ComparedRun:
    by_a, by_b = _first_repeats(a), _first_repeats(b)
    picked: list[tuple[str, Direction]] = [(i, "pass_to_fail") for i in comparison.pass_to_fail[:max_flips]]
    picked += [(i, "fail_to_pass") for i in comparison.fail_to_pass[:max_flips]]
    flips = tuple(_flip(i, d, by_a.get(i), by_b.get(i)) for i, d in picked)
    hidden = len(comparison.pass_to_fail) + len(comparison.fail_to_pass) - len(flips)
    return ComparedRun(index, comparison, flips, hidden)


def failing_cases(run: RunResult, limit: int = MAX_FAILING) -> tuple[tuple[CaseView, ...], int]:
    """The run's case repeats that failed a threshold or errored, in dataset order (the first `limit`),
    and how many there are."""
    failing = [c for c in run.cases if c.passed is False or c.error is not None]
    views = tuple(_failing(c) for c in failing[:limit])
    return views, len(failing)


def _failing(c: CaseResult) -> CaseView:
    return CaseView(case_id=c.case_id, repeat=c.repeat, input=c.input, expected=c.expected, output=c.output,
                    scores=dict(c.scores), trace_id=c.trace_id, error=c.error)  # fmt: skip


# --- the report ----------------------------------------------------------------------------------


def build_report_data(
    runs: Sequence[RunResult],
    *,
    cluster_by: str | None = None,
    alpha: float = 0.05,
    max_flips: int = MAX_FLIPS,
    max_failing: int = MAX_FAILING,
    strict: bool = False,
) -> ReportData:
    """Every number of a report on `runs`; the first is the baseline each later run is compared with.

    A comparison that cannot be made (runs that share no case, a cluster tag no case has) is named in
    `problems` and the rest of the report stands; with `strict` it raises InputError instead (the
    dashboard's compare route, like `keel eval compare`).
    """
    if not runs:
        raise InputError("a report needs at least one run")
    stats = [run_stats(run, label) for label, run in zip(_labels(runs), runs, strict=True)]
    metric = _quality_metric(runs)
    compared: list[ComparedRun] = []
    problems: list[str] = []
    for i, run in enumerate(runs[1:], start=1):
        try:
            comparison = compare(runs[0], run, cluster_by=cluster_by, alpha=alpha)
        except InputError as error:
            if strict:
                raise
            problems.append(f"{stats[i].label} against {stats[0].label}: {error.message}")
            continue
        compared.append(_compared(i, comparison, runs[0], run, max_flips))
    failing = [failing_cases(run, max_failing) for run in runs]
    return ReportData(
        runs=tuple(stats), quality_metric=metric, distributions=_distributions(runs, stats),
        spend=_spend(stats, metric), tags=_tags(runs, metric), compared=tuple(compared), problems=tuple(problems),
        failing=tuple(f for f, _ in failing), failing_total=tuple(n for _, n in failing),
    )  # fmt: skip
