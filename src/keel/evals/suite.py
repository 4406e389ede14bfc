"""Suites: what to evaluate (a dataset), the thing under test (a task), its variants and the scorers.

A suite is written in a small YAML file or built in Python; both are the same
pydantic models (`extra="forbid"`, so a misspelt field is an error, not a
silent default). A malformed YAML file is reported with its file, line and
field, as keel.toml is.

    name: qa
    dataset: {path: qa.jsonl, columns: {input: question, expected: answer}}
    task: {prompt: "Answer briefly: {question}", model: local}
    variants: {models: [local, gpt-4o-mini], params: [{temperature: 0}, {temperature: 0.7}]}
    scorers:
      - {type: normalized_match, threshold: 1}
      - {type: token_f1, threshold: 0.5}
    repeats: 3
    concurrency: 4
"""

from __future__ import annotations

import hashlib
import importlib
import itertools
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_serializer, field_validator, model_validator

from keel.errors import ConfigError, InputError
from keel.evals.dataset import ROLES, Case, DatasetError, cases_from_rows, load_rows

__all__ = [
    "DatasetSpec",
    "ExtractTaskSpec",
    "RagTaskSpec",
    "ScorerSpec",
    "Suite",
    "SuiteSpec",
    "TaskSpec",
    "Variant",
    "VariantsSpec",
    "import_object",
    "load_suite",
]

ScorerType = Literal[
    "exact", "normalized_match", "token_f1", "contains", "regex", "json_schema", "numeric", "embedding_similarity",
    "retrieval", "citation", "faithfulness", "abstention", "judge", "custom",
]  # fmt: skip


def import_object(spec: str | Callable[..., Any], what: str) -> Any:
    """`module:attribute` imported (a callable given in Python is returned as is)."""
    if callable(spec):
        return spec
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise InputError(f"{what} {spec!r} must be `module:name`")
    try:
        target: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as exc:
        raise InputError(f"cannot import {what} {spec!r}: {exc}") from None
    return target


def _callable_name(value: Any) -> Any:
    """A Python callable stored as `module:qualname` (it is imported back when a worker rebuilds the suite)."""
    if callable(value):
        return f"{value.__module__}:{value.__qualname__}"
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)


class DatasetSpec(_Strict):
    path: str | None = None  # JSONL or CSV, relative to the suite file
    format: Literal["jsonl", "csv"] | None = None
    rows: list[dict[str, Any]] | None = None  # inline rows instead of a file
    columns: dict[str, str] = Field(default_factory=dict)  # role (input, expected, ...) -> column name
    limit: int | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _one_source(self) -> DatasetSpec:
        if (self.path is None) == (self.rows is None):
            raise ValueError("give the dataset as `path` (a JSONL or CSV file) or as inline `rows`, exactly one")
        unknown = sorted(set(self.columns) - set(ROLES))
        if unknown:
            raise ValueError(f"unknown column role {unknown[0]!r}; roles: {', '.join(ROLES)}")
        return self


class RagTaskSpec(_Strict):
    collection: str
    top_k: int = Field(default=10, gt=0, le=1000)  # depth of the retrieval that retrieval metrics score
    mode: Literal["auto", "generate", "extractive"] | None = None
    rerank: bool | str | None = None
    context_tokens: int | None = Field(default=None, gt=0)
    retriever: str | None = None
    # documents ingested into the collection before the run (a file or folder, relative to the suite file);
    # ingestion skips unchanged documents, so a re-run costs a hash check
    ingest: str | None = None


class ExtractTaskSpec(_Strict):
    schema_: dict[str, Any] | str | type[BaseModel] = Field(alias="schema")  # JSON schema, or `module:Model`
    prompt: str = "{input}"
    max_reasks: int = Field(default=2, ge=0, le=10)

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True, populate_by_name=True)

    @field_serializer("schema_")
    def _schema_name(self, value: Any) -> Any:
        return f"{value.__module__}:{value.__qualname__}" if isinstance(value, type) else value


class TaskSpec(_Strict):
    """The thing under test: exactly one of a prompt template, a RAG collection, an extraction, a function."""

    prompt: str | None = None  # a gateway prompt with {placeholders} from the dataset's columns
    system: str | None = None
    rag: RagTaskSpec | None = None
    extract: ExtractTaskSpec | None = None
    function: str | Callable[..., Any] | None = None  # `module:function`, called with the case's input
    model: str | None = None  # default model of every variant (the configured default when unset)
    params: dict[str, Any] = Field(default_factory=dict)  # default call parameters (temperature, max_tokens, ...)

    @model_validator(mode="after")
    def _one_task(self) -> TaskSpec:
        given = [n for n in ("prompt", "rag", "extract", "function") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError(
                "a task is exactly one of `prompt`, `rag`, `extract` or `function`"
                + (f", not {' and '.join(given)}" if given else "")
            )
        return self

    @field_serializer("function")
    def _function_name(self, value: Any) -> Any:
        return _callable_name(value)

    @property
    def kind(self) -> str:
        return next(n for n in ("prompt", "rag", "extract", "function") if getattr(self, n) is not None)


class VariantsSpec(_Strict):
    """The matrix: every model x every prompt template x every parameter set."""

    models: list[str] = Field(default_factory=list)
    prompts: dict[str, str] = Field(default_factory=dict)  # name -> template (replaces the task's prompt)
    params: list[dict[str, Any]] = Field(default_factory=list)


class ScorerSpec(_Strict):
    type: ScorerType
    name: str | None = None  # the metric's name (prefix of a multi-metric scorer's); default: the type
    threshold: float | dict[str, float] | None = None  # pass threshold, or one per metric
    # options of some types
    value: str | None = None  # contains: the text to look for (default: the expected output); abstention: the refusal
    pattern: str | None = None  # regex
    ignore_case: bool = True
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")  # json_schema
    tolerance: float = Field(default=0.0, ge=0)  # numeric: absolute
    relative: float = Field(default=0.0, ge=0)  # numeric: relative to the expected value
    k: int = Field(default=10, gt=0)  # retrieval: recall@k and nDCG@k
    model: str | None = None  # embedding_similarity / faithfulness: embedding model; judge: chat model
    rubric: str | None = None  # judge
    scale: int = Field(default=5, ge=2, le=100)  # judge: scores 1..scale
    samples: int = Field(default=1, ge=1, le=25)  # judge: answers per case
    reduce: Literal["mean", "majority"] = "mean"  # judge
    retries: int = Field(default=2, ge=0, le=10)  # judge: re-asks on unparseable output
    function: str | Callable[..., Any] | None = None  # custom: `module:function`

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True, populate_by_name=True)

    @model_validator(mode="after")
    def _options(self) -> ScorerSpec:
        needs = {"regex": "pattern", "json_schema": "schema_", "judge": "rubric", "custom": "function"}
        option = needs.get(self.type)
        if option is not None and getattr(self, option) is None:
            raise ValueError(f"a {self.type} scorer needs `{option.rstrip('_')}`")
        return self

    @field_validator("threshold")
    @classmethod
    def _in_unit_range(cls, value: float | dict[str, float] | None) -> float | dict[str, float] | None:
        values = value.values() if isinstance(value, dict) else [] if value is None else [value]
        for v in values:
            if not 0 <= v <= 1:
                raise ValueError(f"threshold must be between 0 and 1 (scores are), not {v}")
        return value

    @field_serializer("function")
    def _function_name(self, value: Any) -> Any:
        return _callable_name(value)

    @property
    def metric(self) -> str:
        return self.name or self.type


class SuiteSpec(_Strict):
    name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9._\-]*$")
    description: str = ""
    dataset: DatasetSpec
    task: TaskSpec
    variants: VariantsSpec = Field(default_factory=VariantsSpec)
    scorers: list[ScorerSpec] = Field(min_length=1)
    repeats: int = Field(default=1, ge=1, le=100)
    concurrency: int = Field(default=4, ge=1, le=256)

    @model_validator(mode="after")
    def _unique_metrics(self) -> SuiteSpec:
        names = [s.metric for s in self.scorers]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"two scorers are named {twice[0]!r}: give one a `name`")
        if self.variants.prompts and self.task.kind not in ("prompt", "extract"):
            raise ValueError("variants.prompts replace a prompt template: only a `prompt` or `extract` task has one")
        return self


@dataclass(frozen=True)
class Variant:
    """One point of the matrix: the model, the prompt template's name and the call parameters."""

    index: int
    name: str
    model: str | None
    prompt_name: str | None
    prompt: str | None  # the template this variant uses (None: the task has none)
    params: Mapping[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "prompt": self.prompt_name, **self.params}


@dataclass
class Suite:
    """A validated suite with its cases loaded: what `run_suite` runs."""

    spec: SuiteSpec
    cases: list[Case]
    base_dir: Path
    source: str | None = None  # the YAML file it came from

    @property
    def name(self) -> str:
        return self.spec.name

    @classmethod
    def from_spec(cls, spec: SuiteSpec | Mapping[str, Any], base_dir: str | Path = ".") -> Suite:
        """A suite built in Python: `Suite.from_spec({"name": ..., "dataset": {"rows": [...]}, ...})`."""
        if not isinstance(spec, SuiteSpec):
            try:
                spec = SuiteSpec.model_validate(spec)
            except ValidationError as exc:
                raise _spec_error(exc, None, None) from None
        base = Path(base_dir)
        return cls(spec, _load_cases(spec, base), base)

    def variants(self) -> list[Variant]:
        task, matrix = self.spec.task, self.spec.variants
        base_prompt = task.prompt if task.prompt is not None else (task.extract.prompt if task.extract else None)
        models: list[str | None] = list(matrix.models) or [task.model]
        prompts: list[tuple[str | None, str | None]] = list(matrix.prompts.items()) or [(None, base_prompt)]
        params = matrix.params or [{}]
        out = []
        for i, (model, (prompt_name, prompt), extra) in enumerate(itertools.product(models, prompts, params)):
            merged = {**task.params, **extra}
            parts = [f"model={model or 'default'}"]
            if prompt_name is not None:
                parts.append(f"prompt={prompt_name}")
            parts += [f"{k}={v}" for k, v in sorted(merged.items())]
            out.append(Variant(i, " ".join(parts), model, prompt_name, prompt, merged))
        return out

    def task_config(self) -> dict[str, Any]:
        """The task as JSON: what, with a variant and a case, identifies a model output in the cache."""
        return self.spec.task.model_dump(mode="json", by_alias=True, exclude={"params", "model"})

    def identity(self) -> str:
        """A digest of the task, variants, cases and repeats (not the scorers: rescoring keeps the run)."""
        data = {
            "name": self.spec.name, "task": self.task_config(), "variants": [v.to_json() for v in self.variants()],
            "prompts": [v.prompt for v in self.variants()], "cases": [c.to_json() for c in self.cases],
            "repeats": self.spec.repeats,
        }  # fmt: skip
        encoded = json.dumps(data, sort_keys=True, default=str, ensure_ascii=False).encode()
        return hashlib.sha256(encoded).hexdigest()[:12]

    def limited(self, limit: int | None) -> Suite:
        """The first `limit` cases only (a quick run of a big suite)."""
        if limit is None:
            return self
        if limit <= 0:
            raise InputError(f"limit must be positive, not {limit}")
        return Suite(self.spec, self.cases[:limit], self.base_dir, self.source)


def _required_roles(spec: SuiteSpec) -> set[str]:
    """Dataset roles the scorers cannot do without."""
    needs: set[str] = set()
    for scorer in spec.scorers:
        compares = scorer.type in ("exact", "normalized_match", "token_f1", "numeric", "embedding_similarity")
        if compares or (scorer.type == "contains" and scorer.value is None):
            needs.add("expected")
        elif scorer.type == "retrieval":
            needs.add("gold_docs")
    return needs


def _load_cases(spec: SuiteSpec, base_dir: Path) -> list[Case]:
    ds = spec.dataset
    if ds.rows is not None:
        rows, source = ds.rows, f"suite {spec.name!r} dataset rows"
    else:
        assert ds.path is not None  # the validator allows exactly one
        path = Path(ds.path) if Path(ds.path).is_absolute() else base_dir / ds.path
        rows, source = load_rows(path, ds.format), str(path)
    cases = cases_from_rows(rows, ds.columns, source=source, required=_required_roles(spec))
    return cases[: ds.limit] if ds.limit else cases


# --- YAML with line numbers ----------------------------------------------------------------------------


def yaml_line(root: yaml.Node | None, loc: Sequence[str | int]) -> int | None:
    """The 1-based line of the deepest field of a path that exists in the YAML document (a field's key line)."""
    node = root
    line = None if root is None else root.start_mark.line + 1
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            found = next(((k, v) for k, v in node.value if getattr(k, "value", None) == str(part)), None)
            if found is None:  # a missing field: its parent's line
                break
            line, node = found[0].start_mark.line + 1, found[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _unknown_key_line(root: yaml.Node | None, loc: Sequence[str | int]) -> int | None:
    """An unknown field's own line (its key), found under its parent's node."""
    parent = yaml_line_node(root, loc[:-1])
    if isinstance(parent, yaml.MappingNode):
        for key, _ in parent.value:
            if getattr(key, "value", None) == str(loc[-1]):
                return int(key.start_mark.line) + 1
    return None


def yaml_line_node(root: yaml.Node | None, loc: Sequence[str | int]) -> yaml.Node | None:
    node = root
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            node = next((v for k, v in node.value if getattr(k, "value", None) == str(part)), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
        else:
            return None
    return node


def _spec_error(exc: ValidationError, root: yaml.Node | None, file: str | None) -> ConfigError:
    problems = []
    first: tuple[int | None, str] | None = None
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p.startswith("function-"))))
        field = ".".join(str(p) for p in loc) or "(top level)"
        message = "unknown field" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
        line = _unknown_key_line(root, loc) if err["type"] == "extra_forbidden" and loc else None
        line = line or yaml_line(root, loc)
        problems.append(f"{file or '<suite>'}{f':{line}' if line else ''} [{field}]: {message}")
        first = first or (line, field)
    error = ConfigError("\n".join(problems))
    error.file, error.line, error.field = file, first[0] if first else None, first[1] if first else None
    return error


def parse_suite(text: str, file: str | None = None) -> SuiteSpec:
    """A suite spec from YAML text; errors name the file, line and field."""
    try:
        root = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"not valid YAML: {problem}", file=file or "<suite>", line=line) from None
    if not isinstance(data, dict):
        raise ConfigError("a suite file is a YAML mapping (name, dataset, task, scorers, ...)", file=file, line=1)
    try:
        return SuiteSpec.model_validate(data)
    except ValidationError as exc:
        raise _spec_error(exc, root, file) from None


def load_suite(path: str | Path) -> Suite:
    """A suite from its YAML file; dataset paths are relative to the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read the suite file: {exc.strerror}", file=str(path)) from None
    spec = parse_suite(text, str(path))
    try:
        cases = _load_cases(spec, path.parent)
    except DatasetError:
        raise
    return Suite(spec, cases, path.parent, str(path))
