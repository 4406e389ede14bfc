"""The statistics are right: simulated run pairs with a known true difference through `compare`.

The smaller sibling of benchmarks/eval_stats.py (same generator, fewer simulations). Its
tolerances are exact binomial bands for its size, not tuned: with N run pairs, the share of 95%
intervals that hold the truth is a binomial count, and a goal is missed only when the 99.9%
Clopper-Pearson interval of that count lies wholly outside the goal (coverage 93-97%, false alarms
<= 5%). A correct method fails a check here about once in a thousand runs. At N = 300 the bands
are wide (see the first test); the benchmark's 1,000 run pairs per scenario give the figures.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from eval_stats import Scenario, Tally, clopper_pearson, coverage_ok, false_alarm_ok, simulate

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
