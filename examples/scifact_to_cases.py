"""SciFact (BEIR format) to an evaluation dataset and a document sample for `examples/scifact_rag.yaml`.

    python examples/scifact_to_cases.py [--data ../shared/data/scifact] [--claims 60] [--docs 240] [--seed 19]

Writes, next to this script, in `scifact/`:

- `cases.jsonl`: one case per claim: `id`, `question` (the claim), `gold_docs` (its qrels documents),
  `gold_spans` (its evidence sentences), `label` (SUPPORT / CONTRADICT), `answerable`;
- `corpus_sample.jsonl`: the documents to ingest ({_id, title, text}, as BEIR's corpus).

Every SciFact claim has evidence in the full corpus, so to exercise abstention a share of the claims
(`--unanswerable`, default a quarter) is made unanswerable by leaving their gold documents OUT of the
sample: those cases get `answerable: false` and no gold documents (their original ones are kept in
`withheld_docs`, for reading). The sample holds the gold documents of the answerable claims, hard
distractors (for each claim, the `--hard` documents sharing most of its words: they compete with the
gold for the top ranks and the context budget) and random ones. Unanswerable cases are spread through
the file (every 4th case), so `--limit N` on the suite still exercises abstention. All of this is
a property of the data files: the evaluation library reads generic columns (question, gold
documents, gold spans, answerable) and knows nothing of SciFact.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import re
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def _jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _qrels(path: Path) -> dict[str, list[str]]:
    gold: dict[str, list[str]] = {}
    with path.open(encoding="utf-8") as handle:
        for row in csv.DictReader(handle, delimiter="\t"):
            if int(row["score"]) > 0:
                gold.setdefault(row["query-id"], []).append(row["corpus-id"])
    return gold


def _evidence(data: Path) -> dict[str, tuple[list[str], str]]:
    """claim id -> (gold evidence sentences, label) from evidence_train.jsonl and corpus_sentences.jsonl."""
    sentences = {row["_id"]: row["sentences"] for row in _jsonl(data / "corpus_sentences.jsonl")}
    out: dict[str, tuple[list[str], str]] = {}
    for row in _jsonl(data / "evidence_train.jsonl"):
        spans, labels = [], []
        for item in row["evidence"]:
            doc = sentences.get(item["doc_id"], [])
            spans += [doc[i] for i in item["sentences"] if i < len(doc)]
            labels.append(item["label"])
        if spans:
            out[row["query_id"]] = (spans, labels[0])
    return out


def _words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z0-9]+", text.lower()) if len(w) > 3}


def build(
    data: Path, claims: int, docs: int, unanswerable_share: float, seed: int, hard_per_claim: int = 3
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    rng = random.Random(seed)
    queries = {q["_id"]: q["text"] for q in _jsonl(data / "queries.jsonl")}
    qrels = _qrels(data / "qrels" / "train.tsv")
    evidence = _evidence(data)
    # claims with gold documents and gold evidence sentences (citation recall needs the spans)
    pool = sorted((q for q in queries if q in qrels and q in evidence), key=int)
    chosen = rng.sample(pool, min(claims, len(pool)))
    n_unanswerable = round(len(chosen) * unanswerable_share)
    withheld_ids = set(chosen[:n_unanswerable])
    answerable_ids = chosen[n_unanswerable:]
    withheld_docs = {d for q in withheld_ids for d in qrels[q]}
    needed = {d for q in answerable_ids for d in qrels[q]}
    if needed & withheld_docs:  # a document gold for both kinds: the claim cannot be unanswerable
        clash = {q for q in withheld_ids if set(qrels[q]) & needed}
        withheld_ids -= clash
        answerable_ids += sorted(clash, key=int)
        withheld_docs = {d for q in withheld_ids for d in qrels[q]}
    corpus = _jsonl(data / "corpus.jsonl")
    distractors = [d for d in corpus if d["_id"] not in needed and d["_id"] not in withheld_docs]
    # hard distractors first: for every claim, the documents sharing most of its words (they compete with
    # the gold for the top ranks and the context budget); then random ones up to `docs`
    hard: set[str] = set()
    for q in chosen:
        words = _words(queries[q])
        ranked = sorted(distractors, key=lambda d: -len(words & _words(d.get("title", "") + " " + d["text"])))
        hard.update(d["_id"] for d in ranked[:hard_per_claim])
    rest = [d for d in distractors if d["_id"] not in hard]
    room = max(0, min(docs - len(needed) - len(hard), len(rest)))
    sample_ids = needed | hard | {d["_id"] for d in rng.sample(rest, room)}
    sample = [
        {"_id": d["_id"], "title": d.get("title", ""), "text": d["text"]} for d in corpus if d["_id"] in sample_ids
    ]

    def case(q: str, answerable: bool) -> dict[str, Any]:
        spans, label = evidence[q]
        return {
            "id": f"scifact-{q}",
            "question": queries[q],
            "gold_docs": qrels[q] if answerable else [],
            "gold_spans": spans if answerable else [],
            "label": label,
            "answerable": answerable,
            "withheld_docs": [] if answerable else qrels[q],
        }

    answerable_cases = [case(q, True) for q in answerable_ids]
    unanswerable_cases = [case(q, False) for q in sorted(withheld_ids, key=int)]
    cases: list[dict[str, Any]] = []
    while answerable_cases or unanswerable_cases:  # every 4th case unanswerable while both last
        for _ in range(3):
            if answerable_cases:
                cases.append(answerable_cases.pop(0))
        if unanswerable_cases:
            cases.append(unanswerable_cases.pop(0))
    return cases, sample


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=HERE.parent.parent / "shared" / "data" / "scifact")
    parser.add_argument("--out", type=Path, default=HERE / "scifact")
    parser.add_argument("--claims", type=int, default=60, help="claims to sample (cases)")
    parser.add_argument("--docs", type=int, default=240, help="documents in the ingested sample (gold + distractors)")
    parser.add_argument("--unanswerable", type=float, default=0.25, help="share of claims whose gold is left out")
    parser.add_argument("--hard", type=int, default=3, help="hard distractors per claim (most shared words)")
    parser.add_argument("--seed", type=int, default=19)
    args = parser.parse_args()
    cases, sample = build(args.data, args.claims, args.docs, args.unanswerable, args.seed, args.hard)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("cases.jsonl", cases), ("corpus_sample.jsonl", sample)):
        with (args.out / name).open("w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    unanswerable = sum(not c["answerable"] for c in cases)
    print(f"{len(cases)} cases ({unanswerable} unanswerable), {len(sample)} documents -> {args.out}")


if __name__ == "__main__":
    main()
