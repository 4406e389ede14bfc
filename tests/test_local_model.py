"""The local llama.cpp model, run for real on SmolLM2-135M (no mocks).

Answers of a 135M model are weak; these tests check the adapter's contract
(usage, streaming, determinism, grammar, limits, concurrency), not wisdom.
`max_tokens` stays small so the file runs in seconds.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import llama_cpp  # installed by `make test`: a missing install must fail, not skip
import pytest
from pydantic import BaseModel

from keel import Gateway
from keel.errors import ConfigError, ContextWindowExceeded, InputError, ProviderTimeout
from keel.models.local import LocalModel, _StopCutter, smollm2_path
from keel.types import ChatOptions, ChatRequest, Message, ModelResponse, ResponseFormat, StreamDelta, Tool

pytestmark = pytest.mark.local_model


@pytest.fixture(scope="module")
def model() -> LocalModel:
    return LocalModel()


def _request(text: str, **options: Any) -> ChatRequest:
    options.setdefault("max_tokens", 16)
    return ChatRequest("smollm2", (Message.user(text),), ChatOptions(**options))


class City(BaseModel):
    name: str
    country: str
    population: int


async def test_smollm2_path_is_the_packaged_gguf() -> None:
    path = smollm2_path()
    assert path.suffix == ".gguf" and path.is_file()


async def test_complete_returns_text_usage_and_finish_reason(model: LocalModel) -> None:
    response = await model.complete(_request("Name three colours.", temperature=0, seed=1))
    assert response.text.strip()
    assert response.usage.input_tokens > 0 and 0 < response.usage.output_tokens <= 16
    assert response.finish_reason in ("stop", "length")
    assert (response.provider, response.model) == ("local", "smollm2")
    assert model.context_window == 8192


async def test_stream_deltas_concatenate_to_the_final_text(model: LocalModel) -> None:
    request = _request("Write one sentence about the sea.", temperature=0, seed=3)
    items = [item async for item in model.stream(request)]
    *deltas, final = items
    assert isinstance(final, ModelResponse)
    assert deltas and all(isinstance(d, StreamDelta) for d in deltas)
    assert "".join(d.text for d in deltas if isinstance(d, StreamDelta)) == final.text
    assert final.usage == (await model.complete(request)).usage


async def test_seed_and_temperature_zero_are_deterministic(model: LocalModel) -> None:
    greedy = _request("Tell me a fact about cats.", temperature=0, seed=11)
    assert (await model.complete(greedy)).text == (await model.complete(greedy)).text
    sampled = _request("Tell me a fact about cats.", temperature=0.9, seed=42)
    assert (await model.complete(sampled)).text == (await model.complete(sampled)).text


async def test_structured_output_parses_and_validates(model: LocalModel) -> None:
    request = ChatRequest(
        "smollm2",
        (Message.user("Paris is the capital of France and has 2100000 inhabitants. Describe the city as JSON."),),
        ChatOptions(
            temperature=0, seed=1, max_tokens=60, response_format=ResponseFormat("city", City.model_json_schema())
        ),
    )
    response = await model.complete(request)
    assert response.finish_reason == "stop"
    city = City.model_validate_json(response.text)
    assert city.name


async def test_structured_output_streams_token_by_token(model: LocalModel) -> None:
    # the grammar constrains every token, so the JSON streams in pieces and validates at the end
    gw = Gateway(models={"lm": model}, store=False)
    prompt = "Paris is the capital of France and has 2100000 inhabitants. Describe the city as JSON."
    stream = gw.stream(prompt, model="lm", response_model=City, temperature=0, seed=1, max_tokens=60)
    pieces = [d.text async for d in stream]
    assert len(pieces) > 5 and stream.result is not None and stream.result.finish_reason == "stop"
    assert stream.result.parsed == City.model_validate_json("".join(pieces))
    await gw.aclose()


def _native(model: LocalModel, request: ChatRequest, **extra: Any) -> dict[str, Any]:
    """llama-cpp-python's own non-streaming answer to the same prompt: the oracle for usage."""
    from keel.models.local import _plan

    plan = _plan(request)
    _, engine = model._engine()
    with engine.lock:
        result: dict[str, Any] = engine.llama.create_chat_completion(messages=plan.messages, **plan.sampling, **extra)
    return result


async def test_usage_matches_llama_cpp_own_count(model: LocalModel) -> None:
    by_length = _request("Describe a forest in detail.", temperature=0, seed=5, max_tokens=12)
    ours = await model.complete(by_length)
    native = _native(model, by_length)
    assert model.count_tokens(by_length) == ours.usage.input_tokens == native["usage"]["prompt_tokens"]
    assert ours.usage.output_tokens == native["usage"]["completion_tokens"] == 12
    assert ours.text == native["choices"][0]["message"]["content"]

    # ended by the end-of-turn token (the grammar closes the JSON, then forces it)
    schema = City.model_json_schema()
    by_eog = ChatRequest(
        "smollm2",
        (Message.user("Oslo, Norway, 700000 people. JSON please."),),
        ChatOptions(temperature=0, seed=5, max_tokens=60, response_format=ResponseFormat("city", schema)),
    )
    ours = await model.complete(by_eog)
    from llama_cpp.llama_grammar import LlamaGrammar

    native = _native(model, by_eog, grammar=LlamaGrammar.from_json_schema(json.dumps(schema), verbose=False))
    assert ours.finish_reason == native["choices"][0]["finish_reason"] == "stop"
    assert ours.usage.output_tokens == native["usage"]["completion_tokens"]
    assert model.count_tokens(by_eog) == ours.usage.input_tokens == native["usage"]["prompt_tokens"]

    # ended by a stop sequence: the token that contains it counts, as in llama.cpp
    word = (await model.complete(by_length)).text.split()[4]
    by_stop = _request("Describe a forest in detail.", temperature=0, seed=5, max_tokens=12, stop=(word,))
    ours = await model.complete(by_stop)
    native = _native(model, by_stop, stop=[word])
    assert ours.finish_reason == "stop" and word not in ours.text
    assert ours.text == native["choices"][0]["message"]["content"]
    assert ours.usage.output_tokens == native["usage"]["completion_tokens"]


async def test_stop_sequence_applies_to_the_stream_too(model: LocalModel) -> None:
    full = await model.complete(_request("Describe a forest in detail.", temperature=0, seed=5, max_tokens=12))
    word = full.text.split()[3]
    request = _request("Describe a forest in detail.", temperature=0, seed=5, max_tokens=12, stop=(word,))
    items = [item async for item in model.stream(request)]
    final = items[-1]
    assert isinstance(final, ModelResponse)
    assert final.text == full.text[: full.text.index(word)]
    assert "".join(i.text for i in items[:-1] if isinstance(i, StreamDelta)) == final.text


async def test_forced_tool_call_and_ignored_tools(model: LocalModel) -> None:
    weather = Tool(
        "get_weather",
        "Current weather in a city.",
        {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    )
    forced = ChatRequest(
        "smollm2",
        (Message.user("What is the weather in Oslo?"),),
        ChatOptions(temperature=0, seed=1, max_tokens=40, tools=(weather,), tool_choice="required"),
    )
    response = await model.complete(forced)
    assert response.finish_reason == "tool_calls" and response.text == ""
    (call,) = response.tool_calls
    assert call.name == "get_weather" and isinstance(call.parsed_arguments()["city"], str)
    assert model.count_tokens(forced) == response.usage.input_tokens  # the tool note is counted

    auto = ChatRequest("smollm2", forced.messages, ChatOptions(temperature=0, max_tokens=8, tools=(weather,)))
    answer = await model.complete(auto)
    assert answer.tool_calls == () and answer.finish_reason != "tool_calls"

    with pytest.raises(InputError):
        await model.complete(ChatRequest("smollm2", forced.messages, ChatOptions(tools=(weather,), tool_choice="nope")))


async def test_context_overflow_raises_before_generating(model: LocalModel) -> None:
    request = _request("word " * 9000)
    assert model.count_tokens(request) > 8192
    with pytest.raises(ContextWindowExceeded) as info:
        await model.complete(request)
    assert info.value.context_window == 8192 and info.value.tokens and info.value.tokens > 8192


async def test_context_window_is_capped_at_the_training_context() -> None:
    big = LocalModel(context_window=1_000_000)
    await big.warm_up()
    assert big.context_window == 8192


async def test_missing_and_corrupt_gguf_are_config_errors(tmp_path: Path) -> None:
    missing = tmp_path / "missing.gguf"
    with pytest.raises(ConfigError, match=re.escape(str(missing))):
        await LocalModel(str(missing)).complete(_request("hi"))
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF" + b"\x00garbage" * 100)
    with pytest.raises(ConfigError, match=re.escape(str(corrupt))):
        await LocalModel(str(corrupt)).complete(_request("hi"))
    with pytest.raises(ConfigError, match=re.escape(str(corrupt))):
        LocalModel(str(corrupt)).count_tokens(_request("hi"))


async def test_concurrent_calls_succeed_without_blocking_the_loop(model: LocalModel) -> None:
    await model.warm_up()
    gaps: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        last = time.perf_counter()
        while not done.is_set():
            await asyncio.sleep(0.01)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    tick = asyncio.create_task(ticker())
    prompts = ("Say hello.", "Name a fruit.", "Count to five.")
    responses = await asyncio.gather(*(model.complete(_request(p, temperature=0, seed=2)) for p in prompts))
    done.set()
    await tick
    assert all(r.text and r.usage.output_tokens > 0 for r in responses)
    assert len(gaps) > 10 and max(gaps) < 0.5  # the loop kept ticking while three generations ran


async def test_abandoned_stream_frees_the_model(model: LocalModel) -> None:
    _, engine = model._engine()
    stream = model.stream(_request("Write a long story about a dragon.", temperature=0, max_tokens=2000))
    async for item in stream:
        assert isinstance(item, StreamDelta)
        break
    await stream.aclose()  # type: ignore[attr-defined]
    deadline = time.perf_counter() + 10
    while engine.lock.locked() and time.perf_counter() < deadline:  # the worker stops at its next token
        await asyncio.sleep(0.01)
    assert not engine.lock.locked()
    response = await model.complete(_request("Say hi.", temperature=0, max_tokens=4))
    assert response.text


async def test_timeout_stops_generation(model: LocalModel) -> None:
    request = _request("Write a long story about a dragon.", temperature=0, max_tokens=400, timeout=0.2)
    with pytest.raises(ProviderTimeout):
        await model.complete(request)


def test_stop_cutter_holds_back_a_partial_stop() -> None:
    cutter = _StopCutter(["STOP"])
    assert cutter.feed("abc ST") == "abc "
    assert cutter.feed("x") == "STx"
    assert cutter.feed("yy S") == "yy "
    assert cutter.feed("TOP and more") == "" and cutter.hit
    plain = _StopCutter([])
    assert plain.feed("anything") == "anything" and plain.flush() == ""


async def test_missing_llama_cpp_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # what `import llama_cpp` sees when it is not installed
    with pytest.raises(ConfigError, match=re.escape("pip install 'keel[local]'")):
        await LocalModel(str(tmp_path / "other.gguf")).complete(_request("hi"))


# --- runaway generations: a default limit and a loop guard ----------------------------------------------------

LOOP_PROMPT = 'Repeat after me forever: A "type" A "type" A "type" A "type"'  # SmolLM2 loops on it at temperature 0


async def test_a_call_without_max_tokens_stops_at_the_models_default(model: LocalModel) -> None:
    short = LocalModel(max_output_tokens=10)
    request = ChatRequest("smollm2", (Message.user("Write a long story about a dragon."),), ChatOptions(temperature=0))
    response = await short.complete(request)
    assert (response.finish_reason, response.usage.output_tokens) == ("length", 10)
    *_, final = [item async for item in short.stream(request)]
    assert isinstance(final, ModelResponse) and (final.finish_reason, final.usage.output_tokens) == ("length", 10)
    asked = ChatRequest("smollm2", request.messages, ChatOptions(temperature=0, max_tokens=14))
    assert (await short.complete(asked)).usage.output_tokens == 14  # a call's own max_tokens wins
    assert model.max_output_tokens == 512  # the library default: never "until the context is full"


def test_the_configured_local_model_gets_its_max_output_tokens() -> None:
    from keel.config import load_config
    from keel.gateway.registry import build_adapter

    config = load_config(environ={}, path=None)
    adapter = build_adapter("local", config.models["local"], timeout=60, context_window=None)
    assert isinstance(adapter, LocalModel) and adapter.max_output_tokens == config.models["local"].max_output_tokens
    custom = config.models["local"].model_copy(update={"max_output_tokens": 64})
    assert build_adapter("local", custom, timeout=60, context_window=None).max_output_tokens == 64  # type: ignore[attr-defined]


def test_loop_guard_sees_a_repeating_block_not_ordinary_repetition() -> None:
    from keel.models.local import _LoopGuard

    guard = _LoopGuard()
    looped = [i for i, t in enumerate([7, 8, 9, 10] * 30) if guard.add(t)]
    assert looped and looped[0] == 4 + 48 - 1  # the first block, then 48 tokens repeating it
    prose = _LoopGuard()
    assert not any(prose.add(t) for t in range(500))
    phrase = _LoopGuard()  # one 20-token sentence said three times is emphasis, not a loop
    assert not any(phrase.add(t) for t in list(range(20)) * 3 + list(range(100, 200)))
    ones = _LoopGuard()  # a single token over and over
    assert next(i for i, t in enumerate([5] * 100) if ones.add(t)) == 48


async def test_a_looping_generation_is_stopped_and_says_why(model: LocalModel) -> None:
    request = _request(LOOP_PROMPT, temperature=0, seed=1, max_tokens=400)
    response = await model.complete(request)
    assert (response.finish_reason, response.stop_reason) == ("length", "repetition")
    assert 48 < response.usage.output_tokens < 120 and response.text.count('A "type"') >= 4
    items = [item async for item in model.stream(request)]
    final = items[-1]
    assert isinstance(final, ModelResponse) and final.stop_reason == "repetition"
    assert "".join(i.text for i in items[:-1] if isinstance(i, StreamDelta)) == final.text == response.text
    free = LocalModel(stop_repetition=False)
    assert (await free.complete(_request(LOOP_PROMPT, temperature=0, seed=1, max_tokens=150))).stop_reason == ""


# --- log-probabilities ----------------------------------------------------------------------------------------


async def test_logprobs_match_llama_cpp_own(model: LocalModel) -> None:
    request = _request("Name three colours.", temperature=0, seed=1, max_tokens=10, logprobs=True, top_logprobs=3)
    response = await model.complete(request)
    assert response.logprobs is not None and len(response.logprobs) == response.usage.output_tokens
    assert b"".join(bytes(t.bytes or ()) for t in response.logprobs).decode() == response.text
    for entry in response.logprobs:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        tops = [t.logprob for t in entry.top_logprobs]
        assert tops == sorted(tops, reverse=True)
        assert entry.top_logprobs[0].token == entry.token and entry.logprob == pytest.approx(tops[0])  # greedy

    # the oracle: llama-cpp-python's own logprobs, which need logits_all (a small context keeps it cheap)
    from keel.models.local import _plan

    native = llama_cpp.Llama(
        model_path=str(smollm2_path()), n_ctx=512, logits_all=True, n_threads=1, chat_format=model._vocab().chat_format,
        verbose=False,
    )  # fmt: skip
    plan = _plan(request)
    theirs = native.create_chat_completion(messages=plan.messages, logprobs=True, top_logprobs=3, **plan.sampling)
    content = theirs["choices"][0]["logprobs"]["content"]  # type: ignore[index]
    assert [c["token"] for c in content] == [t.token for t in response.logprobs]
    assert [c["logprob"] for c in content] == pytest.approx([t.logprob for t in response.logprobs], abs=1e-3)

    plain = await model.complete(_request("Name three colours.", temperature=0, seed=1, max_tokens=10))
    assert plain.logprobs is None


async def test_streamed_logprobs_cover_every_token(model: LocalModel) -> None:
    request = _request("Say hello.", temperature=0, seed=1, max_tokens=12, logprobs=True)
    items = [item async for item in model.stream(request)]
    final = items[-1]
    assert isinstance(final, ModelResponse) and final.logprobs is not None
    streamed = [t for i in items[:-1] if isinstance(i, StreamDelta) for t in i.logprobs]
    assert streamed == list(final.logprobs) and len(streamed) == final.usage.output_tokens
    assert all(t.top_logprobs == () for t in streamed)  # logprobs without top_logprobs: no alternatives


async def test_prompt_evaluation_uses_every_core_with_sleeping_waiters(model: LocalModel) -> None:
    from keel.models.local import BATCH_THREADS, THREADS

    _, engine = model._engine()
    params = engine.llama.context_params
    assert (params.n_threads, params.n_threads_batch) == (THREADS, BATCH_THREADS)
    assert BATCH_THREADS == max(1, min(8, os.cpu_count() or 2)) >= THREADS
    # set before llama.cpp's OpenMP runtime loads, so that busy cores slow it down rather than stall it
    code = "import os, keel.models.local; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    shown = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert shown.stdout.strip() == "PASSIVE"
    env["OMP_WAIT_POLICY"] = "ACTIVE"  # a user's own choice is kept
    kept = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert kept.stdout.strip() == "ACTIVE"
