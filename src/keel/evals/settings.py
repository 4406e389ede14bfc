"""`[evals]` of keel.toml: the evaluation app's own section of the configuration.

Registered with keel.config at import (keel.config imports this module when a
file has `[evals]` or `config.section("evals")` is read), as `[rag]` and `[jobs]` are.
Today it holds `[evals.online]`: which production calls are scored, by which
reference-free scorers, how often (see docs/evals.md, "Online quality").
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from keel.config import Config, FieldProblem, register_section

__all__ = ["ONLINE_SCORER_TYPES", "EvalsConfig", "OnlineConfig", "OnlineScorer"]

#: The reference-free scorers: none needs an expected output.
ONLINE_SCORER_TYPES = ("faithfulness", "format", "judge")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


_JUDGE_FIELDS = frozenset({"rubric", "model", "samples", "scale", "retries"})


class OnlineScorer(_Strict):
    """One reference-free scorer of production calls.

    faithfulness: RAG answers, the share of answer sentences supported by their sources (the engine's own checks);
    format: calls that asked for JSON (`response_format`), 1 when the output is JSON valid against the schema,
    0 when it is not or the gateway failed the call for it (`StructuredOutputError`);
    judge: any sampled call, graded by a model against `rubric` (`samples` answers, their mean).
    """

    type: Literal["faithfulness", "format", "judge"]
    name: str | None = Field(default=None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._\-]*$")
    rubric: str | None = None  # judge
    model: str | None = None  # judge: the chat model that grades (default: default_model)
    samples: int = Field(default=1, ge=1, le=25)  # judge: answers per call, averaged
    scale: int = Field(default=5, ge=2, le=100)  # judge: grades 1..scale
    retries: int = Field(default=2, ge=0, le=10)  # judge: re-asks of an answer without a grade

    @model_validator(mode="after")
    def _judge_has_rubric(self) -> OnlineScorer:
        if self.type == "judge" and not (self.rubric or "").strip():
            raise ValueError("a judge scorer needs a `rubric`")
        if self.type != "judge":  # else a rubric or model on `format` would be ignored without a word
            stray = sorted(self.model_fields_set & _JUDGE_FIELDS)
            if stray:
                raise ValueError(f"{', '.join(stray)}: a judge scorer's only, not of type {self.type!r}")
        return self

    @property
    def metric(self) -> str:
        return self.name or self.type


#: The default catch-up bound, in intervals (an hour at the default 300 s).
BACKFILL_INTERVALS = 12


class OnlineConfig(_Strict):
    """`[evals.online]`: a share of production calls scored by a background job (0 = off)."""

    sample: float = Field(default=0.0, ge=0, le=1)  # share of eligible traces, chosen by a hash of the trace id
    scorers: list[OnlineScorer] = [OnlineScorer(type="faithfulness"), OnlineScorer(type="format")]
    interval_s: float = Field(default=300.0, ge=1, le=86_400)  # one batch of calls per interval
    settle_s: float = Field(default=30.0, ge=0, le=3600)  # a batch waits this long after its interval ends
    models: list[str] = []  # only calls of these models (configured names or the provider's model ids)
    tags: list[str] = []  # only calls with one of these tags
    max_per_interval: int = Field(default=1000, gt=0, le=100_000)  # sampled calls scored per interval, at most
    embedded_worker: bool = True  # `keel serve` runs the scoring items itself (else: a `keel worker` does)
    # After a pause (sampling off, or no server running), calls older than this are not scored: the catch-up
    # would cost a judge call per sampled call of the whole pause. None: BACKFILL_INTERVALS intervals.
    max_backfill_s: float | None = Field(default=None, ge=1, le=90 * 86_400)

    @model_validator(mode="after")
    def _unique_names(self) -> OnlineConfig:
        if self.sample > 0 and not self.scorers:  # sampling for nothing: say so rather than stay off in silence
            raise ValueError(f"sample = {self.sample:g} but no scorers: list at least one, or set sample = 0")
        names = [s.metric for s in self.scorers]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"scorer names repeat: {', '.join(repeated)} (give each a `name`)")
        if self.max_backfill_s is not None and self.max_backfill_s < self.interval_s:
            raise ValueError(
                f"max_backfill_s = {self.max_backfill_s:g} is shorter than one interval ({self.interval_s:g} s)"
            )
        return self

    @property
    def enabled(self) -> bool:
        return self.sample > 0 and bool(self.scorers)

    @property
    def backfill_s(self) -> float:
        """How far behind the newest settled interval a catch-up still scores."""
        return self.max_backfill_s if self.max_backfill_s is not None else BACKFILL_INTERVALS * self.interval_s


class EvalsConfig(_Strict):
    """`[evals]`: settings of `keel.evals` outside a suite file."""

    online: OnlineConfig = OnlineConfig()


def _check_models(config: Config, evals: EvalsConfig) -> None:
    for i, scorer in enumerate(evals.online.scorers):
        if scorer.model is None:
            continue
        where = ("evals", "online", "scorers", str(i), "model")
        resolved = config.resolve_name(scorer.model)
        if resolved is None:
            raise FieldProblem(where, f"judge model {scorer.model!r} is not configured")
        if config.models[resolved].kind != "chat":  # it would fail every item at run time instead
            raise FieldProblem(where, f"judge model {scorer.model!r} is an embedding model; a judge needs a chat model")


register_section("evals", EvalsConfig, check=_check_models)
