"""The eval report in a real browser: Debian's Chromium, opened from a file with the network off.

Never `playwright install`; without /usr/bin/chromium this fails, it does not skip (see
test_dashboard_browser.py). The screenshot lands in tests/artifacts/eval_report/ for a person to look at.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from playwright.sync_api import sync_playwright

from browsers import CHROMIUM, CHROMIUM_ARGS
from keel.evals.report import write_report
from test_eval_report import sample_run

pytestmark = pytest.mark.slow

ARTIFACTS = Path(__file__).parent / "artifacts" / "eval_report"


def test_report_renders_offline_with_every_plot(tmp_path: Path) -> None:
    a = sample_run("run-main", "prompt=v1", 0.0, 0.001, 1)
    b = sample_run("run-pr", "prompt=v2", -0.1, 0.002, 2)
    path = write_report([a, b], tmp_path / "report.html")
    requests: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        context = browser.new_context(offline=True, viewport={"width": 1280, "height": 900})
        page = context.new_page()
        page.on("request", lambda request: requests.append(request.url))
        page.goto(path.as_uri())
        # every embedded plot decoded to a real picture, wider than a thumbnail
        widths = page.eval_on_selector_all("img", "imgs => imgs.map(i => i.complete ? i.naturalWidth : 0)")
        assert len(widths) == 4 and min(widths) > 400
        assert page.get_by_role("heading", name="Score distributions").is_visible()
        assert page.locator("td.worse", has_text="worse").first.is_visible()
        assert page.locator("td", has_text="pass rate (McNemar)").is_visible()
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "report.png"), full_page=True)
        browser.close()
    # the page asked for nothing but itself: no font, script or image from anywhere
    assert requests == [path.as_uri()]
    assert (ARTIFACTS / "report.png").stat().st_size > 50_000
