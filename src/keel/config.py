"""keel.toml, `KEEL_*` environment overrides, and the embedded defaults.

Where the file comes from: `KEEL_CONFIG`, else `./keel.toml`, else nothing
(the embedded defaults: a local model, the SQLite store, no keys). A user file
is merged over the defaults, so it only names what it changes.

Environment overrides, applied last:
  KEEL_STORE             store.url (a file path, or a postgresql:// URL)
  KEEL_DEFAULT_MODEL     default_model
  KEEL_CAPTURE_CONTENT   tracing.capture_content (true/false)
  KEEL_TIMEOUT           timeout (seconds)
  KEEL_MAX_RETRIES       max_retries
  KEEL_<A>__<B>__<C>     any field by path, e.g. KEEL_MODELS__LOCAL__TIMEOUT=30
                         (names match case-insensitively, `_` matches `-`)
  OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, OTEL_EXPORTER_OTLP_ENDPOINT
                         otlp.endpoint, when neither the file nor KEEL_OTLP__ENDPOINT sets it
                         (the standard OpenTelemetry variables; the second is a base URL)

Validation errors name the file, the line and the field.

The apps' sections (`[rag]`, `[jobs]`, later `[evals]`) are not defined here:
each app registers its pydantic model with `register_section` (see
keel/rag/settings.py), and `Config` validates `[name]` against it; a section
nobody registered is an unknown field, as before. `config.rag` and
`config.jobs` stay typed accessors.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar, cast
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails

from keel.errors import ConfigError, UnknownModel

if TYPE_CHECKING:  # the apps define these; the core names them only for the type checker
    from keel.jobs.settings import JobsConfig
    from keel.rag.settings import RagConfig

__all__ = [
    "AlertRule",
    "AlertingConfig",
    "CircuitConfig",
    "Config",
    "FieldProblem",
    "KeyConfig",
    "ModelConfig",
    "OtlpConfig",
    "PriceConfig",
    "StoreConfig",
    "TracingConfig",
    "default_store_path",
    "load_config",
    "register_section",
]

Provider = Literal["openai", "anthropic", "gemini", "local", "test", "onnx"]

DEFAULT_KEY_ENV: dict[str, str] = {
    "openai": "OPENAI_API_KEY",
    "anthropic": "ANTHROPIC_API_KEY",
    "gemini": "GEMINI_API_KEY",
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PriceConfig(_Strict):
    """USD per million tokens; overrides genai-prices (self-hosted or negotiated prices)."""

    input: float = Field(ge=0)
    output: float = Field(ge=0)
    cached_input: float | None = Field(default=None, ge=0)


class ModelConfig(_Strict):
    provider: Provider
    model: str = Field(min_length=1, description="the provider's model id (local: 'smollm2' or a .gguf path)")
    kind: Literal["chat", "embedding"] = "chat"
    base_url: str | None = None
    api_key_env: str | None = None
    context_window: int | None = Field(default=None, gt=0)
    max_output_tokens: int | None = Field(default=None, gt=0)
    timeout: float | None = Field(default=None, gt=0)
    max_retries: int | None = Field(default=None, ge=0, le=20)
    rpm: int | None = Field(default=None, gt=0)
    tpm: int | None = Field(default=None, gt=0)
    fallbacks: tuple[str, ...] = ()
    context_fallbacks: tuple[str, ...] = ()
    price: PriceConfig | None = None
    price_model: str | None = None
    price_provider: str | None = None
    script: tuple[str, ...] = ()  # provider "test": the answers, in order
    delay_s: float = Field(default=0.0, ge=0)  # provider "test": how long each answer takes
    query_prefix: str = ""  # embedding models: put before a search query (bge: its retrieval instruction)
    document_prefix: str = ""  # embedding models: put before a text being indexed (e5: "passage: ")

    def key_env(self) -> str | None:
        return self.api_key_env or DEFAULT_KEY_ENV.get(self.provider)

    def missing_key(self, environ: Mapping[str, str] | None = None) -> str | None:
        """The environment variable this model needs for its API key and does not have, or None.

        Mirrors what the gateway does when it builds the model: a self-hosted OpenAI-compatible
        server (a base_url and no api_key_env) needs no key."""
        env = self.key_env()
        if env is None or (os.environ if environ is None else environ).get(env):
            return None
        return None if self.base_url and not self.api_key_env else env


class KeyConfig(_Strict):
    """Limits and budgets of one caller (a team, a feature, a virtual key)."""

    rpm: int | None = Field(default=None, gt=0, le=2**31 - 1)
    tpm: int | None = Field(default=None, gt=0, le=2**31 - 1)
    daily_budget_usd: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    monthly_budget_usd: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    models: tuple[str, ...] | None = None
    #: RAG collections the key may read (list, search, ask); None: all.
    collections: tuple[str, ...] | None = None
    #: RAG collections the key may write (ingest, delete); None: none (writing is the admin's by default).
    collections_write: tuple[str, ...] | None = None


class StoreConfig(_Strict):
    url: str = ""  # empty: default_store_path()


class TracingConfig(_Strict):
    capture_content: bool = True
    redact_patterns: tuple[str, ...] = ()
    max_queue: int = Field(default=10_000, gt=0)

    @model_validator(mode="after")
    def _patterns_compile(self) -> TracingConfig:
        for pattern in self.redact_patterns:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"redact pattern {pattern!r} is not a valid regular expression: {exc}") from exc
        return self


class CircuitConfig(_Strict):
    failures: int = Field(default=5, gt=0)  # consecutive failures that open the circuit
    cooldown_s: float = Field(default=30.0, gt=0)


class ServerConfig(_Strict):
    """`keel serve`: authentication, request bounds and logs."""

    admin_key_env: str = "KEEL_ADMIN_KEY"  # the environment variable holding the admin key
    max_body_bytes: int = Field(default=4 * 1024 * 1024, gt=0)
    request_timeout_s: float = Field(default=600.0, gt=0)  # a whole request, retries and fallbacks included
    key_refresh_s: float = Field(default=0.5, gt=0)  # how soon keys created or revoked elsewhere are seen
    log_format: Literal["text", "json"] = "text"
    drain_s: float = Field(default=30.0, ge=0)  # on shutdown, how long in-flight requests may finish


_WINDOW = re.compile(r"^(\d+(?:\.\d+)?)(s|m|h|d)$")
_WINDOW_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def window_seconds(window: str) -> float | None:
    """Seconds of an alert window such as "30s", "10m", "1h", "1d"; None for "today" (since UTC midnight)."""
    if window == "today":
        return None
    match = _WINDOW.match(window.strip())
    if match is None or float(match.group(1)) <= 0:
        raise ValueError(f'window {window!r} is not a duration: write "30s", "10m", "1h", "1d" or "today"')
    return float(match.group(1)) * _WINDOW_UNITS[match.group(2)]


def _check_webhook(url: str | None) -> str | None:
    if url is not None and not url.startswith(("http://", "https://")):
        raise ValueError(f"webhook must be an http:// or https:// URL, not {url[:40]!r}")
    return url


class AlertRule(_Strict):
    """A condition on recent model calls (chat and embeddings spans), e.g. an error rate over 5% in 10 minutes."""

    metric: Literal[
        "error_rate", "p95_latency_ms", "p99_latency_ms", "cost_usd", "budget_overrun_usd", "requests", "errors",
        "quality_drop",
    ]  # fmt: skip
    op: Literal[">", ">=", "<", "<="] = ">"
    threshold: float
    window: str = "10m"
    model: str | None = None  # only calls of this model (or alias)
    key: str | None = None  # only calls made with this key
    min_requests: int = Field(default=10, ge=0)  # error rates and latencies of fewer calls are not judged
    for_s: float = Field(default=0.0, ge=0)  # how long the condition must hold before the alert fires
    webhook: str | None = None  # overrides [alerting].webhook
    description: str | None = None
    # quality_drop: an [evals.online] scorer's mean after the latest model or prompt version change is lower
    # than before by at least `threshold` (on 0-1), one-sided p < alpha, with min_n scores on each side
    scorer: str | None = None
    min_n: int | None = Field(default=None, ge=2)
    alpha: float = Field(default=0.05, gt=0, le=0.5)

    @field_validator("window")
    @classmethod
    def _window_parses(cls, window: str) -> str:
        window_seconds(window)
        return window

    @field_validator("threshold")
    @classmethod
    def _rate_is_a_fraction(cls, threshold: float, info: ValidationInfo) -> float:
        if info.data.get("metric") == "error_rate" and not 0 <= threshold <= 1:
            raise ValueError(f"error_rate is a fraction between 0 and 1: write 0.05 for 5%, not {threshold:g}")
        return threshold

    _webhook_is_url = field_validator("webhook")(_check_webhook)

    @model_validator(mode="after")
    def _quality_fields(self) -> AlertRule:
        if self.metric != "quality_drop":
            if self.scorer is not None or self.min_n is not None:
                raise ValueError('scorer and min_n are fields of metric = "quality_drop" only')
            return self
        if not self.scorer:
            raise ValueError('metric = "quality_drop" needs `scorer`: the name of an [evals.online] scorer')
        if self.min_n is None:
            raise ValueError('metric = "quality_drop" needs `min_n`: the fewest scores on each side of a change')
        if not 0 < self.threshold <= 1:
            raise ValueError(f"quality_drop's threshold is a drop of the 0-1 score, in (0, 1], not {self.threshold:g}")
        if self.op != ">=" and self.op != ">":
            raise ValueError('quality_drop fires on a drop at least `threshold`: use op ">=" (or leave it out)')
        return self

    @property
    def window_s(self) -> float | None:
        return window_seconds(self.window)


class AlertingConfig(_Strict):
    """How `[alerts.*]` rules are evaluated (by `keel serve`, or `keel alerts check`) and where they go."""

    interval_s: float = Field(default=15.0, gt=0)
    webhook: str | None = None  # receives a JSON POST when an alert fires or resolves
    webhook_timeout_s: float = Field(default=5.0, gt=0)

    _webhook_is_url = field_validator("webhook")(_check_webhook)


class OtlpConfig(_Strict):
    """Export of every span to an OpenTelemetry collector over OTLP/HTTP (needs `keel[otlp]`)."""

    endpoint: str = ""  # empty: off; e.g. http://localhost:4318/v1/traces (a URL with no path gets /v1/traces)
    headers: dict[str, str] = {}  # e.g. an API key of a hosted collector (OTEL_EXPORTER_OTLP_HEADERS works too)
    service_name: str = Field(default="keel", min_length=1)
    timeout_s: float = Field(default=10.0, gt=0)  # one export, retries included
    max_queue: int = Field(default=2048, gt=0)  # spans waiting for the collector; more are dropped, and counted
    export_content: bool = False  # inputs and outputs too (redacted), if tracing.capture_content is on

    @field_validator("endpoint")
    @classmethod
    def _endpoint_is_a_url(cls, endpoint: str) -> str:
        if not endpoint:
            return endpoint
        if not re.fullmatch(r"https?://[^/\s]+(/\S*)?", endpoint):
            raise ValueError(f"endpoint {endpoint!r} must be an http:// or https:// URL, e.g. {_OTLP_EXAMPLE}")
        return endpoint if urlsplit(endpoint).path.strip("/") else endpoint.rstrip("/") + "/v1/traces"


_OTLP_EXAMPLE = "http://localhost:4318/v1/traces"


class WrapperConfig(_Strict):
    """One `[[gateway.wrappers]]` entry: a request wrapper class by import path, its slot and options."""

    path: str = Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")  # package.module:Class
    slot: str | None = None
    options: dict[str, Any] = {}


class GatewayConfig(_Strict):
    """`[gateway]`: the request pipeline's own wrappers, added after the built-in ones of their slot."""

    wrappers: list[WrapperConfig] = []


class Config(_Strict):
    default_model: str = "local"
    default_embedding_model: str = "local-embed"
    timeout: float = Field(default=60.0, gt=0)
    max_retries: int = Field(default=2, ge=0, le=20)
    retry_base_s: float = Field(default=0.5, gt=0)
    retry_max_s: float = Field(default=20.0, gt=0)
    store: StoreConfig = StoreConfig()
    tracing: TracingConfig = TracingConfig()
    circuit_breaker: CircuitConfig = CircuitConfig()
    server: ServerConfig = ServerConfig()
    otlp: OtlpConfig = OtlpConfig()
    gateway: GatewayConfig = GatewayConfig()
    models: dict[str, ModelConfig] = {}
    aliases: dict[str, str] = {}
    keys: dict[str, KeyConfig] = {}
    alerting: AlertingConfig = AlertingConfig()
    alerts: dict[str, AlertRule] = {}
    source: str | None = Field(default=None, exclude=True)
    #: The apps' sections ([rag], [jobs], ...) as configured; see register_section.
    _sections: dict[str, BaseModel] = PrivateAttr(default_factory=dict)

    @model_validator(mode="wrap")
    @classmethod
    def _app_sections(cls, data: Any, handler: ModelWrapValidatorHandler[Config]) -> Config:
        """Validate each app's section against the model its app registered, the rest as the core fields.

        Their problems are reported together, each at its own path, as if the sections were fields.
        """
        if not isinstance(data, Mapping):
            return handler(data)
        core: dict[str, Any] = {}
        sections: dict[str, BaseModel] = {}
        problems: list[InitErrorDetails] = []
        for name, value in data.items():
            section = None if name in cls.model_fields else app_section(name)
            if section is None:
                core[name] = value  # a core field, or an unknown one the core validation refuses
                continue
            try:
                sections[name] = section.model.model_validate(value)
            except ValidationError as exc:
                problems += _details(exc, (name,))
        try:
            config = handler(core)
        except ValidationError as exc:
            raise ValidationError.from_exception_data(cls.__name__, _details(exc) + problems) from None
        if problems:
            raise ValidationError.from_exception_data(cls.__name__, problems)
        config._sections = sections
        for name, value in sections.items():
            check = _SECTIONS[name].check
            if check is not None:
                check(config, value)
        return config

    @model_validator(mode="after")
    def _references_exist(self) -> Config:
        known = set(self.models)
        for alias, target in self.aliases.items():
            if target not in known:
                raise _Ref(("aliases", alias), f"alias {alias!r} points at unknown model {target!r}")
            if alias in known:
                raise _Ref(("aliases", alias), f"alias {alias!r} has the name of a model")
        for name, model in self.models.items():
            for field in ("fallbacks", "context_fallbacks"):
                for target in getattr(model, field):
                    if self.resolve_name(target) is None:
                        raise _Ref(("models", name, field), f"{field} of {name!r} names unknown model {target!r}")
                    if self.resolve_name(target) == name:
                        raise _Ref(("models", name, field), f"model {name!r} falls back to itself")
        for key, key_config in self.keys.items():
            for target in key_config.models or ():
                if self.resolve_name(target) is None:
                    raise _Ref(("keys", key, "models"), f"key {key!r} allows unknown model {target!r}")
        for field, kind in (("default_model", "chat"), ("default_embedding_model", "embedding")):
            self._check_default(field, kind)
        for name, rule in self.alerts.items():
            if rule.model is not None and self.resolve_name(rule.model) is None:
                raise _Ref(("alerts", name, "model"), f"alert {name!r} watches unknown model {rule.model!r}")
            if rule.metric == "quality_drop":
                self._check_scorer(name, str(rule.scorer))
        return self

    def _check_scorer(self, alert: str, scorer: str) -> None:
        """A quality_drop rule must watch a scorer that [evals.online] runs, or it never has data."""
        known = [s.metric for s in self.section("evals").online.scorers]
        if scorer not in known:
            names = ", ".join(known) or "none"
            raise _Ref(("alerts", alert, "scorer"), f"alert {alert!r} watches scorer {scorer!r}, which [evals.online]"
                       f" does not run (its scorers: {names})")  # fmt: skip

    def _check_default(self, field: str, kind: str) -> None:
        """A default must name a configured model of its kind: else every call without a model fails later."""
        wanted = getattr(self, field)
        resolved = self.resolve_name(wanted)
        if resolved is None:
            known = ", ".join(sorted(n for n, m in self.models.items() if m.kind == kind)) or "none"
            raise _Ref((field,), f"{field} names unknown model {wanted!r}; {kind} models: {known}")
        if self.models[resolved].kind != kind:
            actual = self.models[resolved].kind
            raise _Ref((field,), f"{field} {wanted!r} is a model of kind {actual!r}; it must be a {kind} model")

    def unavailable(self, name: str, environ: Mapping[str, str] | None = None) -> str | None:
        """Why a model (or alias) cannot be called as configured, or None: today, an API key that is not set."""
        resolved = self.resolve_name(name)
        if resolved is None:
            return "not configured"
        env = self.models[resolved].missing_key(environ)
        return None if env is None else f"{env} is not set"

    def resolve_name(self, name: str) -> str | None:
        """The model name an alias or model name refers to, or None."""
        if name in self.models:
            return name
        return self.aliases.get(name)

    def resolve(self, name: str | None, *, kind: str = "chat") -> str:
        wanted = name or (self.default_model if kind == "chat" else self.default_embedding_model)
        resolved = self.resolve_name(wanted)
        if resolved is None:
            raise UnknownModel(wanted, [*self.models, *self.aliases])
        return resolved

    @property
    def store_url(self) -> str:
        return self.store.url or str(default_store_path())

    def has_section(self, name: str) -> bool:
        """Whether `[name]` was configured (or already read), without importing its app to find out."""
        return name in self._sections

    def section(self, name: str) -> Any:
        """An app's section: as configured, else its model's defaults."""
        if name not in self._sections:
            section = app_section(name)
            if section is None:
                raise ConfigError(f"no app registered a configuration section [{name}]")
            self._sections[name] = section.model()
        return self._sections[name]

    @property
    def rag(self) -> RagConfig:
        """`[rag]`, defined by keel.rag.settings."""
        return cast("RagConfig", self.section("rag"))

    @property
    def jobs(self) -> JobsConfig:
        """`[jobs]`, defined by keel.jobs.settings."""
        return cast("JobsConfig", self.section("jobs"))


class FieldProblem(ValueError):
    """A problem a cross-check found (an unknown model named, say), with the path of the field it concerns.

    A section's `check` raises it; `keel config check` reports it with the file, line and field.
    """

    def __init__(self, loc: tuple[str, ...], message: str) -> None:
        super().__init__(message)
        self.loc = loc


_Ref = FieldProblem  # the core's own cross-checks


# --- the apps' sections ----------------------------------------------------------------

SectionModel = TypeVar("SectionModel", bound=BaseModel)


@dataclass(frozen=True)
class AppSection:
    name: str
    model: type[BaseModel]
    #: Cross-checks against the whole configuration (models named, say); raises FieldProblem.
    check: Callable[[Config, Any], None] | None = None


_SECTIONS: dict[str, AppSection] = {}
#: The built-in apps' sections and the module that registers each. It is imported when its section
#: is configured or read, so a process that uses neither never imports the app (nor DBOS, for jobs).
BUILTIN_SECTIONS: dict[str, str] = {
    "rag": "keel.rag.settings", "jobs": "keel.jobs.settings", "evals": "keel.evals.settings",
}  # fmt: skip


def register_section(
    name: str, model: type[SectionModel], *, check: Callable[[Config, SectionModel], None] | None = None
) -> None:
    """Make `[name]` of keel.toml an app's section, validated by `model` (and `check`, after the whole file).

    Call it at import of the app's settings module, before the configuration is loaded.
    """
    if name in Config.model_fields:
        raise ConfigError(f"[{name}] is a core field of the configuration, not an app's section")
    _SECTIONS[name] = AppSection(name, model, check)


def app_section(name: str) -> AppSection | None:
    """The registered section `name` (a built-in app's is registered on first use), or None."""
    if name not in _SECTIONS and name in BUILTIN_SECTIONS:
        importlib.import_module(BUILTIN_SECTIONS[name])
    return _SECTIONS.get(name)


def _details(exc: ValidationError, prefix: tuple[str, ...] = ()) -> list[InitErrorDetails]:
    """The errors of `exc`, their paths under `prefix`, to re-raise as one ValidationError."""
    return [
        InitErrorDetails(type=e["type"], loc=(*prefix, *e["loc"]), input=e["input"], ctx=e.get("ctx", {}))
        for e in exc.errors()
    ]


def default_store_path() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "keel" / "keel.db"


EMBEDDED_DEFAULTS: dict[str, Any] = {
    "models": {
        "local": {"provider": "local", "model": "smollm2", "context_window": 8192, "max_output_tokens": 512},
        "local-embed": {"provider": "onnx", "model": "all-MiniLM-L6-v2", "kind": "embedding", "context_window": 256},
        "bge-small": {
            "provider": "onnx",
            "model": "bge-small-en-v1.5",
            "kind": "embedding",
            "context_window": 512,
            "query_prefix": "Represent this sentence for searching relevant passages: ",
        },
        "gpt-4o-mini": {"provider": "openai", "model": "gpt-4o-mini"},
        "gpt-4.1": {"provider": "openai", "model": "gpt-4.1"},
        "text-embedding-3-small": {"provider": "openai", "model": "text-embedding-3-small", "kind": "embedding"},
        "claude-haiku-4-5": {"provider": "anthropic", "model": "claude-haiku-4-5"},
        "claude-sonnet-4-5": {"provider": "anthropic", "model": "claude-sonnet-4-5"},
        "gemini-2.5-flash": {"provider": "gemini", "model": "gemini-2.5-flash"},
        "gemini-embedding-001": {"provider": "gemini", "model": "gemini-embedding-001", "kind": "embedding"},
    },
}


# --- loading ----------------------------------------------------------------------


def _merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping) and key != "models":
            out[key] = _merge(out[key], value)
        elif key == "models" and isinstance(value, Mapping):
            out[key] = {**out.get(key, {}), **value}  # a user's model replaces the default of that name
        else:
            out[key] = value
    return out


_SHORT_ENV = {
    "KEEL_STORE": ("store", "url"),
    "KEEL_DEFAULT_MODEL": ("default_model",),
    "KEEL_CAPTURE_CONTENT": ("tracing", "capture_content"),
    "KEEL_TIMEOUT": ("timeout",),
    "KEEL_MAX_RETRIES": ("max_retries",),
}


def _env_value(raw: str) -> Any:
    if raw[:1] in "[{":
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            return raw
    return raw


def _match_key(mapping: Mapping[str, Any], part: str) -> str:
    wanted = part.lower().replace("_", "-")
    for key in mapping:
        if key.lower().replace("_", "-") == wanted:
            return key
    return part.lower()


def _set_path(data: dict[str, Any], parts: Sequence[str], value: Any) -> None:
    node = data
    for depth, part in enumerate(parts[:-1], start=1):
        key = _match_key(node, part)
        child = node.get(key)
        if child is not None and not isinstance(child, dict):
            where = ".".join(parts[:depth])
            raise ConfigError(f"{where} must be a table to set {'.'.join(parts)} from the environment")
        node[key] = child = dict(child or {})
        node = child
    node[_match_key(node, parts[-1])] = value


def _apply_env(data: dict[str, Any], environ: Mapping[str, str]) -> list[str]:
    applied = []
    for name, raw in environ.items():
        if name in _SHORT_ENV:
            _set_path(data, _SHORT_ENV[name], _env_value(raw))
        elif name.startswith("KEEL_") and "__" in name:
            _set_path(data, name[5:].split("__"), _env_value(raw))
        else:
            continue
        applied.append(name)
    return applied


def _apply_otel_env(data: dict[str, Any], environ: Mapping[str, str]) -> None:
    """The standard OpenTelemetry endpoint variables, when keel's own configuration names none."""
    otlp = data.get("otlp")
    if isinstance(otlp, Mapping) and otlp.get("endpoint"):
        return
    if traces := environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        _set_path(data, ("otlp", "endpoint"), traces)
    elif base := environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        _set_path(data, ("otlp", "endpoint"), base.rstrip("/") + "/v1/traces")


def locate(text: str, loc: Sequence[str | int]) -> int | None:
    """The 1-based line of a field path in TOML text (best effort), or None."""
    path = [str(p) for p in loc]
    table: list[str] = []
    best: int | None = None
    best_depth = 0
    header = re.compile(r"^\s*\[\[?\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
    assign = re.compile(r"^\s*([A-Za-z0-9_\-\"'.]+)\s*=")
    for number, line in enumerate(text.splitlines(), start=1):
        if m := header.match(line):
            table = [p.strip().strip("\"'") for p in m.group(1).split(".")]
            full = table
        elif m := assign.match(line):
            full = table + [p.strip().strip("\"'") for p in m.group(1).split(".")]
        else:
            continue
        depth = 0
        for a, b in zip(full, path, strict=False):
            if a != b:
                break
            depth += 1
        if depth > best_depth and depth == len(full):
            best, best_depth = number, depth
    return best


def _config_error(exc: ValidationError, text: str | None, file: str | None) -> ConfigError:
    problems = []
    first_line = None
    first_field = None
    for err in exc.errors():
        loc = tuple(err["loc"])
        ctx_error = (err.get("ctx") or {}).get("error")
        if isinstance(ctx_error, _Ref):
            loc = ctx_error.loc
        field = ".".join(str(p) for p in loc) or "(top level)"
        line = locate(text, loc) if text else None
        message = str(ctx_error) if ctx_error else err["msg"]
        if err["type"] == "extra_forbidden":
            message = "unknown field"
        problems.append(f"{file or '<config>'}{f':{line}' if line else ''} [{field}]: {message}")
        if first_field is None:
            first_line, first_field = line, field
    error = ConfigError("\n".join(problems))
    error.file, error.line, error.field = file, first_line, first_field
    return error


def load_config(
    path: str | Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    defaults: bool = True,
) -> Config:
    """Load and validate the configuration (see the module docstring for the order)."""
    environ = os.environ if environ is None else environ
    if path is None:
        path = environ.get("KEEL_CONFIG") or ("keel.toml" if Path("keel.toml").is_file() else None)
    data: dict[str, Any] = dict(EMBEDDED_DEFAULTS) if defaults else {}
    text: str | None = None
    file: str | None = None
    if path is not None:
        file = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read config file: {exc.strerror}", file=file) from exc
        try:
            user = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            line_match = re.search(r"line (\d+)", str(exc))
            raise ConfigError(
                f"not valid TOML: {exc}", file=file, line=int(line_match.group(1)) if line_match else None
            ) from exc
        data = _merge(data, user)
    _apply_env(data, environ)
    _apply_otel_env(data, environ)
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        raise _config_error(exc, text, file) from None
    return config.model_copy(update={"source": file})
