"""Paired comparison of two runs of one suite: did B get better or worse than A, and is it real?

How cases are paired
    Cases are matched by `case_id`. Repeats are averaged per case first (a case's score is the
    mean over its repeats, its pass rate the share of repeats that passed): the case is the unit
    that was sampled from the population of inputs, and repeats of one case are correlated, so
    pairing repeat by repeat would count them as independent evidence and draw intervals that are
    too narrow. Cases in only one run are left out and counted (`only_a`, `only_b`); runs that
    share no case are an error.

Errored scores
    A score of None (its scorer raised) or a non-finite one is errored. A case whose metric
    errored in every repeat of either run is left out of that metric's pairing and counted in
    `excluded`; so is a case whose task errored (`passed` is None) for the pass/fail test.

Per metric (a score in [0, 1], higher is better)
    the mean in A and in B over the paired cases, the mean paired difference B - A, its two-sided
    bootstrap interval at level 1 - alpha (BCa by default; clusters resampled when `cluster_by`
    names a tag prefix), and a reference p-value (the paired t-test, cluster-robust when
    clustered).

Pass/fail
    the pass rate's difference with its interval, and McNemar's exact test on the per-case
    outcomes. With one outcome per case in each run (no repeats to average) and no clusters, the
    interval is Tango's score interval for paired proportions (`interval == "tango"`: it inverts
    the statistic of McNemar's asymptotic test and stays right with few flipped cases, where the
    bootstrap does not); pass rates averaged over repeats, or clustered cases, are bootstrapped as
    above. For McNemar, a case passes when more than half its repeats passed (one repeat: it
    passed); a case at exactly half is a tie and left out of the test (`ties`). The cases that
    flipped are listed both ways.

Cost and latency
    paired differences of the per-case means with intervals, as above. They are reported, never
    a regression.

The decision rule (`Comparison.regressions(alpha)`, `keel eval compare --fail-on-regression`)
    A score metric drops significantly when its 1 - alpha interval for B - A lies entirely below
    0. Pass/fail drops significantly when McNemar's exact p < alpha and more cases went
    pass->fail than fail->pass. Nothing else is a regression: a metric without enough paired
    cases (fewer than 3, or no discordant case) never fires. Each rule is two-sided at alpha and
    fires on one side only, so with no true difference it fires at most about alpha/2 of the time
    per metric (checked by simulation: tests/test_eval_stats_simulation.py and
    benchmarks/eval_stats.py).
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from keel.errors import InputError
from keel.evals.results import CaseResult, RunResult
from keel.evals.stats import (
    IntervalMethod,
    McNemar,
    mcnemar_exact,
    mean_p_value,
    paired_interval,
    paired_proportion_interval,
)

__all__ = ["Change", "Comparison", "MetricDelta", "compare"]

PASS_METRIC = "pass"
Kind = Literal["score", "pass", "cost", "latency"]
Change = Literal["drop", "rise", "none", "unknown"]
#: How an interval was drawn: a bootstrap (compare's `method`) or Tango's score interval (pass/fail).
Interval = Literal["BCa", "percentile", "tango"]
#: Fewer clusters than this and a cluster bootstrap is known to draw intervals that are too narrow.
FEW_CLUSTERS = 10


@dataclass(frozen=True, slots=True)
class MetricDelta:
    """One metric of a comparison: means, the paired difference B - A and its interval."""

    metric: str
    kind: Kind
    n: int  # paired cases that entered the difference
    excluded: int  # shared cases left out: errored (or without a value) in A or in B
    mean_a: float | None
    mean_b: float | None
    delta: float | None  # mean of B - A over the paired cases
    ci: tuple[float, float] | None  # at `level`; None with fewer than 3 paired cases (or clusters)
    level: float
    p_value: float | None  # McNemar's exact p for pass/fail, the paired t-test's otherwise
    mcnemar: McNemar | None = None  # pass/fail only
    ties: int = 0  # pass/fail only: cases at exactly half their repeats passed, left out of McNemar
    diffs: tuple[float, ...] = field(default=(), repr=False)  # kept to redraw the interval at another level
    clusters: tuple[int, ...] | None = field(default=None, repr=False)
    interval: Interval = "BCa"  # how `ci` was drawn (and is redrawn at another level)

    @property
    def alpha(self) -> float:
        return round(1 - self.level, 12)  # 1 - 0.95 is 0.050000000000000044 in floats

    def change(self) -> Change:
        """Which way the metric moved, significantly, at this delta's level."""
        if self.kind == "pass":
            test = self.mcnemar
            if test is None or test.p_value is None:
                return "unknown" if self.n == 0 else "none"
            if test.p_value >= self.alpha or test.pass_to_fail == test.fail_to_pass:
                return "none"
            return "drop" if test.pass_to_fail > test.fail_to_pass else "rise"
        if self.ci is None:
            return "unknown"
        if self.ci[1] < 0:
            return "drop"
        return "rise" if self.ci[0] > 0 else "none"

    def verdict(self) -> str:
        """The change in words; for cost and latency a rise is the bad direction."""
        change = self.change()
        if change == "unknown":
            return "not enough data"
        if change == "none":
            return "no significant change"
        if self.kind in ("cost", "latency"):
            return "higher" if change == "rise" else "lower"
        return "worse" if change == "drop" else "better"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "metric": self.metric, "kind": self.kind, "n": self.n, "excluded": self.excluded,
            "mean_a": self.mean_a, "mean_b": self.mean_b, "delta": self.delta,
            "ci": list(self.ci) if self.ci else None, "level": self.level, "interval": self.interval,
            "p_value": self.p_value,
            "change": self.change(), "verdict": self.verdict(),
        }  # fmt: skip
        if self.mcnemar is not None:
            out["mcnemar"] = dataclasses.asdict(self.mcnemar)
            out["ties"] = self.ties
        return out


@dataclass(frozen=True, slots=True)
class Comparison:
    """B against A, case by case. `metrics` holds the score metrics and then pass/fail."""

    run_a: str
    run_b: str
    variant_a: str
    variant_b: str
    alpha: float
    shared: int  # cases in both runs
    only_a: tuple[str, ...]
    only_b: tuple[str, ...]
    metrics: tuple[MetricDelta, ...]
    cost: MetricDelta | None
    latency: MetricDelta | None
    pass_to_fail: tuple[str, ...]  # case ids that passed in A and failed in B
    fail_to_pass: tuple[str, ...]
    cluster_by: str | None = None
    n_clusters: int | None = None
    notes: tuple[str, ...] = ()
    n_boot: int = 2000
    seed: int | None = 0
    method: IntervalMethod = "BCa"

    def metric(self, name: str) -> MetricDelta:
        for delta in self.metrics:
            if delta.metric == name:
                return delta
        raise KeyError(name)

    def at_alpha(self, alpha: float) -> Comparison:
        """The same comparison with every interval redrawn at level 1 - alpha."""
        _check_alpha(alpha)
        if alpha == self.alpha:
            return self

        def redraw(delta: MetricDelta | None) -> MetricDelta | None:
            return None if delta is None else _redraw(delta, 1 - alpha, self.n_boot, self.seed)

        return dataclasses.replace(
            self, alpha=alpha, metrics=tuple(_redraw(m, 1 - alpha, self.n_boot, self.seed) for m in self.metrics),
            cost=redraw(self.cost), latency=redraw(self.latency),
        )  # fmt: skip

    def regressions(self, alpha: float | None = None) -> list[MetricDelta]:
        """The metrics that drop significantly at `alpha` (the comparison's own by default); see the
        module docstring for the rule. Cost and latency are never regressions."""
        comparison = self if alpha is None else self.at_alpha(alpha)
        return [m for m in comparison.metrics if m.change() == "drop"]

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_a": self.run_a, "run_b": self.run_b, "variant_a": self.variant_a, "variant_b": self.variant_b,
            "alpha": self.alpha, "shared": self.shared, "only_a": list(self.only_a), "only_b": list(self.only_b),
            "cluster_by": self.cluster_by, "n_clusters": self.n_clusters,
            "metrics": [m.to_dict() for m in self.metrics],
            "cost": self.cost.to_dict() if self.cost else None,
            "latency": self.latency.to_dict() if self.latency else None,
            "pass_to_fail": list(self.pass_to_fail), "fail_to_pass": list(self.fail_to_pass),
            "regressions": [m.metric for m in self.regressions()], "notes": list(self.notes),
            "method": self.method, "n_boot": self.n_boot, "seed": self.seed,
        }  # fmt: skip


def _check_alpha(alpha: float) -> None:
    if not (isinstance(alpha, float | int) and 0 < alpha < 1):
        raise InputError(f"alpha must be between 0 and 1 (exclusive), got {alpha!r}")


def _redraw(delta: MetricDelta, level: float, n_boot: int, seed: int | None) -> MetricDelta:
    ci = _interval(delta.interval, delta.diffs, delta.clusters, level, n_boot, seed)
    return dataclasses.replace(delta, ci=ci, level=level)


def _interval(
    how: Interval,
    diffs: Sequence[float],
    clusters: Sequence[int] | None,
    level: float,
    n_boot: int,
    seed: int | None,
) -> tuple[float, float] | None:
    if how == "tango":
        d = np.asarray(diffs, dtype=np.float64)
        return paired_proportion_interval(int(np.sum(d > 0)), int(np.sum(d < 0)), d.size, level=level)
    return paired_interval(diffs, clusters=clusters, level=level, n_boot=n_boot, seed=seed, method=how)


def _interval_for(kind: Kind, a: np.ndarray, b: np.ndarray, clustered: bool, bootstrap: IntervalMethod) -> Interval:
    """Pass/fail with one outcome per case in each run, on independent cases, is a pair of paired
    proportions: Tango's interval, made for them. Pass rates over repeats (2 of 3 passed), clustered
    cases and scores are bootstrapped."""
    outcomes = np.concatenate([a, b])
    if kind == "pass" and not clustered and np.all((outcomes == 0.0) | (outcomes == 1.0)):
        return "tango"
    return bootstrap


# --- one value per case ------------------------------------------------------------------------


@dataclass(slots=True)
class _Case:
    """A case's repeats reduced to one value per quantity (None: nothing usable)."""

    scores: dict[str, float | None]
    pass_rate: float | None
    cost: float | None
    latency: float | None
    tags: tuple[str, ...]


def _usable(value: object) -> float | None:
    """A number that can enter a mean; None, NaN, infinities and non-numbers are errored."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _mean(values: Sequence[float | None]) -> float | None:
    usable = [v for v in values if v is not None]
    return sum(usable) / len(usable) if usable else None


def _reduce(repeats: Sequence[CaseResult], metrics: Sequence[str]) -> _Case:
    scores = {m: _mean([_usable(r.scores.get(m)) for r in repeats]) for m in metrics}
    passed = [None if r.passed is None else float(r.passed) for r in repeats]
    return _Case(
        scores=scores, pass_rate=_mean(passed), cost=_mean([_usable(r.cost_usd) for r in repeats]),
        latency=_mean([_usable(r.latency_s) for r in repeats]), tags=tuple(repeats[0].tags),
    )  # fmt: skip


def _cases(run: RunResult) -> dict[str, _Case]:
    """The run's cases by id, repeats averaged; a (case_id, repeat) seen twice is a corrupt run."""
    groups: dict[str, list[CaseResult]] = defaultdict(list)
    seen: set[tuple[str, int]] = set()
    for case in run.cases:
        key = (case.case_id, case.repeat)
        if key in seen:
            raise InputError(f"run {run.run_id!r} holds case {case.case_id!r} repeat {case.repeat} twice")
        seen.add(key)
        groups[case.case_id].append(case)
    metrics = run.metric_names()
    return {case_id: _reduce(repeats, metrics) for case_id, repeats in groups.items()}


# --- clusters ----------------------------------------------------------------------------------


def _cluster_value(tags: Sequence[str], prefix: str) -> str | None:
    """The value of the first tag `prefix:value` (or `prefix=value`)."""
    for tag in tags:
        for sep in (":", "="):
            if tag.startswith(prefix + sep):
                return tag[len(prefix) + 1 :]
    return None


def _clusters(ids: Sequence[str], cases: Mapping[str, _Case], prefix: str) -> tuple[dict[str, int], int, int]:
    """Each case's cluster index; a case without the tag is a cluster of its own.
    Returns (index by case id, number of clusters, cases without the tag)."""
    index: dict[str, int] = {}
    names: dict[str, int] = {}
    untagged = 0
    for case_id in ids:
        value = _cluster_value(cases[case_id].tags, prefix)
        if value is None:
            untagged += 1
            value = f"\0{case_id}"  # its own cluster, never equal to a real tag value
        index[case_id] = names.setdefault(value, len(names))
    if untagged == len(ids):
        raise InputError(f"--cluster {prefix!r}: no shared case has a tag {prefix}:<value> to cluster by")
    return index, len(names), untagged


def _cluster_prefix(cluster_by: str | None) -> str | None:
    if cluster_by is None:
        return None
    prefix = cluster_by.strip().rstrip(":=")
    if not prefix:
        raise InputError("cluster_by must name a tag prefix, e.g. 'topic' for tags like 'topic:biology'")
    return prefix


# --- the comparison ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Settings:
    level: float
    n_boot: int
    seed: int | None
    method: IntervalMethod
    clusters: Mapping[str, int] | None


def _delta(
    name: str,
    kind: Kind,
    pairs: Sequence[tuple[str, float | None, float | None]],
    s: _Settings,
) -> MetricDelta:
    """Mean difference B - A over the cases where both values are usable, with its interval."""
    kept = [(cid, a, b) for cid, a, b in pairs if a is not None and b is not None]
    a = np.array([p[1] for p in kept], dtype=np.float64)
    b = np.array([p[2] for p in kept], dtype=np.float64)
    diffs = b - a
    clusters = None
    if s.clusters is not None and kept:
        # renumber densely: the clusters left after the exclusions, 0..k-1
        clusters = tuple(int(i) for i in np.unique([s.clusters[p[0]] for p in kept], return_inverse=True)[1])
    how = _interval_for(kind, a, b, clusters is not None, s.method)
    ci = _interval(how, diffs.tolist(), clusters, s.level, s.n_boot, s.seed)
    return MetricDelta(
        metric=name, kind=kind, n=len(kept), excluded=len(pairs) - len(kept),
        mean_a=float(a.mean()) if kept else None, mean_b=float(b.mean()) if kept else None,
        delta=float(diffs.mean()) if kept else None, ci=ci, level=s.level,
        p_value=mean_p_value(diffs, clusters=clusters), diffs=tuple(float(d) for d in diffs), clusters=clusters,
        interval=how,
    )  # fmt: skip


def _outcome(rate: float | None) -> bool | None:
    """A case's pass/fail from its pass rate over repeats: majority, None at a tie or unknown."""
    if rate is None or rate == 0.5:
        return None
    return rate > 0.5


def _pass_delta(
    ids: Sequence[str], ca: Mapping[str, _Case], cb: Mapping[str, _Case], s: _Settings
) -> tuple[MetricDelta, tuple[str, ...], tuple[str, ...]]:
    """The pass rate's paired difference plus McNemar on per-case outcomes, and the flipped cases."""
    base = _delta(PASS_METRIC, "pass", [(i, ca[i].pass_rate, cb[i].pass_rate) for i in ids], s)
    outcomes = [(i, _outcome(ca[i].pass_rate), _outcome(cb[i].pass_rate)) for i in ids]
    both = [(i, a, b) for i, a, b in outcomes if a is not None and b is not None]
    both_rates = sum(1 for i in ids if ca[i].pass_rate is not None and cb[i].pass_rate is not None)
    test = mcnemar_exact([a for _, a, _ in both], [b for _, _, b in both]) if both else None
    pass_to_fail = tuple(i for i, a, b in both if a and not b)
    fail_to_pass = tuple(i for i, a, b in both if b and not a)
    delta = dataclasses.replace(base, mcnemar=test, p_value=test.p_value if test else None, ties=both_rates - len(both))
    return delta, pass_to_fail, fail_to_pass


def _notes(run_a: RunResult, run_b: RunResult, only_a: Sequence[str], only_b: Sequence[str], shared: int) -> list[str]:
    notes = []
    if only_a or only_b:
        notes.append(
            f"compared on the {shared} shared cases only: {len(only_a)} case(s) only in A ({run_a.run_id}), "
            f"{len(only_b)} only in B ({run_b.run_id})"
        )
    for label, run in (("A", run_a), ("B", run_b)):
        repeats = max((c.repeat for c in run.cases), default=0) + 1
        if repeats > 1:
            notes.append(f"{label} has up to {repeats} repeats per case: averaged per case before pairing")
    names_a, names_b = run_a.metric_names(), run_b.metric_names()
    for metric in names_a:
        if metric not in names_b:
            notes.append(f"metric {metric!r} is only in A: not compared")
    for metric in names_b:
        if metric not in names_a:
            notes.append(f"metric {metric!r} is only in B: not compared")
    return notes


def compare(
    run_a: RunResult,
    run_b: RunResult,
    *,
    cluster_by: str | None = None,
    alpha: float = 0.05,
    n_boot: int = 2000,
    seed: int | None = 0,
    method: IntervalMethod = "BCa",
) -> Comparison:
    """Compare run B against run A (the baseline) case by case; see the module docstring.

    `cluster_by` names a tag prefix ("topic" for tags like "topic:biology"): the intervals then
    resample clusters of cases instead of cases. Raises InputError when the runs share no case.
    """
    _check_alpha(alpha)
    if not isinstance(n_boot, int) or n_boot < 100:
        raise InputError(f"n_boot must be an integer of at least 100, got {n_boot!r}")
    if method not in ("BCa", "percentile"):
        raise InputError(f"method must be 'BCa' or 'percentile', got {method!r}")
    prefix = _cluster_prefix(cluster_by)
    ca, cb = _cases(run_a), _cases(run_b)
    ids = [i for i in ca if i in cb]
    only_a = tuple(i for i in ca if i not in cb)
    only_b = tuple(i for i in cb if i not in ca)
    if not ids:
        raise InputError(
            f"runs {run_a.run_id!r} ({len(ca)} cases) and {run_b.run_id!r} ({len(cb)} cases) share no case: "
            "compare two runs of the same suite"
        )
    notes = _notes(run_a, run_b, only_a, only_b, len(ids))
    index, n_clusters = None, None
    if prefix is not None:
        index, n_clusters, untagged = _clusters(ids, ca, prefix)
        notes.append(
            f"clustered by {prefix!r}: {n_clusters} clusters"
            + (f" ({untagged} case(s) without the tag, each its own cluster)" if untagged else "")
        )
        notes.append("McNemar's test treats cases as independent; with clustered cases read the pass rate's "
                     "clustered interval beside it")  # fmt: skip
        if n_clusters < FEW_CLUSTERS:
            notes.append(f"only {n_clusters} clusters: a cluster bootstrap with so few tends to draw intervals "
                         "that are too narrow")  # fmt: skip
    s = _Settings(1 - alpha, n_boot, seed, method, index)
    shared_metrics = [m for m in run_a.metric_names() if m in set(run_b.metric_names())]
    metrics = [_delta(m, "score", [(i, ca[i].scores[m], cb[i].scores[m]) for i in ids], s) for m in shared_metrics]
    pass_delta, pass_to_fail, fail_to_pass = _pass_delta(ids, ca, cb, s)
    if pass_delta.n:
        metrics.append(pass_delta)
    cost = _delta("cost_usd", "cost", [(i, ca[i].cost, cb[i].cost) for i in ids], s)
    latency = _delta("latency_s", "latency", [(i, ca[i].latency, cb[i].latency) for i in ids], s)
    return Comparison(
        run_a=run_a.run_id, run_b=run_b.run_id, variant_a=run_a.variant, variant_b=run_b.variant, alpha=alpha,
        shared=len(ids), only_a=only_a, only_b=only_b, metrics=tuple(metrics),
        cost=cost if cost.n else None, latency=latency if latency.n else None,
        pass_to_fail=pass_to_fail, fail_to_pass=fail_to_pass, cluster_by=prefix, n_clusters=n_clusters,
        notes=tuple(notes), n_boot=n_boot, seed=seed, method=method,
    )  # fmt: skip
