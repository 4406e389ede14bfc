"""Prometheus metrics, derived from the spans every model call produces.

The metrics are a listener on the gateway's tracer, so they count exactly
what the trace store records (one place decides what a call is), per model
and key: calls by status, errors by type, tokens, cost and latency.

Label values are bounded: a model label is a configured model (an alias counts
as the model it resolves to) and a key label a key the gateway knows; any
other name a caller sends is counted under `unknown`, so that nobody can grow
the series (and the scrape, and the server's memory) by inventing names.
Labels go through the gateway's redactor like everything else that leaves it.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from keel.gateway import Gateway
from keel.trace import Span

__all__ = ["CONTENT_TYPE_LATEST", "UNKNOWN", "GatewayMetrics"]

UNKNOWN = "unknown"  # the one label value of every model or key name that is not configured

_OPERATIONS = frozenset({"chat", "embeddings", "http"})  # http: refused before the gateway (401, 413, 400)
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80)


class GatewayMetrics:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self._models: dict[str, str] = {}  # configured model or alias -> its label
        self.registry = CollectorRegistry()
        labels = ("operation", "model", "key")
        self.requests = Counter("keel_requests", "Model calls by outcome.", (*labels, "status"), registry=self.registry)
        self.errors = Counter(
            "keel_errors", "Failed model calls by error type.", (*labels, "error_type"), registry=self.registry
        )
        self.tokens = Counter("keel_tokens", "Tokens by direction.", (*labels, "direction"), registry=self.registry)
        self.cost = Counter("keel_cost_usd", "Cost in USD of calls with a known price.", labels, registry=self.registry)
        self.overrun = Counter(
            "keel_budget_overrun_usd", "USD charged beyond a key's budget (real usage over the reservation).",
            labels, registry=self.registry,
        )  # fmt: skip
        self.latency = Histogram(
            "keel_request_duration_seconds", "Model call latency.", labels, buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )  # fmt: skip

    def observe(self, span: Span) -> None:
        """Count one finished span (a tracer listener); other operations are ignored."""
        a = span.attributes
        operation = a.get("gen_ai.operation.name")
        if operation not in _OPERATIONS:
            return
        labels = (
            operation,
            self._model_label(a.get("keel.model") or a.get("gen_ai.request.model")),
            self._key_label(a.get("keel.api_key")),
        )
        self.requests.labels(*labels, span.status).inc()
        if span.status == "error":
            self.errors.labels(*labels, span.error_type or "unknown").inc()
        for direction, attribute in (("input", "gen_ai.usage.input_tokens"), ("output", "gen_ai.usage.output_tokens")):
            count = a.get(attribute)
            if count:
                self.tokens.labels(*labels, direction).inc(count)
        cost = a.get("keel.cost_usd")
        if cost:
            self.cost.labels(*labels).inc(cost)
        overrun = a.get("keel.budget.overrun_usd")
        if overrun:
            self.overrun.labels(*labels).inc(overrun)
        self.latency.labels(*labels).observe(span.duration_ms / 1000.0)

    def _model_label(self, name: object) -> str:
        """The configured model a span's model names (an alias resolved), "" for none, else `unknown`."""
        if not name or not isinstance(name, str):
            return ""
        label = self._models.get(name)
        if label is None:
            gateway = self.gateway
            resolved = gateway.config.resolve_name(name)
            if resolved is None and name in gateway.model_names:  # a model given to the Gateway in code
                resolved = name
            if resolved is None:
                return UNKNOWN  # not remembered: the cache holds configured names only
            label = self._models[name] = gateway.redactor.text(resolved)
        return label

    def _key_label(self, name: object) -> str:
        """A known key's name, "" for none (admin, open mode), else `unknown`."""
        if not name:
            return ""
        return self.gateway.redactor.text(name) if isinstance(name, str) and name in self.gateway.keys else UNKNOWN

    def render(self) -> bytes:
        return generate_latest(self.registry)
