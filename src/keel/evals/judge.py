"""LLM-as-judge: a model grades an output against a rubric, N times, and says how much it disagreed with itself.

Judges flip between identical runs (Ragas #240, DeepEval #1265), so a judge
score here is the mean (or majority) of `samples` answers, with their spread
reported as a metric of its own (`NAME.spread`, the standard deviation of
the samples on the 0-1 scale). Each sample is cached by its input (judge
model, rubric, case, output, sample number): re-scoring a run asks nothing
again. An answer without a parseable score is re-asked `retries` times,
then the scorer errors for that case (never a guess).

A judge is checked against human labels with `judge_agreement`: raw
agreement and Cohen's kappa (scikit-learn), printed by `keel eval judge-check`.
"""

from __future__ import annotations

import hashlib
import json
import re
import statistics
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from keel.errors import InputError
from keel.evals.scorers import Sample, ScoreContext, Scorer, output_text
from keel.evals.suite import ScorerSpec
from keel.store.base import Store

__all__ = [
    "JudgeAgreement", "UnparseableJudgement", "judge_agreement", "judge_prompt", "judge_scorer", "parse_score",
    "run_agreement",
]

_SCORE = re.compile(r"score\W{0,5}(\d{1,3})\b", re.IGNORECASE)


class UnparseableJudgement(ValueError):
    """The judge's answer held no score on the rubric's scale, after every retry."""


def judge_prompt(spec: ScorerSpec, sample: Sample) -> str:
    expected = sample.case.expected
    parts = [
        f"You grade the output of an AI system against a rubric, on a scale from 1 (worst) to {spec.scale} (best).",
        f"Rubric:\n{spec.rubric}",
        f"Input:\n{output_text(sample.case.input)}",
        f"Output to grade:\n{sample.text}",
    ]
    if expected is not None:
        parts.append(f"Reference answer:\n{output_text(expected)}")
    parts.append(f"Think briefly, then end with one line `SCORE: n` where n is an integer from 1 to {spec.scale}.")
    return "\n\n".join(parts)


def parse_score(text: str, scale: int) -> int | None:
    """The last `SCORE: n` of the answer if n is on the scale, else None."""
    found = [int(m) for m in _SCORE.findall(text)]
    if not found or not 1 <= found[-1] <= scale:
        return None
    return found[-1]


def _cache_key(spec: ScorerSpec, sample: Sample, i: int) -> str:
    data = [spec.model, spec.rubric, spec.scale, sample.case.input, sample.text, sample.case.expected, i]
    return "judge:" + hashlib.sha256(json.dumps(data, default=str, sort_keys=True).encode()).hexdigest()


async def _one_sample(spec: ScorerSpec, sample: Sample, ctx: ScoreContext, i: int) -> int:
    key = _cache_key(spec, sample, i)
    cached = ctx.cache_get(key) if ctx.cache_get else None
    if isinstance(cached, int):
        return cached
    gateway = ctx.need_gateway("judge")
    prompt = judge_prompt(spec, sample)
    answers = []
    for attempt in range(spec.retries + 1):
        temperature = 0.0 if spec.samples == 1 and attempt == 0 else 0.7
        result = await gateway.chat(prompt, spec.model, temperature=temperature, seed=i * 100 + attempt,
                                    max_tokens=400, metadata={"purpose": "eval.judge"})  # fmt: skip
        ctx.cost_usd += result.cost_usd or 0.0
        score = parse_score(result.text, spec.scale)
        if score is not None:
            if ctx.cache_put:
                ctx.cache_put(key, score)
            return score
        answers.append(result.text[-120:])
    raise UnparseableJudgement(
        f"the judge gave no `SCORE: n` on 1..{spec.scale} in {spec.retries + 1} answers (last: {answers[-1]!r})"
    )


def judge_scorer(spec: ScorerSpec) -> Scorer:
    metric, spread = spec.metric, f"{spec.metric}.spread"

    async def fn(sample: Sample, ctx: ScoreContext) -> Mapping[str, float]:
        raw = [await _one_sample(spec, sample, ctx, i) for i in range(spec.samples)]
        scaled = [(r - 1) / (spec.scale - 1) for r in raw]
        if spec.reduce == "majority":
            counts = Counter(raw).most_common()
            top = min(r for r, n in counts if n == counts[0][1])  # a tie goes to the lower grade
            value = (top - 1) / (spec.scale - 1)
        else:
            value = statistics.fmean(scaled)
        return {metric: value, spread: statistics.pstdev(scaled)}

    return Scorer(spec, fn, [metric, spread])


@dataclass(frozen=True)
class JudgeAgreement:
    n: int
    agreement: float  # share of cases where judge and human gave the same label
    kappa: float | None  # Cohen's kappa; None when it is undefined (one label only on both sides)
    labels: list[str]
    confusion: list[list[int]]  # rows: human label, columns: judge label, in `labels` order

    def describe(self) -> str:
        kappa = "undefined (a single label)" if self.kappa is None else f"{self.kappa:.3f}"
        return f"{self.n} cases: agreement {self.agreement:.3f}, Cohen's kappa {kappa}"


def judge_agreement(judge: Sequence[Any], human: Sequence[Any]) -> JudgeAgreement:
    """Agreement and Cohen's kappa between a judge's labels and human labels of the same cases."""
    from sklearn.metrics import cohen_kappa_score, confusion_matrix

    if len(judge) != len(human):
        raise ValueError(f"{len(judge)} judge labels but {len(human)} human labels")
    if not judge:
        raise ValueError("no case has both a judge label and a human label")
    a, b = [str(x) for x in judge], [str(x) for x in human]
    labels = sorted(set(a) | set(b))
    agreement = sum(x == y for x, y in zip(a, b, strict=True)) / len(a)
    kappa: float | None = None
    if len(labels) > 1:
        value = float(cohen_kappa_score(b, a, labels=labels))
        kappa = None if value != value else value  # NaN: undefined
    matrix = confusion_matrix(b, a, labels=labels).tolist()
    return JudgeAgreement(len(a), agreement, kappa, labels, matrix)


_PASS = {"pass", "true", "yes", "1", "good", "correct"}
_FAIL = {"fail", "false", "no", "0", "bad", "incorrect"}


def run_agreement(store: Store, run_id: str, human: Mapping[str, str], metric: str | None = None) -> JudgeAgreement:
    """A stored run's judge against human labels (case id -> label) of the same cases.

    Labels pass/fail (or true/false, 1/0) are compared with the judge's pass at its threshold (0.5 when none);
    labels on the rubric's scale (1..scale) with the judge's grade (the mean of its samples, rounded).
    Repeats of a case are averaged first.
    """
    from keel.evals import storage

    row = storage.get_run_row(store, run_id)
    judges = [s for s in row["spec"]["scorers"] if s["type"] == "judge"]
    spec = next((s for s in judges if (s.get("name") or s["type"]) == metric), None) if metric else (
        judges[0] if len(judges) == 1 else None
    )  # fmt: skip
    if spec is None:
        names = ", ".join(s.get("name") or s["type"] for s in judges) or "none"
        raise InputError(f"run {run_id!r}: name the judge to check (its judge metrics: {names})")
    name = spec.get("name") or spec["type"]
    per_case: dict[str, list[float]] = {}
    for case, _ in storage.case_rows(store, run_id):
        value = case.scores.get(name)
        if value is not None:
            per_case.setdefault(case.case_id, []).append(value)
    shared = [c for c in per_case if c in human]
    if not shared:
        raise InputError(f"no case of run {run_id!r} has both a judge score and a human label")
    binary = all(str(human[c]).strip().lower() in _PASS | _FAIL for c in shared)
    threshold = float(row["thresholds"].get(name, 0.5))
    judge_labels, human_labels = [], []
    for c in shared:
        score = statistics.fmean(per_case[c])
        if binary:
            judge_labels.append("pass" if score >= threshold else "fail")
            human_labels.append("pass" if str(human[c]).strip().lower() in _PASS else "fail")
        else:
            judge_labels.append(str(round(score * (int(spec["scale"]) - 1) + 1)))
            human_labels.append(str(human[c]).strip())
    return judge_agreement(judge_labels, human_labels)
