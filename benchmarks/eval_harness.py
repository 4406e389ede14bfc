"""Eval harness speed (issue 19): 1,000 cases through keel, Inspect and promptfoo against one stub model.

    python benchmarks/eval_harness.py                                  # 1,000 cases, 50 ms, concurrency 16, 2 rounds
    python benchmarks/eval_harness.py --cases 200 --rounds 1           # a quick look
    python benchmarks/eval_harness.py --only keel --rounds 1           # keel alone (e.g. to profile)
    python benchmarks/eval_harness.py --only keel --baseline-src /tmp/old   # keel next to an older tree of it
    python benchmarks/eval_harness.py --json benchmarks/out/eval_harness.json --markdown

The stub is an OpenAI-compatible chat server in its own process (the raw
asyncio protocol of `_stub.py`) that answers every request after a fixed delay
(`--latency-ms`) with "Hello from the stub.", counts the chat requests, the
most it held at once, and the time of the first request and of the last
answer. Each harness runs as its own command, one after the other, on the same
1,000 cases (distinct questions, expected answer the stub's text) at the same
concurrency:

  keel      `keel eval run suite.yaml --json`: a suite with a `prompt` task, an
            `openai` model at the stub, scorer `contains`, `concurrency` C; a
            fresh store (SQLite) and DBOS system database per run.
  inspect   `inspect eval task.py --model openai/gpt-4o-mini --model-base-url
            STUB`: a Task of the same samples, solver generate(), scorer
            includes(), `--max-connections C --max-samples C`, log to a temp dir.
  promptfoo `promptfoo eval` (npm 0.121.20, installed by this script into
            ~/.cache/keel-bench/promptfoo-0.121.20 on first use): provider
            `openai:chat:gpt-4o-mini` with `apiBaseUrl` at the stub, an `equals`
            assertion per test, `--max-concurrency C`, no cache, telemetry,
            update check or sharing; results to its own database in a temp dir.

Per harness: wall time of the command (start to exit, start-up included),
harness overhead per case = (wall - n x latency / C) / n, i.e. what the
command took beyond a perfect harness that keeps C requests in flight from
its first instant to its last (the stub's own figures split it into start-up,
the run between first request and last answer, and the tail), CPU time of
the command's processes per case (os.wait4: the harness and its children),
peak RSS of the process tree (psutil, sampled every 50 ms) and its RSS when
20% and when all of the calls were done (memory flat = the two are close),
the stub's request count (each harness must make exactly n) and the most
requests it held at once (the concurrency the harness really used), and the
cases the harness itself reports as passed. Rounds rotate the harnesses'
order; the table gives medians over rounds.

`--baseline-src DIR` adds a harness `keel-baseline`: the same keel command
with DIR/src first on the path (e.g. `git archive COMMIT | tar -x -C DIR`), in
the same rounds, so that a change is measured before and after under the same
load.

Every socket stays on 127.0.0.1; no API key (each harness gets a fake one).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _stub import OK, StubProtocol, package_version  # noqa: E402

HARNESSES = ("keel", "inspect", "promptfoo")
MODEL = "gpt-4o-mini"
ANSWER = "Hello from the stub."
FAKE_KEY = "sk-bench-0000000000000000000000000000"
PROMPTFOO_VERSION = "0.121.20"  # the last release that runs on Node 20
PROMPTFOO_HOME = Path.home() / ".cache" / "keel-bench" / f"promptfoo-{PROMPTFOO_VERSION}"
GOAL_OVERHEAD_MS = 5.0  # keel's harness overhead per case
GOAL_MEMORY_GROWTH = 0.10  # keel's RSS with all calls done over its RSS at 20% of them, minus one
SAMPLE_S = 0.05


# --- the stub: counts chat requests, in-flight peak, first request and last answer -----------------------


class CountingStub(StubProtocol):
    calls = 0
    in_flight = 0
    max_in_flight = 0
    first_request = 0.0
    last_answer = 0.0

    def _answer(self, response: bytes, *, close: bool) -> None:
        if response is OK:
            cls = CountingStub
            cls.calls += 1
            cls.in_flight += 1
            cls.max_in_flight = max(cls.max_in_flight, cls.in_flight)
            cls.first_request = cls.first_request or time.time()
        super()._answer(response, close=close)

    def _write(self, response: bytes, close: bool) -> None:
        if response is OK:
            CountingStub.in_flight -= 1
            CountingStub.last_answer = time.time()
        super()._write(response, close)


async def serve_stub(delay_ms: float) -> None:
    """The stub's process: READY <port>; a `stats` line on stdin prints the counters, `reset` zeroes them."""
    StubProtocol.delay_s = delay_ms / 1000
    loop = asyncio.get_running_loop()
    server = await loop.create_server(CountingStub, "127.0.0.1", 0, backlog=1024, reuse_address=True)
    stop = asyncio.Event()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    print(f"READY {server.sockets[0].getsockname()[1]}", flush=True)

    async def commands() -> None:
        while line := await reader.readline():
            command = line.decode().strip()
            if command == "reset":
                CountingStub.calls = CountingStub.max_in_flight = 0
                CountingStub.first_request = CountingStub.last_answer = 0.0
            c = CountingStub
            print(json.dumps({"calls": c.calls, "in_flight": c.in_flight, "max_in_flight": c.max_in_flight,
                              "first_request": c.first_request, "last_answer": c.last_answer}), flush=True)  # fmt: skip
        stop.set()  # stdin closed: the benchmark is gone

    task = asyncio.create_task(commands())
    await stop.wait()
    task.cancel()
    server.close()


class Stub:
    """The stub process; `stats()` and `reset()` talk to it over its stdin/stdout (thread-safe)."""

    def __init__(self, delay_ms: float) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "stub", "--latency-ms", str(delay_ms)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert self.process.stdout is not None and self.process.stdin is not None
        line = self.process.stdout.readline()
        if not line.startswith("READY "):
            self.close()
            raise RuntimeError(f"the stub did not start (said {line!r})")
        self.url = f"http://127.0.0.1:{int(line.split()[1])}/v1"
        self._lock = threading.Lock()

    def _ask(self, command: str) -> dict[str, Any]:
        assert self.process.stdout is not None and self.process.stdin is not None
        with self._lock:
            self.process.stdin.write(command + "\n")
            self.process.stdin.flush()
            return dict(json.loads(self.process.stdout.readline()))

    def stats(self) -> dict[str, Any]:
        return self._ask("stats")

    def reset(self) -> dict[str, Any]:
        return self._ask("reset")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                stream.close()


# --- the cases and each harness's files -------------------------------------------------------------------


def cases(n: int) -> list[dict[str, str]]:
    """n distinct questions (no harness can answer one from a cache of another), each expecting the stub's text."""
    return [{"id": f"q{i:05d}", "question": f"Question {i}: say hello to the benchmark.", "answer": ANSWER}
            for i in range(n)]  # fmt: skip


def keel_files(work: Path, url: str, rows: list[dict[str, str]], concurrency: int) -> list[str]:
    """keel.toml, the dataset and the suite; the command that runs it."""
    store = work / "keel.db"
    (work / "keel.toml").write_text(
        f"""default_model = "{MODEL}"

[store]
url = "{store}"

[models.{MODEL}]
provider = "openai"
model = "{MODEL}"
base_url = "{url}"
api_key_env = "KEEL_BENCH_OPENAI_KEY"
""",
        encoding="utf-8",
    )
    with open(work / "cases.jsonl", "w", encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps(row) + "\n")
    suite = {
        "name": "harness-bench",
        "dataset": {"path": "cases.jsonl", "columns": {"input": "question", "expected": "answer", "id": "id"}},
        "task": {"prompt": "{question}", "model": MODEL},
        "scorers": [{"type": "contains", "threshold": 1}],
        "concurrency": concurrency,
    }
    (work / "suite.yaml").write_text(json.dumps(suite, indent=1), encoding="utf-8")  # JSON is YAML
    keel = Path(sys.executable).with_name("keel")
    return [str(keel), "eval", "run", str(work / "suite.yaml"), "--json"]


INSPECT_TASK = '''\
"""The benchmark's task: the same samples, generate(), includes()."""

import json
from pathlib import Path

from inspect_ai import Task, task
from inspect_ai.dataset import Sample
from inspect_ai.scorer import includes
from inspect_ai.solver import generate


@task
def harness_bench() -> Task:
    rows = [json.loads(line) for line in (Path(__file__).parent / "cases.jsonl").read_text().splitlines()]
    samples = [Sample(id=r["id"], input=r["question"], target=r["answer"]) for r in rows]
    return Task(dataset=samples, solver=generate(), scorer=includes())
'''


def inspect_files(work: Path, url: str, rows: list[dict[str, str]], concurrency: int) -> list[str]:
    with open(work / "cases.jsonl", "w", encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps(row) + "\n")
    (work / "task.py").write_text(INSPECT_TASK, encoding="utf-8")
    inspect = Path(sys.executable).with_name("inspect")
    return [str(inspect), "eval", "task.py", "--model", f"openai/{MODEL}", "--model-base-url", url,
            "--max-connections", str(concurrency), "--max-samples", str(concurrency), "--display", "none",
            "--log-dir", str(work / "logs")]  # fmt: skip


def promptfoo_files(work: Path, url: str, rows: list[dict[str, str]], concurrency: int) -> list[str]:
    config = {
        "description": "harness-bench",
        "prompts": ["{{question}}"],
        "providers": [{"id": f"openai:chat:{MODEL}", "config": {"apiBaseUrl": url, "apiKey": FAKE_KEY}}],
        "tests": [
            {"vars": {"question": r["question"]}, "assert": [{"type": "equals", "value": r["answer"]}]} for r in rows
        ],
    }
    (work / "promptfooconfig.yaml").write_text(json.dumps(config), encoding="utf-8")  # JSON is YAML
    return ["node", str(promptfoo_bin()), "eval", "-c", str(work / "promptfooconfig.yaml"), "--no-cache",
            "--max-concurrency", str(concurrency), "--no-table", "--no-progress-bar",
            "-o", str(work / "results.json")]  # fmt: skip


def promptfoo_bin() -> Path:
    return PROMPTFOO_HOME / "node_modules" / "promptfoo" / "dist" / "src" / "entrypoint.js"


def install_promptfoo() -> None:
    """promptfoo from npm into a cache dir, once (about a minute)."""
    if promptfoo_bin().exists():
        return
    if shutil.which("npm") is None:
        raise SystemExit("promptfoo needs node and npm (apt-get install nodejs npm), or leave it out: --harnesses")
    PROMPTFOO_HOME.mkdir(parents=True, exist_ok=True)
    (PROMPTFOO_HOME / "package.json").write_text('{"name": "keel-bench-promptfoo", "private": true}\n')
    print(f"installing promptfoo {PROMPTFOO_VERSION} into {PROMPTFOO_HOME} ...", file=sys.stderr, flush=True)
    subprocess.run(["npm", "install", "--no-audit", "--no-fund", f"promptfoo@{PROMPTFOO_VERSION}"],
                   cwd=PROMPTFOO_HOME, check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    if not promptfoo_bin().exists():
        raise SystemExit(f"npm installed promptfoo but {promptfoo_bin()} is missing: look into {PROMPTFOO_HOME}")


BASELINE = "keel-baseline"
baseline_src: Path | None = None  # --baseline-src: the tree whose src/ the keel-baseline harness runs


def environment(name: str, work: Path) -> dict[str, str]:
    """The harness's environment: the caller's minus anything that would send it elsewhere, plus fake keys."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KEEL_", "OPENAI_", "INSPECT_", "PROMPTFOO_"))}
    env.update(HOME=str(work / "home"), OPENAI_API_KEY=FAKE_KEY, NO_COLOR="1", TERM="dumb")
    (work / "home").mkdir(exist_ok=True)
    if name in ("keel", BASELINE):
        env.update(KEEL_CONFIG=str(work / "keel.toml"), KEEL_BENCH_OPENAI_KEY=FAKE_KEY)
        src = baseline_src / "src" if name == BASELINE and baseline_src else HERE.parent / "src"
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(src), env.get("PYTHONPATH", "")]))
    elif name == "inspect":
        env.update(INSPECT_LOG_LEVEL="warning", INSPECT_DISPLAY="none")
    else:
        env.update(
            PROMPTFOO_DISABLE_TELEMETRY="1", PROMPTFOO_DISABLE_UPDATE="1", PROMPTFOO_DISABLE_SHARING="1",
            PROMPTFOO_CACHE_ENABLED="false", PROMPTFOO_CONFIG_DIR=str(work / "promptfoo"),
            PROMPTFOO_DISABLE_REDTEAM_REMOTE_GENERATION="1", PROMPTFOO_SELF_HOSTED="1", LOG_LEVEL="warn",
        )  # fmt: skip
    return env


def passed(name: str, work: Path, stdout: str) -> int | None:
    """How many cases the harness itself says passed (None: its output could not be read)."""
    try:
        if name in ("keel", BASELINE):
            summary = json.loads(stdout)[0]
            return round(summary["pass_rate"] * summary["cases"])
        if name == "inspect":
            from inspect_ai.log import list_eval_logs, read_eval_log

            log = read_eval_log(list_eval_logs(str(work / "logs"))[0], header_only=True)
            assert log.results is not None
            accuracy = log.results.scores[0].metrics["accuracy"].value
            return round(accuracy * log.results.completed_samples)
        data = json.loads((work / "results.json").read_text())
        return int(data["results"]["stats"]["successes"])
    except Exception as exc:  # reported as "?": the run's other figures still stand
        print(f"{name}: cannot read its results: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None


# --- one measured run -------------------------------------------------------------------------------------


@dataclass
class Result:
    harness: str
    round: int
    wall_s: float
    startup_s: float  # command start to the stub's first request
    run_s: float  # first request to last answer
    tail_s: float  # last answer to the command's exit
    overhead_ms: float  # (wall - n * latency / C) / n
    run_overhead_ms: float  # the same for the run alone: (run - n * latency / C) / n
    cpu_ms: float  # user + system CPU of the command's processes per case
    peak_rss_mb: float
    rss_at_20_mb: float
    rss_at_end_mb: float
    calls: int
    max_in_flight: int
    passed: int | None
    exit_code: int
    samples: list[tuple[float, float, int]] = field(default_factory=list, repr=False)  # (t, rss MB, calls)


def tree_rss(process: Any) -> float:
    import psutil

    total = 0
    try:
        procs = [process, *process.children(recursive=True)]
    except psutil.Error:
        return 0.0
    for p in procs:
        with contextlib.suppress(psutil.Error):  # exited between the listing and the read
            total += p.memory_info().rss
    return total / 2**20


def measure(name: str, rnd: int, stub: Stub, n: int, latency_ms: float, concurrency: int, keep: Path | None) -> Result:
    import psutil

    work = Path(tempfile.mkdtemp(prefix=f"keel-evalbench-{name}-", dir=keep))
    files = {"keel": keel_files, BASELINE: keel_files, "inspect": inspect_files, "promptfoo": promptfoo_files}[name]
    command = files(work, stub.url, cases(n), concurrency)
    env = environment(name, work)
    stub.reset()
    out, err = open(work / "stdout.txt", "w+"), open(work / "stderr.txt", "w+")  # noqa: SIM115 - the child writes
    start = time.time()
    proc = subprocess.Popen(command, cwd=work, env=env, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
    ps = psutil.Process(proc.pid)
    samples: list[tuple[float, float, int]] = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(SAMPLE_S):
            rss = tree_rss(ps)
            if rss:
                samples.append((time.time() - start, rss, stub.stats()["calls"]))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.time() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    done.set()
    sampler.join()
    stats = stub.stats()
    out.seek(0)
    stdout = out.read()
    out.close()
    err.close()
    if proc.returncode != 0:
        tail = (work / "stderr.txt").read_text()[-3000:] or stdout[-3000:]
        print(f"{name} exited with {proc.returncode} (files in {work}):\n{tail}", file=sys.stderr)
    ideal = n * latency_ms / 1000 / concurrency
    first, last = stats["first_request"] or start, stats["last_answer"] or start
    at_20 = next((rss for _, rss, calls in samples if calls >= 0.2 * n), 0.0)
    at_end = next((rss for _, rss, calls in samples if calls >= n), samples[-1][1] if samples else 0.0)
    result = Result(
        harness=name, round=rnd, wall_s=wall, startup_s=first - start, run_s=last - first, tail_s=start + wall - last,
        overhead_ms=(wall - ideal) / n * 1000, run_overhead_ms=(last - first - ideal) / n * 1000,
        cpu_ms=(usage.ru_utime + usage.ru_stime) / n * 1000, peak_rss_mb=max((s[1] for s in samples), default=0.0),
        rss_at_20_mb=at_20, rss_at_end_mb=at_end, calls=stats["calls"], max_in_flight=stats["max_in_flight"],
        passed=passed(name, work, stdout), exit_code=proc.returncode, samples=samples,
    )  # fmt: skip
    if keep is None and proc.returncode == 0:
        shutil.rmtree(work, ignore_errors=True)
    return result


# --- reporting --------------------------------------------------------------------------------------------

COLUMNS = [
    ("harness", "harness", "{}"), ("wall_s", "wall s", "{:.2f}"), ("startup_s", "start-up s", "{:.2f}"),
    ("run_s", "run s", "{:.2f}"), ("tail_s", "tail s", "{:.2f}"), ("overhead_ms", "overhead ms/case", "{:.2f}"),
    ("run_overhead_ms", "in-run ms/case", "{:.2f}"), ("cpu_ms", "CPU ms/case", "{:.2f}"),
    ("peak_rss_mb", "peak RSS MB", "{:.0f}"), ("rss_at_20_mb", "RSS@20% MB", "{:.0f}"),
    ("rss_at_end_mb", "RSS@100% MB", "{:.0f}"), ("calls", "stub calls", "{}"), ("max_in_flight", "max in flight", "{}"),
    ("passed", "passed", "{}"),
]  # fmt: skip


def medians(results: list[Result]) -> list[dict[str, Any]]:
    rows = []
    for name in dict.fromkeys(r.harness for r in results):
        mine = [r for r in results if r.harness == name]
        row: dict[str, Any] = {"harness": name, "rounds": len(mine)}
        for key, _, _ in COLUMNS[1:]:
            values = [getattr(r, key) for r in mine]
            if key in ("calls", "max_in_flight", "passed"):
                row[key] = "/".join(str(v) for v in dict.fromkeys(values))  # every round's, not a median
            else:
                row[key] = statistics.median(values)
        rows.append(row)
    return rows


def table(rows: list[dict[str, Any]], markdown: bool) -> str:
    cells = [[fmt.format(row[key]) if not isinstance(row[key], str) else row[key] for key, _, fmt in COLUMNS]
             for row in rows]  # fmt: skip
    heads = [head for _, head, _ in COLUMNS]
    if markdown:
        lines = ["| " + " | ".join(heads) + " |", "| --- |" + " ---: |" * (len(heads) - 1)]
        return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in cells])
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(heads)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(heads, widths, strict=True))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(cell, widths, strict=True)) for cell in cells]
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    load = os.getloadavg()
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "nproc": os.cpu_count(),
        "load_average": [round(x, 2) for x in load], "python": platform.python_version(),
        "platform": platform.platform(), "node": _output(["node", "--version"]),
        "versions": {**{p: package_version(p) for p in ("keel", "inspect-ai", "dbos", "openai")},
                     "promptfoo": PROMPTFOO_VERSION},
        "git": _output(["git", "-C", str(HERE.parent), "rev-parse", "--short", "HEAD"]),
    }  # fmt: skip


def _output(command: list[str]) -> str:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=10).stdout.strip() or "-"
    except (OSError, subprocess.SubprocessError):
        return "-"


def goals(rows: list[dict[str, Any]], n: int) -> list[tuple[str, bool]]:
    by = {r["harness"]: r for r in rows}
    keel = by.get("keel")
    if keel is None:
        return []
    checks = [(f"keel's overhead {keel['overhead_ms']:.2f} ms/case < {GOAL_OVERHEAD_MS:g}",
               keel["overhead_ms"] < GOAL_OVERHEAD_MS)]  # fmt: skip
    others = [r for r in rows if r["harness"] not in ("keel", BASELINE)]
    if others:
        lowest = min(others, key=lambda r: r["overhead_ms"])
        checks.append((f"keel's overhead lowest (next: {lowest['harness']} {lowest['overhead_ms']:.2f})",
                       keel["overhead_ms"] < lowest["overhead_ms"]))  # fmt: skip
    growth = keel["rss_at_end_mb"] / keel["rss_at_20_mb"] - 1 if keel["rss_at_20_mb"] else float("inf")
    checks.append((f"keel's memory flat: RSS {growth:+.1%} from 20% to 100% of the calls (<= {GOAL_MEMORY_GROWTH:.0%})",
                   growth <= GOAL_MEMORY_GROWTH))  # fmt: skip
    for row in rows:
        checks.append((f"{row['harness']} made exactly {n} model calls ({row['calls']})", row["calls"] == str(n)))
    return checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command")
    stub = sub.add_parser("stub", help="(internal) run the counting stub")
    stub.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--cases", type=int, default=1000, help="cases per harness (default 1000)")
    parser.add_argument("--latency-ms", type=float, default=50.0, help="the stub's fixed latency (default 50)")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight, every harness (default 16)")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each harness, order rotated (default 2)")
    parser.add_argument("--harnesses", "--only", nargs="+", choices=HARNESSES, default=list(HARNESSES),
                        help="which harnesses (default: all three); `--only keel` for quick iterations")
    parser.add_argument("--baseline-src", type=Path,
                        help="also run keel from this tree's src/ (harness keel-baseline), in the same rounds")
    parser.add_argument("--json", type=Path, help="write every run's figures and the machine here")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    parser.add_argument("--keep", type=Path, help="keep each run's files (suite, logs, databases) under this dir")
    args = parser.parse_args()
    if args.command == "stub":
        asyncio.run(serve_stub(args.latency_ms))
        return
    for flag in ("cases", "concurrency", "rounds"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be at least 1")
    if args.latency_ms < 0:
        parser.error("--latency-ms cannot be negative")
    if args.baseline_src is not None:
        if not (args.baseline_src / "src" / "keel").is_dir():
            parser.error(f"--baseline-src: {args.baseline_src}/src/keel is not a keel source tree")
        global baseline_src
        baseline_src = args.baseline_src.resolve()
        args.harnesses = [*args.harnesses, BASELINE]
    if "promptfoo" in args.harnesses:
        install_promptfoo()
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
    info = machine()
    print(f"{args.cases} cases, latency {args.latency_ms:g} ms, concurrency {args.concurrency}, {args.rounds} rounds;"
          f" {info['date']}, {info['nproc']} CPUs, load {info['load_average']}, git {info['git']}",
          flush=True)  # fmt: skip
    results: list[Result] = []
    stub_process = Stub(args.latency_ms)
    try:
        for rnd in range(args.rounds):
            order = args.harnesses[rnd % len(args.harnesses) :] + args.harnesses[: rnd % len(args.harnesses)]
            for name in order:
                r = measure(name, rnd, stub_process, args.cases, args.latency_ms, args.concurrency, args.keep)
                results.append(r)
                print(f"  round {rnd + 1} {name}: wall {r.wall_s:.2f} s, overhead {r.overhead_ms:.2f} ms/case,"
                      f" CPU {r.cpu_ms:.2f} ms/case, peak RSS {r.peak_rss_mb:.0f} MB, calls {r.calls},"
                      f" max in flight {r.max_in_flight}, passed {r.passed}, exit {r.exit_code}",
                      flush=True)  # fmt: skip
    finally:
        stub_process.close()
    rows = medians(results)
    info["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    print(f"\nload average at the end: {info['load_average_after']}")
    print(table(rows, args.markdown))
    print(f"\nideal wall (n x latency / C): {args.cases * args.latency_ms / 1000 / args.concurrency:.2f} s")
    checks = goals(rows, args.cases)
    for text, ok in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {text}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "machine": info, "args": {k: str(v) for k, v in vars(args).items()}, "medians": rows,
            "runs": [asdict(r) for r in results],
        }, indent=1))  # fmt: skip
    sys.exit(0 if all(ok for _, ok in checks) and all(r.exit_code == 0 for r in results) else 1)


if __name__ == "__main__":
    main()
