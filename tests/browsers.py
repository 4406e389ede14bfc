"""Headless Chromium for the page tests: Debian's chromium driven by Playwright (never a downloaded
browser), and a keel server started with an admin key, as every real deployment has."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from playwright.sync_api import Browser, BrowserContext, Page

    from keel import Gateway
    from serving import Server

__all__ = [
    "ARTIFACTS", "CHROMIUM", "CHROMIUM_ARGS", "admin_key_set", "admin_server", "close_gateway", "dashboard_page",
    "launched_browser", "no_horizontal_scroll", "shot", "signed_in",
]  # fmt: skip

#: Where the dashboard tests leave their screenshots, to be looked at.
ARTIFACTS = Path(__file__).parent / "artifacts" / "dashboard"

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


@contextmanager
def admin_server(gateway: Gateway, key: str) -> Iterator[Server]:
    """`gateway` served with the admin key `key`, as every real deployment has; stopped on the way out."""
    from serving import Server

    with admin_key_set(key):
        running = Server(gateway)
    try:
        yield running
    finally:
        running.stop()


def close_gateway(gateway: Gateway) -> None:
    """Close `gateway` in a thread of its own: Playwright's sync API leaves an event loop set in this one,
    and a gateway that never ran a sync call closes with asyncio.run."""
    closing = threading.Thread(target=gateway.close)
    closing.start()
    closing.join(timeout=30)


def signed_in(browser: Browser, width: int, admin_key: str, *, height: int = 900) -> BrowserContext:
    """A browser context whose pages already hold the admin key, as after signing in once."""
    context = browser.new_context(viewport={"width": width, "height": height})
    context.add_init_script(f"localStorage.setItem('keel.adminKey', {admin_key!r})")
    return context


@contextmanager
def dashboard_page(
    browser: Browser, width: int, admin_key: str, *, height: int = 900, expected: tuple[str, ...] = ()
) -> Iterator[Page]:
    """A signed-in page `width` px wide; fails the test on any page error or console error but those
    containing one of `expected` (e.g. "status of 404" when a test asks for a missing thing)."""
    context = signed_in(browser, width, admin_key, height=height)
    opened = context.new_page()
    problems: list[str] = []
    opened.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    opened.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    yield opened
    context.close()
    unexpected = [p for p in problems if not any(e in p for e in expected)]
    assert unexpected == [], unexpected


def shot(page: Page, name: str) -> Path:
    """A full-page screenshot in ARTIFACTS, named after the page's width: `NAME-1024.png`."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    width = page.viewport_size["width"] if page.viewport_size else 0
    path = ARTIFACTS / f"{name}-{width}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def no_horizontal_scroll(page: Page) -> None:
    widths = page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
    assert widths[0] <= widths[1], f"the page scrolls sideways at {widths[1]} px: {widths[0]} px wide"
