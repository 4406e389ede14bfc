"""The local model's speed (issue 16, point 11): prompt evaluation and generation in tokens/s, keel's adapter
next to a bare `llama_cpp.Llama` under several settings, and `rag ask`-like latency on SciFact.

    .venv/bin/python benchmarks/local_prompt_speed.py               # 2,500-token prompt, 300 docs, 5 claims
    .venv/bin/python benchmarks/local_prompt_speed.py --threads 1 2 # also 2 threads (a quiet machine only)
    .venv/bin/python benchmarks/local_prompt_speed.py --llama-path /tmp/avx512   # another llama-cpp-python build too
    .venv/bin/python benchmarks/local_prompt_speed.py --skip-rag --json /tmp/speed.json

On a shared machine absolute figures move with the load: read the ratios (keel against bare llama.cpp in the
same run, before against after), and the `load` column (1-minute load average when the row was measured).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

console = Console(highlight=False, width=170)
HERE = Path(__file__).resolve().parent
SCIFACT = HERE.parent.parent / "shared" / "data" / "scifact"
# Text for a long prompt: SciFact abstracts, like the passages of a RAG prompt.
FILLER_DOCS = 40


def load() -> float:
    return os.getloadavg()[0]


def prompt_text(folder: Path) -> str:
    rows = []
    with (folder / "corpus.jsonl").open(encoding="utf-8") as f:
        for _, line in zip(range(FILLER_DOCS), f, strict=False):
            row = json.loads(line)
            rows.append(f"{row.get('title', '')}\n{row['text']}")
    return "\n\n".join(rows)


# --- bare llama.cpp ------------------------------------------------------------------------------------------
#
# Each setting runs in its own process: OpenMP reads OMP_WAIT_POLICY once, when llama.cpp's library loads,
# and keel sets it on import.


def settings(threads: list[int], cores: int) -> list[tuple[str, dict[str, Any], dict[str, str]]]:
    """(name, Llama arguments, environment) of every bare setting compared."""
    default_env = {"OMP_WAIT_POLICY": ""}  # empty: libgomp's own default (spin, then sleep)
    passive = {"OMP_WAIT_POLICY": "PASSIVE"}
    out: list[tuple[str, dict[str, Any], dict[str, str]]] = []
    for n in threads:
        t = {"n_threads": n, "n_threads_batch": n}
        out.append((f"defaults (n_batch 512, n_ubatch 512), {n} thread(s)", t, default_env))
        out.append((f"flash_attn, {n} thread(s)", {**t, "flash_attn": True}, default_env))
        out.append((f"n_ubatch 128, {n} thread(s)", {**t, "n_ubatch": 128}, default_env))
        out.append((f"n_batch = n_ubatch = 2048, {n} thread(s)", {**t, "n_batch": 2048, "n_ubatch": 2048}, default_env))
    both = {"n_threads": cores, "n_threads_batch": cores}
    out.append((f"{cores} threads, OMP spinning (llama.cpp's default)", both, default_env))
    out.append((f"{cores} threads, OMP_WAIT_POLICY=PASSIVE", both, passive))
    keel_like = {"n_threads": threads[0], "n_threads_batch": cores}
    out.append((f"{threads[0]} generation / {cores} prompt threads, PASSIVE (keel's)", keel_like, passive))
    return out


def bare_one(args: argparse.Namespace) -> dict[str, Any]:
    """One setting, in this process (run by `bare_rows` with the setting's environment)."""
    import llama_cpp

    from keel.models.local import smollm2_path

    kwargs = json.loads(args.bare_one)
    llm = llama_cpp.Llama(model_path=str(smollm2_path()), n_ctx=4096, verbose=False, **kwargs)
    tokens = llm.tokenize(prompt_text(args.scifact).encode())[: args.prompt_tokens]
    runs = [measure_bare(llm, tokens, args.gen_tokens) for _ in range(args.repeats)]
    return min(runs, key=lambda r: r["prompt_s"])


def bare_rows(args: argparse.Namespace, label: str, llama_path: str | None = None) -> list[dict[str, Any]]:
    rows = []
    cores = os.cpu_count() or 2
    for name, kwargs, extra_env in settings(args.threads, cores):
        out = Path(tempfile.mkdtemp()) / "row.json"
        env = {**os.environ, **extra_env}
        if not env["OMP_WAIT_POLICY"]:
            del env["OMP_WAIT_POLICY"]
        if llama_path:
            env["PYTHONPATH"] = os.pathsep.join([llama_path, os.environ.get("PYTHONPATH", "")])
        command = [sys.executable, __file__, "--bare-one", json.dumps(kwargs), "--json", str(out),
                   "--prompt-tokens", str(args.prompt_tokens), "--gen-tokens", str(args.gen_tokens),
                   "--repeats", str(args.repeats), "--scifact", str(args.scifact)]  # fmt: skip
        subprocess.run(command, env=env, check=True)
        row = {"setting": f"{label}: {name}", **json.loads(out.read_text())}
        console.print(f"  {row['setting']}: {row['prompt_tok_s']:.0f} prompt tok/s, {row['gen_tok_s']:.0f} gen tok/s")
        rows.append(row)
    return rows


def measure_bare(llm: Any, tokens: list[int], gen_tokens: int) -> dict[str, Any]:
    started_load = load()
    llm.reset()  # no prefix reuse: every run evaluates the whole prompt
    t0 = time.perf_counter()
    llm.eval(tokens)
    prompt_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    produced = 0
    for _ in llm.generate(tokens, temp=0.0):  # the whole prompt is cached: sampling starts at once
        produced += 1
        if produced >= gen_tokens:
            break
    gen_s = time.perf_counter() - t0
    return {
        "prompt_tokens": len(tokens), "prompt_s": prompt_s, "prompt_tok_s": len(tokens) / prompt_s,
        "gen_tokens": produced, "gen_tok_s": produced / gen_s, "load": started_load,
    }  # fmt: skip


# --- keel's adapter ------------------------------------------------------------------------------------------


async def keel_row(args: argparse.Namespace) -> dict[str, Any]:
    """keel's LocalModel as the gateway runs it: prompt time is the time to the first streamed piece."""
    from keel.models.local import LocalModel, _recording_llama
    from keel.types import ChatOptions, ChatRequest, Message, StreamDelta

    model = LocalModel(stop_repetition=False)
    vocab, engine = model._engine()
    text = prompt_text(args.scifact)
    # cut the text to the wanted number of prompt tokens (chat template included)
    words = text.split(" ")
    lo, hi = 1, len(words)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(vocab.prompt_tokens([{"role": "user", "content": " ".join(words[:mid])}])) <= args.prompt_tokens:
            lo = mid
        else:
            hi = mid - 1
    request = ChatRequest(
        "smollm2", (Message.user(" ".join(words[:lo]) + " Summarise."),),
        ChatOptions(temperature=0, max_tokens=args.gen_tokens),
    )  # fmt: skip
    assert isinstance(engine.llama, _recording_llama())
    best: dict[str, Any] | None = None
    for _ in range(args.repeats):
        engine.llama.reset()  # no prefix reuse between repeats
        started_load = load()
        t0 = time.perf_counter()
        first = None
        final = None
        async for item in model.stream(request):
            if isinstance(item, StreamDelta):
                first = first or time.perf_counter()
            else:
                final = item
        end = time.perf_counter()
        assert final is not None and first is not None
        prompt_s = first - t0
        row = {
            "setting": f"keel LocalModel ({model.threads} generation / {model.batch_threads} prompt threads)",
            "prompt_tokens": final.usage.input_tokens, "prompt_s": prompt_s,
            "prompt_tok_s": final.usage.input_tokens / prompt_s, "gen_tokens": final.usage.output_tokens,
            "gen_tok_s": max(final.usage.output_tokens - 1, 1) / max(end - first, 1e-9), "load": started_load,
        }  # fmt: skip
        if best is None or row["prompt_s"] < best["prompt_s"]:
            best = row
    assert best is not None
    return best


# --- rag ask on SciFact ---------------------------------------------------------------------------------------


def scifact_sample(folder: Path, n_docs: int, n_claims: int) -> tuple[list[Any], list[str]]:
    """The first `n_docs` abstracts that some train claims cite, plus filler, and `n_claims` of those claims."""
    from keel.rag import Document

    with (folder / "qrels" / "train.tsv").open(encoding="utf-8") as f:
        qrels = [(r["query-id"], r["corpus-id"]) for r in csv.DictReader(f, delimiter="\t")]
    queries = {}
    with (folder / "queries.jsonl").open(encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            queries[str(row["_id"])] = row["text"]
    wanted_docs = {doc for _, doc in qrels[: n_claims * 3]}
    claims = list(dict.fromkeys(q for q, _ in qrels[: n_claims * 3] if q in queries))[:n_claims]
    documents = []
    with (folder / "corpus.jsonl").open(encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if str(row["_id"]) in wanted_docs or len(documents) < n_docs - len(wanted_docs):
                text = f"{row.get('title', '')}\n{row['text']}".strip()
                documents.append(Document(str(row["_id"]), text, title=row.get("title") or None, source="scifact"))
    return documents, [queries[q] for q in claims]


async def rag_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    from keel.config import load_config
    from keel.gateway import Gateway
    from keel.rag import RAG

    work = Path(tempfile.mkdtemp(prefix="keel-local-speed-"))
    config = work / "keel.toml"
    config.write_text(f'[store]\nurl = "{work / "keel.db"}"\n[tracing]\ncapture_content = false\n')
    gw = Gateway(load_config(config))
    rag = RAG(gw)
    documents, claims = scifact_sample(args.scifact, args.docs, args.claims)
    t0 = time.perf_counter()
    await rag.ingest(documents, "scifact")
    console.print(f"  ingested {len(documents)} SciFact abstracts in {time.perf_counter() - t0:.1f} s")
    sizings = [("after: sized for the local model (1000 context, 200 answer tokens)", {})]
    if not args.skip_before:
        sizings.insert(0, ("before: 3000 context, 400 answer tokens", {"context_tokens": 3000, "max_tokens": 400}))
    rows = []
    for name, extra in sizings:
        latencies, prompts, chat_s, kinds = [], [], [], []
        started_load = load()
        for claim in claims:
            t = time.perf_counter()
            answer = await rag.ask(claim, "scifact", model="local", **extra)
            latencies.append(time.perf_counter() - t)
            prompts.append(answer.usage.get("input_tokens", 0))
            kinds.append(answer.kind)
            chat = [s for s in spans_of(gw, answer.trace_id) if s.name.startswith("chat")]
            chat_s.append(sum(s.duration_ms for s in chat) / 1000)
        rows.append({
            "sizing": name, "claims": len(claims), "p50_s": statistics.median(latencies), "max_s": max(latencies),
            "chat_p50_s": statistics.median(chat_s), "prompt_tokens_p50": statistics.median(prompts),
            "kinds": {k: kinds.count(k) for k in set(kinds)}, "load": started_load,
        })  # fmt: skip
        console.print(f"  {name}: p50 {rows[-1]['p50_s']:.1f} s, prompt {rows[-1]['prompt_tokens_p50']:.0f} tokens")
    rag.close()
    await gw.aclose()
    return rows


def spans_of(gw: Any, trace_id: str) -> list[Any]:
    gw.flush()
    spans: list[Any] = gw.store.get_trace(trace_id)
    return spans


# --- report ----------------------------------------------------------------------------------------------------


def speed_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title="prompt evaluation and generation (best of the repeats)")
    for column in ("setting", "prompt tokens", "prompt tok/s", "prompt s", "gen tok/s", "load"):
        table.add_column(column, justify="left" if column == "setting" else "right")
    for r in rows:
        table.add_row(r["setting"], str(r["prompt_tokens"]), f"{r['prompt_tok_s']:.0f}", f"{r['prompt_s']:.1f}",
                      f"{r['gen_tok_s']:.0f}", f"{r['load']:.1f}")  # fmt: skip
    return table


def rag_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title="rag ask on SciFact with the local model")
    for column in ("sizing", "claims", "p50 s", "max s", "chat p50 s", "prompt tokens p50", "answers", "load"):
        table.add_column(column, justify="left" if column == "sizing" else "right")
    for r in rows:
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(r["kinds"].items()))
        table.add_row(r["sizing"], str(r["claims"]), f"{r['p50_s']:.1f}", f"{r['max_s']:.1f}", f"{r['chat_p50_s']:.1f}",
                      f"{r['prompt_tokens_p50']:.0f}", kinds, f"{r['load']:.1f}")  # fmt: skip
    return table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scifact", type=Path, default=SCIFACT)
    parser.add_argument("--prompt-tokens", type=int, default=2500)
    parser.add_argument("--gen-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, nargs="+", default=None, help="llama.cpp threads to compare")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--docs", type=int, default=300, help="SciFact abstracts to ingest")
    parser.add_argument("--claims", type=int, default=5, help="claims to ask")
    parser.add_argument("--skip-rag", action="store_true")
    parser.add_argument("--skip-speed", action="store_true", help="only the rag ask part")
    parser.add_argument("--skip-before", action="store_true", help="only the sized-for-local rag ask")
    parser.add_argument(
        "--llama-path", action="append", default=[], help="another llama-cpp-python build (a --target dir)"
    )
    parser.add_argument("--bare-one", help=argparse.SUPPRESS)  # Llama arguments as JSON: one setting, then exit
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.threads is None:
        from keel.models.local import THREADS

        args.threads = [THREADS]
    if args.bare_one:
        args.json.write_text(json.dumps(bare_one(args)))
        return 0
    speed: list[dict[str, Any]] = []
    if not args.skip_speed:
        console.print(f"prompt of {args.prompt_tokens} tokens, {args.gen_tokens} generated; load {load():.1f}")
        speed = [asyncio.run(keel_row(args))]
        console.print(f"  {speed[0]['setting']}: {speed[0]['prompt_tok_s']:.0f} prompt tok/s")
        speed += bare_rows(args, "bare llama.cpp")
        for path in args.llama_path:
            speed += bare_rows(args, Path(path).name, path)
        console.print(speed_table(speed))
        keel = speed[0]
        same = next(r for r in speed if r["setting"].endswith("(keel's)"))
        before = speed[1]  # llama.cpp's defaults with keel's previous thread count
        for label, other in (("keel's adapter / bare llama.cpp, same settings", same), ("keel now / before", before)):
            ratio = keel["prompt_tok_s"] / other["prompt_tok_s"], keel["gen_tok_s"] / other["gen_tok_s"]
            console.print(f"{label}: prompt {ratio[0]:.2f}x, generation {ratio[1]:.2f}x")
    summary: dict[str, Any] = {"speed": speed}
    if not args.skip_rag:
        rag = asyncio.run(rag_rows(args))
        console.print(rag_table(rag))
        if len(rag) == 2:
            console.print(f"rag ask p50, after / before: {rag[1]['p50_s'] / rag[0]['p50_s']:.2f}x")
        summary["rag"] = rag
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
