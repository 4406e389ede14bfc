"""The gateway's wrappers and routing, with the scripted test model."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from pydantic import BaseModel

from helpers import gateway, spans
from keel import Gateway, TestModel, errors
from keel.errors import ProviderRateLimited, ServerError
from keel.gateway.circuit import CircuitBreakerModel
from keel.gateway.retry import backoff_delay
from keel.types import ChatRequest, Message, ModelResponse, Usage


def scripted(name: str, script: list[str], extra: str = "") -> str:
    quoted = ", ".join(f'"{s}"' for s in script)
    return f'[models.{name}]\nprovider = "test"\nmodel = "{name}"\nscript = [{quoted}]\n{extra}\n'


async def test_result_fields_and_span(tmp_path: Path) -> None:
    gw = gateway(tmp_path, scripted("t", ["Retrieval-augmented generation."]))
    result = await gw.chat("What is RAG?", model="t", metadata={"feature": "faq"})
    assert result.text == "Retrieval-augmented generation." and result.finish_reason == "stop"
    assert result.usage.input_tokens > 0 and result.usage.output_tokens > 0
    assert result.cost_usd == 0.0 and result.latency_s > 0 and result.attempts == 1
    [span] = spans(gw)
    a = span.attributes
    assert span.trace_id == result.trace_id and span.span_id == result.span_id and span.name == "chat t"
    assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.provider.name"] == "test"
    assert a["gen_ai.request.model"] == "t" and a["gen_ai.response.model"] == "t"
    assert a["gen_ai.usage.input_tokens"] == result.usage.input_tokens and a["keel.metadata.feature"] == "faq"
    assert span.input["messages"] == [{"role": "user", "content": "What is RAG?"}]
    assert span.output["text"] == "Retrieval-augmented generation."
    await gw.aclose()


async def test_aliases_and_default_model(tmp_path: Path) -> None:
    gw = gateway(tmp_path, 'default_model = "fast"\n[aliases]\nfast = "t"\n' + scripted("t", ["aliased"]))
    assert (await gw.chat("hi")).model == "t"
    assert (await gw.chat("hi", model="fast")).text == "aliased"
    await gw.aclose()


async def test_fallback_after_retries_counts_every_attempt(tmp_path: Path) -> None:
    toml = '[models.a]\nprovider = "test"\nmodel = "a"\nfallbacks = ["b"]\n' + scripted("b", ["backup answer"])
    gw = gateway(tmp_path, toml)
    gw._extra["a"] = TestModel(ServerError("down", status=503), model_id="a")
    result = await gw.chat("hi", model="a")
    assert result.text == "backup answer" and result.model == "b"
    assert result.attempts == 3 + 1  # 1 try + 2 retries on the primary, then the backup
    await gw.aclose()


async def test_fallbacks_from_config_and_all_failed(tmp_path: Path) -> None:
    toml = 'max_retries = 0\n[models.a]\nprovider = "test"\nmodel = "a"\nfallbacks = ["b"]\n' + scripted(
        "b", ["from b"]
    )
    gw = gateway(tmp_path, toml)
    gw._extra["a"] = TestModel(ProviderRateLimited("busy", status=429), model_id="a")
    gw._deployments.clear()
    assert (await gw.chat("hi", model="a")).text == "from b"
    gw._extra["b"] = TestModel(ServerError("b down", status=500), model_id="b")
    gw._deployments.clear()
    with pytest.raises(errors.AllModelsFailed) as caught:
        await gw.chat("hi", model="a")
    assert [name for name, _ in caught.value.errors] == ["a", "b"] and caught.value.attempts == 2
    await gw.aclose()


async def test_bad_request_does_not_fall_back(tmp_path: Path) -> None:
    toml = 'max_retries = 0\n[models.a]\nprovider = "test"\nmodel = "a"\nfallbacks = ["b"]\n' + scripted(
        "b", ["from b"]
    )
    gw = gateway(tmp_path, toml)
    gw._extra["a"] = TestModel(errors.BadRequest("bad", status=400), model_id="a")
    with pytest.raises(errors.BadRequest):
        await gw.chat("hi", model="a")
    await gw.aclose()


async def test_context_window_precheck_routes_to_larger_model(tmp_path: Path) -> None:
    toml = scripted("tiny", ["tiny"], 'context_window = 50\ncontext_fallbacks = ["large"]') + scripted(
        "large", ["large"], "context_window = 100000"
    )
    gw = gateway(tmp_path, toml)
    assert (await gw.chat("short", model="tiny")).model == "tiny"
    long_prompt = "word " * 200
    result = await gw.chat(long_prompt, model="tiny")
    assert result.model == "large" and result.text == "large"
    await gw.aclose()


async def test_prompt_longer_than_every_window(tmp_path: Path) -> None:
    toml = scripted("tiny", ["x"], 'context_window = 50\nfallbacks = ["small"]') + scripted(
        "small", ["y"], "context_window = 60"
    )
    gw = gateway(tmp_path, toml)
    with pytest.raises(errors.ContextWindowExceeded, match="every model's context window") as caught:
        await gw.chat("word " * 300, model="tiny")
    assert caught.value.attempts == 0
    [span] = spans(gw)
    assert span.error_type == "ContextWindowExceeded"
    await gw.aclose()


async def test_circuit_breaker_opens_and_recovers() -> None:
    clock = [0.0]
    inner = TestModel([ServerError("x", status=500)] * 3 + ["recovered"])  # type: ignore[list-item]
    breaker = CircuitBreakerModel(inner, name="m", failures=3, cooldown=10, clock=lambda: clock[0])
    request = ChatRequest("m", (Message.user("hi"),))
    for _ in range(3):
        with pytest.raises(ServerError):
            await breaker.complete(request)
    assert breaker.state == "open"
    with pytest.raises(errors.CircuitOpen) as caught:
        await breaker.complete(request)
    assert caught.value.retry_after == pytest.approx(10)
    assert inner.calls == 3  # the open circuit sent nothing
    clock[0] = 10.5
    assert breaker.state == "half-open"
    assert (await breaker.complete(request)).text == "recovered"
    assert breaker.state == "closed"


def test_backoff_is_exponential_with_full_jitter() -> None:
    assert backoff_delay(1, 0.5, 20, rand=lambda: 1.0) == 0.5
    assert backoff_delay(4, 0.5, 20, rand=lambda: 1.0) == 4.0
    assert backoff_delay(10, 0.5, 20, rand=lambda: 1.0) == 20
    assert backoff_delay(3, 0.5, 20, rand=lambda: 0.0) == 0.0


async def test_retry_after_longer_than_max_delay_is_not_waited(tmp_path: Path) -> None:
    gw = gateway(tmp_path, "retry_max_s = 1.0\n" + scripted("t", ["never"]))
    gw._extra["t"] = TestModel([ProviderRateLimited("busy", status=429, retry_after=60), "late"], model_id="t")
    with pytest.raises(ProviderRateLimited):
        await asyncio.wait_for(gw.chat("hi", model="t"), timeout=5)
    await gw.aclose()


async def test_model_rate_limit_rpm(tmp_path: Path) -> None:
    gw = gateway(tmp_path, scripted("t", ["ok"], "rpm = 2"))
    await gw.chat("1", model="t")
    await gw.chat("2", model="t")
    with pytest.raises(errors.RateLimited) as caught:
        await gw.chat("3", model="t")
    assert caught.value.retry_after is not None and 0 < caught.value.retry_after <= 60
    assert caught.value.http_status == 429
    await gw.aclose()


async def test_key_token_limit(tmp_path: Path) -> None:
    gw = gateway(tmp_path, scripted("t", ["ok"]) + "[keys.team]\ntpm = 60\n")
    await gw.chat("a few words here", model="t", key="team")
    with pytest.raises(errors.RateLimited, match="token limit"):
        await gw.chat("word " * 80, model="t", key="team")
    await gw.chat("word " * 80, model="t", key="other-team")  # other keys are not limited
    await gw.aclose()


PRICED = "price = { input = 1000.0, output = 2000.0 }\nmax_output_tokens = 10"  # $ per million tokens


async def test_budget_refuses_before_the_call(tmp_path: Path) -> None:
    gw = gateway(tmp_path, scripted("t", ["ok"], PRICED) + "[keys.team]\ndaily_budget_usd = 0.05\n")
    first = await gw.chat("hello", model="t", key="team")
    assert first.cost_usd is not None and first.cost_usd > 0
    model = gw._extra.get("t") or gw.deployment("t").inner
    calls_before = len(gw.deployment("t").inner.inner.inner.inner.requests)  # type: ignore[attr-defined]
    with pytest.raises(errors.BudgetExceeded, match="daily budget") as caught:
        await gw.chat("word " * 100, model="t", key="team")
    assert caught.value.http_status == 402
    assert len(gw.deployment("t").inner.inner.inner.inner.requests) == calls_before  # type: ignore[attr-defined]
    del model
    await gw.aclose()


async def test_budget_spend_survives_restart(tmp_path: Path) -> None:
    toml = scripted("t", ["ok"], PRICED) + "[keys.team]\nmonthly_budget_usd = 0.1\n"
    gw = gateway(tmp_path, toml)
    for _ in range(3):
        await gw.chat("hello", model="t", key="team", max_tokens=5)
    spent = gw.budgets.spent("team", "monthly")
    await gw.aclose()
    again = gateway(tmp_path, toml)
    await again.chat("hello", model="t", key="team", max_tokens=5)
    assert again.budgets.spent("team", "monthly") > spent > 0
    await again.aclose()


async def test_key_model_allow_list(tmp_path: Path) -> None:
    gw = gateway(tmp_path, scripted("t", ["ok"]) + scripted("u", ["ok"]) + '[keys.team]\nmodels = ["t"]\n')
    await gw.chat("hi", model="t", key="team")
    with pytest.raises(errors.ModelNotAllowed):
        await gw.chat("hi", model="u", key="team")
    await gw.aclose()


class Answer(BaseModel):
    answer: str
    confidence: float


async def test_structured_reasks_with_the_error_and_sums_usage(tmp_path: Path) -> None:
    good = '{"answer": "42", "confidence": 0.9}'
    model = TestModel(["not json at all", '{"answer": "42"}', good])
    gw = Gateway(models={"t": model})
    result = await gw.chat("question", model="t", response_model=Answer)
    assert result.parsed == Answer(answer="42", confidence=0.9)
    assert len(model.requests) == 3
    reask = model.requests[1].messages[-1].content or ""
    assert "not valid JSON" in reask
    assert "confidence" in (model.requests[2].messages[-1].content or "")
    single = sum(r.messages.__len__() for r in model.requests)
    assert single > 0 and result.usage.output_tokens > 10
    [span] = spans(gw)
    assert span.attributes["keel.structured.tries"] == 3
    await gw.aclose()


async def test_structured_gives_up_after_limit(tmp_path: Path) -> None:
    gw = Gateway(models={"t": TestModel("{}")})
    with pytest.raises(errors.StructuredOutputError, match="after 2 tries") as caught:
        await gw.chat("q", model="t", response_model=Answer, max_reasks=1)
    assert caught.value.usage is not None and caught.value.usage.output_tokens > 0
    await gw.aclose()


async def test_json_schema_dict_and_invalid_schema() -> None:
    gw = Gateway(models={"t": TestModel('{"n": 3}')})
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    assert (await gw.chat("q", model="t", response_model=schema)).parsed == {"n": 3}
    with pytest.raises(errors.InvalidSchema):
        await gw.chat("q", model="t", response_model={"type": "object", "properties": {"n": {"type": "nope"}}})
    await gw.aclose()


async def test_bad_input_gives_specific_errors_and_failed_spans() -> None:
    gw = Gateway(models={"t": TestModel("ok")})
    with pytest.raises(errors.UnknownModel, match="nope"):
        await gw.chat("hi", model="nope")
    with pytest.raises(errors.InvalidMessages, match="role"):
        await gw.chat([{"role": "wizard", "content": "hi"}], model="t")
    with pytest.raises(errors.InvalidMessages, match="empty"):
        await gw.chat([], model="t")
    with pytest.raises(errors.InvalidMessages, match="tool_call_id"):
        await gw.chat([{"role": "tool", "content": "x"}], model="t")
    with pytest.raises(errors.InputError, match="temperature"):
        await gw.chat("hi", model="t", temperature=5)
    failed = spans(gw, status="error")
    assert sorted(s.error_type or "" for s in failed) == [
        "InputError", "InvalidMessages", "InvalidMessages", "InvalidMessages", "UnknownModel",
    ]  # fmt: skip
    await gw.aclose()


async def test_secrets_are_redacted_and_content_capture_can_be_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-live-abcdefghijklmnopqrstuvwxyz")
    gw = gateway(tmp_path, '[tracing]\nredact_patterns = ["ACCT-\\\\d{6}"]\n' + scripted("t", ["ok"]))
    await gw.chat("my key is sk-live-abcdefghijklmnopqrstuvwxyz and account ACCT-123456", model="t")
    [span] = spans(gw)
    stored = span.input["messages"][0]["content"]
    assert "sk-live" not in stored and "ACCT-123456" not in stored and stored.count("[REDACTED]") == 2
    await gw.aclose()
    off = gateway(
        tmp_path / "off", "[tracing]\ncapture_content = false\n" + scripted("t", ["ok"]), store=str(tmp_path / "off.db")
    )
    await off.chat("private", model="t")
    [span] = spans(off)
    assert span.input is None and span.output is None and span.attributes["gen_ai.usage.input_tokens"] > 0
    await off.aclose()


def test_sync_api(tmp_path: Path) -> None:
    with Gateway(models={"t": TestModel(["one", "two words"])}) as gw:
        assert gw.chat_sync("hi", model="t").text == "one"
        stream = gw.stream_sync("hi", model="t")
        assert "".join(d.text for d in stream) == "two words"
        assert stream.result is not None and stream.result.text == "two words"
        assert gw.count_tokens("hello world", model="t") > 2


async def test_stream_and_complete_agree_on_usage() -> None:
    gw = Gateway(models={"t": TestModel("same answer")})
    plain = await gw.chat("hi", model="t")
    streamed = await gw.stream("hi", model="t").collect()
    assert plain.usage == streamed.usage and streamed.text == plain.text
    await gw.aclose()


async def test_many_concurrent_calls_are_all_traced() -> None:
    gw = Gateway(models={"t": TestModel("ok")})
    results = await asyncio.gather(*(gw.chat(f"q{i}", model="t") for i in range(300)))
    assert len({r.span_id for r in results}) == 300
    assert len(spans(gw, limit=1000)) == 300
    await gw.aclose()


def test_usage_adds() -> None:
    assert Usage(1, 2, 3, 4) + Usage(10, 20, 30, 40) == Usage(11, 22, 33, 44)
    assert ModelResponse("x").attempts == 1


async def test_a_cancelled_probe_does_not_leave_the_circuit_half_open() -> None:
    clock = [0.0]
    inner = TestModel([ServerError("x", status=500)] * 2 + ["slow", "ok"], delay=0.0)  # type: ignore[list-item]
    breaker = CircuitBreakerModel(inner, name="m", failures=2, cooldown=10, clock=lambda: clock[0])
    request = ChatRequest("m", (Message.user("hi"),))
    for _ in range(2):
        with pytest.raises(ServerError):
            await breaker.complete(request)
    clock[0] = 11
    inner.delay = 5.0
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(breaker.complete(request), timeout=0.05)  # the probe is cancelled
    inner.delay = 0.0
    assert (await breaker.complete(request)).text in ("slow", "ok")  # another probe is let through
    assert breaker.state == "closed"


async def test_failed_structured_output_still_costs_the_budget(tmp_path: Path) -> None:
    gw = gateway(tmp_path, scripted("t", ["not json"], PRICED) + "[keys.team]\ndaily_budget_usd = 100\n")
    with pytest.raises(errors.StructuredOutputError) as caught:
        await gw.chat("q", model="t", key="team", response_model=Answer, max_reasks=1)
    assert caught.value.attempts == 2 and caught.value.cost_usd is not None and caught.value.cost_usd > 0
    assert gw.budgets.spent("team") == pytest.approx(caught.value.cost_usd)
    [span] = spans(gw)
    assert span.attributes["keel.cost_usd"] == pytest.approx(caught.value.cost_usd)
    await gw.aclose()


async def test_wrongly_typed_options_are_input_errors() -> None:
    gw = Gateway(models={"t": TestModel("ok")}, store=False)
    bad: list[dict[str, object]] = [
        {"temperature": "0.5"}, {"max_tokens": 1.5}, {"stop": [1]}, {"max_reasks": -1, "response_model": Answer},
        {"tools": [{"name": "f", "parameters": "x"}]},
    ]  # fmt: skip
    for kwargs in bad:
        with pytest.raises(errors.InputError):
            await gw.chat("hi", model="t", **kwargs)  # type: ignore[arg-type]
    with pytest.raises(errors.InputError):
        await gw.embed(None, model="t")  # type: ignore[arg-type]
    await gw.aclose()


async def test_a_refused_call_uses_up_no_request_slot(tmp_path: Path) -> None:
    gw = gateway(tmp_path, scripted("t", ["ok"]) + "[keys.team]\nrpm = 2\ntpm = 100\n")
    await gw.chat("short", model="t", key="team")
    with pytest.raises(errors.RateLimited, match="token limit"):
        await gw.chat("word " * 200, model="t", key="team")
    await gw.chat("short again", model="t", key="team")  # the refused call did not count as a request
    await gw.aclose()


async def test_embedding_retries_are_counted(tmp_path: Path) -> None:
    toml = '[models.e]\nprovider = "test"\nmodel = "e"\nkind = "embedding"\n'
    gw = gateway(tmp_path, toml)
    flaky = TestModel("unused", model_id="e")
    failures = [ServerError("busy", status=503), ServerError("busy", status=503)]
    real_embed = flaky.embed

    async def embed(texts):  # type: ignore[no-untyped-def]
        if failures:
            raise failures.pop()
        return await real_embed(texts)

    flaky.embed = embed  # type: ignore[method-assign]
    gw._extra["e"] = flaky
    result = await gw.embed(["a"], model="e")
    assert result.attempts == 3
    [span] = spans(gw)
    assert span.attributes["keel.attempts"] == 3
    await gw.aclose()


async def test_an_abandoned_stream_is_charged_its_reserved_worst_case(tmp_path: Path) -> None:
    gw = gateway(tmp_path, scripted("t", ["a long answer " * 20], PRICED) + "[keys.team]\ndaily_budget_usd = 100\n")
    stream = gw.stream("q", model="t", key="team")
    async for _ in stream:
        break
    await stream.aclose()
    [span] = spans(gw)
    assert span.status == "error" and span.attributes["keel.cost_estimated"] is True
    assert gw.budgets.spent("team") == pytest.approx(span.attributes["keel.cost_usd"]) and gw.budgets.spent("team") > 0
    await gw.aclose()


async def test_stop_reason_and_logprobs_reach_the_result_and_the_trace(tmp_path: Path) -> None:
    from keel.types import TokenLogprob

    looped = ModelResponse('A "type"A "type"', finish_reason="length", usage=Usage(5, 48), stop_reason="repetition")
    scored = TestModel(ModelResponse("Hi", logprobs=(TokenLogprob("Hi", -0.1),)))
    scored.supports_logprobs = True  # as the local and OpenAI adapters declare
    gw = gateway(tmp_path, models={"loop": TestModel(looped), "scored": scored, "plain": TestModel("Hi")})
    result = await gw.chat("go", model="loop")
    assert (result.finish_reason, result.stop_reason) == ("length", "repetition")
    [span] = spans(gw)
    assert span.attributes["keel.stop_reason"] == "repetition"
    assert span.attributes["gen_ai.response.finish_reasons"] == ["length"]
    assert (await gw.chat("go", model="scored", logprobs=True, top_logprobs=0)).logprobs == (TokenLogprob("Hi", -0.1),)
    with pytest.raises(errors.InputError, match=r"'plain' .* does not return log-probabilities"):
        await gw.chat("go", model="plain", logprobs=True)
    with pytest.raises(errors.InputError, match="top_logprobs needs logprobs"):
        await gw.chat("go", model="scored", top_logprobs=2)
    with pytest.raises(errors.InputError, match="between 0 and 20"):
        await gw.chat("go", model="scored", logprobs=True, top_logprobs=21)
    await gw.aclose()
