"""`keel rag`: ingest documents, search them, ask questions answered with citations."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from collections.abc import Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from keel.cli.errors import EXIT_INPUT, handle_errors
from keel.errors import InputError
from keel.gateway import Gateway
from keel.rag import RAG, Answer, Retrieval
from keel.rag.ingest import IngestReport

app = typer.Typer(
    help="Retrieval-augmented generation: ingest, search, ask with citations.",
    no_args_is_help=True,
    rich_markup_mode=None,
)
out = Console(highlight=False)
info = Console(stderr=True, highlight=False)

T = TypeVar("T")

CollectionOption = Annotated[str, typer.Option("--collection", "-c", help="Collection name.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]


class _Bar:
    """Ingest progress as a rich progress bar: documents written, and chunks embedded so far (a large document
    is written whole at its end, but its chunks count up while they are embedded); while a large document is
    cut into chunks, the description says how far ("chunking big.txt: 1.2/3.0 MB")."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.task = progress.add_task("ingesting", total=None, chunks=0)
        self.chunks = 0

    def started(self, total: int | None) -> None:
        self.progress.update(self.task, total=total)

    def embedded(self, chunks: int) -> None:
        self.chunks += chunks
        self.progress.update(self.task, chunks=self.chunks)

    def advanced(self, documents: int, chunks: int) -> None:
        self.progress.update(self.task, advance=documents)

    def chunking(self, source: str, done: int, total: int) -> None:
        """Called from the reading thread (rich's Progress takes a lock)."""
        name = source if len(source) <= 30 else "…" + source[-29:]
        description = "ingesting" if done >= total else f"chunking {name}: {done / 1e6:.1f}/{total / 1e6:.1f} MB"
        self.progress.update(self.task, description=escape(description))


def _run_interruptibly(gw: Gateway, work: Coroutine[Any, Any, T]) -> T:
    """Run on the gateway's loop; the first Ctrl-C cancels the work and waits for it to stop (what was
    written stays: a re-run resumes), a second one exits at once."""
    stopped = threading.Event()

    async def run() -> T:
        try:
            return await work
        finally:
            stopped.set()  # after the stages unwound: the cancelled future alone says nothing of that

    future = asyncio.run_coroutine_threadsafe(run(), gw._loop().loop)
    try:
        return future.result()
    except KeyboardInterrupt:
        info.print("interrupted: stopping (Ctrl-C again to quit at once) ...")
        future.cancel()
        try:
            stopped.wait(timeout=60)
        except KeyboardInterrupt:
            os._exit(130)  # nothing half-written: every document is committed whole, or not at all
        info.print(
            "stopped: the documents written so far are kept, and chunks already embedded are cached;"
            " run the same command again to resume"
        )
        gw.close()  # the traces so far, to the store
        sys.stdout.flush()
        sys.stderr.flush()
        # not a normal exit: that would wait for a worker thread still chunking a large document (minutes);
        # it writes nothing, and every write is a committed transaction, so nothing is lost
        os._exit(130)


def _meta(pairs: list[str] | None) -> dict[str, str]:
    fields: dict[str, str] = {}
    for pair in pairs or []:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise InputError(f"--meta takes NAME=VALUE, got {pair!r}")
        fields[name.strip()] = value
    return fields


@app.command("ingest")
@handle_errors
def ingest(
    path: Annotated[Path, typer.Argument(help="A file or a folder (.txt .md .html .pdf .docx .jsonl).")],
    collection: CollectionOption,
    embedding_model: Annotated[
        str | None,
        typer.Option("--embedding-model", "-e", help="Embedding model (new collection; default rag.embedding_model)."),
    ] = None,
    chunker: Annotated[
        str | None, typer.Option(help="Chunking of a new collection: structure, tokens or sentences.")
    ] = None,
    chunk_size: Annotated[int | None, typer.Option("--chunk-size", help="Most tokens in a chunk.")] = None,
    overlap: Annotated[int | None, typer.Option(help="Tokens repeated between neighbouring chunks.")] = None,
    meta: Annotated[
        list[str] | None, typer.Option("--meta", help="NAME=VALUE added to every document's metadata (repeatable).")
    ] = None,
    reembed: Annotated[
        bool, typer.Option("--reembed", help="Rebuild the collection with the given model or chunking first.")
    ] = False,
    job: Annotated[
        str | None,
        typer.Option("--job", help="Run as durable job NAME, one item per file, spread over `keel worker`s."),
    ] = None,
    detach: Annotated[
        bool, typer.Option("--detach", help="With --job: submit and return; `keel worker` processes do the work.")
    ] = False,
    concurrency: Annotated[
        int, typer.Option(min=1, max=1000, help="With --job: files ingested at once, across all workers.")
    ] = 4,
    as_json: JsonOption = False,
) -> None:
    """Ingest files into a collection; re-running skips unchanged documents, replaces changed ones and removes
    deleted ones. A killed run resumes where it stopped. With --job, the files are items of a durable job
    that any number of workers share; the same command resumes it.

    Example: keel rag ingest ../shared/data/scifact/corpus.jsonl --collection scifact
    Example: keel rag ingest ./docs -c handbook --job handbook-1 --detach
    """
    if job is None and detach:
        raise InputError("--detach needs --job NAME: only a job goes on without this command")
    if job is not None:
        if reembed:
            raise InputError("--reembed rebuilds the collection in this process: run it without --job first")
        settings_args = {"embedding_model": embedding_model, "strategy": chunker, "size": chunk_size,
                         "overlap": overlap}  # fmt: skip
        from keel.cli import rag_job  # loads DBOS: only for --job

        rag_job.run(path, collection, job, settings_args, _meta(meta), detach=detach, concurrency=concurrency,
                       as_json=as_json)  # fmt: skip
        return
    with Gateway() as gw:
        rag = RAG(gw)
        custom = any(v is not None for v in (embedding_model, chunker, chunk_size, overlap))
        settings = (
            rag.settings(embedding_model=embedding_model, strategy=chunker, size=chunk_size, overlap=overlap)
            if custom else None
        )  # fmt: skip
        columns = (
            TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("docs · {task.fields[chunks]} chunks"), TimeElapsedColumn(), TimeRemainingColumn(),
        )  # fmt: skip
        with Progress(*columns, console=info, transient=True, disable=as_json) as progress:
            work = rag.ingest(path, collection, settings=settings, reembed=reembed, metadata=_meta(meta),
                              progress=_Bar(progress))  # fmt: skip
            report = _run_interruptibly(gw, work)
        rag.close()
    if as_json:
        out.print_json(data=report.to_json())
    else:
        _print_report(report)
    if report.documents == 0 and report.skipped:
        info.print(
            f"[bold red]error[/]: nothing was ingested into {escape(collection)!r}: every file was skipped"
            f" ({report.skipped} {'problem' if report.skipped == 1 else 'problems'})",
            highlight=False,
        )
        raise typer.Exit(EXIT_INPUT)


def _print_report(report: IngestReport) -> None:
    out.print(
        f"[bold]{escape(report.collection)}[/]: {report.added} added, {report.updated} updated, {report.unchanged}"
        f" unchanged, {report.deleted} deleted · {report.chunks} chunks ({report.embedded} embedded,"
        f" {report.cached} from the cache) · {report.seconds:.1f} s"
    )
    if report.seconds > 0 and report.chunks:
        out.print(
            f"[dim]time: read+chunk {report.read_s:.1f} s · embed {report.embed_s:.1f} s · write {report.write_s:.1f} s"
            f" · {report.documents / report.seconds:.1f} docs/s · trace {report.trace_id[-12:]}[/]"
        )
    for problem in report.problems:
        out.print(f"[yellow]{'skipped' if problem.skipped else 'warning'}[/] {escape(str(problem))}")


def _search_options(
    retriever: str | None, fusion: str | None, top_k: int | None, filter_json: str | None, candidates: int | None
) -> dict[str, Any]:
    return {"retriever": retriever, "fusion": fusion, "top_k": top_k, "filter": filter_json, "candidates": candidates}


RetrieverOption = Annotated[str | None, typer.Option(help="bm25, dense or hybrid (default rag.retriever).")]
FusionOption = Annotated[str | None, typer.Option(help="Hybrid fusion: rrf or weighted (default rag.fusion).")]
TopKOption = Annotated[int | None, typer.Option("--top-k", "-k", help="How many chunks.")]
CandidatesOption = Annotated[
    int | None, typer.Option(help="Chunks each retriever returns before fusion (default rag.candidates).")
]
FilterOption = Annotated[
    str | None, typer.Option("--filter", help='Metadata filter as JSON, e.g. \'{"source": "docs/a.md"}\'.')
]
RerankOption = Annotated[
    str | None,
    typer.Option(help="Rerank with llm:MODEL, embed:MODEL or sentences:MODEL; 'none' turns off rag.reranker."),
]


def _rerank(value: str | None) -> bool | str | None:
    return False if value == "none" else value


@app.command("search")
@handle_errors
def search(
    query: Annotated[str, typer.Argument(help="What to look for.")],
    collection: CollectionOption,
    retriever: RetrieverOption = None,
    fusion: FusionOption = None,
    top_k: TopKOption = 10,
    candidates: CandidatesOption = None,
    filter_json: FilterOption = None,
    rerank: RerankOption = None,
    as_json: JsonOption = False,
) -> None:
    """Raw retrieval results with every retriever's score and rank, to debug what an answer was given.

    Example: keel rag search "statins and cancer" -c scifact --retriever hybrid -k 5
    """
    with Gateway() as gw:
        rag = RAG(gw)
        retrieval = rag.search_sync(
            query,
            collection,
            rerank=_rerank(rerank),
            **_search_options(retriever, fusion, top_k, filter_json, candidates),
        )
        rag.close()
    if as_json:
        out.print_json(data={"query": query, "retriever": retrieval.mode, "timings_ms": retrieval.timings_ms,
                             "hits": [h.to_json() for h in retrieval.hits]})  # fmt: skip
        return
    _print_hits(retrieval)


def _rank(score: float | None, rank: int | None) -> str:
    return "-" if score is None else f"{score:.3f} (#{rank})"


def _print_hits(retrieval: Retrieval) -> None:
    table = Table(title=f"{len(retrieval.hits)} chunks · {retrieval.mode}", show_lines=True)
    for column in ("#", "score", "bm25", "dense", "rerank", "document · span"):
        table.add_column(column, justify="right" if column != "document · span" else "left")
    table.add_column("text", ratio=1)
    for i, hit in enumerate(retrieval.hits, start=1):
        c = hit.chunk
        where = f"{escape(c.doc_id)}\n{c.start}-{c.end}" + (
            f" p.{c.metadata['page']}" if c.metadata.get("page") else ""
        )
        snippet = escape((c.context + " | " if c.context else "") + c.text[:300].replace("\n", " "))
        table.add_row(
            str(i), f"{hit.score:.4f}", _rank(hit.bm25, hit.bm25_rank), _rank(hit.dense, hit.dense_rank),
            "-" if hit.rerank is None else f"{hit.rerank:.2f}", where, snippet,
        )  # fmt: skip
    out.print(table)
    timings = " · ".join(f"{k.removesuffix('_ms')} {v:.1f} ms" for k, v in retrieval.timings_ms.items())
    out.print(f"[dim]{timings}[/]")


@app.command("ask")
@handle_errors
def ask(
    question: Annotated[str, typer.Argument(help="The question.")],
    collection: CollectionOption,
    mode: Annotated[
        str | None, typer.Option(help="auto (generate, fall back to quotes), generate, or extractive.")
    ] = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Chat model for the answer.")] = None,
    retriever: RetrieverOption = None,
    top_k: TopKOption = None,
    filter_json: FilterOption = None,
    rerank: RerankOption = None,
    as_json: JsonOption = False,
) -> None:
    """Answer from the collection with [n] citations to exact spans; abstains when the documents do not say.

    Example: keel rag ask "Do statins reduce cancer risk?" -c scifact
    """
    with Gateway() as gw:
        rag = RAG(gw)
        answer = rag.ask_sync(
            question, collection, mode=mode, model=model, rerank=_rerank(rerank),
            **_search_options(retriever, None, top_k, filter_json, None),
        )  # fmt: skip
        rag.close()
    if as_json:
        out.print_json(data=answer.to_json())
        return
    _print_answer(answer)


def _print_answer(answer: Answer) -> None:
    colour = {"generated": "green", "extractive": "cyan", "abstained": "yellow"}[answer.kind]
    out.print(escape(answer.text), soft_wrap=True)
    out.print()
    if answer.reason:
        out.print(f"[{colour}]{answer.kind}[/]: {escape(answer.reason)}")
    for sentence in answer.sentences:
        mark = "[green]supported[/]" if sentence.supported else f"[red]unsupported[/] ({escape(sentence.reason)})"
        out.print(f"  {mark} {sentence.score:.2f}  {escape(sentence.text[:100])}")
    for citation in answer.citations:
        c = citation.hit.chunk
        page = f", p. {c.metadata['page']}" if c.metadata.get("page") else ""
        out.print(
            f"[bold][{citation.n}][/] {escape(c.title or c.doc_id)} ({escape(c.doc_id)}{page}), chars {c.start}-{c.end}"
        )
        if citation.quote is not None:
            q = citation.quote
            out.print(f"    [dim]{q.start}-{q.end}:[/] \u201c{escape(q.text[:240])}\u201d", soft_wrap=True)
    cost = "" if answer.cost_usd is None else f" · ${answer.cost_usd:.6f}"
    model = f" · {answer.model}" if answer.model else ""
    info.print(f"[dim]{answer.kind} · support {answer.support:.2f}{model}{cost} · {answer.latency_s:.1f} s"
               f" · trace {answer.trace_id[-12:]}[/]")  # fmt: skip


@app.command("collections")
@handle_errors
def collections(as_json: JsonOption = False) -> None:
    """Collections with their documents, chunks, embedding model and chunking.

    Example: keel rag collections
    """
    with Gateway() as gw:
        rows = RAG(gw).collections()
    if as_json:
        out.print_json(data=[{
            "name": c.name, "documents": c.n_documents, "chunks": c.n_chunks, "embedding_model": c.embedding_model,
            "embedding_id": c.embedding_id, "dimensions": c.dimensions, "chunking": c.settings.get("chunking"),
            "updated_at": c.updated_at,
        } for c in rows])  # fmt: skip
        return
    table = Table(title=f"{len(rows)} collections")
    for column in ("name", "docs", "chunks", "embedding model", "chunking", "updated (UTC)"):
        table.add_column(column, justify="right" if column in ("docs", "chunks") else "left")
    for c in rows:
        chunking = c.settings.get("chunking", {})
        table.add_row(
            escape(c.name), str(c.n_documents), str(c.n_chunks), f"{escape(c.embedding_model)} ({c.dimensions}d)",
            f"{chunking.get('strategy')} {chunking.get('size')}/{chunking.get('overlap')}",
            datetime.fromtimestamp(c.updated_at, UTC).strftime("%Y-%m-%d %H:%M"),
        )  # fmt: skip
    out.print(table)


@app.command("drop")
@handle_errors
def drop(
    name: Annotated[str, typer.Argument(help="The collection to delete.")],
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
) -> None:
    """Delete a collection: its documents, chunks, vectors and keyword index.

    Example: keel rag drop scifact --yes
    """
    with Gateway() as gw:
        rag = RAG(gw)
        found = rag.collection(name)
        if not yes and not typer.confirm(f"Delete {name!r} ({found.n_chunks} chunks)?"):
            raise typer.Exit(1)
        rag.drop(name)
    out.print(f"dropped {escape(name)}")


from keel.cli.rag_debug import debug  # noqa: E402  (its own module: the debugger reads eval runs, not collections)

app.command("debug")(debug)
