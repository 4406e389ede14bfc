"""A worked example of a request wrapper: e-mail addresses never leave for the model, nor reach the store.

    from keel import Gateway
    from keel.gateway.masking import MaskEmails
    gw = Gateway(wrappers=[MaskEmails()])

or in keel.toml:

    [[gateway.wrappers]]
    path = "keel.gateway.masking:MaskEmails"
    options = { placeholder = "[email]" }

Each address in a chat prompt becomes the placeholder before the cache, the
model and the trace see it (the span records the masked prompt), and the
span counts how many were masked. Embedding inputs are masked too.
"""

from __future__ import annotations

import re
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import replace

from keel.errors import ConfigError
from keel.gateway.pipeline import Call, Handler, Item, RequestWrapper
from keel.types import Message

__all__ = ["MaskEmails"]

# Practical, not RFC 5322: a local part, @, a dotted domain with a 2+ letter top level.
EMAIL = re.compile(
    r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"
)


class MaskEmails(RequestWrapper):
    slot = "user"

    def __init__(self, placeholder: str = "[email]") -> None:
        if not isinstance(placeholder, str) or EMAIL.search(placeholder):
            raise ConfigError("MaskEmails placeholder must be a string that is not itself an e-mail address")
        self.placeholder = placeholder

    def _mask(self, text: str) -> tuple[str, int]:
        return EMAIL.subn(self.placeholder, text)

    def __call__(self, call: Call, next: Handler) -> AsyncGenerator[Item, None]:
        masked = 0
        if call.request is not None:
            messages: list[Message] = []
            for message in call.request.messages:
                if message.content:
                    content, n = self._mask(message.content)
                    masked += n
                    message = replace(message, content=content) if n else message
                messages.append(message)
            if masked:
                call.request = replace(call.request, messages=tuple(messages))
        else:
            texts = []
            for text in call.texts:
                text, n = self._mask(text)
                masked += n
                texts.append(text)
            call.texts = tuple(texts)
        call.span.set(keel__masked_emails=masked)
        return self._relay(call, next)

    @staticmethod
    async def _relay(call: Call, next: Handler) -> AsyncGenerator[Item, None]:
        async with aclosing(next(call)) as items:
            async for item in items:
                yield item
