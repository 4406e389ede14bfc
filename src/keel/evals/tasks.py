"""The thing under test, run on one case under one variant: a prompt, a RAG question, an extraction, a function.

Each returns a `TaskOutput`: the output the scorers read, what it cost and
took, and the evidence later tools need (`details`). A RAG task records the
retrieval (doc id, rank, score, whether the chunk made it into the context),
the gold documents, the answer kind, the citations with their quotes and each
answer sentence with its support: what the retrieval and citation scorers and
the RAG debugger read, without re-running anything.
"""

from __future__ import annotations

import inspect
import string
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from keel.errors import InputError
from keel.evals.dataset import Case
from keel.evals.suite import Suite, Variant, import_object

if TYPE_CHECKING:
    from keel.gateway.core import Gateway
    from keel.rag.answer import Answer
    from keel.rag.engine import RAG

__all__ = ["TaskOutput", "fill_template", "rag_details", "run_task"]

#: Variant parameters passed to the gateway's chat call; others go to RAG.ask or the function.
CHAT_PARAMS = ("temperature", "max_tokens", "top_p", "seed", "stop", "timeout", "system")


@dataclass
class TaskOutput:
    output: Any
    latency_s: float
    input_tokens: int | None = None
    output_tokens: int | None = None
    cost_usd: float | None = None
    trace_id: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "output": self.output, "latency_s": self.latency_s, "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens, "cost_usd": self.cost_usd, "trace_id": self.trace_id,
            "details": self.details,
        }  # fmt: skip

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TaskOutput:
        return cls(
            data.get("output"), float(data.get("latency_s") or 0.0), data.get("input_tokens"),
            data.get("output_tokens"), data.get("cost_usd"), data.get("trace_id"), dict(data.get("details") or {}),
        )  # fmt: skip


class _Columns(dict[str, Any]):
    def __missing__(self, key: str) -> Any:
        columns = ", ".join(self)
        raise InputError(f"the prompt template uses {{{key}}}, which is not a column of the dataset ({columns})")


def fill_template(template: str, case: Case) -> str:
    """The template with {placeholders} from the case's columns ({input} and {expected} too)."""
    columns = _Columns({**case.fields, "input": case.input, "expected": case.expected})
    try:
        return string.Formatter().vformat(template, (), columns)
    except (ValueError, IndexError) as exc:
        raise InputError(f"the prompt template {template[:60]!r} is malformed: {exc}") from None


def _chat_args(variant: Variant, system: str | None) -> dict[str, Any]:
    args = {k: v for k, v in variant.params.items() if k in CHAT_PARAMS}
    if system is not None and "system" not in args:
        args["system"] = system
    return args


async def _prompt(suite: Suite, gateway: Gateway, case: Case, variant: Variant, metadata: dict[str, Any]) -> TaskOutput:
    started = time.perf_counter()
    result = await gateway.chat(fill_template(variant.prompt or "{input}", case), variant.model,
                                metadata=metadata, **_chat_args(variant, suite.spec.task.system))  # fmt: skip
    return TaskOutput(result.text, time.perf_counter() - started, result.usage.input_tokens,
                      result.usage.output_tokens, result.cost_usd, result.trace_id)  # fmt: skip


async def _extract(
    suite: Suite, gateway: Gateway, case: Case, variant: Variant, metadata: dict[str, Any]
) -> TaskOutput:
    spec = suite.spec.task.extract
    assert spec is not None  # the task is an extraction
    schema: Any = spec.schema_
    if isinstance(schema, str):
        schema = import_object(schema, "extraction schema")
        if not (isinstance(schema, type) and issubclass(schema, BaseModel)):
            raise InputError(f"extraction schema {spec.schema_!r} is not a pydantic model")
    started = time.perf_counter()
    result = await gateway.chat(
        fill_template(variant.prompt or spec.prompt, case), variant.model, response_model=schema,
        max_reasks=spec.max_reasks, metadata=metadata, **_chat_args(variant, suite.spec.task.system),
    )  # fmt: skip
    parsed = result.parsed.model_dump(mode="json") if isinstance(result.parsed, BaseModel) else result.parsed
    return TaskOutput(parsed, time.perf_counter() - started, result.usage.input_tokens, result.usage.output_tokens,
                      result.cost_usd, result.trace_id)  # fmt: skip


async def _rag(rag: RAG, suite: Suite, case: Case, variant: Variant, metadata: dict[str, Any]) -> TaskOutput:
    spec = suite.spec.task.rag
    assert spec is not None  # the task is a RAG question
    options: dict[str, Any] = {k: v for k, v in variant.params.items() if k in ("retriever", "fusion", "candidates")}
    if spec.retriever:
        options.setdefault("retriever", spec.retriever)
    top_k = int(variant.params.get("top_k", spec.top_k))
    budget = variant.params.get("context_tokens", spec.context_tokens)
    started = time.perf_counter()
    # one retrieval, top_k deep: the metrics score it and the answer's context is cut from it (by the budget)
    answer = await rag.ask(
        str(case.input), spec.collection, mode=variant.params.get("mode", spec.mode), model=variant.model,
        rerank=variant.params.get("rerank", spec.rerank), context_tokens=budget,
        max_tokens=variant.params.get("max_tokens"), metadata=metadata, top_k=top_k, **options,
    )  # fmt: skip
    return TaskOutput(answer.text, time.perf_counter() - started, answer.usage.get("input_tokens"),
                      answer.usage.get("output_tokens"), answer.cost_usd, answer.trace_id,
                      rag_details(answer, case, rag, top_k, budget))  # fmt: skip


def rag_details(answer: Answer, case: Case, rag: RAG, top_k: int, budget: int | None) -> dict[str, Any]:
    """The evidence of one RAG answer that the retrieval, citation and faithfulness scorers and the RAG
    debugger read: the ranked retrieval (which chunks made it into the context), what the reranker cut,
    the gold, the answer's kind, citations and checked sentences, and the settings that decided them."""
    in_context = {h.chunk.chunk_id for h in answer.hits}
    retrieval = answer.retrieval
    hits = retrieval.hits if retrieval is not None else answer.hits
    config = rag.config
    return {
        "retrieved": [
            {"doc_id": h.chunk.doc_id, "chunk_id": h.chunk.chunk_id, "rank": i, "score": h.score,
             "in_context": h.chunk.chunk_id in in_context}
            for i, h in enumerate(hits, start=1)
        ],
        "cut_by_rerank": [
            {"doc_id": h.chunk.doc_id, "chunk_id": h.chunk.chunk_id, "rank": i, "rerank": h.rerank}
            for i, h in enumerate(retrieval.cut if retrieval is not None else [], start=len(hits) + 1)
        ],
        "context": [h.chunk.text for h in answer.hits],
        "gold_docs": list(case.gold_docs),
        "gold_spans": list(case.gold_spans),
        "answerable": case.answerable,
        "answer_kind": answer.kind,
        "support": answer.support,
        "reason": answer.reason or None,
        "citations": _citations(answer),
        "sentences": [{"text": s.text, "supported": s.supported, "support": round(s.score, 4),
                       "citations": s.citations, "reason": s.reason or None} for s in answer.sentences],
        "generated_text": answer.generated_text,
        "settings": {"top_k": top_k, "context_tokens": budget or config.context_tokens,
                     "min_support": config.min_support, "grounding_threshold": config.grounding_threshold},
    }  # fmt: skip


def _citations(answer: Answer) -> list[dict[str, Any]]:
    """What the answer cites, with the quoted text: one entry per citation, whose quote is the source
    sentence that best supports it; an extractive answer quotes several sentences of one source, and
    each is a citation of its own (else only the first quote of a source would be scored)."""
    by_n = {c.n: c for c in answer.citations}
    if answer.kind == "extractive":
        return [
            {"n": n, "doc_id": by_n[n].hit.chunk.doc_id, "chunk_id": by_n[n].hit.chunk.chunk_id, "quote": s.text}
            for s in answer.sentences for n in s.citations if n in by_n
        ]  # fmt: skip
    return [
        {"n": c.n, "doc_id": c.hit.chunk.doc_id, "chunk_id": c.hit.chunk.chunk_id,
         "quote": c.quote.text if c.quote else c.hit.chunk.text}
        for c in answer.citations
    ]  # fmt: skip


async def _function(suite: Suite, case: Case, variant: Variant) -> TaskOutput:
    function = import_object(suite.spec.task.function or "", "task function")
    takes_variant = "variant" in inspect.signature(function).parameters
    started = time.perf_counter()
    result = function(case.input, variant=variant.to_json()) if takes_variant else function(case.input)
    if inspect.isawaitable(result):
        result = await result
    latency = time.perf_counter() - started
    if isinstance(result, TaskOutput):
        return result
    return TaskOutput(result, latency)


async def run_task(
    suite: Suite, gateway: Gateway, rag: RAG | None, case: Case, variant: Variant, metadata: dict[str, Any]
) -> TaskOutput:
    kind = suite.spec.task.kind
    if kind == "prompt":
        return await _prompt(suite, gateway, case, variant, metadata)
    if kind == "extract":
        return await _extract(suite, gateway, case, variant, metadata)
    if kind == "rag":
        if rag is None:
            raise InputError("a rag task needs keel's RAG (the `rag` extra)")
        return await _rag(rag, suite, case, variant, metadata)
    return await _function(suite, case, variant)
