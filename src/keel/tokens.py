"""Counting tokens before a call, offline.

- OpenAI models: the model's own encoding from `bpe-openai` (o200k_base or
  cl100k_base), plus OpenAI's documented chat framing (3 tokens per message
  and 3 to prime the reply).
- The local model: its own tokenizer (see `keel.models.local`).
- Everything else (Anthropic, Gemini, unknown servers): an **approximation**,
  the o200k_base count plus 10%, rounded up. Modern BPE vocabularies agree
  within about that margin on English text; the margin keeps context-window
  and budget checks on the safe side. Exact counts come back in the usage of
  the response and are what cost is computed from.

Counting is not free (about 0.25 ms per 1,000 tokens), so the gateway avoids
it where a bound will do: `upper_bound` (UTF-8 bytes: a byte-level BPE never
makes more tokens than bytes) decides most context-window checks, and
`estimate` (4 characters a token) is what rate limits charge up front, settled
with the provider's reported usage afterwards.
"""

from __future__ import annotations

import json
import math
from functools import lru_cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from keel.types import ChatRequest, Message

__all__ = [
    "APPROX_MARGIN",
    "MODEL_ENCODINGS",
    "approx_request_tokens",
    "completion_tokens",
    "count_text",
    "encoding_for",
    "estimate",
    "request_tokens",
    "upper_bound",
]

APPROX_MARGIN = 1.10
PER_MESSAGE = 3
REPLY_PRIMING = 3


def _bpe() -> Any:
    """bpe_openai, imported on first use: loading it takes most of a second, which a CLI command that
    counts nothing should not pay."""
    import bpe_openai

    return bpe_openai


@lru_cache(maxsize=8)
def _encoding(name: str) -> Any:
    return _bpe().get_encoding(name)


def _models(encoding: str, names: str) -> dict[str, str]:
    return dict.fromkeys([encoding, *names.split()], encoding)


#: bpe_openai's model table (`bpe_openai.compat.MODEL_REGISTRY`, exact lower-case names), copied: the
#: package builds that table by loading every encoding at import, so asking it which encoding a model
#: uses would cost every OpenAI adapter most of a second. A test pins the copy to the package's table.
MODEL_ENCODINGS: dict[str, str] = {
    **_models("cl100k_base", "gpt-3.5 gpt-3.5-turbo gpt-3.5-turbo-0301 gpt-3.5-turbo-0401 gpt-3.5-turbo-0125"
              " gpt-35-turbo gpt-4 gpt-4-0314 gpt-4-0613 gpt-4-32k text-embedding-ada-002 text-embedding-3-small"
              " text-embedding-3-large"),
    **_models("o200k_base", "gpt-4o gpt-4o-mini gpt-4.1 gpt-4.1-mini gpt-4o-128k gpt-4.1-128k"),
    **_models("voyage3_base", "voyage-3"),
    **_models("gpt2", "gpt-2"),
    **_models("r50k_base", "text-davinci-001 text-curie-001 text-babbage-001 text-ada-001 davinci curie babbage ada"
              " text-similarity-davinci-001 text-similarity-curie-001 text-similarity-babbage-001"
              " text-similarity-ada-001 text-search-davinci-doc-001 text-search-curie-doc-001"
              " text-search-babbage-doc-001 text-search-ada-doc-001 code-search-babbage-code-001"
              " code-search-ada-code-001"),
    **_models("p50k_base", "text-davinci-003 text-davinci-002 code-davinci-002 code-davinci-001 code-cushman-002"
              " code-cushman-001 davinci-codex cushman-codex"),
    **_models("p50k_edit", "text-davinci-edit-001 code-davinci-edit-001"),
}  # fmt: skip


def encoding_for(model_id: str) -> str | None:
    """The tiktoken encoding name of an OpenAI model, or None if not an OpenAI model."""
    return MODEL_ENCODINGS.get(model_id.lower())


def count_text(text: str, encoding: str = "o200k_base") -> int:
    return len(_encoding(encoding).encode(text, allowed_special="all"))


def _message_text(message: Message) -> str:
    parts = [message.role, message.content or ""]
    for call in message.tool_calls:
        parts += [call.name, call.arguments]
    if message.name:
        parts.append(message.name)
    return " ".join(parts)


def _options_text(request: ChatRequest) -> str:
    opts = request.options
    extra = [json.dumps(t.to_openai()) for t in opts.tools]
    if opts.response_format is not None:
        extra.append(json.dumps(dict(opts.response_format.schema)))
    return "\n".join(extra)


def request_tokens(request: ChatRequest, encoding: str = "o200k_base") -> int:
    """Input tokens of a chat request under an OpenAI encoding."""
    enc = _encoding(encoding)
    total = REPLY_PRIMING
    for message in request.messages:
        total += PER_MESSAGE + len(enc.encode(_message_text(message), allowed_special="all"))
    extra = _options_text(request)
    if extra:
        total += len(enc.encode(extra, allowed_special="all"))
    return total


def approx_request_tokens(request: ChatRequest) -> int:
    """The documented approximation for models without an offline tokenizer."""
    return math.ceil(request_tokens(request) * APPROX_MARGIN)


# Chat templates add their own tokens (SmolLM2's inserts a default system prompt).
_TEMPLATE_ALLOWANCE = 64
_PER_MESSAGE_ALLOWANCE = 8


def _text_chars(request: ChatRequest) -> tuple[int, int]:
    """(characters, UTF-8 bytes) of everything a request sends."""
    chars = nbytes = 0
    for message in request.messages:
        text = _message_text(message)
        chars += len(text)
        nbytes += len(text) if text.isascii() else len(text.encode("utf-8"))
    extra = _options_text(request)
    return chars + len(extra), nbytes + len(extra.encode("utf-8"))


def upper_bound(request: ChatRequest) -> int:
    """Tokens a request cannot exceed under any byte-level BPE, with the approximation's margin."""
    _, nbytes = _text_chars(request)
    return math.ceil(nbytes * APPROX_MARGIN) + _PER_MESSAGE_ALLOWANCE * len(request.messages) + _TEMPLATE_ALLOWANCE


def completion_tokens(text: str, encoding: str | None = None) -> int:
    """Output tokens of an answer the provider sent no count for: exact under an OpenAI encoding,
    else the documented approximation (o200k_base plus 10%)."""
    if not text:
        return 0
    if encoding is not None:
        return count_text(text, encoding)
    return math.ceil(count_text(text) * APPROX_MARGIN)


def estimate(request: ChatRequest) -> int:
    """A cheap guess (4 characters a token), for charging rate limits before the real count is known."""
    chars, _ = _text_chars(request)
    return chars // 4 + PER_MESSAGE * len(request.messages) + REPLY_PRIMING
