"""Evaluation: suites of cases run against a task under variants, scored, compared with paired
statistics, and reported (see docs/evals.md)."""

from keel.evals.results import CaseResult, RunResult, ScorerError

__all__ = ["CaseResult", "RunResult", "ScorerError"]
