"""keel RAG on a BEIR data set: retrieval quality, ingest throughput and query latency, next to LlamaIndex.

    .venv/bin/python benchmarks/rag_beir.py ../shared/data/scifact --split train --json benchmarks/out/rag_beir.json

For any folder in BEIR layout (corpus.jsonl, queries.jsonl, qrels/SPLIT.tsv):

1. Ingests corpus.jsonl into a fresh store (cold: every chunk is embedded),
   on each backend asked for (the embedded SQLite one, PostgreSQL from
   pgserver), timing documents/s and chunks/s and how much of it was the
   embedding model.
2. Runs every judged query of the split through BM25, dense and hybrid
   retrieval (and hybrid + rerank on fixed random samples of queries, one per
   reranker: a second embedding model's opinion, and an LLM grading each
   candidate, both through the gateway; no cross-encoder can be had offline),
   timing each retrieval, and scores the ranked documents (a
   document ranks where its best chunk does) with ir-measures: nDCG@10 and
   recall@100.
3. Does the same through LlamaIndex in the same run: its default vector store
   (SimpleVectorStore), its default node parser, the same embedding model
   (keel's ONNX runtime behind LlamaIndex's BaseEmbedding) and the same top-k.

The published numbers printed alongside are on BEIR's SciFact *test* split;
the train split given here scores higher for every method (BM25 0.699 on
train against 0.665 on test), so compare methods within a column, and the
goals are read with that in mind.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

console = Console(highlight=False)

PUBLISHED = {  # BEIR SciFact test split, nDCG@10
    "BM25": 0.665, "all-MiniLM-L6-v2": 0.645, "bge-small-en-v1.5": 0.713, "BM25 + cross-encoder": 0.688,
    "BM25 + bge-base RRF": 0.742,
}  # fmt: skip


@dataclass
class Method:
    name: str
    runs: dict[str, list[str]] = field(default_factory=dict)  # query id -> ranked doc ids
    latencies_ms: list[float] = field(default_factory=list)
    queries: list[str] | None = None  # the subset it ran on, when not all
    scores: dict[str, float] = field(default_factory=dict)


def load_beir(folder: Path, split: str, limit: int | None) -> tuple[dict[str, str], dict[str, dict[str, int]]]:
    qrels: dict[str, dict[str, int]] = {}
    lines = (folder / "qrels" / f"{split}.tsv").read_text().splitlines()
    for line in lines[1:] if lines and lines[0].startswith("query") else lines:
        qid, did, score = line.split("\t")[:3]
        qrels.setdefault(qid, {})[did] = int(score)
    queries = {}
    for line in (folder / "queries.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["_id"] in qrels:
            queries[row["_id"]] = row["text"]
    if limit:
        queries = dict(list(queries.items())[:limit])
    return queries, qrels


def evaluate(method: Method, qrels: dict[str, dict[str, int]]) -> None:
    import ir_measures
    from ir_measures import R, nDCG

    wanted = set(method.runs)
    run = [
        ir_measures.ScoredDoc(qid, did, float(-rank)) for qid, docs in method.runs.items()
        for rank, did in enumerate(docs[:100])
    ]  # fmt: skip
    judged = [ir_measures.Qrel(q, d, s) for q, docs in qrels.items() if q in wanted for d, s in docs.items()]
    result = ir_measures.calc_aggregate([nDCG @ 10, R @ 100], judged, run)
    method.scores = {"ndcg@10": float(result[nDCG @ 10]), "recall@100": float(result[R @ 100])}


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def ranked_documents(hits: list[Any]) -> list[str]:
    """Documents in the order of their best chunk."""
    return list(dict.fromkeys(h.chunk.doc_id for h in hits))


def progress_bar() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=True)  # fmt: skip


# --- keel ------------------------------------------------------------------------------------------


class _Bar:
    def __init__(self, progress: Progress, label: str) -> None:
        self.progress, self.task = progress, progress.add_task(label, total=None)

    def started(self, total: int | None) -> None:
        self.progress.update(self.task, total=total)

    def advanced(self, documents: int, chunks: int) -> None:
        self.progress.update(self.task, advance=documents)


def keel_config(folder: Path, store_url: str, args: argparse.Namespace) -> Path:
    path = folder / "keel.toml"
    path.write_text(
        f'[store]\nurl = "{store_url}"\n[tracing]\ncapture_content = false\n'
        f'[rag]\nembedding_model = "{args.embedding_model}"\nchunk_strategy = "{args.chunker}"\n'
        + (f"chunk_size = {args.chunk_size}\n" if args.chunk_size else "")
        + f"chunk_overlap = {args.overlap}\ncandidates = {args.candidates}\n"
        f"rerank_candidates = {args.rerank_candidates}\n"
    )
    return path


async def run_keel(
    backend: str, store_url: str, corpus: Path, queries: dict[str, str], args: argparse.Namespace, workdir: Path,
) -> dict[str, Any]:  # fmt: skip
    from keel.config import load_config
    from keel.gateway import Gateway
    from keel.rag import RAG

    gw = Gateway(load_config(keel_config(workdir, store_url, args)))
    rag = RAG(gw)
    collection = "beir"
    with progress_bar() as progress:
        report = await rag.ingest(corpus, collection, progress=_Bar(progress, f"keel ingest ({backend})"))
    info = rag.collection(collection)
    ingest = {
        "documents": report.documents, "chunks": report.chunks, "seconds": report.seconds,
        "docs_per_s": report.documents / report.seconds, "chunks_per_s": report.chunks / report.seconds,
        "embed_s": report.embed_s, "read_s": report.read_s, "write_s": report.write_s, "embedded": report.embedded,
        "cached": report.cached, "problems": len(report.problems),
    }  # fmt: skip
    console.print(
        f"keel ingest ({backend}): {report.documents} docs, {info.n_chunks} chunks in {report.seconds:.1f} s;"
        f" waiting for embeddings {report.embed_s:.1f} s ({report.embedded} embedded, {report.cached} cached)"
    )
    methods = []
    keep = max(args.top_k * 2, args.candidates)
    variants = [("bm25", {}), ("dense", {}), ("hybrid", {"fusion": "rrf"}), ("hybrid", {"fusion": "weighted"})]
    for mode, extra in variants:
        label = f"keel {mode}" + (f" {extra['fusion']}" if extra else "")
        if extra.get("fusion") == gw.config.rag.fusion:
            label += " (default)"
        method = Method(label)
        await rag.search("warm up", collection, retriever=mode, top_k=10)
        with progress_bar() as progress:
            task = progress.add_task(f"{label} ({backend})", total=len(queries))
            for qid, text in queries.items():
                t0 = time.perf_counter()
                retrieval = await rag.search(text, collection, retriever=mode, top_k=keep, rerank=False, **extra)
                method.latencies_ms.append((time.perf_counter() - t0) * 1000)
                method.runs[qid] = ranked_documents(retrieval.hits)
                progress.advance(task)
        methods.append(method)
    if backend in args.rerank_backends:
        for spec, sample in rerank_samples(args, queries):
            methods += await rerank_sample(rag, collection, queries, sample, spec, keep, args, backend)
    rag.close()
    await gw.aclose()
    return {"backend": backend, "ingest": ingest, "methods": methods}


def rerank_samples(args: argparse.Namespace, queries: dict[str, str]) -> list[tuple[str, list[str]]]:
    """(reranker, a fixed random sample of query ids) for each `--rerank SPEC[=N]`."""
    out = []
    for item in args.rerank:
        spec, _, size = item.partition("=")
        if spec == "none":
            continue
        n = min(int(size or args.rerank_queries), len(queries))
        out.append((spec, sorted(random.Random(13).sample(sorted(queries), n))))
    return out


async def rerank_sample(
    rag: Any, collection: str, queries: dict[str, str], sample: list[str], spec: str, keep: int,
    args: argparse.Namespace, backend: str,
) -> list[Method]:  # fmt: skip
    """Hybrid alone and hybrid + rerank on the same sample (the reranked head, then the rest of hybrid's list)."""
    base = Method(f"keel hybrid (sample of {len(sample)} for {spec})", queries=sample)
    reranked = Method(f"keel hybrid + rerank {spec}", queries=sample)
    with progress_bar() as progress:
        task = progress.add_task(f"keel hybrid + rerank {spec} ({backend})", total=len(sample))
        for qid in sample:
            plain = await rag.search(queries[qid], collection, retriever="hybrid", top_k=keep, rerank=False)
            base.runs[qid] = ranked_documents(plain.hits)
            t0 = time.perf_counter()
            result = await rag.search(queries[qid], collection, retriever="hybrid", top_k=args.rerank_candidates,
                                      rerank=spec)  # fmt: skip
            reranked.latencies_ms.append((time.perf_counter() - t0) * 1000)
            head = ranked_documents(result.hits)
            reranked.runs[qid] = head + [d for d in base.runs[qid] if d not in head]
            progress.advance(task)
    return [base, reranked]


# --- LlamaIndex ------------------------------------------------------------------------------------


def run_llamaindex(corpus: Path, queries: dict[str, str], args: argparse.Namespace) -> dict[str, Any]:
    from llama_index.core import Document, Settings, VectorStoreIndex
    from llama_index.core.base.embeddings.base import BaseEmbedding

    from keel.config import load_config
    from keel.models.onnx import OnnxEmbeddingModel, _embed_sync

    model_config = load_config().models[args.embedding_model]
    local = OnnxEmbeddingModel(model_config.model)
    prefix = model_config.query_prefix

    class KeelOnnxEmbedding(BaseEmbedding):  # type: ignore[misc]
        """The same ONNX model and runtime keel uses, behind LlamaIndex's embedding interface."""

        def _embed(self, texts: list[str]) -> list[list[float]]:
            return _embed_sync(local._runtime(), texts, local.batch_size, local.spec.pooling)[0]

        def _get_query_embedding(self, query: str) -> list[float]:
            return self._embed([prefix + query])[0]

        def _get_text_embedding(self, text: str) -> list[float]:
            return self._embed([text])[0]

        def _get_text_embeddings(self, texts: list[str]) -> list[list[float]]:
            return self._embed(texts)

        async def _aget_query_embedding(self, query: str) -> list[float]:
            return self._get_query_embedding(query)

    Settings.embed_model = KeelOnnxEmbedding(model_name=args.embedding_model)
    Settings.llm = None
    documents = []
    for line in corpus.read_text().splitlines():
        row = json.loads(line)
        documents.append(Document(text=f"{row.get('title', '')}\n{row['text']}".strip(), doc_id=str(row["_id"]),
                                  metadata={"doc_id": str(row["_id"])}))  # fmt: skip
    t0 = time.perf_counter()
    index = VectorStoreIndex.from_documents(documents, show_progress=True)
    seconds = time.perf_counter() - t0
    nodes = len(index.docstore.docs)
    console.print(f"LlamaIndex ingest: {len(documents)} docs, {nodes} nodes in {seconds:.1f} s")
    retriever = index.as_retriever(similarity_top_k=max(args.top_k * 2, args.candidates))
    method = Method("LlamaIndex dense")
    retriever.retrieve("warm up")
    with progress_bar() as progress:
        task = progress.add_task("LlamaIndex dense", total=len(queries))
        for qid, text in queries.items():
            t1 = time.perf_counter()
            found = retriever.retrieve(text)
            method.latencies_ms.append((time.perf_counter() - t1) * 1000)
            method.runs[qid] = list(dict.fromkeys(n.node.metadata["doc_id"] for n in found))
            progress.advance(task)
    ingest = {"documents": len(documents), "chunks": nodes, "seconds": seconds,
              "docs_per_s": len(documents) / seconds, "chunks_per_s": nodes / seconds}  # fmt: skip
    return {"backend": "llamaindex", "ingest": ingest, "methods": [method]}


# --- PostgreSQL ------------------------------------------------------------------------------------


def start_postgres(folder: Path) -> tuple[Any, str]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from pgserver.postgres_server import get_server
    server = get_server(folder / "pgdata", cleanup_mode="delete")
    return server, server.get_uri()


# --- report ----------------------------------------------------------------------------------------


def report(results: list[dict[str, Any]], qrels: dict[str, dict[str, int]], args: argparse.Namespace) -> dict[str, Any]:
    table = Table(title=f"retrieval on {args.data.name} ({args.split}), documents ranked by their best chunk")
    for column in ("backend", "method", "queries", "nDCG@10", "recall@100", "p50 ms", "p95 ms"):
        table.add_column(column, justify="left" if column in ("backend", "method") else "right")
    for result in results:
        for method in result["methods"]:
            evaluate(method, qrels)
            table.add_row(
                result["backend"], method.name, str(len(method.runs)), f"{method.scores['ndcg@10']:.4f}",
                f"{method.scores['recall@100']:.4f}", f"{percentile(method.latencies_ms, 0.5):.1f}",
                f"{percentile(method.latencies_ms, 0.95):.1f}",
            )  # fmt: skip
    console.print(table)
    published = Table(title="published nDCG@10, BEIR SciFact test split (for reference)")
    published.add_column("method")
    published.add_column("nDCG@10", justify="right")
    for name, value in PUBLISHED.items():
        published.add_row(name, f"{value:.3f}")
    console.print(published)
    ingest = Table(title="ingest (cold: every chunk embedded)")
    for column in ("backend", "docs", "chunks", "seconds", "docs/s", "chunks/s", "embedding share"):
        ingest.add_column(column, justify="left" if column == "backend" else "right")
    for result in results:
        i = result["ingest"]
        share = f"{i['embed_s'] / i['seconds']:.0%}" if "embed_s" in i else "-"
        ingest.add_row(result["backend"], str(i["documents"]), str(i["chunks"]), f"{i['seconds']:.1f}",
                       f"{i['docs_per_s']:.1f}", f"{i['chunks_per_s']:.1f}", share)  # fmt: skip
    console.print(ingest)
    out = {
        "data": str(args.data), "split": args.split, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{os.cpu_count()} cpus", "settings": {k: str(v) for k, v in vars(args).items()},
        "results": [{
            "backend": r["backend"], "ingest": r["ingest"],
            "methods": [{"name": m.name, "queries": len(m.runs), **m.scores,
                         "p50_ms": percentile(m.latencies_ms, 0.5), "p95_ms": percentile(m.latencies_ms, 0.95)}
                        for m in r["methods"]],
        } for r in results],
    }  # fmt: skip
    return out


def goals(summary: dict[str, Any]) -> bool:
    ok = True
    found = {(r["backend"], m["name"]): m for r in summary["results"] for m in r["methods"]}

    def method(backend: str, test: Any) -> dict[str, Any] | None:
        return next((m for (b, name), m in found.items() if b == backend and test(name)), None)

    def check(name: str, passed: bool, detail: str) -> None:
        nonlocal ok
        ok &= passed
        console.print(f"{'[green]PASS[/]' if passed else '[red]FAIL[/]'} {name}: {detail}")

    backend = "sqlite" if any(b == "sqlite" for b, _ in found) else "postgres"
    hybrid = method(backend, lambda n: n.startswith("keel hybrid") and n.endswith("(default)"))
    dense = method(backend, lambda n: n == "keel dense")
    li = method("llamaindex", lambda n: True)
    if hybrid:
        check("hybrid nDCG@10 >= 0.70", hybrid["ndcg@10"] >= 0.70, f"{hybrid['ndcg@10']:.4f} ({hybrid['name']})")
    for (b, name), reranked in found.items():
        if b != backend or not name.startswith("keel hybrid + rerank "):
            continue
        spec = name.removeprefix("keel hybrid + rerank ")
        sample = method(backend, lambda n, spec=spec: n.startswith("keel hybrid (sample") and n.endswith(f" {spec})"))
        alone = f"hybrid alone on the sample: {sample['ndcg@10']:.4f}" if sample else ""
        detail = f"{reranked['ndcg@10']:.4f} on {reranked['queries']} queries ({alone})"
        check(f"hybrid + rerank {spec} nDCG@10 >= 0.72", reranked["ndcg@10"] >= 0.72, detail)
    if li and hybrid and dense:
        ingest = {r["backend"]: r["ingest"] for r in summary["results"]}
        keel_s, li_s = ingest[backend]["seconds"], ingest["llamaindex"]["seconds"]
        if ingest[backend]["chunks"] == 0:  # a kept store: nothing was embedded, so there is nothing to compare
            console.print("SKIP keel ingests faster than LlamaIndex: keel's store was kept, its ingest was not cold")
        else:
            check("keel ingests faster than LlamaIndex", keel_s < li_s, f"{keel_s:.1f} s against {li_s:.1f} s")
        detail = f"{hybrid['p50_ms']:.1f} ms against {li['p50_ms']:.1f} ms (keel dense: {dense['p50_ms']:.1f} ms)"
        check("keel queries faster than LlamaIndex (p50, hybrid)", hybrid["p50_ms"] < li["p50_ms"], detail)
        detail = f"{hybrid['ndcg@10']:.4f} against {li['ndcg@10']:.4f} (keel dense: {dense['ndcg@10']:.4f})"
        check("keel nDCG@10 above LlamaIndex (hybrid)", hybrid["ndcg@10"] > li["ndcg@10"], detail)
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path, help="a folder in BEIR layout")
    parser.add_argument("--split", default="test")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--backends", nargs="+", default=["sqlite", "postgres"], choices=["sqlite", "postgres"])
    parser.add_argument("--no-llamaindex", action="store_true", help="skip the LlamaIndex comparison")
    parser.add_argument("--embedding-model", default="bge-small")
    parser.add_argument("--chunker", default="structure", choices=["structure", "tokens", "sentences"])
    parser.add_argument("--chunk-size", type=int, help="default: rag.chunk_size (sized to the model's window)")
    parser.add_argument("--overlap", type=int, default=32)
    parser.add_argument("--candidates", type=int, default=100, help="per retriever, before fusion")
    parser.add_argument("--top-k", type=int, default=100)
    parser.add_argument("--queries", type=int, help="only the first N judged queries (a quick look)")
    rerankers = "rerankers, each as SPEC[=N]: reranked on a fixed random sample of N queries; or none"
    parser.add_argument("--rerank", nargs="+", default=["embed:local-embed=200", "llm:local=20"], help=rerankers)
    parser.add_argument("--rerank-queries", type=int, default=100, help="sample size when SPEC has no =N")
    parser.add_argument("--rerank-backends", nargs="+", default=["sqlite"], help="where to run the rerank sample")
    parser.add_argument("--rerank-candidates", type=int, default=30)
    parser.add_argument("--keep", type=Path, help="keep the stores in this folder (default: a temporary one)")
    args = parser.parse_args()
    queries, qrels = load_beir(args.data, args.split, args.queries)
    workdir = Path(tempfile.mkdtemp(prefix="keel-beir-")) if args.keep is None else args.keep
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ.pop("KEEL_STORE", None)
    results = []
    corpus = args.data / "corpus.jsonl"
    try:
        for backend in args.backends:
            server = None
            if backend == "postgres":
                server, url = start_postgres(workdir)
            else:
                url = str(workdir / "keel.db")
            try:
                results.append(asyncio.run(run_keel(backend, url, corpus, queries, args, workdir)))
            finally:
                if server is not None:
                    server.cleanup()
        if not args.no_llamaindex:
            results.append(run_llamaindex(corpus, queries, args))
    finally:
        if args.keep is None:
            shutil.rmtree(workdir, ignore_errors=True)
    summary = report(results, qrels, args)
    passed = goals(summary)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2))
    console.print("latencies: per query, retrieval only (embedding the query included), medians and 95th percentiles")
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
