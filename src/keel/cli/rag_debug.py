"""`keel rag debug RUN`: why each failing case of a RAG evaluation run failed (keel.evals.rag_debug)."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from keel.cli.errors import handle_errors
from keel.errors import InputError

out = Console(highlight=False)

#: What each class points at, for the table.
ADVICE = {
    "task error": "the task raised: see the error",
    "missing abstention": "generation: answered without evidence (abstention threshold, prompt)",
    "retrieval miss": "retrieval: gold not in the top k (retriever, chunking, embeddings)",
    "wrong abstention": "generation: refused with the gold at hand (min_support, prompt, model)",
    "ranking loss": "ranking: gold retrieved but cut (reranker, context budget)",
    "unfaithful generation": "generation: sentences its context does not support (model, prompt)",
    "wrong despite gold context": "generation: supported but wrong (model, citations)",
    "other": "no RAG stage at fault: see the failed metrics",
}


def _fmt(value: Any, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _print_case(d: Any) -> None:
    ev = d.evidence
    repeat = f" (repeat {d.repeat})" if d.repeat else ""
    out.print(f"\n[bold]{escape(d.case_id)}[/]{repeat}: [bold]{escape(d.label)}[/]: {escape(d.rule)}")
    ranks = ", ".join(
        f"{h['doc_id']} rank {h['rank']} score {_fmt(h['score'])}{' in context' if h['in_context'] else ''}"
        for h in ev.get("gold_hits", [])
    )
    cut = ", ".join(f"{h['doc_id']} rank {h['rank']}" for h in ev.get("cut_by_rerank", []))
    gold = f"gold {len(ev.get('gold_docs', []))} docs" + (f": {ranks}" if ranks else ": none retrieved")
    out.print(f"  {escape(gold)}" + (f"; cut by rerank: {escape(cut)}" if cut else ""))
    support = f"support {_fmt(ev.get('support'))} (min {_fmt(ev.get('min_support'))})"
    context = f"{ev.get('in_context', 0)} of {ev.get('retrieved', 0)} chunks in context"
    reason = f"; {ev['reason']}" if ev.get("reason") else ""
    out.print(f"  answer {ev.get('answer_kind')}, {support}, {context}{escape(reason)}")
    for s in ev.get("unsupported_sentences", [])[:5]:
        why = f" [{s['reason']}]" if s.get("reason") else ""
        out.print(f"  unsupported ({_fmt(s.get('support'))}): {escape(str(s.get('text'))[:160] + why)}")
    failed = ev.get("failed_metrics", {})
    if failed:
        shown = ", ".join(f"{m} {_fmt(v['value'])} < {_fmt(v['threshold'], 2)}" for m, v in failed.items())
        out.print(f"  failed: {escape(shown)}")


def _print(diagnosis: Any, recorded: int | None) -> None:
    out.print(f"[bold]{escape(diagnosis.run_id)}[/]: {diagnosis.failing} failing of {diagnosis.cases} case repeats")
    table = Table("class", "cases", "share", "points at")
    for label, count in diagnosis.counts.items():
        share = count / diagnosis.failing if diagnosis.failing else 0.0
        table.add_row(escape(label), str(count), f"{share:.0%}", escape(ADVICE.get(label, "")))
    out.print(table)
    for d in diagnosis.diagnoses:
        _print_case(d)
    if recorded is not None:
        out.print(f'\nrecorded; {recorded} new trace span(s): the dashboard\'s trace view shows "RAG debug: <class>"')


@handle_errors
def debug(
    run_id: Annotated[str, typer.Argument(help="A run id of a RAG suite (see `keel eval list`).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
    record: Annotated[
        bool, typer.Option("--record/--no-record", help="Store the classes and add them to the cases' traces.")
    ] = True,
) -> None:
    """Classify every failing case of a RAG evaluation run: retrieval miss, ranking loss, unfaithful
    generation, wrong despite gold context, wrong or missing abstention; with each case's evidence.

    Example: keel rag debug scifact-rag-1a2b3c4d5e6f-v0
    """
    from keel.config import load_config
    from keel.evals import storage
    from keel.evals.rag_debug import diagnose_run, record_diagnoses
    from keel.store import open_store

    store = open_store(load_config().store_url)
    try:
        row = storage.get_run_row(store, run_id)
        if not (row["spec"].get("task") or {}).get("rag"):
            raise InputError(f"run {run_id!r} is not a RAG run (its suite's task is not `rag`): nothing to debug")
        diagnosis = diagnose_run(storage.load_run(store, run_id))
        recorded = record_diagnoses(store, diagnosis) if record else None
    finally:
        store.close()
    if as_json:
        out.print_json(json.dumps(diagnosis.to_json(), default=str))
        return
    _print(diagnosis, recorded)
