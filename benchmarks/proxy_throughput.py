"""Proxy throughput (issue 3): the keel server next to the LiteLLM proxy, each in its own process.

One run on one machine starts, each as its own process:

  stub     benchmarks/_stub.py: a fixed chat.completion (optional fixed delay)
  keel     `keel serve` with a temporary keel.toml (one openai model at the stub,
           rpm/tpm limits, retries, content capture) and its own SQLite store:
           every request is traced to it, and that is part of what is measured
  litellm  `litellm --config ... --num_workers 1` (the `litellm[proxy]` extra),
           one model at the stub, no database, no master key

and drives the stub directly, then each proxy, with the same load generator
(a raw asyncio HTTP/1.1 keep-alive client, itself a separate process): N
workers, one connection each, POST /v1/chat/completions non-streaming with the
same small body, closed loop, a warm-up and then a fixed time (or number of
requests) per concurrency level. Per target and level: requests/s, latency
p50/p99, errors (non-200, wrong body, connection errors), and the proxy's CPU
time per request; "added" latency is the proxy's p50/p99 minus the stub's
direct p50/p99 at the same level in the same round. Within a round the targets
take turns at each level in rotating order, so that what other tenants do to
the machine hits them alike; the table shows medians over rounds.

Memory: the proxy's resident set (its children included) after a warm-up and
after --memory-requests requests at concurrency 64.

    .venv/bin/python benchmarks/proxy_throughput.py
    .venv/bin/python benchmarks/proxy_throughput.py --seconds 5 --concurrency 1 64 --skip-memory
    .venv/bin/python benchmarks/proxy_throughput.py --targets keel --concurrency 64 --skip-memory \
        --profile /tmp/keel-py-spy.txt

Every socket stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _stub import StubProcess, package_version, stop_group
from gateway_overhead import EXPECTED_TEXT, FAKE_KEY, FAKE_KEY_ENV, MESSAGES, MODEL, keel_toml, machine

EXPECTED = EXPECTED_TEXT.encode()
CHAT_PATH = "/v1/chat/completions"
TARGETS = ("keel", "litellm")
LOG_LEVEL = "warning"  # both proxies log at this level (no access log)
GOAL_RPS_RATIO = 3.0  # keel's best requests/s over LiteLLM's best
GOAL_P99_RATIO = 1 / 3  # keel's added p99 at GOAL_LEVEL over LiteLLM's
GOAL_LEVEL = 64
GOAL_MEMORY_GROWTH = 0.10  # keel's RSS after the memory run over after warm-up, minus one


# --- the load generator (its own process: `proxy_throughput.py loadgen URL ...`) --------------


class HttpConnection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection with at most one request in flight.

    Parses just what the two proxies and the stub send: a status line, headers,
    and a Content-Length or chunked body.
    """

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self.server_closes = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError(f"connection lost: {exc}"))

    def request(self, payload: bytes) -> asyncio.Future[tuple[int, bytes]]:
        """Send one request; the future gets (status, body)."""
        if self.transport is None or self.transport.is_closing() or self.server_closes:
            raise ConnectionError("connection closed")
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(payload)
        return self.waiter

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.waiter is None or self.waiter.done():
            return
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self.buffer[:end]).lower()
        framed = _body(self.buffer, end + 4, head)
        if framed is None:
            return  # the body is still on its way
        body, consumed = framed
        del self.buffer[:consumed]
        self.server_closes = b"\r\nconnection: close" in head
        self.waiter.set_result((int(head[9:12]), body))

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def _body(buffer: bytearray, start: int, head: bytes) -> tuple[bytes, int] | None:
    """(body, bytes consumed up to its end), or None while incomplete."""
    if (at := head.find(b"\r\ncontent-length:")) >= 0:
        line_end = head.find(b"\r\n", at + 2)
        total = start + int(head[at + 17 : line_end if line_end >= 0 else None])
        return (bytes(buffer[start:total]), total) if len(buffer) >= total else None
    if b"\r\ntransfer-encoding: chunked" not in head:
        return b"", start  # no body framing: only bodiless answers come like this
    body, pos = bytearray(), start
    while (line_end := buffer.find(b"\r\n", pos)) >= 0:
        size = int(bytes(buffer[pos:line_end]).split(b";")[0], 16)
        pos = line_end + 2
        if len(buffer) < pos + size + 2:
            return None
        if size == 0:
            return bytes(body), pos + 2  # (no trailers from these servers)
        body += buffer[pos : pos + size]
        pos += size + 2
    return None


@dataclass
class Phase:
    """One closed-loop phase: latencies (ns) of good answers, and the rest counted by kind."""

    latencies_ns: list[int] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    wall_s: float = 0.0


class LoadGenerator:
    """`concurrency` workers, each with its own connection, sending the same request in a closed loop."""

    def __init__(self, url: str, concurrency: int) -> None:
        rest = url.removeprefix("http://")
        hostport, _, path = rest.partition("/")
        host, _, port = hostport.partition(":")
        self.host, self.port, self.concurrency = host, int(port or 80), concurrency
        body = json.dumps({"model": MODEL, "messages": MESSAGES}, separators=(",", ":")).encode()
        head = (
            f"POST /{path} HTTP/1.1\r\nhost: {hostport}\r\ncontent-type: application/json\r\n"
            f"accept: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
        )
        self.payload = head.encode() + body
        self.connections: list[HttpConnection] = []

    async def connect(self) -> HttpConnection:
        loop = asyncio.get_running_loop()
        _, protocol = await loop.create_connection(HttpConnection, self.host, self.port)
        return protocol

    async def open(self) -> None:
        self.connections = [await self.connect() for _ in range(self.concurrency)]

    def close(self) -> None:
        for connection in self.connections:
            connection.close()

    async def run(self, *, seconds: float | None = None, requests: int | None = None) -> Phase:
        """Until `seconds` have passed or `requests` have been sent; in-flight requests finish."""
        phase = Phase()
        clock = time.perf_counter_ns
        deadline = clock() + int(seconds * 1e9) if seconds is not None else None
        remaining = requests if requests is not None else 0

        async def worker(index: int) -> None:
            nonlocal remaining
            payload, latencies, errors = self.payload, phase.latencies_ns, phase.errors
            while True:
                if deadline is not None:
                    if clock() >= deadline:
                        return
                elif remaining <= 0:
                    return
                else:
                    remaining -= 1
                started = clock()
                try:
                    status, body = await self.connections[index].request(payload)
                except (ConnectionError, OSError):
                    errors["connection"] += 1
                    await self._reconnect(index)
                    continue
                if status == 200 and EXPECTED in body:
                    latencies.append(clock() - started)
                else:
                    errors[f"http {status}" if status != 200 else "unexpected body"] += 1
                if self.connections[index].server_closes:
                    await self._reconnect(index)

        started = clock()
        await asyncio.gather(*(worker(i) for i in range(self.concurrency)))
        phase.wall_s = (clock() - started) / 1e9
        return phase

    async def _reconnect(self, index: int) -> None:
        self.connections[index].close()
        try:
            self.connections[index] = await self.connect()
        except OSError:
            await asyncio.sleep(0.05)  # the server is gone or full: the next request counts the error


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[rank - 1]


def phase_summary(phase: Phase) -> dict[str, Any]:
    latencies = sorted(ns / 1e6 for ns in phase.latencies_ns)
    ok = len(latencies)
    return {
        "ok": ok,
        "errors": sum(phase.errors.values()),
        "error_kinds": dict(phase.errors),
        "wall_s": round(phase.wall_s, 3),
        "rps": round(ok / phase.wall_s, 1) if phase.wall_s else 0.0,
        "p50_ms": round(percentile(latencies, 0.50), 3) if ok else math.nan,
        "p99_ms": round(percentile(latencies, 0.99), 3) if ok else math.nan,
        "mean_ms": round(statistics.fmean(latencies), 3) if ok else math.nan,
        "max_ms": round(latencies[-1], 3) if ok else math.nan,
    }


async def loadgen(args: argparse.Namespace, out: TextIO) -> None:
    """Warm up, say WARM (the parent samples the proxy then), measure, say RESULT {json}."""
    generator = LoadGenerator(args.url, args.concurrency)
    await generator.open()
    warmup = Phase()
    try:
        if args.warmup_seconds > 0:
            warmup = await generator.run(seconds=args.warmup_seconds)
        print("WARM", file=out, flush=True)
        phase = await generator.run(seconds=args.seconds, requests=args.requests)
    finally:
        generator.close()
    result = phase_summary(phase)
    result.update(warmup_ok=len(warmup.latencies_ns), warmup_errors=sum(warmup.errors.values()))
    print("RESULT " + json.dumps(result), file=out, flush=True)


def loadgen_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="proxy_throughput.py loadgen", description="the load generator alone")
    parser.add_argument("url", help="e.g. http://127.0.0.1:8000/v1/chat/completions")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=None)
    parser.add_argument("--requests", type=int, default=None)
    parser.add_argument("--warmup-seconds", type=float, default=2.0)
    args = parser.parse_args(argv)
    if (args.seconds is None) == (args.requests is None):
        parser.error("give one of --seconds and --requests")
    # the lightest event loop available, the same for every target
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    try:
        asyncio.run(loadgen(args, sys.stdout))
    except KeyboardInterrupt:  # Ctrl-C reaches the whole process group; the parent reports it
        return 130
    return 0


def event_loop_name() -> str:
    version = package_version("uvloop")
    return "asyncio" if version == "-" else f"uvloop {version}"


# --- the proxies' processes ----------------------------------------------------------------------


class ProcessStats:
    """Resident memory and CPU time of a process and its children (psutil, else /proc)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        try:
            import psutil

            self._psutil: Any = psutil.Process(pid)
        except ImportError:
            self._psutil = None

    def rss_bytes(self) -> int:
        if self._psutil is not None:
            return int(sum(self._each(lambda p: p.memory_info().rss)))
        total = 0
        for pid in self._family_pids():
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        return total

    def cpu_s(self) -> float:
        if self._psutil is not None:
            return sum(self._each(lambda p: p.cpu_times().user + p.cpu_times().system))
        ticks = os.sysconf("SC_CLK_TCK")
        total = 0.0
        for pid in self._family_pids():
            with contextlib.suppress(OSError):
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / ticks
        return total

    def _each(self, read: Any) -> Iterator[float]:
        import psutil

        for process in [self._psutil, *self._psutil.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                yield read(process)

    def _family_pids(self) -> list[int]:
        pids, index = [self.pid], 0
        while index < len(pids):
            with contextlib.suppress(OSError):
                for task in Path(f"/proc/{pids[index]}/task").iterdir():
                    pids += [int(p) for p in (task / "children").read_text().split()]
            index += 1
        return pids


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _clean_environment(*prefixes: str) -> dict[str, str]:
    """This process's environment without variables that would reconfigure the proxies."""
    return {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}


def http_get(url: str, timeout: float = 2.0) -> int:
    with urllib.request.urlopen(url, timeout=timeout) as response:  # loopback only
        return int(response.status)


def http_chat(url: str, timeout: float = 30.0) -> bytes:
    body = json.dumps({"model": MODEL, "messages": MESSAGES}).encode()
    request = urllib.request.Request(url, data=body, headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:  # loopback only
        return bytes(response.read())


class ProxyServer:
    """A proxy in its own process (and process group), logging to a file in its home."""

    name = ""
    health_path = ""

    def __init__(self, stub_url: str, workdir: Path) -> None:
        self.stub_url = stub_url
        self.home = workdir / self.name
        self.home.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.log_path = self.home / "server.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.started_s = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{CHAT_PATH}"

    def command(self) -> list[str]:
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        raise NotImplementedError

    def start(self, timeout: float = 180.0) -> ProxyServer:
        started = time.perf_counter()
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                self.command(), cwd=self.home, env=self.environment(), stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        self._wait_ready(timeout)
        answer = http_chat(self.url)
        if EXPECTED not in answer:
            raise RuntimeError(f"{self.name} answered {answer[:300]!r}, not the stub's text")
        self.started_s = time.perf_counter() - started
        return self

    def _wait_ready(self, timeout: float) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(OSError, urllib.error.URLError):
                if http_get(f"http://127.0.0.1:{self.port}{self.health_path}") == 200:
                    return
            time.sleep(0.25)
        raise RuntimeError(f"{self.name} was not ready after {timeout:.0f} s:\n{self.log_tail()}")

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def stop(self) -> None:
        """SIGTERM to its process group (a graceful shutdown flushes keel's spans), then SIGKILL."""
        if self.process is None:
            return
        stop_group(self.process)
        self.process = None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def facts(self) -> dict[str, Any]:
        """After stop(): what the run left behind, for the record."""
        return {"start_s": round(self.started_s, 2)}


class KeelServer(ProxyServer):
    """`keel serve` with the full stack of the overhead benchmark: limits, retries, tracing to SQLite."""

    name = "keel"
    health_path = "/healthz"

    def __init__(self, stub_url: str, workdir: Path, executable: list[str] | None = None) -> None:
        super().__init__(stub_url, workdir)
        self.executable = executable or [str(Path(sys.executable).with_name("keel"))]

        self.store = self.home / "keel.db"
        self.config = self.home / "keel.toml"
        self.config.write_text(keel_toml(stub_url, self.store), encoding="utf-8")

    def command(self) -> list[str]:
        return [*self.executable, "serve", "--host", "127.0.0.1", "--port", str(self.port), "--log-level", LOG_LEVEL]

    def environment(self) -> dict[str, str]:
        env = _clean_environment("KEEL_")  # no admin key, no overrides from the caller's shell
        env.update({"KEEL_CONFIG": str(self.config), "KEEL_STORE": str(self.store), FAKE_KEY_ENV: FAKE_KEY})
        return env

    def facts(self) -> dict[str, Any]:
        spans = None
        with contextlib.suppress(sqlite3.Error), contextlib.closing(sqlite3.connect(self.store)) as db:
            spans = int(db.execute("SELECT COUNT(*) FROM spans").fetchone()[0])
        size = self.store.stat().st_size if self.store.exists() else 0
        return {**super().facts(), "spans_stored": spans, "store_mb": round(size / 2**20, 1)}


class LiteLLMServer(ProxyServer):
    """The LiteLLM proxy: one worker, one model at the stub, no database, no master key, no callbacks."""

    name = "litellm"
    health_path = "/health/liveliness"

    def __init__(self, stub_url: str, workdir: Path) -> None:
        super().__init__(stub_url, workdir)
        self.config = self.home / "config.yaml"
        config = {
            "model_list": [{
                "model_name": MODEL,
                "litellm_params": {"model": f"openai/{MODEL}", "api_base": stub_url, "api_key": FAKE_KEY},
            }],
            "litellm_settings": {"set_verbose": False, "json_logs": False},
        }  # fmt: skip
        self.config.write_text(json.dumps(config, indent=2), encoding="utf-8")  # JSON is YAML

    def command(self) -> list[str]:
        litellm = str(Path(sys.executable).with_name("litellm"))
        return [litellm, "--config", str(self.config), "--host", "127.0.0.1", "--port", str(self.port),
                "--num_workers", "1"]  # fmt: skip

    def environment(self) -> dict[str, str]:
        env = _clean_environment("LITELLM_", "DATABASE_URL", "REDIS_")
        env.update(LITELLM_ENVIRONMENT)
        return env


LITELLM_ENVIRONMENT = {
    "LITELLM_LOG": LOG_LEVEL.upper(),
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # else it downloads the cost map at start
    "LITELLM_OFFLINE_MODE": "true",  # every catalog it would fetch comes from the package
    "LITELLM_LOCAL_ANTHROPIC_BETA_HEADERS": "True",
    "LITELLM_LOCAL_BLOG_POSTS": "True",
    "LITELLM_TELEMETRY": "False",
    # 1.108 refuses to start without a master key; keel runs open on loopback, so LiteLLM does too
    "LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY": "true",
}


# --- measuring -------------------------------------------------------------------------------------


@dataclass
class Sample:
    round: int
    target: str  # direct, keel or litellm
    concurrency: int
    ok: int
    errors: int
    error_kinds: dict[str, int]
    wall_s: float
    rps: float
    p50_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float
    proxy_cpu_ms_per_request: float | None  # the proxy process's CPU time / requests answered
    warmup_ok: int = 0


@dataclass
class LoadRun:
    result: dict[str, Any]
    cpu_s: float | None = None  # the watched process's CPU over the measured phase
    rss_warm: int | None = None
    rss_end: int | None = None
    rss_peak: int | None = None
    rss_trace: list[tuple[float, int]] = field(default_factory=list)


def run_loadgen(
    url: str, concurrency: int, *, seconds: float | None, requests: int | None, warmup_s: float,
    watch: ProcessStats | None = None, sample_every: float = 0.0,
) -> LoadRun:  # fmt: skip
    """One load-generator process; samples the watched proxy when the measured phase starts and ends."""
    command = [sys.executable, str(Path(__file__).resolve()), "loadgen", url, "--concurrency", str(concurrency),
               "--warmup-seconds", str(warmup_s)]  # fmt: skip
    command += ["--seconds", str(seconds)] if seconds is not None else ["--requests", str(requests)]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    assert child.stdout is not None
    run, cpu_started, sampler = LoadRun({}), 0.0, None
    stop = threading.Event()
    try:
        for line in child.stdout:
            if line.startswith("WARM") and watch is not None:
                run.rss_warm, cpu_started = watch.rss_bytes(), watch.cpu_s()
                if sample_every > 0:
                    sampler = threading.Thread(target=_sample_rss, args=(watch, sample_every, stop, run), daemon=True)
                    sampler.start()
            elif line.startswith("RESULT "):
                if watch is not None:
                    run.cpu_s, run.rss_end = watch.cpu_s() - cpu_started, watch.rss_bytes()
                run.result = json.loads(line.removeprefix("RESULT "))
    finally:
        stop.set()
        if sampler is not None:
            sampler.join()
        if child.poll() is None:
            child.terminate()
        child.wait()
        child.stdout.close()
    if not run.result:
        raise RuntimeError(f"the load generator failed (exit {child.returncode})")
    if run.rss_trace:
        run.rss_peak = max(rss for _, rss in run.rss_trace)
    return run


def _sample_rss(watch: ProcessStats, every: float, stop: threading.Event, run: LoadRun) -> None:
    started = time.monotonic()
    while not stop.wait(every):
        with contextlib.suppress(Exception):  # the process may be gone at the very end
            run.rss_trace.append((round(time.monotonic() - started, 1), watch.rss_bytes()))


def measure(
    target: str, url: str, concurrency: int, round_: int, options: Options, watch: ProcessStats | None
) -> Sample:
    run = run_loadgen(
        url, concurrency, seconds=options.seconds, requests=options.requests, warmup_s=options.warmup_seconds,
        watch=watch,
    )  # fmt: skip
    r = run.result
    answered = r["ok"] + r["errors"]
    cpu = round(run.cpu_s * 1000 / answered, 3) if run.cpu_s is not None and answered else None
    return Sample(
        round=round_, target=target, concurrency=concurrency, ok=r["ok"], errors=r["errors"],
        error_kinds=r["error_kinds"], wall_s=r["wall_s"], rps=r["rps"], p50_ms=r["p50_ms"], p99_ms=r["p99_ms"],
        mean_ms=r["mean_ms"], max_ms=r["max_ms"], proxy_cpu_ms_per_request=cpu, warmup_ok=r["warmup_ok"],
    )  # fmt: skip


def measure_memory(server: ProxyServer, options: Options) -> dict[str, Any]:
    """RSS after a warm-up, then after `memory_requests` requests at `memory_concurrency`."""
    watch = ProcessStats(server.pid)
    run = run_loadgen(
        server.url, options.memory_concurrency, seconds=None, requests=options.memory_requests,
        warmup_s=options.memory_warmup_seconds, watch=watch, sample_every=1.0,
    )  # fmt: skip
    assert run.rss_warm is not None and run.rss_end is not None
    mb = 2**20
    return {
        "target": server.name,
        "concurrency": options.memory_concurrency,
        "requests": run.result["ok"] + run.result["errors"],
        "ok_with_warmup": run.result["ok"] + run.result["warmup_ok"],
        "errors": run.result["errors"],
        "rps": run.result["rps"],
        "rss_warm_mb": round(run.rss_warm / mb, 1),
        "rss_end_mb": round(run.rss_end / mb, 1),
        "rss_peak_mb": round((run.rss_peak or run.rss_end) / mb, 1),
        "growth_pct": round((run.rss_end - run.rss_warm) * 100 / run.rss_warm, 1),
        "rss_trace_mb": [(t, round(rss / mb, 1)) for t, rss in run.rss_trace[:: max(1, len(run.rss_trace) // 60)]],
    }


def order_for(index: int, names: Sequence[str]) -> list[str]:
    shift = index % len(names)
    return [*names[shift:], *names[:shift]]


# --- summarising -----------------------------------------------------------------------------------


def summarise(samples: list[Sample], targets: Sequence[str], levels: Sequence[int]) -> list[dict[str, Any]]:
    """Medians over rounds per target and level; added latency against `direct` in the same round."""
    rows = []
    for level in levels:
        base = {s.round: s for s in samples if s.target == "direct" and s.concurrency == level}
        for target in ["direct", *targets]:
            mine = [s for s in samples if s.target == target and s.concurrency == level]
            if not mine:
                continue
            paired = [(s, base[s.round]) for s in mine if s.round in base and target != "direct"]
            cpu = [s.proxy_cpu_ms_per_request for s in mine if s.proxy_cpu_ms_per_request is not None]
            rows.append({
                "target": target,
                "concurrency": level,
                "rounds": len(mine),
                "rps": round(statistics.median(s.rps for s in mine), 1),
                "p50_ms": round(statistics.median(s.p50_ms for s in mine), 3),
                "p99_ms": round(statistics.median(s.p99_ms for s in mine), 3),
                "added_p50_ms": round(statistics.median(s.p50_ms - b.p50_ms for s, b in paired), 3) if paired else None,
                "added_p99_ms": round(statistics.median(s.p99_ms - b.p99_ms for s, b in paired), 3) if paired else None,
                "errors": sum(s.errors for s in mine),
                "proxy_cpu_ms": round(statistics.median(cpu), 3) if cpu else None,
                "rps_per_round": [s.rps for s in mine],
            })  # fmt: skip
    return rows


def goal_checks(rows: list[dict[str, Any]], memory: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    def best_rps(target: str) -> tuple[float, int] | None:
        mine = [(r["rps"], r["concurrency"]) for r in rows if r["target"] == target]
        return max(mine) if mine else None

    found = {(r["target"], r["concurrency"]): r for r in rows}
    checks = []
    keel_best, litellm_best = best_rps("keel"), best_rps("litellm")
    if keel_best and litellm_best:
        ratio = keel_best[0] / litellm_best[0]
        checks.append({
            "goal": f"keel max requests/s >= {GOAL_RPS_RATIO:g}x LiteLLM's",
            "passed": ratio >= GOAL_RPS_RATIO,
            "detail": f"keel {keel_best[0]:.0f}/s (c={keel_best[1]}) vs LiteLLM {litellm_best[0]:.0f}/s "
            f"(c={litellm_best[1]}): {ratio:.2f}x",
        })  # fmt: skip
    keel, litellm = found.get(("keel", GOAL_LEVEL)), found.get(("litellm", GOAL_LEVEL))
    if keel and litellm and keel["added_p99_ms"] is not None and litellm["added_p99_ms"] is not None:
        ratio = keel["added_p99_ms"] / litellm["added_p99_ms"] if litellm["added_p99_ms"] > 0 else math.inf
        checks.append({
            "goal": f"keel added p99 at c={GOAL_LEVEL} <= 1/3 of LiteLLM's",
            "passed": ratio <= GOAL_P99_RATIO,
            "detail": f"keel {keel['added_p99_ms']:.1f} ms vs LiteLLM {litellm['added_p99_ms']:.1f} ms: "
            f"ratio {ratio:.2f} (limit {GOAL_P99_RATIO:.2f})",
        })  # fmt: skip
    if "keel" in memory:
        growth = memory["keel"]["growth_pct"]
        checks.append({
            "goal": f"keel memory flat: growth <= {GOAL_MEMORY_GROWTH:.0%} after warm-up",
            "passed": growth <= GOAL_MEMORY_GROWTH * 100,
            "detail": f"{memory['keel']['rss_warm_mb']} MB -> {memory['keel']['rss_end_mb']} MB after "
            f"{memory['keel']['requests']:,} requests ({growth:+.1f}%)",
        })  # fmt: skip
    errors = sum(r["errors"] for r in rows if r["target"] == "keel")
    errors += memory.get("keel", {}).get("errors", 0)
    checks.append({"goal": "keel answered every request", "passed": errors == 0, "detail": f"{errors} errors"})
    return checks


# --- output ------------------------------------------------------------------------------------------


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:,.{digits}f}"


def side_by_side(rows: list[dict[str, Any]], targets: Sequence[str]) -> tuple[list[str], list[list[str]]]:
    """One line per concurrency: the stub's own figures, then per proxy rps, added p50/p99, errors, CPU."""
    header = ["concurrency", "direct rps", "direct p50 ms", "direct p99 ms"]
    for target in targets:
        header += [f"{target} rps", f"{target} +p50 ms", f"{target} +p99 ms", f"{target} errors",
                   f"{target} CPU ms/req"]  # fmt: skip
    found = {(r["target"], r["concurrency"]): r for r in rows}
    lines = []
    for level in sorted({r["concurrency"] for r in rows}):
        direct = found.get(("direct", level), {})
        line = [str(level), _num(direct.get("rps"), 0), _num(direct.get("p50_ms"), 2), _num(direct.get("p99_ms"), 2)]
        for target in targets:
            r = found.get((target, level), {})
            line += [_num(r.get("rps"), 0), _num(r.get("added_p50_ms"), 2), _num(r.get("added_p99_ms"), 2),
                     str(r.get("errors", "-")), _num(r.get("proxy_cpu_ms"), 2)]  # fmt: skip
        lines.append(line)
    return header, lines


MEMORY_HEADER = ["proxy", "requests", "concurrency", "rps", "errors", "RSS warm MB", "RSS end MB", "peak MB", "growth"]


def memory_line(m: dict[str, Any]) -> list[str]:
    return [
        m["target"], f"{m['requests']:,}", str(m["concurrency"]), _num(m["rps"], 0), str(m["errors"]),
        _num(m["rss_warm_mb"]), _num(m["rss_end_mb"]), _num(m["rss_peak_mb"]), f"{m['growth_pct']:+.1f}%",
    ]  # fmt: skip


def print_report(
    rows: list[dict[str, Any]], memory: dict[str, dict[str, Any]], checks: list[dict[str, Any]],
    targets: Sequence[str], facts: dict[str, Any],
) -> None:  # fmt: skip
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 160))
    header, lines = side_by_side(rows, targets)
    table = Table(title="Proxy throughput: medians over rounds (+p50/+p99 = proxy - stub direct, same round)")
    for column in header:
        table.add_column(column, justify="right")
    for line in lines:
        table.add_row(*line)
    console.print(table)
    if memory:
        table = Table(title="Resident memory of the proxy process")
        for column in MEMORY_HEADER:
            table.add_column(column, justify="left" if column == "proxy" else "right")
        for m in memory.values():
            table.add_row(*memory_line(m))
        console.print(table)
    for name, fact in facts.items():
        console.print(f"{name}: {fact}")
    for check in checks:
        mark = "[green]PASS[/green]" if check["passed"] else "[red]FAIL[/red]"
        console.print(f"{mark} {check['goal']}: {check['detail']}")


def markdown(rows: list[dict[str, Any]], memory: dict[str, dict[str, Any]], targets: Sequence[str]) -> str:
    header, lines = side_by_side(rows, targets)
    out = ["| " + " | ".join(header) + " |", "|" + " ---: |" * len(header)]
    out += ["| " + " | ".join(line) + " |" for line in lines]
    if memory:
        out += ["", "| " + " | ".join(MEMORY_HEADER) + " |", "| --- |" + " ---: |" * (len(MEMORY_HEADER) - 1)]
        out += ["| " + " | ".join(memory_line(m)) + " |" for m in memory.values()]
    return "\n".join(out)


def progress(s: Sample) -> str:
    errors = f"  errors {s.errors} {s.error_kinds}" if s.errors else ""
    cpu = f"  proxy CPU {s.proxy_cpu_ms_per_request:.2f} ms/req" if s.proxy_cpu_ms_per_request is not None else ""
    return (
        f"  round {s.round + 1} c={s.concurrency:<3} {s.target:<7} {s.rps:8.0f} req/s  "
        f"p50 {s.p50_ms:8.2f} ms  p99 {s.p99_ms:8.2f} ms{cpu}{errors}"
    )


# --- main --------------------------------------------------------------------------------------------


@dataclass
class Options:
    levels: list[int]
    seconds: float | None
    requests: int | None
    warmup_seconds: float
    rounds: int
    targets: list[str]
    delay_ms: float
    memory_requests: int
    memory_concurrency: int
    memory_warmup_seconds: float
    skip_memory: bool
    profile: Path | None
    keel_command: list[str] | None


def run(options: Options, workdir: Path) -> tuple[list[Sample], dict[str, dict[str, Any]], dict[str, Any]]:
    samples: list[Sample] = []
    memory: dict[str, dict[str, Any]] = {}
    facts: dict[str, Any] = {}
    with StubProcess(delay_ms=options.delay_ms) as stub, contextlib.ExitStack() as servers:
        proxies: dict[str, ProxyServer] = {}
        for name in options.targets:
            if name == "keel":
                proxies[name] = KeelServer(stub.url, workdir, options.keel_command)
            else:
                proxies[name] = LiteLLMServer(stub.url, workdir)
            servers.callback(proxies[name].stop)
            print(f"starting {name} ...", file=sys.stderr, flush=True)
            proxies[name].start()
        urls = {"direct": f"http://127.0.0.1:{stub.port}{CHAT_PATH}", **{n: p.url for n, p in proxies.items()}}
        watches = {n: ProcessStats(p.pid) for n, p in proxies.items()}
        facts["rss_at_start_mb"] = {n: round(w.rss_bytes() / 2**20, 1) for n, w in watches.items()}
        names = ["direct", *options.targets]
        for round_ in range(options.rounds):
            for index, level in enumerate(options.levels):
                for target in order_for(round_ + index, names):
                    profiler = _start_profiler(options, proxies, target, level, round_)
                    sample = measure(target, urls[target], level, round_, options, watches.get(target))
                    _stop_profiler(profiler)
                    print(progress(sample), file=sys.stderr, flush=True)
                    samples.append(sample)
        if not options.skip_memory:
            for name, proxy in proxies.items():
                print(f"memory: {options.memory_requests:,} requests to {name} ...", file=sys.stderr, flush=True)
                memory[name] = measure_memory(proxy, options)
                m = memory[name]
                print(f"  {name}: {m['rss_warm_mb']} MB -> {m['rss_end_mb']} MB ({m['growth_pct']:+.1f}%), "
                      f"{m['rps']:.0f} req/s, {m['errors']} errors", file=sys.stderr, flush=True)  # fmt: skip
        for proxy in proxies.values():
            proxy.stop()  # graceful: keel flushes its spans before exiting
            facts[proxy.name] = proxy.facts()
    return samples, memory, facts


def _start_profiler(
    options: Options, proxies: dict[str, ProxyServer], target: str, level: int, round_: int
) -> subprocess.Popen[bytes] | None:
    """py-spy on the keel process during its first measurement at the highest level."""
    if options.profile is None or target != "keel" or round_ != 0 or level != max(options.levels):
        return None
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    command = [py_spy, "record", "--pid", str(proxies["keel"].pid), "--rate", "100", "--format", "raw",
               "--output", str(options.profile), "--nonblocking"]  # fmt: skip
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)


def _stop_profiler(profiler: subprocess.Popen[bytes] | None) -> None:
    if profiler is None:
        return
    profiler.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
    _, err = profiler.communicate(timeout=60)
    print(f"  py-spy: {err.decode(errors='replace').strip().splitlines()[-1:]}", file=sys.stderr)


def parse_args(argv: Sequence[str] | None = None) -> tuple[Options, argparse.Namespace]:
    parser = argparse.ArgumentParser(
        description="Requests/s, added latency and memory of the keel server and the LiteLLM proxy, "
        "each in its own process, against the same local stub.",
        epilog="example: .venv/bin/python benchmarks/proxy_throughput.py --rounds 3 --json /tmp/proxy.json "
        "--markdown  (the load generator alone: proxy_throughput.py loadgen URL --concurrency 64 --seconds 10)",
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64, 256],
                        help="concurrency levels (default 1 16 64 256)")  # fmt: skip
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--seconds", type=float, default=None, help="measured seconds per target and level (def. 10)")
    length.add_argument("--requests", type=int, default=None, help="or a number of requests per target and level")
    parser.add_argument("--warmup-seconds", type=float, default=2.0,
                        help="discarded seconds before each measurement, same connections (default 2)")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=1, help="rounds, each in a different target order (default 1)")
    parser.add_argument("--targets", nargs="+", choices=TARGETS, default=list(TARGETS),
                        help="proxies (default: keel litellm); the stub is always measured directly too")  # fmt: skip
    parser.add_argument("--delay-ms", type=float, default=0.0, help="the stub waits this long per answer (default 0)")
    parser.add_argument("--memory-requests", type=int, default=100_000,
                        help="requests per proxy for the memory check (default 100000)")  # fmt: skip
    parser.add_argument("--memory-concurrency", type=int, default=64, help="concurrency of the memory run (default 64)")
    parser.add_argument("--memory-warmup-seconds", type=float, default=5.0,
                        help="load before the first RSS reading of the memory run (default 5)")  # fmt: skip
    parser.add_argument("--skip-memory", action="store_true", help="skip the memory run")
    parser.add_argument("--profile", type=Path, default=None, metavar="OUT",
                        help="py-spy (raw folded stacks) on keel in its first run at the highest level")  # fmt: skip
    parser.add_argument("--keel-command", default=None, metavar="CMD",
                        help="run keel as CMD (split on spaces), not .venv/bin/keel: to compare a variant")  # fmt: skip
    parser.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write every figure as JSON")
    parser.add_argument("--markdown", action="store_true", help="also print the tables as Markdown (for docs)")
    args = parser.parse_args(argv)
    if any(c < 1 for c in args.concurrency) or args.rounds < 1 or args.memory_requests < 1:
        parser.error("concurrency, rounds and memory requests must be >= 1")
    if args.requests is None and args.seconds is None:
        args.seconds = 10.0
    if (args.seconds is not None and args.seconds <= 0) or (args.requests is not None and args.requests < 1):
        parser.error("--seconds and --requests must be positive")
    targets = [t for t in TARGETS if t in args.targets]
    options = Options(
        levels=args.concurrency, seconds=args.seconds, requests=args.requests, warmup_seconds=args.warmup_seconds,
        rounds=args.rounds, targets=targets, delay_ms=args.delay_ms, memory_requests=args.memory_requests,
        memory_concurrency=args.memory_concurrency, memory_warmup_seconds=args.memory_warmup_seconds,
        skip_memory=args.skip_memory, profile=args.profile,
        keel_command=_resolved(args.keel_command.split()) if args.keel_command else None,
    )  # fmt: skip
    return options, args


def _resolved(command: list[str]) -> list[str]:
    """Relative paths made absolute: the proxies run in their own directories."""
    return [str(Path(word).absolute()) if "/" in word and Path(word).exists() else word for word in command]


def _raise_on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # so the finally blocks stop every child process


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["loadgen"]:
        return loadgen_main(argv[1:])
    options, args = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    meta = machine()
    meta["versions"].update({p: package_version(p) for p in ("fastapi", "starlette", "uvicorn", "uvloop", "httptools")})
    meta["loadgen_loop"] = event_loop_name()
    meta["src_changes"] = _uncommitted("src")  # the server measured is the working tree's
    meta["command"] = " ".join([Path(sys.executable).name, *sys.argv])
    meta["loadavg_start"] = os.getloadavg()
    length = f"{options.seconds:g} s" if options.seconds is not None else f"{options.requests} requests"
    print(f"levels {options.levels}; {length} per target and level after {options.warmup_seconds:g} s warm-up; "
          f"rounds {options.rounds}; stub delay {options.delay_ms:g} ms; load generator on {meta['loadgen_loop']}; "
          f"load average {os.getloadavg()[0]:.2f}", file=sys.stderr)  # fmt: skip
    try:
        with tempfile.TemporaryDirectory(prefix="keel-proxy-bench-") as tmp:
            samples, memory, facts = run(options, Path(tmp))
    except KeyboardInterrupt:
        print("interrupted: every process this run started is stopped", file=sys.stderr)
        return 130
    meta["loadavg_end"] = os.getloadavg()
    rows = summarise(samples, options.targets, options.levels)
    checks = goal_checks(rows, memory)
    if "keel" in facts and facts["keel"].get("spans_stored") is not None:
        # every good answer, warm-ups and the start-up check included (a failed request may add a span too)
        answered = 1 + sum(s.ok + s.warmup_ok for s in samples if s.target == "keel")
        answered += memory.get("keel", {}).get("ok_with_warmup", 0)
        spans = facts["keel"]["spans_stored"]
        checks.append({"goal": "keel traced every request to its store", "passed": spans >= answered,
                       "detail": f"{spans:,} spans for {answered:,} good answers"})  # fmt: skip
    print_report(rows, memory, checks, options.targets, facts)
    if args.markdown:
        print(markdown(rows, memory, options.targets))
    if args.json:
        payload = {"machine": meta, "options": asdict(options), "summary": rows, "memory": memory, "checks": checks,
                   "facts": facts, "samples": [asdict(s) for s in samples]}  # fmt: skip
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")
    return 0 if all(c["passed"] for c in checks) else 1


def _uncommitted(path: str) -> list[str]:
    """Files under `path` that differ from the commit (read-only `git status`)."""
    try:
        command = ["git", "status", "--porcelain", "--", path]
        out = subprocess.run(command, cwd=Path(__file__).parent.parent, capture_output=True, text=True, timeout=10)
        return out.stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return []


if __name__ == "__main__":
    raise SystemExit(main())
