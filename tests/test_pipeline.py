"""The request pipeline: one stack of wrappers for chat, stream and embed, with the call's context."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import aclosing
from pathlib import Path

import pytest

from helpers import gateway, spans
from keel import CallContext, FunctionModel, Gateway, RequestWrapper, TestModel, errors
from keel.gateway.masking import MaskEmails
from keel.gateway.pipeline import SLOTS, Call, Handler, Item
from keel.types import ChatRequest, ModelResponse, StreamDelta


class Recorder(RequestWrapper):
    """Notes every call it sees, then passes it on."""

    def __init__(self) -> None:
        self.calls: list[Call] = []

    async def __call__(self, call: Call, next: Handler) -> AsyncGenerator[Item, None]:
        self.calls.append(call)
        async with aclosing(next(call)) as items:
            async for item in items:
                yield item


class ExactCache(RequestWrapper):
    """A toy cache in the cache slot: answers a repeated prompt without calling the model."""

    slot = "cache"

    def __init__(self) -> None:
        self.answers: dict[str, ModelResponse] = {}

    async def __call__(self, call: Call, next: Handler) -> AsyncGenerator[Item, None]:
        prompt = call.chat_request.messages[-1].content or ""
        if prompt in self.answers:
            call.state["cache_hit"] = True
            yield self.answers[prompt]
            return
        async with aclosing(next(call)) as items:
            async for item in items:
                if isinstance(item, ModelResponse):
                    self.answers[prompt] = item
                yield item


class Boom(RequestWrapper):
    async def __call__(self, call: Call, next: Handler) -> AsyncGenerator[Item, None]:
        raise errors.InputError("boom: this wrapper refuses every call")
        yield  # pragma: no cover - makes this an async generator


def echo(request: ChatRequest) -> str:
    return " | ".join(m.content or "" for m in request.messages)


def test_the_slots_are_in_the_documented_order() -> None:
    assert SLOTS.index("scope") < SLOTS.index("user") < SLOTS.index("cache") < SLOTS.index("limits")
    assert SLOTS.index("cache") < SLOTS.index("budget") < SLOTS.index("cascade") < SLOTS.index("structured")


async def test_chat_stream_and_embed_pass_the_same_wrapper_with_their_context(tmp_path: Path) -> None:
    recorder = Recorder()
    gw = gateway(tmp_path, models={"f": FunctionModel(echo), "e": TestModel()}, wrappers=[recorder])
    context = CallContext(tenant="acme", user="u-1", session="s-42", tags=("beta",), metadata={"feature": "faq"})
    result = await gw.chat("hello", model="f", context=context)
    stream = gw.stream("hello", model="f", context=context)
    streamed = await stream.collect()
    assert [c.stream for c in recorder.calls] == [False, True]
    assert all(c.context.tenant == "acme" and c.context.session == "s-42" for c in recorder.calls)
    assert streamed.text == result.text == "hello"
    for span in spans(gw):
        a = span.attributes
        who = (a["keel.tenant"], a["keel.user"], a["keel.session"], a["keel.tags"])
        assert who == ("acme", "u-1", "s-42", ["beta"])
        assert a["keel.metadata.feature"] == "faq"


async def test_embeddings_pass_the_pipeline(tmp_path: Path) -> None:
    recorder = Recorder()
    gw = gateway(tmp_path, wrappers=[recorder])
    gw.pipeline.add(MaskEmails())
    seen: list[list[str]] = []

    class Embedder(TestModel):
        async def embed(self, texts):  # type: ignore[no-untyped-def]
            seen.append(list(texts))
            return await super().embed(texts)

    gw._extra["emb"] = Embedder()
    await gw.embed(["write to ann@example.com"], model="emb", context=CallContext(tenant="acme"))
    assert recorder.calls[0].operation == "embeddings" and recorder.calls[0].context.tenant == "acme"
    assert seen == [["write to [email]"]]


async def test_a_cache_hit_takes_no_rate_limit_slot(tmp_path: Path) -> None:
    gw = gateway(tmp_path, "[keys.team]\nrpm = 1\n", models={"f": FunctionModel(echo)}, wrappers=[ExactCache()])
    first = await gw.chat("same question", model="f", key="team")
    for _ in range(3):  # answered by the cache: the key's one request a minute is not touched again
        assert (await gw.chat("same question", model="f", key="team")).text == first.text
    with pytest.raises(errors.RateLimited):
        await gw.chat("another question", model="f", key="team")
    hits = [s.attributes["keel.cache_hit"] for s in sorted(spans(gw), key=lambda s: s.start_time) if s.status == "ok"]
    assert hits == [False, True, True, True]


async def test_a_refused_key_never_reaches_a_user_wrapper(tmp_path: Path) -> None:
    recorder = Recorder()
    toml = '[models.t]\nprovider = "test"\nmodel = "t"\n[models.u]\nprovider = "test"\nmodel = "u"\n'
    gw = gateway(tmp_path, toml + '[keys.team]\nmodels = ["t"]\n', wrappers=[recorder])
    with pytest.raises(errors.ModelNotAllowed):
        await gw.chat("hi", model="u", key="team")
    assert recorder.calls == []


async def test_a_wrapper_that_raises_fails_the_call_traced_and_releases_the_budget(tmp_path: Path) -> None:
    priced = '[models.t]\nprovider = "test"\nmodel = "t"\nprice = { input = 1000.0, output = 2000.0 }\n'
    gw = gateway(tmp_path, priced + "[keys.team]\ndaily_budget_usd = 100\n")
    gw.pipeline.add(Boom(), "structured")  # inside the budget: its reservation must be released
    with pytest.raises(errors.InputError, match="boom"):
        await gw.chat("hi", model="t", key="team")
    [span] = spans(gw)
    assert span.status == "error" and span.error_type == "InputError" and "boom" in (span.error_message or "")
    ledger = gw.budgets._ledgers[("team", "daily")]
    assert ledger.reserved == 0 and ledger.spent == 0


async def test_mask_emails_from_the_configuration_masks_the_prompt_the_model_and_the_trace_see(
    tmp_path: Path,
) -> None:
    toml = '[[gateway.wrappers]]\npath = "keel.gateway.masking:MaskEmails"\noptions = { placeholder = "<email>" }\n'
    gw = gateway(tmp_path, toml, models={"f": FunctionModel(echo)})
    result = await gw.chat("Mail bob.smith+x@mail.example.co.uk and ann@example.com today", model="f")
    assert result.text == "Mail <email> and <email> today"
    [span] = spans(gw)
    assert "example" not in str(span.input) and span.attributes["keel.masked_emails"] == 2


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ('path = "keel.nowhere:Mask"', "cannot be imported"),
        ('path = "keel.gateway.masking:MaskEmails"\nslot = "front"', "unknown pipeline slot"),
        ('path = "keel.gateway.masking:MaskEmails"\noptions = { colour = "red" }', "options do not fit"),
        ('path = "keel.types:Usage"', "not a keel RequestWrapper"),
    ],
)
def test_a_bad_wrapper_entry_is_a_config_error(tmp_path: Path, entry: str, message: str) -> None:
    with pytest.raises(errors.ConfigError, match=message):
        gateway(tmp_path, f"[[gateway.wrappers]]\n{entry}\n")


async def test_a_stream_left_early_closes_every_wrapper_at_once(tmp_path: Path) -> None:
    closed: list[bool] = []

    class Closer(RequestWrapper):
        async def __call__(self, call: Call, next: Handler) -> AsyncGenerator[Item, None]:
            try:
                async with aclosing(next(call)) as items:
                    async for item in items:
                        yield item
            finally:
                closed.append(True)

    gw = gateway(tmp_path, models={"t": TestModel("a long answer " * 10)}, wrappers=[Closer()])
    stream = gw.stream("q", model="t")
    async for delta in stream:
        assert isinstance(delta, StreamDelta)
        break
    await stream.aclose()
    assert closed == [True]


async def test_a_budgeted_key_is_not_refused_for_a_fallback_without_its_api_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KEEL_TEST_ABSENT_KEY", raising=False)
    toml = (
        '[models.t]\nprovider = "test"\nmodel = "t"\nprice = { input = 1.0, output = 2.0 }\nfallbacks = ["far"]\n'
        '[models.far]\nprovider = "openai"\nmodel = "gpt-4o-mini"\napi_key_env = "KEEL_TEST_ABSENT_KEY"\n'
        "[keys.team]\ndaily_budget_usd = 5\n"
    )
    gw = gateway(tmp_path, toml)
    result = await gw.chat("hi", model="t", key="team")  # the fallback is never reached: nothing to price
    assert result.model == "t"


def test_unknown_keyword_arguments_are_named(tmp_path: Path) -> None:
    gw: Gateway = gateway(tmp_path, models={"t": TestModel()})
    with pytest.raises(errors.InputError, match=r"unknown argument.*temprature"):
        gw.chat_sync("hi", model="t", temprature=0.1)  # type: ignore[call-arg]
    gw.close()
