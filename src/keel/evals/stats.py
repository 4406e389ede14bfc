"""The statistics under `keel eval compare`: paired bootstrap intervals, a score interval for paired
pass/fail outcomes, McNemar's exact test and a reference p-value, on plain arrays (compare.py turns
runs into these arrays).

Why paired: two runs of one suite score the same cases, and most of the variance is between cases
(some are hard for every model). Comparing per-case differences removes it; an unpaired test on
the two means (lm-eval-harness's z-test) throws that away and needs several times more cases to
see the same drop.

The maths comes from scipy and statsmodels, not from this file:
- `scipy.stats.bootstrap` draws the confidence interval of the mean difference. Resampling the
  per-case differences is resampling case indices with both runs' scores kept together (the
  paired bootstrap). With clusters (cases that share a topic, a document, a template and so fail
  together), whole clusters are resampled: the statistic is the ratio of the resampled clusters'
  summed differences to their summed sizes, so a cluster keeps its weight.
- Paired pass/fail outcomes (one per case in each run) get Tango's score interval for a difference
  of paired proportions instead of the bootstrap: with few flipped cases the bootstrap of a handful
  of -1/+1 values is coarse (BCa's 95% intervals covered 90-91% at a 95% pass rate on 100 cases
  and at 90% on 50, computed exactly in tests/test_eval_stats_simulation.py; Tango's 95.4%) and with
  none it draws [0, 0]. Neither scipy nor statsmodels (0.15)
  ships an interval for paired proportions, so the score statistic is written here and its roots
  found with `scipy.optimize.brentq`; the tests check the bounds against a numerical restricted
  maximum likelihood.
- `statsmodels.stats.contingency_tables.mcnemar(exact=True)` tests paired pass/fail outcomes on
  the discordant cases only (the exact binomial test on pass->fail against fail->pass).
- The p-value shown next to a continuous metric is the t-test of the mean difference from
  statsmodels OLS on a constant (the paired t-test), with cluster-robust errors when clustered.
  It is for reading; the decision on a continuous metric is the bootstrap interval's.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

from keel.errors import InputError

__all__ = [
    "IntervalMethod", "McNemar", "mcnemar_exact", "mean_p_value", "paired_interval", "paired_proportion_interval",
]  # fmt: skip

FloatArray = npt.NDArray[np.float64]
IntervalMethod = Literal["BCa", "percentile"]

#: Below this many cases (or clusters) no interval is drawn: a bootstrap of one or two values
#: says nothing about the population.
MIN_UNITS = 3


@dataclass(frozen=True, slots=True)
class McNemar:
    """Paired pass/fail outcomes of two runs on the same cases: the 2x2 table and the exact test."""

    both_pass: int
    pass_to_fail: int  # passed in A, failed in B: a regression on that case
    fail_to_pass: int
    both_fail: int
    p_value: float | None  # None when no case is discordant: nothing to test


def mcnemar_exact(passed_a: npt.ArrayLike, passed_b: npt.ArrayLike) -> McNemar:
    """McNemar's exact test on paired booleans (A's outcome and B's outcome for the same cases)."""
    from statsmodels.stats.contingency_tables import mcnemar

    a = np.asarray(passed_a, dtype=bool)
    b = np.asarray(passed_b, dtype=bool)
    table = np.array([[np.sum(a & b), np.sum(a & ~b)], [np.sum(~a & b), np.sum(~a & ~b)]], dtype=np.int64)
    discordant = int(table[0, 1] + table[1, 0])
    p = float(mcnemar(table, exact=True).pvalue) if discordant else None
    return McNemar(int(table[0, 0]), int(table[0, 1]), int(table[1, 0]), int(table[1, 1]), p)


def _cluster_sums(diffs: FloatArray, clusters: npt.NDArray[np.int64]) -> tuple[FloatArray, FloatArray]:
    """Per cluster: the sum of its cases' differences and its number of cases."""
    sums = np.bincount(clusters, weights=diffs).astype(np.float64)
    sizes = np.bincount(clusters).astype(np.float64)
    keep = sizes > 0
    return sums[keep], sizes[keep]


def _ratio(sums: FloatArray, sizes: FloatArray, axis: int = -1) -> FloatArray:
    """The mean difference over the (resampled) clusters' cases."""
    return np.asarray(np.sum(sums, axis=axis) / np.sum(sizes, axis=axis), dtype=np.float64)


def _mean(diffs: FloatArray, axis: int = -1) -> FloatArray:
    return np.asarray(np.mean(diffs, axis=axis), dtype=np.float64)


def paired_interval(
    diffs: npt.ArrayLike,
    *,
    clusters: npt.ArrayLike | None = None,
    level: float = 0.95,
    n_boot: int = 2000,
    seed: int | None = 0,
    method: IntervalMethod = "BCa",
) -> tuple[float, float] | None:
    """A two-sided bootstrap confidence interval for the mean of per-case differences (B - A).

    `clusters` gives each case a cluster index (0..k-1); when given, clusters are resampled
    instead of cases. Returns None when there are fewer than `MIN_UNITS` cases (or clusters).
    """
    from scipy.stats import bootstrap

    d = np.asarray(diffs, dtype=np.float64)
    statistic: Callable[..., FloatArray]
    if clusters is None:
        data: tuple[FloatArray, ...] = (d,)
        units = d.size
        statistic = _mean
    else:
        data = _cluster_sums(d, np.asarray(clusters, dtype=np.int64))
        units = data[0].size
        statistic = _ratio
    if units < MIN_UNITS:
        return None
    if np.ptp(d) == 0.0:
        # every case moved by the same amount: every resample gives it (scipy would warn and
        # return NaN for BCa, whose acceleration is 0/0 here)
        return float(d[0]), float(d[0])
    with warnings.catch_warnings():
        # BCa on a nearly degenerate sample (say one discordant pair in 300) warns and may give
        # NaN; the percentile interval below takes over then
        warnings.simplefilter("ignore", RuntimeWarning)
        result = bootstrap(
            data, statistic, n_resamples=n_boot, confidence_level=level, method=method,
            paired=len(data) > 1, vectorized=True, rng=np.random.default_rng(seed),
        )  # fmt: skip
        low, high = float(result.confidence_interval.low), float(result.confidence_interval.high)
        if method != "percentile" and not (np.isfinite(low) and np.isfinite(high)):
            result = bootstrap(
                data, statistic, n_resamples=n_boot, confidence_level=level, method="percentile",
                paired=len(data) > 1, vectorized=True, rng=np.random.default_rng(seed),
            )  # fmt: skip
            low, high = float(result.confidence_interval.low), float(result.confidence_interval.high)
    return low, high


def _tango_score(gains: int, losses: int, n: int, d: float) -> float:
    """Tango's (1998) score statistic of "B - A = d" for paired proportions: the observed difference
    minus d, over its standard error at the cell probabilities that maximise the likelihood under d
    (closed form). At d = 0 it is McNemar's z, (gains - losses) / sqrt(gains + losses)."""
    excess = gains - losses - n * d
    if excess == 0:
        return 0.0  # also the 0/0 of no flipped case at d = 0
    w = -gains - losses + (2 * n - gains + losses) * d
    p_loss = (math.sqrt(max(w * w + 8 * n * losses * d * (1 - d), 0.0)) - w) / (4 * n)
    variance = n * (2 * p_loss + d * (1 - d))
    return excess / math.sqrt(variance) if variance > 0 else math.copysign(math.inf, excess)


def paired_proportion_interval(gains: int, losses: int, n: int, *, level: float = 0.95) -> tuple[float, float] | None:
    """Tango's score interval for B - A = (gains - losses) / n, the difference of two paired pass rates.

    `gains`: cases that failed in A and passed in B; `losses`: passed in A and failed in B; `n`: all
    paired cases. The interval holds every difference the score test does not reject at 1 - level;
    it inverts the statistic whose value at 0 is McNemar's z, so it excludes 0 exactly when
    McNemar's asymptotic test rejects. Returns None with fewer than `MIN_UNITS` cases.
    """
    from scipy.optimize import brentq
    from scipy.stats import norm

    if min(gains, losses) < 0 or gains + losses > n:
        raise InputError(f"paired counts need 0 <= gains, losses and gains + losses <= n, got {gains}, {losses}, {n}")
    if n < MIN_UNITS:
        return None
    z = float(norm.isf((1 - level) / 2))
    estimate = (gains - losses) / n
    edge = 1 - 1e-12  # the score's variance is 0 at exactly -1 and 1

    def score(d: float) -> float:
        return _tango_score(gains, losses, n, d)

    # the score falls as d rises: each bound is where it crosses -z or z (or the end of [-1, 1])
    low = -1.0 if score(-edge) <= z else float(brentq(lambda d: score(d) - z, -edge, estimate, xtol=1e-12))
    high = 1.0 if score(edge) >= -z else float(brentq(lambda d: score(d) + z, estimate, edge, xtol=1e-12))
    return low, high


def mean_p_value(diffs: npt.ArrayLike, *, clusters: npt.ArrayLike | None = None) -> float | None:
    """Two-sided p-value of "the mean difference is 0": the paired t-test, cluster-robust when
    `clusters` is given (statsmodels OLS on a constant). None when it cannot be computed."""
    import statsmodels.api as sm

    d = np.asarray(diffs, dtype=np.float64)
    if d.size < MIN_UNITS:
        return None
    if np.ptp(d) == 0.0:
        return 1.0 if d[0] == 0.0 else 0.0  # no spread: the difference is exactly what it is
    exog = np.ones((d.size, 1))
    if clusters is None:
        fit = sm.OLS(d, exog).fit()
    else:
        groups = np.asarray(clusters, dtype=np.int64)
        if np.unique(groups).size < MIN_UNITS:
            return None
        fit = sm.OLS(d, exog).fit(cov_type="cluster", cov_kwds={"groups": groups})
    p = float(np.asarray(fit.pvalues)[0])
    return p if np.isfinite(p) else None
