"""Gateway overhead (issue 2): what keel adds to a model call, next to the SDK and LiteLLM.

One run starts a local OpenAI-compatible stub (its own process, a fixed small
answer, no sleep) and measures, against that same stub, calls per second and
per-call latency (p50, p99) at each concurrency for:

  openai   the openai SDK's AsyncOpenAI, called directly: the floor
  keel     `Gateway.chat` with the full wrapper stack on: tracing to SQLite
           (content captured), rpm/tpm limits (set too high to trigger, so the
           code runs), retry (max_retries=2), circuit breaker, timeout, cost
  litellm  `litellm.acompletion` with its defaults (offline cost map, no callbacks)

"Added overhead" is a client's latency minus the openai SDK's at the same
percentile in the same round. The machine is small and shared, so within a
round the clients take turns in blocks of calls (rotating order), each round
starts with a different client, and the table shows medians over rounds. CPU
ms per call (the whole benchmark process, the span writer thread included; the
stub is another process) is shown too: it moves less than wall time when other
tenants load the machine.
The goal checks read concurrency 1, where latency is per-call cost and not
queueing. After the run the keel store must hold one span per keel call, the
span writer must have failed none, and its queue must have stayed bounded.

    .venv/bin/python benchmarks/gateway_overhead.py
    .venv/bin/python benchmarks/gateway_overhead.py --calls 500 1000 --rounds 1 --json /tmp/overhead.json

Every socket stays on 127.0.0.1: a guard refuses (and counts) any other connect.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import gc
import json
import math
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _stub import StubProcess, package_version

MODEL = "gpt-4o-mini"
FAKE_KEY_ENV = "KEEL_BENCH_OPENAI_KEY"
FAKE_KEY = "sk-bench-0000000000000000000000000000"
EXPECTED_TEXT = "Hello from the stub."
MESSAGES = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "Say hello to the benchmark in five words."},
]
CLIENTS = ("openai", "keel", "litellm")
# keel with parts switched off, to see where its overhead goes (not run unless named in --clients)
KEEL_VARIANTS: dict[str, dict[str, Any]] = {
    "keel-notrace": {"trace": False},  # store=False: spans are built and redacted but not written
    "keel-nolimits": {"limits": False},  # no rpm/tpm: no limiter and no token count for it
    "keel-bare": {"trace": False, "limits": False, "retries": 0},  # still Retry/Circuit/Timeout/Deployment
}
ALL_CLIENTS = (*CLIENTS, *KEEL_VARIANTS)
GOAL_ADDED_P50_MS = 1.0
GOAL_RATIO_TO_LITELLM = 1 / 3


# --- network guard -------------------------------------------------------------------

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
blocked: list[str] = []


def _guard_network() -> None:
    """Refuse every connect and name lookup that is not loopback (and remember it)."""
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex
    real_getaddrinfo = socket.getaddrinfo

    def allowed(address: Any) -> bool:
        return not isinstance(address, tuple) or str(address[0]) in LOOPBACK

    def refuse(what: str) -> OSError:
        blocked.append(what)
        return OSError(errno.ENETUNREACH, f"benchmark network guard: {what} is not loopback")

    def connect(self: socket.socket, address: Any) -> None:
        if not allowed(address):
            raise refuse(f"connect {address!r}")
        real_connect(self, address)

    def connect_ex(self: socket.socket, address: Any) -> int:
        if not allowed(address):
            raise refuse(f"connect {address!r}")
        return real_connect_ex(self, address)

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        name = host.decode() if isinstance(host, bytes) else host
        if name is not None and str(name) not in LOOPBACK:
            raise refuse(f"getaddrinfo {name!r}")
        return real_getaddrinfo(host, *args, **kwargs)

    socket.socket.connect = connect  # type: ignore[method-assign]
    socket.socket.connect_ex = connect_ex  # type: ignore[method-assign]
    socket.getaddrinfo = getaddrinfo


# --- the three clients ---------------------------------------------------------------


class Client:
    """One way of making the same chat call against the stub."""

    name = ""

    async def setup(self) -> None:
        """Build the client and check one answer."""

    async def call(self) -> None:
        raise NotImplementedError

    def observe(self) -> None:
        """Called after every timed call, outside the timed window."""

    async def settle(self) -> dict[str, Any]:
        """After a measurement, outside the timed window; returns facts to record."""
        return {}

    async def aclose(self) -> None:
        pass


class OpenAIClient(Client):
    name = "openai"

    def __init__(self, url: str) -> None:
        import openai

        self.client = openai.AsyncOpenAI(api_key=FAKE_KEY, base_url=url, max_retries=0)

    async def setup(self) -> None:
        raw = await self.client.chat.completions.create(model=MODEL, messages=MESSAGES)  # type: ignore[arg-type]
        _expect(raw.choices[0].message.content, "openai")

    async def call(self) -> None:
        await self.client.chat.completions.create(model=MODEL, messages=MESSAGES)  # type: ignore[arg-type]

    async def aclose(self) -> None:
        await self.client.close()


def keel_toml(url: str, store: Path, *, limits: bool = True, retries: int = 2) -> str:
    limit_lines = "rpm = 10_000_000\ntpm = 10_000_000_000\n" if limits else ""
    return f"""\
default_model = "{MODEL}"
max_retries = {retries}

[store]
url = "{store}"

[tracing]
capture_content = true

[models.{MODEL}]
provider = "openai"
model = "{MODEL}"
base_url = "{url}"
api_key_env = "{FAKE_KEY_ENV}"
{limit_lines}max_retries = {retries}
"""


class KeelClient(Client):
    name = "keel"

    def __init__(
        self, url: str, workdir: Path, name: str = "keel", *, trace: bool = True, limits: bool = True, retries: int = 2
    ) -> None:
        from keel import Gateway
        from keel.config import load_config

        self.name = name
        os.environ[FAKE_KEY_ENV] = FAKE_KEY
        home = workdir / name
        home.mkdir(parents=True, exist_ok=True)
        self.db = home / "keel.db"
        path = home / "keel.toml"
        path.write_text(keel_toml(url, self.db, limits=limits, retries=retries), encoding="utf-8")
        config = load_config(path, environ={})  # no KEEL_* overrides from the caller's shell
        self.gateway = Gateway(config, store=str(self.db) if trace else False)
        self.writer = self.gateway.tracer.writer
        self.max_queue = config.tracing.max_queue
        self.calls = 0
        self.max_pending = 0
        self.stack: list[str] = []

    async def setup(self) -> None:
        result = await self.gateway.chat(MESSAGES, model=MODEL)
        self.calls += 1
        _expect(result.text, "keel")
        if not result.cost_usd:
            raise RuntimeError(f"keel computed no cost for {MODEL}: the cost step would not be measured")
        deployment = self.gateway.deployment(MODEL)
        self.stack = _stack(deployment)

    async def call(self) -> None:
        await self.gateway.chat(MESSAGES, model=MODEL)
        self.calls += 1

    def observe(self) -> None:
        if self.writer is None:
            return
        pending = self.writer.pending
        if pending > self.max_pending:
            self.max_pending = pending

    async def settle(self) -> dict[str, Any]:
        if self.writer is None:
            return {}
        pending = self.writer.pending
        started = time.perf_counter()
        flushed = await asyncio.to_thread(self.gateway.flush, 60.0)
        flush_ms = round((time.perf_counter() - started) * 1000, 2)
        return {"pending_at_end": pending, "flush_ms": flush_ms, "flushed": flushed}

    def count_spans(self) -> int:
        assert self.gateway.store is not None
        with self.gateway.store.transaction() as cur:
            cur.execute("SELECT COUNT(*) FROM spans")
            return int(cur.fetchone()[0])

    async def aclose(self) -> None:
        await self.gateway.aclose()


def _stack(model: Any) -> list[str]:
    names = []
    while model is not None:
        names.append(type(model).__name__)
        model = getattr(model, "inner", None)
    return names


class LiteLLMClient(Client):
    name = "litellm"

    def __init__(self, url: str) -> None:
        self.url = url
        self.litellm = quiet_litellm()

    async def setup(self) -> None:
        raw = await self._call()
        _expect(raw.choices[0].message.content, "litellm")

    def _call(self) -> Awaitable[Any]:
        return self.litellm.acompletion(  # type: ignore[no-any-return]
            model=f"openai/{MODEL}", messages=MESSAGES, api_base=self.url, api_key=FAKE_KEY
        )

    async def call(self) -> None:
        await self._call()


def quiet_litellm() -> Any:
    """Import litellm with its bundled cost map, no telemetry, no callbacks, no logging."""
    for name, value in {
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # else it downloads the cost map at import
        "LITELLM_OFFLINE_MODE": "true",  # every catalog it would fetch by itself comes from the package
        "LITELLM_LOCAL_ANTHROPIC_BETA_HEADERS": "True",
        "LITELLM_LOCAL_BLOG_POSTS": "True",
        "LITELLM_LOG": "ERROR",
        "LITELLM_TELEMETRY": "False",
    }.items():
        os.environ[name] = value
    import litellm

    litellm.telemetry = False  # gone from recent versions; harmless where it is
    litellm.suppress_debug_info = True
    litellm.set_verbose = False
    litellm.turn_off_message_logging = True
    litellm.success_callback = []
    litellm.failure_callback = []
    litellm.callbacks = []
    return litellm


def _expect(text: str | None, who: str) -> None:
    if text != EXPECTED_TEXT:
        raise RuntimeError(f"{who} answered {text!r}, not the stub's {EXPECTED_TEXT!r}")


# --- measuring -------------------------------------------------------------------------


@dataclass
class Sample:
    round: int
    client: str
    concurrency: int
    calls: int
    wall_s: float
    calls_per_s: float
    p50_ms: float
    p99_ms: float
    mean_ms: float
    cpu_ms_per_call: float  # process CPU (all threads; the stub is another process) / calls
    extra: dict[str, Any] = field(default_factory=dict)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[rank - 1]


async def run_calls(client: Client, concurrency: int, calls: int) -> tuple[list[float], float]:
    """`calls` calls from `concurrency` workers; per-call latencies (ms) and wall time (s)."""
    latencies = [0.0] * calls
    issued = 0
    call, observe, clock = client.call, client.observe, time.perf_counter_ns

    async def worker() -> None:
        nonlocal issued
        while issued < calls:
            index = issued
            issued += 1
            started = clock()
            await call()
            latencies[index] = (clock() - started) / 1e6
            observe()

    started = clock()
    await asyncio.gather(*(worker() for _ in range(min(concurrency, calls))))
    return latencies, (clock() - started) / 1e9


@dataclass
class _Tally:
    """One client's calls in one round, gathered over its interleaved blocks."""

    latencies: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    cpu_s: float = 0.0
    max_pending_at_end: int = 0
    flush_ms: float = 0.0


def blocks_of(calls: int, size: int) -> list[int]:
    full, rest = divmod(calls, size)
    return [size] * full + ([rest] if rest else [])


async def measure_round(
    clients: dict[str, Client], order: list[str], round_: int, concurrency: int, calls: int, warmup: int, block: int
) -> list[Sample]:
    """All clients at one concurrency, interleaved in blocks so they share the machine's ups and downs.

    Each block's client order rotates. CPU time covers the block and the
    settling after it (for keel: draining the span writer), so tracing work
    done in the background is charged to keel.
    """
    gc.collect()
    for name in order:
        await run_calls(clients[name], concurrency, warmup)
        await clients[name].settle()
    tallies = {name: _Tally() for name in order}
    gc.collect()
    for index, size in enumerate(blocks_of(calls, block)):
        for name in order_for(index, order):
            client, tally = clients[name], tallies[name]
            cpu_started = time.process_time()
            latencies, wall = await run_calls(client, concurrency, size)
            settled = await client.settle()
            tally.cpu_s += time.process_time() - cpu_started
            tally.latencies += latencies
            tally.wall_s += wall
            tally.max_pending_at_end = max(tally.max_pending_at_end, settled.get("pending_at_end", 0))
            tally.flush_ms += settled.get("flush_ms", 0.0)
    return [_sample(round_, name, concurrency, tally) for name, tally in tallies.items()]


def _sample(round_: int, name: str, concurrency: int, tally: _Tally) -> Sample:
    latencies = sorted(tally.latencies)
    calls = len(latencies)
    extra = {"max_pending_at_block_end": tally.max_pending_at_end, "flush_ms": round(tally.flush_ms, 2)}
    return Sample(
        round=round_, client=name, concurrency=concurrency, calls=calls, wall_s=round(tally.wall_s, 4),
        calls_per_s=round(calls / tally.wall_s, 1), p50_ms=round(percentile(latencies, 0.50), 4),
        p99_ms=round(percentile(latencies, 0.99), 4), mean_ms=round(statistics.fmean(latencies), 4),
        cpu_ms_per_call=round(tally.cpu_s * 1000 / calls, 4), extra=extra if name.startswith("keel") else {},
    )  # fmt: skip


def order_for(index: int, names: Sequence[str]) -> list[str]:
    """Rotation `index` of the clients: with three clients each is first, middle and last once in three."""
    shift = index % len(names)
    return [*names[shift:], *names[:shift]]


# --- summarising ---------------------------------------------------------------------


def summarise(samples: list[Sample], names: Sequence[str], levels: Sequence[int]) -> list[dict[str, Any]]:
    """Medians over rounds; added latency is taken against the openai SDK within each round."""
    rows = []
    for concurrency in levels:
        base = {s.round: s for s in samples if s.client == "openai" and s.concurrency == concurrency}
        for name in names:
            mine = [s for s in samples if s.client == name and s.concurrency == concurrency]
            if not mine:
                continue
            row: dict[str, Any] = {
                "client": name,
                "concurrency": concurrency,
                "rounds": len(mine),
                "calls_per_s": round(statistics.median(s.calls_per_s for s in mine), 1),
                "p50_ms": round(statistics.median(s.p50_ms for s in mine), 3),
                "p99_ms": round(statistics.median(s.p99_ms for s in mine), 3),
                "added_p50_ms": None,
                "added_p99_ms": None,
                "cpu_ms_per_call": round(statistics.median(s.cpu_ms_per_call for s in mine), 3),
            }
            paired = [(s, base[s.round]) for s in mine if s.round in base]
            if paired and name != "openai":
                row["added_p50_ms"] = round(statistics.median(s.p50_ms - b.p50_ms for s, b in paired), 3)
                row["added_p99_ms"] = round(statistics.median(s.p99_ms - b.p99_ms for s, b in paired), 3)
                row["added_p50_per_round_ms"] = [round(s.p50_ms - b.p50_ms, 3) for s, b in paired]
            rows.append(row)
    return rows


def goal_checks(rows: list[dict[str, Any]], level: int) -> list[dict[str, Any]]:
    found = {(r["client"], r["concurrency"]): r for r in rows}
    keel, litellm = found.get(("keel", level)), found.get(("litellm", level))
    checks = []
    if keel is not None and keel["added_p50_ms"] is not None:
        added = keel["added_p50_ms"]
        checks.append({
            "goal": f"keel added p50 <= {GOAL_ADDED_P50_MS:g} ms (concurrency {level})",
            "passed": added <= GOAL_ADDED_P50_MS,
            "detail": f"keel adds {added:.3f} ms (per round: {keel.get('added_p50_per_round_ms')})",
        })  # fmt: skip
        if litellm is not None and litellm["added_p50_ms"] is not None:
            limit = litellm["added_p50_ms"] * GOAL_RATIO_TO_LITELLM
            ratio = added / litellm["added_p50_ms"] if litellm["added_p50_ms"] > 0 else math.inf
            checks.append({
                "goal": f"keel added p50 <= 1/3 of litellm's (concurrency {level})",
                "passed": added <= limit,
                "detail": f"keel {added:.3f} ms vs litellm {litellm['added_p50_ms']:.3f} ms "
                f"(ratio {ratio:.2f}, limit {limit:.3f} ms)",
            })  # fmt: skip
    return checks


def tracing_checks(keel: KeelClient, spans: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    assert keel.writer is not None
    facts = {
        "keel_calls": keel.calls,
        "spans_stored": spans,
        "writer_failed": keel.writer.failed,
        "max_pending": keel.max_pending,
        "max_queue": keel.max_queue,
        "pending_after_flush": keel.writer.pending,
        "stack": keel.stack,
    }
    checks = [
        {"goal": "tracing: one stored span per keel call", "passed": spans == keel.calls,
         "detail": f"{spans} spans for {keel.calls} calls"},
        {"goal": "tracing: no span failed to store", "passed": keel.writer.failed == 0,
         "detail": f"writer.failed = {keel.writer.failed}"},
        {"goal": "tracing: queue stayed below its bound", "passed": keel.max_pending < keel.max_queue,
         "detail": f"max pending {keel.max_pending} of max_queue {keel.max_queue}"},
    ]  # fmt: skip
    return facts, checks


# --- the machine -------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {p: package_version(p) for p in ("keel", "openai", "litellm", "httpx", "aiohttp")},
        "git": _git_head(),
    }


def _prompt_tokens() -> int | None:
    """Input tokens of the benchmark's request (o200k_base with chat framing), for the record."""
    try:
        from keel import tokens
        from keel.types import ChatRequest, parse_messages

        return tokens.request_tokens(ChatRequest(MODEL, parse_messages(MESSAGES)), "o200k_base")
    except Exception:  # the figure is informative only
        return None


def _git_head() -> str:
    try:
        command = ["git", "rev-parse", "--short", "HEAD"]
        out = subprocess.run(command, cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "-"
    except (OSError, subprocess.SubprocessError):
        return "-"


# --- output -----------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def print_report(rows: list[dict[str, Any]], checks: list[dict[str, Any]], facts: dict[str, Any] | None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 110))
    table = Table(title="Gateway overhead: medians over rounds (added = client - openai SDK, same round)")
    columns = ("client", "concurrency", "calls/s", "p50 ms", "p99 ms", "added p50 ms", "added p99 ms", "CPU ms/call")
    for column in columns:
        table.add_column(column, justify="left" if column == "client" else "right")
    for r in rows:
        table.add_row(
            r["client"], str(r["concurrency"]), f"{r['calls_per_s']:.0f}", _ms(r["p50_ms"]), _ms(r["p99_ms"]),
            _ms(r["added_p50_ms"]), _ms(r["added_p99_ms"]), _ms(r["cpu_ms_per_call"]),
        )  # fmt: skip
    console.print(table)
    if facts:
        console.print(
            f"keel tracing: {facts['spans_stored']} spans for {facts['keel_calls']} calls, "
            f"writer.failed={facts['writer_failed']}, max pending {facts['max_pending']} of {facts['max_queue']}; "
            f"stack: {' > '.join(facts['stack'])}"
        )
    if blocked:
        console.print(f"[red]network guard refused {len(blocked)} non-loopback attempts: {blocked[:5]}[/red]")
    for check in checks:
        mark = "[green]PASS[/green]" if check["passed"] else "[red]FAIL[/red]"
        console.print(f"{mark} {check['goal']}: {check['detail']}")


def progress(s: Sample) -> str:
    return (
        f"  round {s.round + 1} c={s.concurrency:<3} {s.client:<8} {s.calls_per_s:8.0f} calls/s  "
        f"p50 {s.p50_ms:7.3f} ms  p99 {s.p99_ms:8.3f} ms  cpu {s.cpu_ms_per_call:.3f} ms/call"
    )


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| client | concurrency | calls/s | p50 ms | p99 ms | added p50 ms | added p99 ms | CPU ms/call |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['client']} | {r['concurrency']} | {r['calls_per_s']:.0f} | {_ms(r['p50_ms'])} | {_ms(r['p99_ms'])} "
            f"| {_ms(r['added_p50_ms'])} | {_ms(r['added_p99_ms'])} | {_ms(r['cpu_ms_per_call'])} |"
        )
    return "\n".join(lines)


# --- main ----------------------------------------------------------------------------------


@dataclass
class Options:
    calls: dict[int, int]
    levels: list[int]
    rounds: int
    warmup: int
    block: int
    clients: list[str]
    stub: str


def _keel_variant(url: str, workdir: Path, name: str) -> Callable[[], Client]:
    return lambda: KeelClient(url, workdir, name, **KEEL_VARIANTS[name])


async def run(
    options: Options, url: str, workdir: Path
) -> tuple[list[Sample], dict[str, Any] | None, list[dict[str, Any]]]:
    """Every measurement, then the tracing checks; closes the clients."""
    makers: dict[str, Callable[[], Client]] = {
        "openai": lambda: OpenAIClient(url),
        "keel": lambda: KeelClient(url, workdir),
        **{name: _keel_variant(url, workdir, name) for name in KEEL_VARIANTS},
        "litellm": lambda: LiteLLMClient(url),
    }
    clients: dict[str, Client] = {}
    samples: list[Sample] = []
    try:
        for name in options.clients:
            clients[name] = makers[name]()
            await clients[name].setup()
        for round_ in range(options.rounds):
            for level in options.levels:
                block = max(options.block, 16 * level)
                order = order_for(round_, options.clients)
                measured = await measure_round(
                    clients, order, round_, level, options.calls[level], options.warmup, block
                )
                for sample in measured:
                    print(progress(sample), file=sys.stderr, flush=True)
                samples += measured
        keel = clients.get("keel")
        if isinstance(keel, KeelClient):
            await asyncio.to_thread(keel.gateway.flush, 60.0)
            facts, checks = tracing_checks(keel, keel.count_spans())
            return samples, facts, checks
        return samples, None, []
    finally:
        for client in clients.values():
            await client.aclose()


def parse_args(argv: Sequence[str] | None = None) -> tuple[Options, argparse.Namespace]:
    parser = argparse.ArgumentParser(
        description="keel's per-call overhead next to the openai SDK and LiteLLM, against a local stub.",
        epilog="example: .venv/bin/python benchmarks/gateway_overhead.py --calls 2000 5000 --json /tmp/overhead.json",
    )
    parser.add_argument(
        "--calls", type=int, nargs="+", default=None,
        help="timed calls per client and round: one value, or one per concurrency (default 2000 at 1, 5000 above)",
    )  # fmt: skip
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 64], help="concurrency levels (default 1 64)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, each in a different client order (default 3)")
    parser.add_argument("--warmup", type=int, default=200, help="discarded calls before each measurement (default 200)")
    parser.add_argument("--block", type=int, default=250,
                        help="calls per interleaved block (at least 16 x concurrency; default 250)")  # fmt: skip
    parser.add_argument(
        "--clients", nargs="+", choices=ALL_CLIENTS, default=list(CLIENTS),
        help="default: openai keel litellm; the keel-* variants switch parts of keel off to locate its overhead",
    )  # fmt: skip
    parser.add_argument("--stub", choices=("raw", "uvicorn"), default="raw", help="stub server (default raw asyncio)")
    parser.add_argument("--prompt-words", type=int, default=0,
                        help="pad the user message with this many words (default 0: two short messages)")  # fmt: skip
    parser.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write every figure as JSON")
    parser.add_argument("--markdown", action="store_true", help="also print the table as Markdown (for docs)")
    args = parser.parse_args(argv)
    if any(c < 1 for c in args.concurrency) or args.rounds < 1 or args.block < 1 or args.warmup < 0:
        parser.error("concurrency, rounds and block must be >= 1, warmup >= 0")
    if args.calls is None:
        calls = {c: 2000 if c == 1 else 5000 for c in args.concurrency}
    elif len(args.calls) == 1:
        calls = dict.fromkeys(args.concurrency, args.calls[0])
    elif len(args.calls) == len(args.concurrency):
        calls = dict(zip(args.concurrency, args.calls, strict=True))
    else:
        parser.error("--calls takes one value, or one per --concurrency level")
    if any(n < 1 for n in calls.values()):
        parser.error("--calls must be >= 1")
    clients = [c for c in ALL_CLIENTS if c in args.clients]
    if args.prompt_words < 0:
        parser.error("--prompt-words must be >= 0")
    options = Options(calls, args.concurrency, args.rounds, args.warmup, args.block, clients, args.stub)
    return options, args


def main(argv: Sequence[str] | None = None) -> int:
    options, args = parse_args(argv)
    _guard_network()
    if args.prompt_words:
        words = ("keel measures what a gateway adds to one model call " * (args.prompt_words // 10 + 1)).split()
        MESSAGES[-1]["content"] += "\n" + " ".join(words[: args.prompt_words])
    meta = machine()
    meta["command"] = " ".join([Path(sys.executable).name, *sys.argv])
    meta["loadavg_start"] = os.getloadavg()
    meta["prompt_tokens"] = _prompt_tokens()
    plan = (
        f"stub: {options.stub}; calls {options.calls}; rounds {options.rounds}; block {options.block}; "
        f"warm-up {options.warmup}; prompt {meta['prompt_tokens']} tokens; load average {os.getloadavg()[0]:.2f}"
    )
    print(plan, file=sys.stderr)
    stub = StubProcess(uvicorn=options.stub == "uvicorn")
    with tempfile.TemporaryDirectory(prefix="keel-bench-") as tmp, stub:
        samples, facts, trace_checks = asyncio.run(run(options, stub.url, Path(tmp)))
    meta["loadavg_end"] = os.getloadavg()
    rows = summarise(samples, options.clients, options.levels)
    checks = goal_checks(rows, 1 if 1 in options.levels else options.levels[0]) + trace_checks
    if blocked:
        checks.append({"goal": "no traffic left 127.0.0.1", "passed": False, "detail": "; ".join(blocked[:5])})
    print_report(rows, checks, facts)
    if args.markdown:
        print(markdown_table(rows))
    if args.json:
        payload = {
            "machine": meta, "options": asdict(options), "summary": rows, "checks": checks, "tracing": facts,
            "samples": [asdict(s) for s in samples],
            "blocked": blocked,
        }  # fmt: skip
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")
    return 0 if all(c["passed"] for c in checks) else 1


if __name__ == "__main__":
    raise SystemExit(main())
