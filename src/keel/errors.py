"""keel's one exception tree.

The caller's mistakes and the provider's failures are separate branches, so
code can catch "anything I did wrong" apart from "anything upstream did":

    KeelError
    ├── ConfigError                 keel.toml or environment is wrong (file, line, field)
    │   └── MissingAPIKey           names the environment variable to set
    ├── InputError                  the request itself is wrong
    │   ├── UnknownModel
    │   ├── NoSuchModel             GET /v1/models/{id}: not configured or not this key's (one answer for both)
    │   ├── InvalidMessages
    │   ├── InvalidSchema
    │   ├── ModelNotAllowed         the caller's key may not use this model
    │   ├── ContextWindowExceeded   prompt larger than every usable context window
    │   ├── Unauthorized            401: a missing, unknown or revoked key
    │   ├── Forbidden               403: a key that may not use this endpoint or collection
    │   ├── NotFound                404: no such trace or dashboard file
    │   ├── BodyError               an HTTP body refused before validation (`param` names the field)
    │   ├── BodyTooLarge            413: an HTTP body over server.max_body_bytes
    │   ├── UnknownJob              no job of that name
    │   ├── UnknownJobKind          no handler registered for a job's kind
    │   ├── JobConflict             a job name reused with other inputs, or an action its state forbids
    │   ├── WorkerIdInUse           a live `keel worker` already has that id
    │   ├── UnknownCollection       404: no RAG collection of that name
    │   ├── CollectionExists        409: a RAG collection of that name exists already
    │   ├── SettingsMismatch        409: other settings than the collection was built with (rebuild: --reembed)
    │   ├── InvalidFilter           a metadata filter that does not parse
    │   ├── QueryTooLong            a question larger than the answer's context budget
    │   ├── DatasetError            an eval dataset that cannot be read or lacks a column (file, row, column)
    │   └── UnknownRun              no eval run of that id
    ├── LimitError                  refused by keel before anything was sent
    │   ├── RateLimited             requests or tokens per minute (retry_after)
    │   ├── BudgetExceeded          daily or monthly budget of a key
    │   ├── CircuitOpen             a deployment is cooling down after failures
    │   └── LimitsUnavailable       the shared ledger of budgets and limits (PostgreSQL) does not answer
    ├── ProviderError               the provider failed (status, retryable, retry_after)
    │   ├── BadRequest              400
    │   ├── AuthenticationFailed    401
    │   ├── PermissionDenied        403
    │   ├── ModelNotFound           404
    │   ├── ProviderTimeout         408 or no answer within the timeout
    │   ├── ProviderRateLimited     429
    │   ├── ServerError             5xx
    │   ├── ProviderConnectionError connection refused or reset
    │   └── MalformedResponse       the provider's answer could not be understood
    ├── StoreUnavailable            503: the store does not answer (what was committed stays; rerun resumes)
    ├── StoreDisabled               503: the gateway runs without a store (Gateway(store=False))
    ├── ClientDisconnected          499: the HTTP client went away; its model call was cancelled
    ├── StructuredOutputError       no valid instance after the re-ask limit
    └── AllModelsFailed             every model of a fallback chain failed

Every error carries `attempts` (how many provider calls were made), `usage`
(tokens spent before it failed) and `cost_usd`, so the trace, the budget and
the caller see the real cost of a failure.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from keel.types import Usage

__all__ = [
    "AllModelsFailed",
    "AuthenticationFailed",
    "BadRequest",
    "BodyError",
    "BodyTooLarge",
    "BudgetExceeded",
    "CircuitOpen",
    "ClientDisconnected",
    "CollectionExists",
    "ConfigError",
    "ContextWindowExceeded",
    "DatasetError",
    "Forbidden",
    "InputError",
    "InvalidFilter",
    "InvalidMessages",
    "InvalidSchema",
    "JobConflict",
    "KeelError",
    "LimitError",
    "LimitsUnavailable",
    "MalformedResponse",
    "MissingAPIKey",
    "ModelNotAllowed",
    "ModelNotFound",
    "NoSuchModel",
    "NotFound",
    "PermissionDenied",
    "ProviderConnectionError",
    "ProviderError",
    "ProviderRateLimited",
    "ProviderTimeout",
    "QueryTooLong",
    "RateLimited",
    "ServerError",
    "SettingsMismatch",
    "StoreDisabled",
    "StoreUnavailable",
    "StructuredOutputError",
    "Unauthorized",
    "UnknownCollection",
    "UnknownJob",
    "UnknownJobKind",
    "UnknownModel",
    "UnknownRun",
    "WorkerIdInUse",
    "error_for_status",
]


class KeelError(Exception):
    """Base of every error keel raises on purpose."""

    #: HTTP status the server answers with for this error.
    http_status: int = 500
    #: Short machine-readable code (OpenAI error shape `code`).
    code: str = "keel_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
        self.attempts: int = 0
        self.usage: Usage | None = None
        self.cost_usd: float | None = None  # what the failed call still cost (structured re-asks)

    @property
    def error_type(self) -> str:
        """The `error.type` span attribute: the class name."""
        return type(self).__name__


# --- configuration -------------------------------------------------------


class ConfigError(KeelError):
    """The configuration is invalid; says where."""

    http_status = 500
    code = "config_error"

    def __init__(
        self, message: str, *, file: str | None = None, line: int | None = None, field: str | None = None
    ) -> None:
        where = ""
        if file:
            where = file + (f":{line}" if line else "")
        if field:
            where = f"{where} [{field}]" if where else f"[{field}]"
        super().__init__(f"{where}: {message}" if where else message)
        self.file = file
        self.line = line
        self.field = field


class MissingAPIKey(ConfigError):
    # 503, not 500: this server cannot serve the model as configured (another replica, or this one once
    # the variable is set, can). The server adds `x-should-retry: false`, so SDKs do not retry in vain.
    http_status = 503
    code = "missing_api_key"

    def __init__(self, env_var: str, model: str) -> None:
        super().__init__(f"model {model!r} needs an API key: set the environment variable {env_var}")
        self.env_var = env_var


# --- the caller's mistakes ----------------------------------------------------


class InputError(KeelError):
    http_status = 400
    code = "invalid_request"


class UnknownModel(InputError):
    http_status = 404
    code = "model_not_found"

    def __init__(self, name: str, known: list[str]) -> None:
        known_text = ", ".join(sorted(known)) or "none configured"
        super().__init__(f"unknown model or alias {name!r}; configured: {known_text}")
        self.name = name


class InvalidMessages(InputError):
    code = "invalid_messages"


class InvalidSchema(InputError):
    code = "invalid_schema"


class ModelNotAllowed(InputError):
    http_status = 403
    code = "model_not_allowed"


class ContextWindowExceeded(InputError):
    code = "context_length_exceeded"

    def __init__(self, message: str, *, tokens: int | None = None, context_window: int | None = None) -> None:
        super().__init__(message)
        self.tokens = tokens
        self.context_window = context_window


class UnknownJob(InputError):
    http_status = 404
    code = "job_not_found"


class UnknownJobKind(InputError):
    code = "unknown_job_kind"


class JobConflict(InputError):
    http_status = 409
    code = "job_conflict"


class WorkerIdInUse(InputError):
    http_status = 409
    code = "worker_id_in_use"


# --- the HTTP caller's mistakes (the server) ---------------------------------


class Unauthorized(InputError):
    """A missing, unknown or revoked key."""

    http_status = 401
    code = "invalid_api_key"


class Forbidden(InputError):
    """A key that may not use this endpoint (or read or write this collection)."""

    http_status = 403
    code = "forbidden"


class NotFound(InputError):
    """A trace or dashboard file that does not exist."""

    http_status = 404
    code = "not_found"


class NoSuchModel(InputError):
    """GET /v1/models/{id} of a model that is not configured or not allowed: one answer for both, so a
    restricted key learns nothing about models it may not use (UnknownModel lists the configured ones)."""

    http_status = 404
    code = "model_not_found"


class BodyError(InputError):
    """A request body keel refuses before validating it; `param` names the field."""

    code = "invalid_request"

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(f"{param}: {message}" if param else message)
        self.param = param


class BodyTooLarge(InputError):
    http_status = 413
    code = "request_too_large"


# --- RAG: collections and queries ------------------------------------------------


class UnknownCollection(InputError):
    http_status = 404
    code = "collection_not_found"


class CollectionExists(InputError):
    http_status = 409
    code = "collection_exists"


class SettingsMismatch(InputError):
    """Other settings than the collection was built with; a rebuild (--reembed) applies them."""

    http_status = 409
    code = "collection_settings_mismatch"


class InvalidFilter(InputError):
    code = "invalid_filter"


class QueryTooLong(InputError):
    code = "query_too_long"


# --- evaluation ------------------------------------------------------------------


class DatasetError(InputError):
    """A dataset that cannot be read or lacks what the suite needs: names the file, row and column."""

    code = "invalid_dataset"


class UnknownRun(InputError):
    http_status = 404
    code = "unknown_eval_run"


# --- refused by keel before sending -------------------------------------------


class LimitError(KeelError):
    http_status = 429
    code = "limit_exceeded"

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RateLimited(LimitError):
    code = "rate_limit_exceeded"


class BudgetExceeded(LimitError):
    http_status = 402
    code = "budget_exceeded"


class CircuitOpen(LimitError):
    http_status = 503
    code = "circuit_open"


class LimitsUnavailable(LimitError):
    """Replicas share budgets and rate limits through PostgreSQL: while it does not answer, a key with a
    budget or a limit is refused rather than let through unlimited."""

    http_status = 503
    code = "limits_unavailable"


# --- the provider's failures ---------------------------------------------------


class ProviderError(KeelError):
    """The provider (or the network to it) failed."""

    http_status = 502
    code = "provider_error"
    retryable = False

    def __init__(
        self,
        message: str,
        *,
        provider: str | None = None,
        model: str | None = None,
        status: int | None = None,
        retry_after: float | None = None,
        body: Any = None,
    ) -> None:
        super().__init__(message)
        self.provider = provider
        self.model = model
        self.status = status
        self.retry_after = retry_after
        self.body = body


class BadRequest(ProviderError):
    http_status = 400
    code = "bad_request"


class AuthenticationFailed(ProviderError):
    http_status = 401
    code = "authentication_failed"


class PermissionDenied(ProviderError):
    http_status = 403
    code = "permission_denied"


class ModelNotFound(ProviderError):
    http_status = 404
    code = "upstream_model_not_found"


class ProviderTimeout(ProviderError):
    http_status = 504
    code = "timeout"
    retryable = True


class ProviderRateLimited(ProviderError):
    http_status = 429
    code = "upstream_rate_limited"
    retryable = True


class ServerError(ProviderError):
    http_status = 502
    code = "upstream_server_error"
    retryable = True


class ProviderConnectionError(ProviderError):
    http_status = 502
    code = "upstream_connection_error"
    retryable = True


class MalformedResponse(ProviderError):
    http_status = 502
    code = "malformed_response"


# --- the store and the HTTP connection ---------------------------------------------


class StoreUnavailable(KeelError):
    """The store does not answer: a key cannot be checked, or a write failed after its retries.

    What was committed stays; running the same command again resumes.
    """

    http_status = 503
    code = "store_unavailable"


class StoreDisabled(KeelError):
    """The gateway runs without a store (Gateway(store=False)): nothing to read or keep."""

    http_status = 503
    code = "store_disabled"


class ClientDisconnected(KeelError):
    """The client went away before the answer: the model call was cancelled."""

    http_status = 499
    code = "client_disconnected"


# --- composite failures -------------------------------------------------------


class StructuredOutputError(KeelError):
    http_status = 422
    code = "structured_output_invalid"

    def __init__(self, message: str, *, last_text: str | None = None) -> None:
        super().__init__(message)
        self.last_text = last_text


class AllModelsFailed(KeelError):
    """Every model of a fallback chain failed; `errors` holds each one's error."""

    code = "all_models_failed"

    def __init__(self, errors: list[tuple[str, KeelError]]) -> None:
        parts = "; ".join(f"{name}: {err.error_type}: {err.message}" for name, err in errors)
        super().__init__(f"all models failed: {parts}")
        self.errors = errors
        self.http_status = errors[-1][1].http_status if errors else 502

    @property
    def last(self) -> KeelError:
        return self.errors[-1][1]


_STATUS_ERRORS: dict[int, type[ProviderError]] = {
    400: BadRequest,
    401: AuthenticationFailed,
    403: PermissionDenied,
    404: ModelNotFound,
    408: ProviderTimeout,
    409: ServerError,
    422: BadRequest,
    429: ProviderRateLimited,
}


def error_for_status(status: int) -> type[ProviderError]:
    """The ProviderError subclass for an HTTP status from a provider."""
    if status in _STATUS_ERRORS:
        return _STATUS_ERRORS[status]
    if status >= 500:
        return ServerError
    return ProviderError
