"""Money (issue 17): a call without usage is charged, an overrun is charged, reported and stops the key."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from pathlib import Path
from typing import Any

import pytest

from helpers import collect, gateway, openai_model, spans
from keel import errors, tokens
from keel.alerts import AlertEvaluator
from keel.config import KeyConfig
from keel.gateway.budget import BudgetTracker
from keel.models.anthropic import AnthropicModel
from keel.models.gemini import GeminiModel
from keel.server.metrics import GatewayMetrics
from keel.store import Store
from keel.store.alerts import CallWindow, measure
from keel.trace import Span, new_id, new_trace_id
from keel.types import ChatRequest, Message
from provider_stubs import StubServer, anthropic_message, anthropic_stream, gemini_response, gemini_stream
from stubs import OpenAIStub, Scripted, completion, stream_chunks

#: $10 and $20 per million tokens: 1e-5 per input token, 2e-5 per output token.
PRICE = "price = { input = 10.0, output = 20.0 }"
ANSWER = "Four score and seven years ago our fathers brought forth on this continent a new nation."


def without_usage(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k not in ("usage", "usageMetadata")}


def priced(url: str, budget: float = 1.0) -> str:
    return openai_model("m", url, extra=PRICE) + f"[keys.team]\ndaily_budget_usd = {budget}\n"


# --- 17.1: no usage from the upstream ------------------------------------------------------


async def test_a_call_without_usage_is_charged_from_local_counts(tmp_path: Path, openai_stub: OpenAIStub) -> None:
    gw = gateway(tmp_path, priced(openai_stub.url))
    openai_stub.push(without_usage(completion(ANSWER)))
    result = await gw.chat("How does the address begin?", model="m", key="team", max_tokens=100)
    assert result.usage.estimated
    assert result.usage.input_tokens == gw.count_tokens("How does the address begin?", "m")
    assert result.usage.output_tokens == tokens.count_text(ANSWER, "o200k_base") > 10  # gpt-4o-mini's encoding
    expected = result.usage.input_tokens * 1e-5 + result.usage.output_tokens * 2e-5
    assert result.cost_usd == pytest.approx(expected)
    assert gw.budgets.spent("team") == pytest.approx(expected)
    [span] = spans(gw)
    assert span.attributes["keel.cost_estimated"] is True and span.attributes["keel.cost_usd"] == pytest.approx(
        expected
    )
    assert span.attributes["gen_ai.usage.output_tokens"] == result.usage.output_tokens
    await gw.aclose()


async def test_zero_counts_with_an_answer_are_no_counts(tmp_path: Path, openai_stub: OpenAIStub) -> None:
    gw = gateway(tmp_path, priced(openai_stub.url))
    openai_stub.push(completion(ANSWER, prompt_tokens=0, completion_tokens=0))
    result = await gw.chat("How does the address begin?", model="m", key="team")
    assert result.usage.estimated and result.usage.input_tokens > 0 and result.usage.output_tokens > 10
    assert result.cost_usd is not None and result.cost_usd > 0
    await gw.aclose()


async def test_reported_usage_is_not_estimated(tmp_path: Path, openai_stub: OpenAIStub) -> None:
    gw = gateway(tmp_path, priced(openai_stub.url))
    openai_stub.push(completion(ANSWER, prompt_tokens=7, completion_tokens=3))
    result = await gw.chat("hi", model="m", key="team")
    assert not result.usage.estimated and (result.usage.input_tokens, result.usage.output_tokens) == (7, 3)
    [span] = spans(gw)
    assert "keel.cost_estimated" not in span.attributes
    await gw.aclose()


async def test_a_budget_cannot_be_bypassed_by_an_upstream_without_usage(
    tmp_path: Path, openai_stub: OpenAIStub
) -> None:
    """The issue's case: $0.01 a day, an upstream that never sends usage. Before, every call cost $0."""
    gw = gateway(tmp_path, priced(openai_stub.url, budget=0.01))
    calls = 0
    with pytest.raises(errors.BudgetExceeded):
        for _ in range(400):
            openai_stub.push(without_usage(completion(ANSWER)))
            await gw.chat("How does the address begin?", model="m", key="team", max_tokens=40)
            calls += 1
    spent = gw.budgets.spent("team")
    one_call = spent / calls
    assert 0.01 - 2 * one_call < spent <= 0.01  # refused when the next worst case no longer fits
    assert calls < 100
    await gw.aclose()
    again = gateway(tmp_path, priced(openai_stub.url, budget=0.01))  # the spend is in the store too
    with pytest.raises(errors.BudgetExceeded):
        await again.chat("How does the address begin?", model="m", key="team", max_tokens=40)
    await again.aclose()


async def test_a_stream_without_usage_is_charged(tmp_path: Path, openai_stub: OpenAIStub) -> None:
    gw = gateway(tmp_path, priced(openai_stub.url))
    chunks = [c for c in stream_chunks(ANSWER) if "usage" not in c]
    openai_stub.push(Scripted(stream=chunks))
    stream = gw.stream("How does the address begin?", model="m", key="team")
    result = await stream.collect()
    assert stream.text == ANSWER and result.usage.estimated
    assert result.usage.output_tokens == tokens.count_text(ANSWER, "o200k_base")
    assert result.cost_usd is not None and result.cost_usd > 0
    assert gw.budgets.spent("team") == pytest.approx(result.cost_usd)
    [span] = spans(gw)
    assert span.attributes["keel.cost_estimated"] is True
    await gw.aclose()


async def test_when_counting_fails_the_reserved_worst_case_is_charged(
    tmp_path: Path, openai_stub: OpenAIStub, monkeypatch: pytest.MonkeyPatch
) -> None:
    gw = gateway(tmp_path, priced(openai_stub.url))
    prompt = gw.count_tokens("How does the address begin?", "m")

    def broken(text: str, encoding: str | None = None) -> int:
        raise RuntimeError("no tokenizer")

    monkeypatch.setattr(tokens, "completion_tokens", broken)
    openai_stub.push(without_usage(completion(ANSWER)))
    result = await gw.chat("How does the address begin?", model="m", key="team", max_tokens=50)
    worst = prompt * 1e-5 + 50 * 2e-5
    assert result.usage.estimated and result.cost_usd == pytest.approx(worst)
    assert gw.budgets.spent("team") == pytest.approx(worst)
    await gw.aclose()


def test_the_server_marks_estimated_usage(tmp_path: Path, openai_stub: OpenAIStub) -> None:
    import openai

    from serving import Server

    gw = gateway(tmp_path, openai_model("m", openai_stub.url, extra=PRICE))
    served = Server(gw)
    try:
        client = openai.OpenAI(base_url=served.url, api_key="unused", max_retries=0)
        openai_stub.push(without_usage(completion(ANSWER)))
        answer = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        assert answer.usage is not None and answer.usage.completion_tokens > 10
        assert (answer.usage.model_extra or {}).get("estimated") is True
        openai_stub.push(completion(ANSWER))
        answer = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        assert answer.usage is not None and "estimated" not in (answer.usage.model_extra or {})
    finally:
        served.stop()


REQUEST = ChatRequest("model-x", (Message.user("How does the address begin?"),))


@pytest.fixture
async def claude(server: StubServer) -> AsyncIterator[AnthropicModel]:
    server.reset()
    model = AnthropicModel("claude-test-1", api_key="sk-test", base_url=server.url, timeout=5)
    yield model
    await model.aclose()


@pytest.fixture
async def gemini(server: StubServer) -> AsyncIterator[GeminiModel]:
    server.reset()
    model = GeminiModel("gemini-test", api_key="test-key", base_url=server.url, timeout=5)
    yield model
    await model.aclose()


def _strip_usage(events: list[bytes]) -> list[bytes]:
    """Anthropic SSE events with every `usage` taken out."""
    out = []
    for event in events:
        head, _, data = event.partition(b"data: ")
        body = json.loads(data)
        body.pop("usage", None)
        if isinstance(body.get("message"), dict):
            body["message"].pop("usage", None)
        out.append(head + b"data: " + json.dumps(body).encode() + b"\n\n")
    return out


async def test_anthropic_without_usage(server: StubServer, claude: AnthropicModel) -> None:
    server.reply_json(without_usage(anthropic_message(ANSWER)))
    response = await claude.complete(REQUEST)
    assert response.usage.estimated and response.usage.input_tokens == claude.count_tokens(REQUEST)
    assert response.usage.output_tokens == tokens.completion_tokens(ANSWER) > 10
    server.reply_stream(_strip_usage(anthropic_stream(("Four score ", "and seven"))))
    _, final = await collect(claude, REQUEST)
    assert final.usage.estimated and final.usage.input_tokens == claude.count_tokens(REQUEST)
    assert final.usage.output_tokens == tokens.completion_tokens("Four score and seven")
    server.reply_json(anthropic_message(ANSWER, usage={"input_tokens": 11, "output_tokens": 22}))
    reported = await claude.complete(REQUEST)
    assert not reported.usage.estimated and (reported.usage.input_tokens, reported.usage.output_tokens) == (11, 22)


async def test_gemini_without_usage(server: StubServer, gemini: GeminiModel) -> None:
    server.reply_json(without_usage(gemini_response(ANSWER)))
    response = await gemini.complete(REQUEST)
    assert response.usage.estimated and response.usage.input_tokens == gemini.count_tokens(REQUEST)
    assert response.usage.output_tokens == tokens.completion_tokens(ANSWER) > 10
    chunks = [
        without_usage(gemini_response("Four score ", finish_reason=None)),
        without_usage(gemini_response("and seven")),
    ]
    server.reply_stream(gemini_stream(chunks))
    _, final = await collect(gemini, REQUEST)
    assert final.text == "Four score and seven" and final.usage.estimated
    assert final.usage.output_tokens == tokens.completion_tokens("Four score and seven")
    server.reply_json(gemini_response(ANSWER, usage={"promptTokenCount": 11, "candidatesTokenCount": 22}))
    reported = await gemini.complete(REQUEST)
    assert not reported.usage.estimated and (reported.usage.input_tokens, reported.usage.output_tokens) == (11, 22)


# --- a call cancelled after it was sent (the client left, the request timed out) -------------


async def test_a_call_cancelled_in_flight_keeps_the_reserved_worst_case(
    tmp_path: Path, openai_stub: OpenAIStub
) -> None:
    """The provider bills a request it received whether or not keel waits for the answer: a caller who
    leaves (or times out) before it arrives is charged the reservation, as for a stream cut midway,
    never nothing (which let a $1 key make unbounded upstream calls)."""
    gw = gateway(tmp_path, priced(openai_stub.url))
    await gw.chat("hi", model="m")  # warm up (tokenizer, client) outside the key
    openai_stub.push(Scripted(body=completion(ANSWER), delay=5))
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(gw.chat("hi", model="m", key="team", max_tokens=100), 1.5)
    assert len(openai_stub.requests) == 2  # it was sent
    worst = gw.count_tokens("hi", "m") * 1e-5 + 100 * 2e-5
    assert gw.budgets.spent("team") == pytest.approx(worst)
    [span] = [s for s in spans(gw) if s.attributes.get("keel.api_key") == "team"]
    assert span.attributes["keel.cost_usd"] == pytest.approx(worst) and span.attributes["keel.cost_estimated"]
    await gw.aclose()


async def test_a_stream_left_after_its_first_piece_keeps_the_reserved_worst_case(
    tmp_path: Path, openai_stub: OpenAIStub
) -> None:
    gw = gateway(tmp_path, priced(openai_stub.url))
    openai_stub.push(Scripted(stream=stream_chunks(ANSWER, pieces=5)))
    stream = gw.stream("hi", model="m", key="team", max_tokens=100)  # held: settling must not wait for the GC
    async with aclosing(aiter(stream)) as deltas:
        await anext(deltas)
    worst = gw.count_tokens("hi", "m") * 1e-5 + 100 * 2e-5
    assert gw.budgets.spent("team") == pytest.approx(worst)
    await gw.aclose()


# --- 17.12: real usage beyond the reservation ------------------------------------------------


async def test_an_overrun_is_charged_reported_and_stops_the_key(tmp_path: Path, openai_stub: OpenAIStub) -> None:
    """The issue's case: max_tokens=10, the upstream bills 1,000 output tokens against a $0.01 budget."""
    gw = gateway(tmp_path, priced(openai_stub.url, budget=0.01))
    metrics = GatewayMetrics(gw)
    gw.tracer.listeners.append(metrics.observe)
    openai_stub.push(completion(ANSWER, prompt_tokens=10, completion_tokens=1000))
    result = await gw.chat("hi", model="m", key="team", max_tokens=10)
    assert result.cost_usd == pytest.approx(10 * 1e-5 + 1000 * 2e-5)  # $0.0201, all of it charged
    assert gw.budgets.spent("team") == pytest.approx(0.0201)
    [span] = spans(gw)
    assert span.attributes["keel.budget.overrun_usd"] == pytest.approx(0.0101)
    [line] = [x for x in metrics.render().decode().splitlines() if x.startswith("keel_budget_overrun_usd_total{")]
    labels, value = line.split(" ")
    assert labels.endswith('{key="team",model="m",operation="chat"}') and float(value) == pytest.approx(0.0101)
    sent = len(openai_stub.requests)
    with pytest.raises(errors.BudgetExceeded, match="spent its daily budget"):
        await gw.chat("hi", model="m", key="team", max_tokens=1)
    assert len(openai_stub.requests) == sent  # refused before anything was sent
    await gw.aclose()


async def test_an_exhausted_budget_refuses_even_unpriced_calls() -> None:
    budgets = BudgetTracker(None, {"team": KeyConfig(daily_budget_usd=0.01)})
    reservation = await budgets.reserve("team", 0.004)
    assert budgets.settle(reservation, 0.01) == 0.0  # exactly the budget: spent, not passed
    with pytest.raises(errors.BudgetExceeded, match="spent its daily budget"):
        await budgets.reserve("team", None)  # a model without a price reserves nothing
    free = BudgetTracker(None, {"team": KeyConfig(daily_budget_usd=0.01)})
    assert await free.reserve("team", None) is not None  # within the budget, unpriced calls still pass


async def test_concurrent_overruns_are_each_reported() -> None:
    budgets = BudgetTracker(None, {"team": KeyConfig(daily_budget_usd=0.01, monthly_budget_usd=1.0)})
    first, second = await budgets.reserve("team", 0.004), await budgets.reserve("team", 0.004)
    assert budgets.settle(first, 0.008) == 0.0
    assert budgets.settle(second, 0.005) == pytest.approx(0.003)  # 0.013 spent: 0.003 past the daily budget
    assert budgets.spent("team") == pytest.approx(0.013) and budgets.spent("team", "monthly") == pytest.approx(0.013)


async def test_an_alert_rule_fires_on_overruns(tmp_path: Path, openai_stub: OpenAIStub) -> None:
    toml = priced(openai_stub.url, budget=0.01) + (
        '[alerts.overspend]\nmetric = "budget_overrun_usd"\nthreshold = 0\nwindow = "1h"\n'
    )
    gw = gateway(tmp_path, toml)
    assert gw.store is not None
    evaluator = AlertEvaluator(gw.config, gw.store)
    [row] = await evaluator.evaluate_once()
    assert row.state == "ok" and row.value == 0.0
    openai_stub.push(completion(ANSWER, prompt_tokens=10, completion_tokens=1000))
    await gw.chat("hi", model="m", key="team", max_tokens=10)
    gw.flush()
    [row] = await evaluator.evaluate_once()
    await evaluator.aclose()
    assert row.state == "firing" and row.value == pytest.approx(0.0101)
    assert row.message.startswith("budget overrun of all models $0.0101 > $0 over 1h")
    await gw.aclose()


def test_overruns_are_measured_on_both_stores(store: Store) -> None:
    now = time.time()

    def call(overrun: float | None, key: str = "team") -> Span:
        attributes: dict[str, Any] = {"gen_ai.operation.name": "chat", "keel.model": "m", "keel.api_key": key}
        if overrun is not None:
            attributes["keel.budget.overrun_usd"] = overrun
        return Span(new_trace_id(), new_id(), None, "chat m", now - 10, now - 9, attributes=attributes)

    store.write_spans([call(None), call(0.25), call(0.5), call(1.0, key="ops")])
    assert measure(store, CallWindow(now - 60, now, overrun=True)).budget_overrun_usd == pytest.approx(1.75)
    assert measure(store, CallWindow(now - 60, now, api_key="team", overrun=True)).budget_overrun_usd == 0.75
    assert measure(store, CallWindow(now - 60, now)).budget_overrun_usd == 0.0  # not asked: not read
