"""Reducers over a run's per-case scores: means with their uncertainty, pass rates, pass@k, pass^k, flaky cases.

Nothing here is computed inside the run loop: a stored run is reduced when it
is shown (STYLE.md 12), so re-scoring or a new reducer never re-runs a model.
Repeats of a case are not independent samples: a metric's mean and standard
error are taken over cases, each case the mean of its repeats.

pass@k (Chen et al. 2021) is the chance that at least one of k attempts
passes, pass^k (Yao et al. 2024, tau-bench) that all k pass; both use the
unbiased estimators from n repeats with c passes: 1 - C(n-c, k)/C(n, k) and
C(c, k)/C(n, k).

scipy and numpy are imported when a run is reduced, not with this module:
`keel eval run` imports it at start, and scipy.stats alone takes about a
second to import. The interval needs only Student's t quantile, which comes
from `scipy.special` (half of that).
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

from keel.evals.results import CaseResult, RunResult

__all__ = ["MetricSummary", "RunSummary", "flaky_cases", "pass_at_k", "pass_hat_k", "summarize"]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of P(at least one of k attempts passes) from n attempts with c passes."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def pass_hat_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of P(all of k attempts pass) from n attempts with c passes."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    return math.comb(c, k) / math.comb(n, k)


def _by_case(cases: Sequence[CaseResult]) -> dict[str, list[CaseResult]]:
    grouped: dict[str, list[CaseResult]] = defaultdict(list)
    for case in cases:
        grouped[case.case_id].append(case)
    return grouped


def flaky_cases(cases: Sequence[CaseResult]) -> list[str]:
    """Cases whose outcome flips across repeats (some repeat passed, another failed)."""
    return [
        case_id for case_id, repeats in _by_case(cases).items()
        if len({r.passed for r in repeats if r.passed is not None}) > 1
    ]  # fmt: skip


@dataclass(frozen=True)
class MetricSummary:
    name: str
    n: int  # cases with a score
    mean: float | None
    stderr: float | None
    ci_low: float | None  # 95% t-interval over cases
    ci_high: float | None
    errored: int  # case repeats whose scorer errored
    threshold: float | None = None
    pass_rate: float | None = None  # share of scored repeats at or above the threshold


@dataclass(frozen=True)
class RunSummary:
    run_id: str
    variant: str
    cases: int
    repeats: int
    task_errors: int
    metrics: list[MetricSummary]
    pass_rate: float | None  # share of case repeats that passed every threshold
    pass_at_k: dict[int, float] = field(default_factory=dict)
    pass_hat_k: dict[int, float] = field(default_factory=dict)
    flaky: list[str] = field(default_factory=list)
    cost_usd: float = 0.0
    latency_p50_s: float | None = None
    latency_p95_s: float | None = None
    input_tokens: int = 0
    output_tokens: int = 0


def _t_interval(mean: float, sem: float, df: int) -> tuple[float, float]:
    """The 95% t-interval (scipy.stats.t.interval) from scipy.special's t quantile (lighter to import)."""
    from scipy.special import stdtrit

    half = float(stdtrit(df, 0.975)) * sem
    return mean - half, mean + half


def _metric(run: RunResult, name: str) -> MetricSummary:
    per_case: list[float] = []
    errored = 0
    values: list[float] = []
    for repeats in _by_case(run.cases).values():
        scored = [r.scores[name] for r in repeats if name in r.scores and r.scores[name] is not None]
        errored += sum(1 for r in repeats if name in r.scores and r.scores[name] is None)
        values.extend(v for v in scored if v is not None)
        if scored:
            per_case.append(statistics.fmean(v for v in scored if v is not None))
    threshold = run.thresholds.get(name)
    pass_rate = sum(v >= threshold for v in values) / len(values) if threshold is not None and values else None
    if not per_case:
        return MetricSummary(name, 0, None, None, None, None, errored, threshold, pass_rate)
    mean = statistics.fmean(per_case)
    if len(per_case) < 2:
        return MetricSummary(name, 1, mean, None, None, None, errored, threshold, pass_rate)
    sem = statistics.stdev(per_case) / math.sqrt(len(per_case))  # scipy.stats.sem (ddof=1)
    low, high = (mean, mean) if sem == 0 else _t_interval(mean, sem, len(per_case) - 1)
    low, high = max(0.0, low), min(1.0, high)  # scores live in [0, 1]
    return MetricSummary(name, len(per_case), mean, sem, low, high, errored, threshold, pass_rate)


def summarize(run: RunResult) -> RunSummary:
    """A run reduced: per metric mean, stderr and 95% CI; pass rate, pass@k and pass^k; flaky cases; cost, latency."""
    grouped = _by_case(run.cases)
    repeats = max((len(r) for r in grouped.values()), default=0)
    at_k: dict[int, float] = {}
    hat_k: dict[int, float] = {}
    for k in sorted({1, repeats} - {0}):
        full = [rs for rs in grouped.values() if len(rs) >= k]
        if full:
            at_k[k] = statistics.fmean(pass_at_k(len(rs), sum(bool(r.passed) for r in rs), k) for rs in full)
            hat_k[k] = statistics.fmean(pass_hat_k(len(rs), sum(bool(r.passed) for r in rs), k) for rs in full)
    latencies = [r.latency_s for r in run.cases if r.latency_s is not None]
    import numpy as np  # here, not at import (see the module's docstring)

    return RunSummary(
        run.run_id, run.variant, len(grouped), repeats, sum(r.error is not None for r in run.cases),
        [_metric(run, m) for m in run.metric_names()],
        sum(bool(r.passed) for r in run.cases) / len(run.cases) if run.cases else None,
        at_k, hat_k, flaky_cases(run.cases) if repeats > 1 else [],
        sum(r.cost_usd or 0.0 for r in run.cases),
        float(np.percentile(latencies, 50)) if latencies else None,
        float(np.percentile(latencies, 95)) if latencies else None,
        sum(r.input_tokens or 0 for r in run.cases), sum(r.output_tokens or 0 for r in run.cases),
    )  # fmt: skip
