"""`keel.evals.report`: a self-contained HTML report with its plots embedded."""

from __future__ import annotations

import base64
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from keel.errors import InputError
from keel.evals import CaseResult, RunResult
from keel.evals.report import build_report, write_report

TOPICS = ["biology", "physics", "chemistry", "medicine"]


def sample_run(run_id: str, variant: str, shift: float, cost: float, seed: int) -> RunResult:
    rng = np.random.default_rng(seed)
    base = np.random.default_rng(0).beta(4, 2, size=80)  # the same cases in every run
    cases = []
    for i in range(80):
        f1 = float(np.clip(base[i] + shift + rng.normal(0, 0.05), 0, 1))
        cases.append(CaseResult(
            case_id=f"q{i:03d}", scores={"f1": None if i == 7 else f1, "exact": float(f1 > 0.85)}, passed=f1 >= 0.55,
            tags=(f"topic:{TOPICS[i % 4]}",), cost_usd=cost, latency_s=0.2 + 0.01 * i,
            input=f"Is <script>alert({i})</script> safe?", expected="no", output=f"{variant} answer {i}",
        ))  # fmt: skip
    return RunResult(run_id=run_id, suite="qa", variant=variant, cases=cases)


def images(page: str) -> list[bytes]:
    return [base64.b64decode(data) for data in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def test_two_runs_report_has_every_section_plot_and_the_flips() -> None:
    a = sample_run("run-main", "prompt=v1", 0.0, 0.001, 1)
    b = sample_run("run-pr", "prompt=v2", -0.1, 0.002, 2)
    page = build_report([a, b])
    for heading in ("Runs", "Compared with the baseline (first run)", "Score distributions",
                    "Quality against cost and latency", "By tag", "Flipped cases"):  # fmt: skip
        assert f"<h2>{heading}</h2>" in page
    pngs = images(page)
    assert len(pngs) == 4  # forest plot, distributions, quality against spend, tags
    assert all(png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000 for png in pngs)
    # self-contained: nothing fetched, nothing run, user text escaped
    assert "<script" not in page and "http://" not in page and "https://" not in page
    assert "&lt;script&gt;alert(" in page
    assert "Significant drop: f1" in page
    assert "topic:physics" in page and "prompt=v2" in page
    flipped = re.findall(r"<td>(q\d{3})</td><td class='worse'>pass→fail</td>", page)
    assert flipped and all(f"prompt=v2 answer {int(case_id[1:])}" in page for case_id in flipped)
    assert "errored scores" in page


def test_one_run_has_no_comparison() -> None:
    page = build_report([sample_run("solo", "prompt=v1", 0.0, 0.001, 1)])
    assert "Compared with the baseline" not in page and "Flipped cases" not in page
    assert len(images(page)) == 3


def test_runs_without_tags_cost_or_scores_say_so() -> None:
    bare = RunResult(run_id="bare", suite="s", variant="v", cases=[CaseResult(case_id=str(i)) for i in range(5)])
    page = build_report([bare])
    assert "No case has tags." in page and "No run records cost or latency." in page
    assert "No run has per-metric scores." in page


def test_runs_that_share_no_case_are_reported_with_the_reason() -> None:
    a = sample_run("a", "v1", 0.0, 0.001, 1)
    b = RunResult(run_id="b", suite="qa", variant="v2", cases=[CaseResult(case_id="other", passed=True)])
    page = build_report([a, b])
    assert "share no case" in page


def test_the_same_run_twice_gets_two_labels() -> None:
    a = sample_run("a", "v1", 0.0, 0.001, 1)
    page = build_report([a, a])
    assert "a #1" in page and "a #2" in page and "No significant drop." in page


def test_write_report_and_its_errors(tmp_path: Path) -> None:
    a = sample_run("a", "v1", 0.0, 0.001, 1)
    path = write_report([a], tmp_path / "r.html")
    assert path.read_text(encoding="utf-8").startswith("<!doctype html>")
    with pytest.raises(InputError, match="cannot write the report"):
        write_report([a], tmp_path / "missing-dir" / "r.html")
    with pytest.raises(InputError, match="at least one run"):
        build_report([])


def test_one_runs_report_lists_its_failing_cases_with_outputs_and_traces() -> None:
    run = sample_run("solo", "prompt=v1", -0.2, 0.001, 1)
    failing = [c for c in run.cases if c.passed is False]
    traced = [replace(c, trace_id="t-0123") if c.case_id == failing[0].case_id else c for c in run.cases]
    run = RunResult(run_id="solo", suite="qa", variant="prompt=v1", cases=traced)
    page = build_report([run])
    assert "<h2>Failing cases</h2>" in page
    rows = re.findall(r"<tr><td>(q\d{3})</td>", page.split("<h2>Failing cases</h2>")[1])
    assert rows == [c.case_id for c in failing][: len(rows)] and len(rows) == min(25, len(failing))
    assert f"prompt=v1 answer {int(failing[0].case_id[1:])}" in page and "<code>t-0123</code>" in page
