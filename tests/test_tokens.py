"""Token counts, and the cheap bounds that stand in for them on the hot path."""

from __future__ import annotations

import pytest

from keel import tokens
from keel.models.local import LocalModel
from keel.types import ChatOptions, ChatRequest, Message, Tool

TEXTS = [
    "What is retrieval-augmented generation?",
    "Ünïcödé façade — naïve café, 東京タワーは高さ333メートルです。",
    "emoji 🧪🚀🎉 " * 20,
    "x" * 5000,
    "def f(x):\n    return {'a': [1, 2, 3]}\n" * 50,
]


def _request(text: str) -> ChatRequest:
    tool = Tool("lookup", "Look a thing up", {"type": "object", "properties": {"q": {"type": "string"}}})
    return ChatRequest("m", (Message.system("Be brief."), Message.user(text)), ChatOptions(tools=(tool,)))


@pytest.mark.parametrize("text", TEXTS)
def test_upper_bound_is_never_below_any_count(text: str) -> None:
    request = _request(text)
    bound = tokens.upper_bound(request)
    assert bound >= tokens.request_tokens(request, "o200k_base")
    assert bound >= tokens.request_tokens(request, "cl100k_base")
    assert bound >= tokens.approx_request_tokens(request)


@pytest.mark.parametrize("text", TEXTS)
def test_upper_bound_holds_for_the_local_tokenizer_and_its_chat_template(text: str) -> None:
    request = ChatRequest("smollm2", (Message.user(text),))
    assert tokens.upper_bound(request) >= LocalModel("smollm2").count_tokens(request)


def test_estimate_is_close_on_english_text() -> None:
    request = _request("The quick brown fox jumps over the lazy dog. " * 40)
    exact = tokens.request_tokens(request)
    assert 0.7 * exact <= tokens.estimate(request) <= 1.3 * exact


def test_encodings_of_openai_models() -> None:
    assert tokens.encoding_for("gpt-4o-mini") == "o200k_base"
    assert tokens.encoding_for("gpt-4") == "cl100k_base"
    assert tokens.encoding_for("claude-haiku-4-5") is None
    assert tokens.count_text("hello world") == 2


def test_the_model_table_is_bpe_openais_own_and_needs_no_import_of_it() -> None:
    """`encoding_for` answers from a copy of bpe_openai's model table: the package loads every encoding's
    tables when imported (most of a second), which an adapter built for a call that counts nothing
    should not pay. The copy must stay the package's table."""
    import subprocess
    import sys

    from bpe_openai import compat

    assert {name: meta.encoding for name, meta in compat.MODEL_REGISTRY.items()} == tokens.MODEL_ENCODINGS
    for name in ("GPT-4o-Mini", "gpt-4o-mini-2024-07-18", "llama3", ""):
        try:
            expected: str | None = compat.get_metadata(name).encoding
        except KeyError:
            expected = None
        assert tokens.encoding_for(name) == expected
    code = "import sys, keel.tokens as t\nassert t.encoding_for('gpt-4o') == 'o200k_base'\n"
    code += "print('bpe_openai' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
