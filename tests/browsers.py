"""Headless Chromium for the page tests: Debian's chromium driven by Playwright (never a downloaded
browser), and a keel server started with an admin key, as every real deployment has."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from playwright.sync_api import Browser

__all__ = ["CHROMIUM", "CHROMIUM_ARGS", "admin_key_set", "launched_browser"]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


@contextmanager
def launched_browser() -> Iterator[Browser]:
    from playwright.sync_api import sync_playwright

    assert CHROMIUM.exists(), "Debian's chromium is needed: apt-get install -y chromium (make install does it)"
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


@contextmanager
def admin_key_set(key: str) -> Iterator[None]:
    """`KEEL_ADMIN_KEY` set while a server starts (it is read then), restored after."""
    saved = os.environ.get("KEEL_ADMIN_KEY")
    os.environ["KEEL_ADMIN_KEY"] = key
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("KEEL_ADMIN_KEY")
        else:
            os.environ["KEEL_ADMIN_KEY"] = saved
