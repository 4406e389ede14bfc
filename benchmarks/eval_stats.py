"""Are `keel eval compare`'s statistics right? A simulation with a known truth (issue 19).

Each simulated run pair is two systems scored on the same n cases, with a known true difference
in the population (B - A) and outcomes correlated within a case (a hard case is hard for both):

- binary: paired pass/fail with pass rates p and p + delta and correlation rho (the 2x2 cell
  probabilities are fixed by the marginals and rho, each case draws its cell);
- continuous: paired scores in [0, 1] from Beta marginals with means m and m + delta, joined by a
  Gaussian copula with correlation rho; the pass/fail outcome is score >= 0.5, whose true rates
  are the Beta tails. So each continuous run pair has two metrics (score and pass) and the
  regression rule fires when either drops.

Every run pair goes through `keel.evals.compare` exactly as the CLI does (scores: BCa, 2,000
resamples; pass/fail: Tango's score interval for paired proportions). Per scenario the table reports:
- coverage: the share of 95% intervals that hold the true difference (goal 93-97%),
- exact coverage of the pass/fail interval: it depends only on the numbers of flipped cases each
  way, whose distribution is known (multinomial over the scenario's 2x2 cell probabilities), so
  its coverage is a sum over the possible tables, free of simulation noise,
- false alarms: with delta = 0, the share of run pairs where `Comparison.regressions()` names a
  metric (goal <= 5%),
- power: with delta = -0.03, the share where it does (reported; the issue asks for 1,000 cases).
Next to each share, its 95% Clopper-Pearson interval from the number of simulations.

    .venv/bin/python benchmarks/eval_stats.py                  # 1,000 simulations per scenario (about 10 min)
    .venv/bin/python benchmarks/eval_stats.py --sims 200       # a quick look
    .venv/bin/python benchmarks/eval_stats.py --markdown       # the table for docs/benchmarks.md
    .venv/bin/python benchmarks/eval_stats.py --only delta=-0.03   # the power scenarios alone

Exit status 1 when a coverage or false-alarm goal is missed beyond its simulation noise (the goal
range lies outside the share's 99.9% Clopper-Pearson interval), or the exact coverage is outside it.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
from scipy import stats

from keel.evals import CaseResult, RunResult
from keel.evals.compare import compare
from keel.evals.stats import paired_proportion_interval

COVERAGE_GOAL = (0.93, 0.97)
FALSE_ALARM_GOAL = 0.05
DROP = -0.03


@dataclass(frozen=True)
class Scenario:
    kind: str  # binary | continuous
    base: float  # A's pass rate (binary) or mean score (continuous)
    n: int
    delta: float
    rho: float = 0.5
    concentration: float = 4.0  # continuous: a + b of the Beta marginals (4: widely spread scores)

    @property
    def name(self) -> str:
        return f"{self.kind} base={self.base:g} n={self.n} delta={self.delta:+g} rho={self.rho:g}"


@dataclass
class Tally:
    sims: int = 0
    covered: dict[str, int] = field(default_factory=dict)  # metric -> intervals holding the truth
    fired: int = 0  # run pairs where regressions() named a metric
    seconds: float = 0.0
    exact_pass: float | None = None  # the pass/fail interval's exact coverage


def binary_cells(p_a: float, p_b: float, rho: float) -> np.ndarray:
    """P(A pass & B pass), P(A pass & B fail), P(A fail & B pass), P(both fail) for marginals p_a,
    p_b and the phi correlation rho."""
    both = p_a * p_b + rho * math.sqrt(p_a * (1 - p_a) * p_b * (1 - p_b))
    cells = np.array([both, p_a - both, p_b - both, 1 - p_a - p_b + both])
    if (cells < -1e-12).any():
        raise ValueError(f"rho={rho} is impossible for pass rates {p_a} and {p_b}")
    return np.clip(cells, 0, None) / np.clip(cells, 0, None).sum()


def _beta(mean: float, concentration: float) -> stats.rv_continuous:
    return stats.beta(mean * concentration, (1 - mean) * concentration)


def truths(s: Scenario) -> dict[str, float]:
    """The population difference B - A of every metric the scenario's runs carry."""
    if s.kind == "binary":
        return {"pass": s.delta}
    a, b = _beta(s.base, s.concentration), _beta(s.base + s.delta, s.concentration)
    return {"score": s.delta, "pass": float(b.sf(0.5) - a.sf(0.5))}


def pass_cells(s: Scenario) -> np.ndarray:
    """The scenario's paired pass/fail outcome as 2x2 cell probabilities, ordered as `binary_cells`.
    Continuous: a case passes when its score is >= 0.5, that is when its copula normal is above
    the normal quantile of the Beta's mass below 0.5; both pass with a bivariate normal orthant
    probability."""
    if s.kind == "binary":
        return binary_cells(s.base, s.base + s.delta, s.rho)
    p_a, p_b = (float(_beta(m, s.concentration).sf(0.5)) for m in (s.base, s.base + s.delta))
    thresholds = stats.norm.isf([p_a, p_b])
    both = float(stats.multivariate_normal.cdf(  # P(Z_a > t_a, Z_b > t_b), to 1e-10 and seeded
        -thresholds, mean=[0.0, 0.0], cov=[[1.0, s.rho], [s.rho, 1.0]], abseps=1e-10, releps=1e-10, rng=0
    ))  # fmt: skip
    return np.array([both, p_a - both, p_b - both, 1 - p_a - p_b + both])


PassInterval = Callable[[int, int, int], "tuple[float, float] | None"]


def exact_pass_coverage(s: Scenario, interval: PassInterval | None = None, tail: float = 1e-10) -> float:
    """The exact coverage of a pass/fail interval that depends only on (gains, losses, n): the number
    of flipped cases is binomial and the split into gains and losses binomial given it, so the
    coverage is the probability of the tables whose interval holds the truth. Tables rarer than
    `tail` are left out (their mass is below 1e-6 here) and the rest renormalised."""
    interval = interval or (lambda gains, losses, n: paired_proportion_interval(gains, losses, n))
    cells = pass_cells(s)
    truth, flip = float(cells[2] - cells[1]), float(cells[1] + cells[2])
    flipped = np.arange(s.n + 1)
    p_flipped = stats.binom.pmf(flipped, s.n, flip)
    covered = total = 0.0
    for k in flipped[p_flipped > tail]:
        gains = np.arange(k + 1)
        p = p_flipped[k] * stats.binom.pmf(gains, k, cells[2] / flip)
        for g in gains[p > tail]:
            ci = interval(int(g), int(k - g), s.n)
            total += p[g]
            covered += p[g] * (ci is not None and ci[0] <= truth <= ci[1])
    return covered / total


def draw(s: Scenario, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One run pair's per-case values: (A, B), each of length n."""
    if s.kind == "binary":
        cell = rng.choice(4, size=s.n, p=binary_cells(s.base, s.base + s.delta, s.rho))
        return np.isin(cell, (0, 1)).astype(float), np.isin(cell, (0, 2)).astype(float)
    z = rng.multivariate_normal([0, 0], [[1, s.rho], [s.rho, 1]], size=s.n)
    u = stats.norm.cdf(z)
    return _beta(s.base, s.concentration).ppf(u[:, 0]), _beta(s.base + s.delta, s.concentration).ppf(u[:, 1])


def as_run(run_id: str, values: np.ndarray, kind: str) -> RunResult:
    if kind == "binary":
        cases = [CaseResult(case_id=str(i), passed=bool(v)) for i, v in enumerate(values)]
    else:
        cases = [CaseResult(case_id=str(i), scores={"score": float(v)}, passed=bool(v >= 0.5))
                 for i, v in enumerate(values)]  # fmt: skip
    return RunResult(run_id=run_id, suite="simulated", variant=run_id, cases=cases)


def simulate(s: Scenario, sims: int, seed: int = 0) -> Tally:
    """`sims` run pairs of scenario `s` through `compare`, tallied."""
    rng = np.random.default_rng([seed, int(s.base * 1000), s.n, round(s.delta * 1000) + 500])
    truth = truths(s)
    tally = Tally(covered=dict.fromkeys(truth, 0))
    start = time.perf_counter()
    for i in range(sims):
        a, b = draw(s, rng)
        comparison = compare(as_run("a", a, s.kind), as_run("b", b, s.kind), seed=i)
        for metric, true_delta in truth.items():
            ci = comparison.metric(metric).ci
            tally.covered[metric] += ci is not None and ci[0] <= true_delta <= ci[1]
        tally.fired += bool(comparison.regressions())
    tally.sims = sims
    tally.seconds = time.perf_counter() - start
    tally.exact_pass = exact_pass_coverage(s)
    return tally


def clopper_pearson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    ci = stats.binomtest(k, n).proportion_ci(confidence_level=confidence, method="exact")
    return float(ci.low), float(ci.high)


def coverage_ok(k: int, n: int) -> bool:
    """True unless the simulations rule out every coverage in the goal range (99.9% interval)."""
    low, high = clopper_pearson(k, n, 0.999)
    return high >= COVERAGE_GOAL[0] and low <= COVERAGE_GOAL[1]


def exact_coverage_ok(coverage: float) -> bool:
    return COVERAGE_GOAL[0] <= coverage <= COVERAGE_GOAL[1]


def false_alarm_ok(k: int, n: int) -> bool:
    return clopper_pearson(k, n, 0.999)[0] <= FALSE_ALARM_GOAL


def scenarios() -> Iterator[Scenario]:
    for n in (200, 1000):
        for base in (0.5, 0.8, 0.95):
            yield Scenario("binary", base, n, 0.0)
        for base in (0.5, 0.8):
            yield Scenario("continuous", base, n, 0.0, rho=0.6)
    for base in (0.5, 0.8, 0.95):
        yield Scenario("binary", base, 1000, DROP)
    for base in (0.5, 0.8):
        yield Scenario("continuous", base, 1000, DROP, rho=0.6)


def _pct(k: int, n: int) -> str:
    low, high = clopper_pearson(k, n)
    return f"{100 * k / n:5.1f}% [{100 * low:4.1f}, {100 * high:4.1f}]"


def row(s: Scenario, t: Tally) -> tuple[list[str], bool]:
    cov = {m: _pct(k, t.sims) for m, k in t.covered.items()}
    ok = all(coverage_ok(k, t.sims) for k in t.covered.values())
    exact = "-" if t.exact_pass is None else f"{100 * t.exact_pass:.2f}%"
    ok = ok and (t.exact_pass is None or exact_coverage_ok(t.exact_pass))
    if s.delta == 0:
        ok = ok and false_alarm_ok(t.fired, t.sims)
        alarm, power = _pct(t.fired, t.sims), "-"
    else:
        alarm, power = "-", _pct(t.fired, t.sims)
    cells = [s.kind, f"{s.base:g}", str(s.n), f"{s.delta:+g}", cov.get("score", "-"), cov["pass"], exact, alarm,
             power, f"{t.seconds / t.sims * 1000:.0f}"]  # fmt: skip
    return cells, ok


HEADER = ["outcome", "base", "n", "true delta", "coverage: score", "coverage: pass", "exact: pass", "false alarms",
          "power", "ms/pair"]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sims", type=int, default=1000, help="run pairs per scenario (default 1000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    parser.add_argument("--only", default="", help="only the scenarios whose name contains this, e.g. 'delta=-0.03'")
    args = parser.parse_args(argv)
    if args.sims < 10:
        parser.error("--sims must be at least 10")
    rows, failed = [], []
    for s in (s for s in scenarios() if args.only in s.name):
        cells, ok = row(s, simulate(s, args.sims, args.seed))
        rows.append([*cells, "PASS" if ok else "FAIL"])
        failed += [] if ok else [s.name]
        print(("| " + " | ".join(rows[-1]) + " |") if args.markdown else "  ".join(rows[-1]), flush=True)
    if args.markdown:
        print("\n| " + " | ".join([*HEADER, "goal"]) + " |\n|" + "---|" * (len(HEADER) + 1))
        for cells in rows:
            print("| " + " | ".join(cells) + " |")
    print(f"\n{args.sims} run pairs per scenario; shares with their 95% Clopper-Pearson interval")
    for name in failed:
        print(f"FAIL {name}: a goal is missed beyond simulation noise")
    print("PASS: coverage 93-97% and false alarms <= 5% in every scenario" if not failed else "FAIL")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
