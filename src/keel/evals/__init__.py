"""Evaluation: suites of cases run against a task under variants, scored, compared with paired
statistics, and reported (see docs/evals.md).

    from keel.evals import load_suite, run_suite, load_run
    runs = run_suite("suite.yaml")              # one RunResult per variant; resumable
"""

from keel.evals.dataset import Case, DatasetError
from keel.evals.metrics import RunSummary, flaky_cases, pass_at_k, pass_hat_k, summarize
from keel.evals.results import CaseResult, RunResult, ScorerError
from keel.evals.runner import load_run, rescore, run_suite, start_suite
from keel.evals.suite import ScorerSpec, Suite, SuiteSpec, load_suite, parse_suite

__all__ = [
    "Case",
    "CaseResult",
    "DatasetError",
    "RunResult",
    "RunSummary",
    "ScorerError",
    "ScorerSpec",
    "Suite",
    "SuiteSpec",
    "flaky_cases",
    "load_run",
    "load_suite",
    "parse_suite",
    "pass_at_k",
    "pass_hat_k",
    "rescore",
    "run_suite",
    "start_suite",
    "summarize",
]
