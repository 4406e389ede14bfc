"""`keel.evals.compare`: paired deltas, intervals, McNemar, clusters, shared cases and errored scores,
on runs built in memory."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pytest
from scipy import optimize, stats

from keel.errors import InputError
from keel.evals import CaseResult, RunResult
from keel.evals.compare import compare
from keel.evals.results import run_from_json, run_to_json
from keel.evals.stats import paired_proportion_interval


def _passed(scores: Sequence[float | None] | None, i: int) -> bool | None:
    value = scores[i] if scores is not None else None
    return None if value is None else value >= 0.5


def make_run(
    run_id: str,
    scores: Sequence[float | None] | None = None,
    passed: Sequence[bool | None] | None = None,
    *,
    ids: Sequence[str] | None = None,
    tags: Sequence[Sequence[str]] | None = None,
    cost: Sequence[float | None] | None = None,
    latency: Sequence[float | None] | None = None,
) -> RunResult:
    n = len(scores if scores is not None else passed or [])
    ids = ids or [f"case-{i}" for i in range(n)]
    cases = []
    for i in range(n):
        cases.append(CaseResult(
            case_id=ids[i], scores={"f1": scores[i]} if scores is not None else {},
            passed=passed[i] if passed is not None else _passed(scores, i),
            tags=tuple(tags[i]) if tags else (), cost_usd=cost[i] if cost else None,
            latency_s=latency[i] if latency else None,
        ))  # fmt: skip
    return RunResult(run_id=run_id, suite="suite", variant=run_id, cases=cases)


def base_scores(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).beta(3, 2, size=n)


def test_significant_drop_is_a_regression() -> None:
    a = base_scores(300)
    noise = np.random.default_rng(2).normal(0, 0.05, size=300)
    b = np.clip(a - 0.06 + noise, 0, 1)
    comparison = compare(make_run("a", a.tolist()), make_run("b", b.tolist()))
    f1 = comparison.metric("f1")
    assert f1.n == 300 and f1.excluded == 0
    assert f1.delta == pytest.approx(float(np.mean(b - a)))
    assert f1.mean_a == pytest.approx(float(a.mean())) and f1.mean_b == pytest.approx(float(b.mean()))
    assert f1.ci is not None and f1.ci[0] < f1.delta < f1.ci[1] < 0
    assert f1.p_value is not None and f1.p_value < 1e-6
    assert f1.verdict() == "worse"
    assert "f1" in [m.metric for m in comparison.regressions()]


def test_no_difference_is_not_a_regression() -> None:
    a = base_scores(300)
    # every case moves by 0.04, half up and half down: the true mean difference is 0
    shift = np.where(np.arange(300) % 2 == 0, 0.04, -0.04)
    b = np.clip(a + shift, 0, 1)
    flip_down = set(range(0, 40, 2))  # 20 cases pass->fail and 20 fail->pass
    flip_up = set(range(1, 40, 2))
    pa = [i not in flip_up for i in range(300)]
    pb = [i not in flip_down for i in range(300)]
    comparison = compare(make_run("a", a.tolist(), pa), make_run("b", b.tolist(), pb))
    f1 = comparison.metric("f1")
    assert f1.ci is not None and f1.ci[0] < 0 < f1.ci[1]
    assert f1.verdict() == "no significant change"
    passed = comparison.metric("pass")
    assert passed.mcnemar is not None
    assert (passed.mcnemar.pass_to_fail, passed.mcnemar.fail_to_pass) == (20, 20)
    assert passed.p_value == pytest.approx(1.0)
    assert comparison.regressions() == []


def test_a_rise_is_better_and_never_a_regression() -> None:
    a = base_scores(200)
    b = np.clip(a + 0.1, 0, 1)
    comparison = compare(make_run("a", a.tolist()), make_run("b", b.tolist()))
    assert comparison.metric("f1").verdict() == "better"
    assert comparison.regressions() == []


def test_mcnemar_counts_p_value_and_flipped_cases() -> None:
    # 40 pass in both, 12 pass->fail, 3 fail->pass, 45 fail in both
    pa = [True] * 40 + [True] * 12 + [False] * 3 + [False] * 45
    pb = [True] * 40 + [False] * 12 + [True] * 3 + [False] * 45
    comparison = compare(make_run("a", passed=pa), make_run("b", passed=pb))
    passed = comparison.metric("pass")
    test = passed.mcnemar
    assert test is not None
    assert (test.both_pass, test.pass_to_fail, test.fail_to_pass, test.both_fail) == (40, 12, 3, 45)
    # the exact McNemar test is a two-sided binomial test on the 15 discordant cases
    assert test.p_value == pytest.approx(stats.binomtest(3, 15, 0.5).pvalue)
    assert test.p_value < 0.05
    assert comparison.pass_to_fail == tuple(f"case-{i}" for i in range(40, 52))
    assert comparison.fail_to_pass == tuple(f"case-{i}" for i in range(52, 55))
    assert passed.delta == pytest.approx((3 - 12) / 100)
    assert passed.verdict() == "worse"
    assert [m.metric for m in comparison.regressions()] == ["pass"]
    # the same counts the other way round: better, no regression
    assert compare(make_run("b", passed=pb), make_run("a", passed=pa)).regressions() == []


def test_more_pass_to_fail_but_not_significant_is_no_regression() -> None:
    pa = [True] * 50 + [True] * 6 + [False] * 3 + [False] * 41
    pb = [True] * 50 + [False] * 6 + [True] * 3 + [False] * 41
    passed = compare(make_run("a", passed=pa), make_run("b", passed=pb)).metric("pass")
    assert passed.p_value == pytest.approx(stats.binomtest(3, 9, 0.5).pvalue)
    assert passed.p_value > 0.05 and passed.change() == "none"


def test_runs_that_share_no_case_are_an_error() -> None:
    a = make_run("a", [0.5, 0.6, 0.7], ids=["x", "y", "z"])
    b = make_run("b", [0.5, 0.6, 0.7], ids=["p", "q", "r"])
    with pytest.raises(InputError, match="share no case"):
        compare(a, b)


def test_runs_that_share_some_cases_are_compared_on_those_and_say_so() -> None:
    a = make_run("a", [0.9, 0.8, 0.7, 0.6, 0.5], ids=["s1", "s2", "s3", "s4", "only-a"])
    b = make_run("b", [0.1, 0.8, 0.7, 0.6, 0.5, 0.5], ids=["s1", "s2", "s3", "s4", "only-b1", "only-b2"])
    comparison = compare(a, b)
    assert comparison.shared == 4
    assert comparison.only_a == ("only-a",)
    assert comparison.only_b == ("only-b1", "only-b2")
    assert comparison.metric("f1").n == 4
    assert comparison.metric("f1").delta == pytest.approx(-0.8 / 4)
    assert any("4 shared cases only" in note and "1 case(s) only in A" in note and "2 only in B" in note
               for note in comparison.notes)  # fmt: skip


def test_errored_scores_are_left_out_and_counted() -> None:
    a_scores: list[float | None] = [0.5, None, 0.7, 0.8, 0.9, 0.4, 0.6]
    b_scores: list[float | None] = [0.6, 0.6, math.nan, 0.8, 0.9, 0.5, None]
    pa: list[bool | None] = [True, None, True, True, True, False, True]
    pb: list[bool | None] = [True, True, True, None, True, True, True]
    comparison = compare(make_run("a", a_scores, pa), make_run("b", b_scores, pb))
    f1 = comparison.metric("f1")
    assert (f1.n, f1.excluded) == (4, 3)  # None in A, NaN in B, None in B
    assert f1.delta == pytest.approx(np.mean([0.1, 0.0, 0.0, 0.1]))
    assert all(math.isfinite(v) for v in (f1.mean_a, f1.mean_b, f1.delta) if v is not None)
    passed = comparison.metric("pass")
    assert (passed.n, passed.excluded) == (5, 2)
    assert passed.mcnemar is not None and passed.mcnemar.fail_to_pass == 1


def test_a_metric_in_one_run_only_is_named_not_compared() -> None:
    a = make_run("a", [0.5, 0.6, 0.7])
    cases = [CaseResult(case_id=c.case_id, scores={"other": 0.5}, passed=True) for c in a.cases]
    b = RunResult(run_id="b", suite="suite", variant="b", cases=cases)
    comparison = compare(a, b)
    assert [m.metric for m in comparison.metrics] == ["pass"]
    assert "metric 'f1' is only in A: not compared" in comparison.notes
    assert "metric 'other' is only in B: not compared" in comparison.notes


def test_repeats_are_averaged_per_case_before_pairing() -> None:
    def case(cid: str, repeat: int, score: float, passed: bool) -> CaseResult:
        return CaseResult(case_id=cid, repeat=repeat, scores={"f1": score}, passed=passed)

    a = RunResult(run_id="a", suite="s", variant="a", cases=[
        case("x", 0, 0.2, True), case("x", 1, 0.4, True), case("x", 2, 0.6, False),  # pass rate 2/3: passes
        case("y", 0, 1.0, True), case("y", 1, 0.0, False),  # a tie: left out of McNemar
        case("z", 0, 0.5, True),
    ])  # fmt: skip
    b = RunResult(run_id="b", suite="s", variant="b",
                  cases=[case("x", 0, 0.1, False), case("y", 0, 0.5, True), case("z", 0, 0.5, True)])  # fmt: skip
    comparison = compare(a, b)
    f1 = comparison.metric("f1")
    assert f1.n == 3
    assert f1.mean_a == pytest.approx((0.4 + 0.5 + 0.5) / 3)
    assert f1.delta == pytest.approx(((0.1 - 0.4) + (0.5 - 0.5) + 0) / 3)
    passed = comparison.metric("pass")
    assert passed.ties == 1
    assert comparison.pass_to_fail == ("x",)
    assert any("A has up to 3 repeats" in note for note in comparison.notes)


def test_a_case_repeated_twice_under_one_repeat_index_is_an_error() -> None:
    a = RunResult(run_id="a", suite="s", variant="a", cases=[CaseResult("x", 0), CaseResult("x", 0)])
    with pytest.raises(InputError, match="case 'x' repeat 0 twice"):
        compare(a, a)


def clustered_runs(correlated: bool) -> tuple[RunResult, RunResult]:
    """20 topics of 15 cases; when correlated, a topic moves as a whole (B is better or worse on all
    of its cases), otherwise cases move independently and topics are arbitrary labels."""
    rng = np.random.default_rng(7)
    n_topics, size = 20, 15
    topic = np.repeat(np.arange(n_topics), size)
    a = rng.uniform(0.3, 0.7, size=n_topics * size)
    effect = rng.normal(0, 0.15, size=n_topics)[topic] if correlated else rng.normal(0, 0.15, size=topic.size)
    b = a + effect + rng.normal(0, 0.02, size=topic.size)
    tags = [[f"topic:{t}", "lang:en"] for t in topic]
    return make_run("a", a.tolist(), tags=tags), make_run("b", b.tolist(), tags=tags)


def width(ci: tuple[float, float] | None) -> float:
    assert ci is not None
    return ci[1] - ci[0]


def test_clustered_interval_is_wider_when_clusters_are_correlated() -> None:
    a, b = clustered_runs(correlated=True)
    plain = compare(a, b).metric("f1")
    clustered_comparison = compare(a, b, cluster_by="topic")
    clustered = clustered_comparison.metric("f1")
    assert clustered.delta == pytest.approx(plain.delta)
    # 15 cases per topic that move together: the design effect is about 15, the interval about 3.9x
    assert width(clustered.ci) > 2.5 * width(plain.ci)
    assert clustered_comparison.n_clusters == 20
    assert "clustered by 'topic': 20 clusters" in clustered_comparison.notes
    # and the cluster-robust p-value is larger than the naive paired t-test's
    assert clustered.p_value is not None and plain.p_value is not None and clustered.p_value > plain.p_value


def test_clustered_interval_is_about_the_same_when_clusters_do_not_matter() -> None:
    a, b = clustered_runs(correlated=False)
    plain = compare(a, b).metric("f1")
    clustered = compare(a, b, cluster_by="topic").metric("f1")
    assert 0.6 < width(clustered.ci) / width(plain.ci) < 1.5


def test_cluster_tag_that_no_case_has_is_an_error() -> None:
    a, b = clustered_runs(correlated=True)
    with pytest.raises(InputError, match="no shared case has a tag source:"):
        compare(a, b, cluster_by="source")
    with pytest.raises(InputError, match="tag prefix"):
        compare(a, b, cluster_by=" : ")


def test_cases_without_the_cluster_tag_are_clusters_of_their_own() -> None:
    a, b = clustered_runs(correlated=True)
    untag = lambda run: RunResult(  # noqa: E731
        run_id=run.run_id, suite=run.suite, variant=run.variant,
        cases=[CaseResult(case_id=c.case_id, scores=c.scores, tags=c.tags if i >= 5 else ()) for i, c in
               enumerate(run.cases)],
    )  # fmt: skip
    comparison = compare(untag(a), untag(b), cluster_by="topic")
    assert comparison.n_clusters == 20 + 5  # topic 0 keeps 10 of its cases, 5 become singletons
    assert any("5 case(s) without the tag" in note for note in comparison.notes)


def test_cost_and_latency_deltas_are_paired_with_intervals() -> None:
    n = 50
    a = make_run("a", [0.5] * n, cost=[0.001] * n, latency=[1.0 + 0.01 * i for i in range(n)])
    b = make_run("b", [0.5] * n, cost=[0.002] * (n - 1) + [None], latency=[0.5 + 0.01 * i for i in range(n)])
    comparison = compare(a, b)
    assert comparison.cost is not None and comparison.latency is not None
    assert (comparison.cost.n, comparison.cost.excluded) == (n - 1, 1)
    assert comparison.cost.delta == pytest.approx(0.001)
    assert comparison.cost.verdict() == "higher"
    assert comparison.latency.delta == pytest.approx(-0.5)
    assert comparison.latency.ci == (pytest.approx(-0.5), pytest.approx(-0.5))
    assert comparison.latency.verdict() == "lower"
    assert comparison.regressions() == []  # dearer is reported, never a quality regression


def test_regressions_at_another_alpha_redraw_the_interval() -> None:
    rng = np.random.default_rng(11)
    a = rng.uniform(0.2, 0.8, size=400)
    b = a + rng.normal(-0.011, 0.1, size=400)
    comparison = compare(make_run("a", a.tolist()), make_run("b", b.tolist()))
    f1 = comparison.metric("f1")
    assert f1.p_value is not None and 0.005 < f1.p_value < 0.04  # the data this test is about: p about 0.02
    assert [m.metric for m in comparison.regressions()] == ["f1"]
    strict = comparison.at_alpha(0.001).metric("f1")
    assert strict.level == pytest.approx(0.999)
    assert width(strict.ci) > width(f1.ci)
    assert comparison.regressions(0.001) == []


@pytest.mark.parametrize("kwargs", [{"alpha": 0.0}, {"alpha": 1.5}, {"n_boot": 10}, {"method": "studentized"}])
def test_bad_settings_are_input_errors(kwargs: dict[str, object]) -> None:
    run = make_run("a", [0.5, 0.6, 0.7])
    with pytest.raises(InputError):
        compare(run, run, **kwargs)  # type: ignore[arg-type]


def test_too_few_cases_give_no_interval_and_never_fire() -> None:
    comparison = compare(make_run("a", [0.9, 0.9]), make_run("b", [0.1, 0.1]))
    f1 = comparison.metric("f1")
    assert f1.ci is None and f1.verdict() == "not enough data"
    assert comparison.regressions() == []


def test_a_run_survives_json_and_compares_the_same() -> None:
    a, b = clustered_runs(correlated=True)
    a2, b2 = run_from_json(run_to_json(a)), run_from_json(run_to_json(b))
    assert a2.cases[3].tags == ["topic:0", "lang:en"]
    assert compare(a2, b2, cluster_by="topic").to_dict() == compare(a, b, cluster_by="topic").to_dict()


def test_a_malformed_run_file_names_the_field() -> None:
    text = '{"run_id": "a", "suite": "s", "variant": "v", "cases": [{"case_id": "x", "scores": {"f1": "high"}}]}'
    with pytest.raises(InputError, match=r"a\.json: cases\.0\.scores\.f1: Input should be a valid number"):
        run_from_json(text, source="a.json")


def test_a_single_flip_among_many_cases_gives_a_finite_interval() -> None:
    # 299 cases unchanged and one pass->fail: BCa's acceleration is near 0/0 here
    pa = [True] * 300
    pb = [True] * 299 + [False]
    passed = compare(make_run("a", passed=pa), make_run("b", passed=pb)).metric("pass")
    assert passed.ci is not None and all(math.isfinite(v) for v in passed.ci)
    # one flip is no evidence either way: the interval reaches above 0, as McNemar's p of 1 says (the
    # bootstrap drew [-1/300, 0], as it cannot resample a case that was never better)
    assert passed.ci[0] < passed.delta < 0 < passed.ci[1]  # type: ignore[operator]
    assert passed.mcnemar is not None and passed.mcnemar.p_value == pytest.approx(1.0)
    assert passed.change() == "none"


# --- the pass/fail interval: a score interval for paired proportions ---------------------------


def flipped_runs(gains: int, losses: int, n: int) -> tuple[RunResult, RunResult]:
    """n cases: `losses` pass->fail, `gains` fail->pass, the rest pass in both runs."""
    same = n - gains - losses
    pa = [True] * same + [True] * losses + [False] * gains
    pb = [True] * same + [False] * losses + [True] * gains
    return make_run("a", passed=pa), make_run("b", passed=pb)


def score_statistic(gains: int, losses: int, n: int, d: float) -> float:
    """The score statistic of "B - A = d" for paired proportions, with its variance at the restricted
    maximum-likelihood cell probabilities found numerically (not Tango's closed form): an
    independent check of the interval's bounds."""

    def nll(p_loss: float) -> float:
        p_gain = p_loss + d
        same = n - gains - losses
        return -(losses * math.log(p_loss) + gains * math.log(p_gain) + same * math.log(1 - p_loss - p_gain))

    low, high = max(0.0, -d) + 1e-12, (1 - d) / 2 - 1e-12
    p_loss = float(optimize.minimize_scalar(nll, bounds=(low, high), method="bounded", options={"xatol": 1e-13}).x)
    variance = (2 * p_loss + d - d * d) / n
    return ((gains - losses) / n - d) / math.sqrt(variance)


@pytest.mark.parametrize(
    ("gains", "losses", "n"), [(3, 12, 100), (5, 20, 300), (1, 0, 300), (70, 40, 1000), (9, 0, 10), (0, 10, 10)]
)
def test_the_pass_interval_is_the_score_interval_for_paired_proportions(gains: int, losses: int, n: int) -> None:
    comparison = compare(*flipped_runs(gains, losses, n))
    for alpha in (0.05, 0.01):
        passed = comparison.at_alpha(alpha).metric("pass")
        assert passed.interval == "tango" and passed.ci is not None
        z = stats.norm.isf(alpha / 2)
        # the bounds are the differences the score test rejects at exactly alpha (or the ends of [-1, 1])
        low, high = passed.ci
        assert low == pytest.approx(-1.0) or score_statistic(gains, losses, n, low) == pytest.approx(z, abs=1e-4)
        assert high == pytest.approx(1.0) or score_statistic(gains, losses, n, high) == pytest.approx(-z, abs=1e-4)
        assert low <= (gains - losses) / n <= high and low < high


def test_no_flip_among_many_cases_still_gives_an_interval_with_some_width() -> None:
    # 200 cases, none flipped: the pass rates could still differ by a point or two (the bootstrap
    # drew [0, 0], as if 200 cases proved the rates identical)
    passed = compare(*flipped_runs(0, 0, 200)).metric("pass")
    assert passed.delta == 0 and passed.ci is not None
    assert -0.03 < passed.ci[0] < -0.01 and passed.ci[1] == pytest.approx(-passed.ci[0])
    assert passed.change() == "none"


def test_the_pass_interval_excludes_0_exactly_when_mcnemars_score_test_rejects() -> None:
    # the interval inverts the score statistic whose value at 0 is McNemar's z: the interval beside
    # the test never contradicts it (the decision stays with the exact test, slightly stricter)
    from statsmodels.stats.contingency_tables import mcnemar

    for gains in range(0, 26, 2):
        for losses in range(0, 26, 3):
            passed = compare(*flipped_runs(gains, losses, 200)).metric("pass")
            assert passed.ci is not None
            table = [[200 - gains - losses, losses], [gains, 0]]
            rejects = gains + losses > 0 and mcnemar(table, exact=False, correction=False).pvalue < 0.05
            assert (passed.ci[1] < 0 or passed.ci[0] > 0) == rejects, (gains, losses, passed.ci)


def test_pass_rates_averaged_over_repeats_or_clustered_keep_the_bootstrap() -> None:
    # the score interval is for one pass/fail outcome per case and independent cases; a case's pass
    # rate over repeats (2 of 3), or clustered cases, are resampled as before
    a = RunResult(run_id="a", suite="s", variant="a", cases=[
        CaseResult(case_id=f"c{i}", repeat=r, passed=(i + r) % 3 != 0) for i in range(30) for r in range(3)
    ])  # fmt: skip
    b = RunResult(run_id="b", suite="s", variant="b", cases=[CaseResult(case_id=f"c{i}", passed=i % 2 == 0)
                                                             for i in range(30)])  # fmt: skip
    assert compare(a, b).metric("pass").interval == "BCa"
    assert compare(a, b, method="percentile").metric("pass").interval == "percentile"
    ca, cb = clustered_runs(correlated=True)
    clustered = compare(ca, cb, cluster_by="topic")
    assert clustered.metric("pass").interval == "BCa" and clustered.metric("f1").interval == "BCa"
    unclustered = compare(ca, cb)
    assert unclustered.metric("pass").interval == "tango" and unclustered.metric("f1").interval == "BCa"
    assert unclustered.to_dict()["metrics"][1]["interval"] == "tango"


def test_the_paired_proportion_interval_refuses_impossible_counts() -> None:
    assert paired_proportion_interval(1, 0, 2) is None  # too few cases to say anything
    for gains, losses, n in [(-1, 0, 10), (0, -2, 10), (6, 5, 10)]:
        with pytest.raises(InputError, match="paired counts"):
            paired_proportion_interval(gains, losses, n)
