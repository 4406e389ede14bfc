"""Where keel's groundedness check and abstention draw their lines, measured on SciFact's gold evidence.

    .venv/bin/python benchmarks/rag_grounding.py ../shared/data/scifact [--claims N] [--json OUT]

keel marks an answer sentence supported when its best cited source sentence
scores at least `rag.grounding_threshold`, and abstains when the best
retrieved chunk scores under `rag.min_support`; both scores put a cosine on a
0-1 scale between COSINE_FLOOR and COSINE_CEILING (keel/text/grounding.py).
This measures those constants against labelled data instead of guessing them:

1. Grounding: each SciFact claim with SUPPORT evidence plays an answer
   sentence. Its gold evidence sentences are the supported case; the other
   sentences of the same abstract (same topic, not the evidence: the hard
   case) and the sentences of a random other abstract (a wrong citation) are
   the unsupported ones. Prints the cosine distributions, ROC AUC, and
   precision/recall of "supported" at the configured threshold.
2. Abstention: each judged query against its relevant abstract (answerable)
   and against the closest of 300 random abstracts that are not relevant
   (what retrieval finds when the answer is not in the documents). Prints
   how often keel would answer and abstain at the configured min_support.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import numpy as np
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from sklearn.metrics import roc_auc_score, roc_curve

from keel import Gateway
from keel.config import load_config
from keel.text.grounding import COSINE_CEILING, COSINE_FLOOR, best_support, rescale_cosine

console = Console(highlight=False)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class Vectors:
    """Unit vectors of texts from keel's gateway (the collection's embedding model), batched with a progress bar."""

    def __init__(self, gw: Gateway, model: str, prefix: str = "") -> None:
        self.gw, self.model, self.prefix = gw, model, prefix

    def __call__(self, texts: list[str], label: str) -> np.ndarray:
        out = []
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task(label, total=len(texts))
            for i in range(0, len(texts), 64):
                batch = [self.prefix + t for t in texts[i : i + 64]]
                out.append(np.asarray(self.gw.embed_sync(batch, self.model).vectors, dtype=np.float32))
                progress.advance(task, len(batch))
        return np.vstack(out)


def quantiles(values: list[float]) -> str:
    q = np.quantile(values, [0.1, 0.5, 0.9])
    return f"{q[0]:.3f} / {q[1]:.3f} / {q[2]:.3f}"


def grounding(folder: Path, embed: Vectors, n_claims: int, threshold: float, rng: random.Random) -> dict[str, Any]:
    sentences = {row["_id"]: row["sentences"] for row in read_jsonl(folder / "corpus_sentences.jsonl")}
    claims = []
    for row in read_jsonl(folder / "evidence_train.jsonl"):
        for evidence in row["evidence"]:
            if evidence["label"] == "SUPPORT" and evidence["doc_id"] in sentences:
                claims.append((row["claim"], evidence["doc_id"], set(evidence["sentences"])))
                break
    rng.shuffle(claims)
    claims = claims[:n_claims]
    doc_ids = sorted(sentences)
    others = [rng.choice([d for d in doc_ids if d != doc]) for _, doc, _ in claims]
    needed = sorted({doc for _, doc, _ in claims} | set(others))
    flat = [(doc, i, s) for doc in needed for i, s in enumerate(sentences[doc])]
    claim_vectors = embed([c for c, _, _ in claims], "claims")
    sentence_vectors = embed([s for _, _, s in flat], "abstract sentences")
    rows: dict[str, list[int]] = {}
    for row, (doc, _, _) in enumerate(flat):
        rows.setdefault(doc, []).append(row)

    cosines: dict[str, list[float]] = {"evidence": [], "same abstract": [], "other abstract": []}
    scores: dict[str, list[float]] = {k: [] for k in cosines}
    for (claim, doc, gold), vector, other in zip(claims, claim_vectors, others, strict=True):
        groups = {
            "evidence": [r for r in rows[doc] if flat[r][1] in gold],
            "same abstract": [r for r in rows[doc] if flat[r][1] not in gold],
            "other abstract": rows[other],
        }
        for name, group in groups.items():
            if not group:
                continue
            matrix = sentence_vectors[group]
            cosines[name].append(float(np.max(matrix @ vector)))
            scores[name].append(best_support(claim, vector, [flat[r][2] for r in group], matrix)[0])

    table = Table(title=f"grounding: {len(claims)} SciFact claims as answer sentences, best source sentence")
    for column in (
        "source sentences",
        "cosine p10 / p50 / p90",
        "score p10 / p50 / p90",
        f"supported (>= {threshold})",
    ):
        table.add_column(column)
    for name in cosines:
        rate = np.mean(np.array(scores[name]) >= threshold)
        table.add_row(name, quantiles(cosines[name]), quantiles(scores[name]), f"{rate:.1%}")
    console.print(table)
    result: dict[str, Any] = {"claims": len(claims), "threshold": threshold}
    for negative in ("same abstract", "other abstract"):
        labels = [1] * len(scores["evidence"]) + [0] * len(scores[negative])
        auc = roc_auc_score(labels, scores["evidence"] + scores[negative])
        console.print(f"ROC AUC, evidence against {negative}: {auc:.3f}")
        result[f"auc_vs_{negative.replace(' ', '_')}"] = round(float(auc), 4)
    for name in cosines:
        result[name.replace(" ", "_")] = {
            "cosine_p10_p50_p90": [round(float(x), 4) for x in np.quantile(cosines[name], [0.1, 0.5, 0.9])],
            "supported_rate": round(float(np.mean(np.array(scores[name]) >= threshold)), 4),
        }
    return result


def abstention(folder: Path, embed_query: Vectors, embed_doc: Vectors, min_support: float, rng: random.Random,
               n_queries: int) -> dict[str, Any]:  # fmt: skip
    corpus = {row["_id"]: f"{row['title']}\n{row['text']}" for row in read_jsonl(folder / "corpus.jsonl")}
    queries = {row["_id"]: row["text"] for row in read_jsonl(folder / "queries.jsonl")}
    relevant: dict[str, set[str]] = {}
    for line in (folder / "qrels" / "train.tsv").read_text().splitlines()[1:]:
        qid, doc, score = line.split("\t")
        if int(score) > 0 and doc in corpus:
            relevant.setdefault(qid, set()).add(doc)
    qids = sorted(q for q in relevant if q in queries)
    rng.shuffle(qids)
    qids = qids[:n_queries]
    pool = rng.sample(sorted(corpus), 300)
    docs = sorted(set(pool) | {d for q in qids for d in relevant[q]})
    index = {d: i for i, d in enumerate(docs)}
    query_vectors = embed_query([queries[q] for q in qids], "queries")
    doc_vectors = embed_doc([corpus[d] for d in docs], "abstracts")
    answerable, unanswerable = [], []
    for qid, vector in zip(qids, query_vectors, strict=True):
        similarity = doc_vectors @ vector
        answerable.append(max(float(similarity[index[d]]) for d in relevant[qid]))
        unanswerable.append(max(float(similarity[index[d]]) for d in pool if d not in relevant[qid]))
    support_yes = np.asarray(rescale_cosine(np.array(answerable)))
    support_no = np.asarray(rescale_cosine(np.array(unanswerable)))
    auc = roc_auc_score([1] * len(qids) + [0] * len(qids), answerable + unanswerable)
    table = Table(title=f"abstention: {len(qids)} SciFact queries, best abstract (query prefix on the question)")
    for column in ("case", "cosine p10 / p50 / p90", f"answers (support >= {min_support})"):
        table.add_column(column)
    table.add_row("relevant abstract present", quantiles(answerable), f"{np.mean(support_yes >= min_support):.1%}")
    table.add_row("only unrelated abstracts", quantiles(unanswerable), f"{np.mean(support_no >= min_support):.1%}")
    console.print(table)
    console.print(f"ROC AUC, answerable against not: {auc:.3f}")
    fpr, tpr, cut = roc_curve([1] * len(qids) + [0] * len(qids), np.concatenate([support_yes, support_no]))
    best = int(np.argmax(tpr - fpr))
    console.print(
        f"min_support with the best Youden's J: {cut[best]:.3f} (answers {tpr[best]:.1%} of answerable questions,"
        f" {fpr[best]:.1%} of the others)"
    )
    return {
        "youden_min_support": round(float(cut[best]), 4), "youden_answer_rates": [float(tpr[best]), float(fpr[best])],
        "queries": len(qids), "min_support": min_support, "auc": round(float(auc), 4),
        "answer_rate_answerable": round(float(np.mean(support_yes >= min_support)), 4),
        "answer_rate_unanswerable": round(float(np.mean(support_no >= min_support)), 4),
        "cosine_answerable_p10_p50_p90": [round(float(x), 4) for x in np.quantile(answerable, [0.1, 0.5, 0.9])],
        "cosine_unanswerable_p10_p50_p90": [round(float(x), 4) for x in np.quantile(unanswerable, [0.1, 0.5, 0.9])],
    }  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path, help="the SciFact folder (corpus_sentences.jsonl, evidence_train.jsonl)")
    parser.add_argument("--claims", type=int, default=400)
    parser.add_argument("--queries", type=int, default=400)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    config = load_config()
    rag = config.rag
    model = config.models[config.resolve(rag.embedding_model, kind="embedding")]
    console.print(
        f"embedding model {rag.embedding_model} · COSINE_FLOOR {COSINE_FLOOR} · COSINE_CEILING {COSINE_CEILING}"
        f" · grounding_threshold {rag.grounding_threshold} · min_support {rag.min_support}"
    )
    with Gateway(config) as gw:
        documents = Vectors(gw, rag.embedding_model, model.document_prefix)
        questions = Vectors(gw, rag.embedding_model, model.query_prefix)
        summary = {
            "embedding_model": rag.embedding_model, "cosine_floor": COSINE_FLOOR, "cosine_ceiling": COSINE_CEILING,
            "grounding": grounding(args.data, documents, args.claims, rag.grounding_threshold, random.Random(7)),
            "abstention": abstention(args.data, questions, documents, rag.min_support, random.Random(7), args.queries),
        }  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
