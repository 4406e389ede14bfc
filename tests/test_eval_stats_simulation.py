"""The statistics are right: simulated run pairs with a known true difference through `compare`.

The smaller sibling of benchmarks/eval_stats.py (same generator, fewer simulations). Its
tolerances are exact binomial bands for its size, not tuned: with N run pairs, the share of 95%
intervals that hold the truth is a binomial count, and a goal is missed only when the 99.9%
Clopper-Pearson interval of that count lies wholly outside the goal (coverage 93-97%, false alarms
<= 5%). A correct method fails a check here about once in a thousand runs. At N = 300 the bands
are wide (see the first test); the benchmark's 1,000 run pairs per scenario give the figures.

The pass/fail interval depends only on how many cases flipped each way, whose distribution is
known, so its coverage is also computed exactly (no simulation noise, no tolerance but the goal).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from eval_stats import (
    COVERAGE_GOAL,
    Scenario,
    Tally,
    as_run,
    clopper_pearson,
    coverage_ok,
    draw,
    exact_pass_coverage,
    false_alarm_ok,
    pass_cells,
    scenarios,
    simulate,
    truths,
)

from keel.evals.compare import compare

pytestmark = pytest.mark.slow

SIMS = 300
NULL_BINARY = Scenario("binary", 0.8, 200, 0.0)
NULL_CONTINUOUS = Scenario("continuous", 0.7, 200, 0.0, rho=0.6)
# pass rate 0.5 -> 0.4 on 200 cases, phi 0.5: the normal approximation gives a power of about 0.8
DROP = Scenario("binary", 0.5, 200, -0.1)


@pytest.fixture(scope="module")
def tallies() -> dict[Scenario, Tally]:
    return {s: simulate(s, SIMS, seed=1) for s in (NULL_BINARY, NULL_CONTINUOUS, DROP)}


def test_the_binomial_bands_have_the_stated_size() -> None:
    # what the checks below accept at N = 300: 263..299 intervals covering (87.7%..99.7%), up to 29
    # false alarms (9.7%); a method whose 95% intervals cover 85%, or always, fails
    assert coverage_ok(285, SIMS) and coverage_ok(263, SIMS) and coverage_ok(299, SIMS)
    assert not coverage_ok(262, SIMS) and not coverage_ok(300, SIMS)
    assert false_alarm_ok(29, SIMS) and not false_alarm_ok(30, SIMS)


@pytest.mark.parametrize("scenario", [NULL_BINARY, NULL_CONTINUOUS, DROP], ids=lambda s: s.name)
def test_the_95_percent_intervals_cover_the_true_difference(tallies: dict[Scenario, Tally], scenario: Scenario) -> None:
    for metric, covered in tallies[scenario].covered.items():
        low, high = clopper_pearson(covered, SIMS, 0.999)
        assert coverage_ok(covered, SIMS), f"{metric}: {covered}/{SIMS} covered, 99.9% CI [{low:.3f}, {high:.3f}]"


def test_pooled_coverage(tallies: dict[Scenario, Tally]) -> None:
    # one interval per run pair (the continuous pairs' pass interval shares their data: left out),
    # 900 independent intervals: the band narrows to 90.0%..98.7%
    covered = sum(t.covered["score" if "score" in t.covered else "pass"] for t in tallies.values())
    assert coverage_ok(covered, 3 * SIMS), f"{covered}/{3 * SIMS} covered"


@pytest.mark.parametrize("scenario", [NULL_BINARY, NULL_CONTINUOUS], ids=lambda s: s.name)
def test_with_no_difference_the_rule_rarely_fires(tallies: dict[Scenario, Tally], scenario: Scenario) -> None:
    fired = tallies[scenario].fired
    assert false_alarm_ok(fired, SIMS), f"fired in {fired}/{SIMS} runs with no difference"


def test_a_real_drop_is_found(tallies: dict[Scenario, Tally]) -> None:
    fired = tallies[DROP].fired
    low, _ = clopper_pearson(fired, SIMS, 0.999)
    assert low > 0.5, f"the rule found the drop in only {fired}/{SIMS} runs"


def _compare_pass_interval(gains: int, losses: int, n: int) -> tuple[float, float] | None:
    """compare()'s pass/fail interval for a table of n cases with `gains` fail->pass and `losses`
    pass->fail (the rest pass in both: the interval depends on the flips only)."""
    a = np.array([1.0] * (n - gains - losses) + [1.0] * losses + [0.0] * gains)
    b = np.array([1.0] * (n - gains - losses) + [0.0] * losses + [1.0] * gains)
    return compare(as_run("a", a, "binary"), as_run("b", b, "binary")).metric("pass").ci


SMALL_SUITES = [
    Scenario("binary", 0.95, 100, 0.0),
    Scenario("binary", 0.9, 50, 0.0),
    Scenario("binary", 0.95, 100, -0.03),
]


@pytest.mark.parametrize("scenario", SMALL_SUITES, ids=lambda s: s.name)
def test_the_pass_interval_covers_on_small_suites_with_few_flips(scenario: Scenario) -> None:
    # 5-10 flipped cases per run pair: compare's bootstrap of a few -1/+1 values covered 90.4%,
    # 90.3% and 90.6% here (exactly, with its seed); the score interval 95.4%, 95.4% and 93.6%
    coverage = exact_pass_coverage(scenario, _compare_pass_interval)
    assert COVERAGE_GOAL[0] <= coverage <= COVERAGE_GOAL[1], f"exact coverage {coverage:.4f}"


@pytest.mark.parametrize("scenario", [s for s in scenarios() if s.n == 200 or s.delta != 0], ids=lambda s: s.name)
def test_the_pass_interval_covers_exactly_in_the_benchmark_scenarios(scenario: Scenario) -> None:
    coverage = exact_pass_coverage(scenario)
    assert COVERAGE_GOAL[0] <= coverage <= COVERAGE_GOAL[1], f"exact coverage {coverage:.4f}"


@pytest.mark.parametrize("scenario", [Scenario("continuous", 0.8, 1000, -0.03, rho=0.6), NULL_CONTINUOUS, DROP],
                         ids=lambda s: s.name)  # fmt: skip
def test_the_pass_cells_are_those_the_simulation_draws(scenario: Scenario) -> None:
    # the exact coverage stands on these 2x2 probabilities (for continuous scores, bivariate normal
    # orthants of the copula): they must match the generator's own draws, and give the truth
    cells = pass_cells(scenario)
    assert cells.sum() == pytest.approx(1.0) and cells[2] - cells[1] == pytest.approx(truths(scenario)["pass"])
    rng = np.random.default_rng(5)
    big = Scenario(scenario.kind, scenario.base, 200_000, scenario.delta, scenario.rho)
    a, b = (v >= 0.5 if scenario.kind == "continuous" else v.astype(bool) for v in draw(big, rng))
    seen = np.array([np.mean(a & b), np.mean(a & ~b), np.mean(~a & b), np.mean(~a & ~b)])
    assert seen == pytest.approx(cells, abs=4 * np.sqrt(0.25 / big.n))
