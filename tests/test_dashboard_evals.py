"""The dashboard's Evals page: `/api/evals`, `/api/evals/{run}` and `/api/evals/compare` (admin only), and
the page in Chromium.

The runs are real: `run_suite` over a two-model matrix whose models are scripted functions (a cheap one
that misses more, a dearer one), priced in keel.toml, so every run has scores, tags, cost, latency and a
trace per case. The API must give the numbers `keel eval compare` and `keel eval report` compute, from
the same code. Screenshots at 1024 and 1440 px land in tests/artifacts/dashboard/evals-*.png.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from playwright.sync_api import Browser, Page, expect

from browsers import admin_server, close_gateway, dashboard_page, launched_browser, no_horizontal_scroll, shot
from helpers import gateway
from keel import Gateway
from keel.evals import CaseResult, Suite, load_run, run_suite, storage
from keel.evals.compare import compare
from keel.evals.report_data import build_report_data
from keel.jobs import records
from keel.jobs.schema import ensure_tables
from keel.models.test import FunctionModel
from keel.server import dashboard_evals
from keel.server.app import create_app
from keel.store import Store
from serving import LOCAL, Server

ADMIN_KEY = "sk-keel-admin-evals-page-0123456789"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
TOPICS = ["billing", "shipping", "returns", "accounts"]
TOML = (
    '[models.cheap]\nprovider = "test"\nmodel = "cheap"\nprice = { input = 150.0, output = 600.0 }\n'
    '[models.smart]\nprovider = "test"\nmodel = "smart"\nprice = { input = 2500.0, output = 10000.0 }\n'
)


def rows(ids: range) -> list[dict[str, Any]]:
    return [{"id": f"c{i:02d}", "q": f"What is order {i}'s status?", "a": f"order {i} shipped",
             "tags": [f"topic:{TOPICS[i % 4]}"]} for i in ids]  # fmt: skip


def suite(name: str, ids: range) -> Suite:
    return Suite.from_spec({
        "name": name, "dataset": {"rows": rows(ids), "columns": {"input": "q", "expected": "a", "tags": "tags"}},
        "task": {"prompt": "{q}", "model": "cheap"}, "variants": {"models": ["cheap", "smart"]},
        "scorers": [{"type": "contains", "threshold": 1}, {"type": "token_f1", "threshold": 0.5}],
        "concurrency": 4,
    })  # fmt: skip


def answer(model: str) -> FunctionModel:
    """The cheap model misses every third order and mangles every fifth; the smart one misses every seventh."""

    def respond(request: Any) -> str:
        n = int(request.messages[-1].content.split()[3].rstrip("'s"))
        if (model == "cheap" and n % 3 == 0) or (model == "smart" and n % 7 == 0):
            return "I could not find that order."
        if model == "cheap" and n % 5 == 0:
            return f"Order {n} is on its way, it shipped"
        return f"Order {n} shipped yesterday."

    return FunctionModel(respond, model_id=model)


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, dict[str, str]]]:
    tmp = tmp_path_factory.mktemp("evals-page")
    # the store in keel.toml, not only given to the gateway: DBOS's system database goes beside the configured
    # store, and a module fixture runs before conftest's per-test KEEL_STORE (the default one is shared)
    store = f'[store]\nurl = "{tmp / "keel.db"}"\n'
    gw = gateway(tmp, store + TOML, models={"cheap": answer("cheap"), "smart": answer("smart")})
    runs: dict[str, str] = {}
    cheap, smart = run_suite(suite("support-qa", range(40)), gateway=gw)
    runs.update(cheap=cheap.run_id, smart=smart.run_id)
    later, _ = run_suite(suite("support-qa-new", range(20, 60)), gateway=gw)  # shares c20..c39 with the first
    other, _ = run_suite(suite("other-qa", range(100, 110)), gateway=gw)  # shares no case
    runs.update(later=later.run_id, other=other.run_id)
    gw.flush()
    yield gw, runs
    close_gateway(gw)


@pytest.fixture
def client(seeded: tuple[Gateway, dict[str, str]], monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    monkeypatch.setenv("KEEL_ADMIN_KEY", ADMIN_KEY)
    with TestClient(create_app(gateway=seeded[0]), **LOCAL) as test_client:
        yield test_client


def test_the_runs_list_has_suite_variant_cases_pass_rate_means_cost_and_times(
    client: TestClient, seeded: tuple[Gateway, dict[str, str]]
) -> None:
    body = client.get("/api/evals", headers=ADMIN).json()
    runs = {r["run_id"]: r for r in body["runs"]}
    assert len(runs) == 6 and body["empty_hint"] is None
    cheap = runs[seeded[1]["cheap"]]
    assert (cheap["suite"], cheap["variant"], cheap["cases"], cheap["repeats"], cheap["status"]) == (
        "support-qa", "model=cheap", 40, 1, "done",
    )  # fmt: skip
    # cheap misses 0, 3, ..., 39 (14 cases); "contains" needs the expected text: every 5th not a 3rd fails too
    misses = {i for i in range(40) if i % 3 == 0 or i % 5 == 0}
    assert cheap["pass_rate"] == pytest.approx(1 - len(misses) / 40)
    assert cheap["means"]["contains"] == pytest.approx(1 - len(misses) / 40)
    assert 0 < cheap["means"]["token_f1"] < 1
    assert cheap["cost_usd"] > 0 and cheap["latency_p50_s"] is not None
    assert cheap["started_at"] <= cheap["finished_at"]
    smart = runs[seeded[1]["smart"]]
    assert smart["cost_usd"] > cheap["cost_usd"] and smart["pass_rate"] > cheap["pass_rate"]
    limited = client.get("/api/evals", params={"limit": 2}, headers=ADMIN).json()["runs"]
    assert len(limited) == 2


def test_a_runs_report_is_the_html_reports_data_with_variants_and_failing_cases(
    client: TestClient, seeded: tuple[Gateway, dict[str, str]]
) -> None:
    gw, runs = seeded
    assert gw.store is not None
    body = client.get(f"/api/evals/{runs['cheap']}", headers=ADMIN).json()
    expected = build_report_data([load_run(gw.store, runs["cheap"])], max_failing=50).to_dict()
    for key in ("runs", "distributions", "spend", "tags", "quality_metric"):
        assert body[key] == expected[key], key
    [dist] = [d for d in body["distributions"] if d["metric"] == "contains"]
    assert sum(dist["counts"][0]) == dist["n"][0] == 40 and len(dist["edges"]) == 11
    assert {t["tag"] for t in body["tags"]} == {f"topic:{t}" for t in TOPICS}
    # every variant of the same `keel eval run`, for cost against quality
    assert [v["variant"] for v in body["variants"]] == ["model=cheap", "model=smart"]
    assert body["failing_total"] == [len({i for i in range(40) if i % 3 == 0 or i % 5 == 0})]
    first = body["failing"][0][0]
    assert first["case_id"] == "c00" and first["output"] == "I could not find that order."
    assert first["trace_id"] and client.get(f"/api/traces/{first['trace_id']}", headers=ADMIN).status_code == 200
    three = client.get(f"/api/evals/{runs['cheap']}", params={"failing": 3}, headers=ADMIN).json()
    assert len(three["failing"][0]) == 3 and three["failing_total"] == body["failing_total"]


def test_compare_is_keel_eval_compare_with_flips_linked_to_traces(
    client: TestClient, seeded: tuple[Gateway, dict[str, str]]
) -> None:
    gw, runs = seeded
    assert gw.store is not None
    body = client.get("/api/evals/compare", params={"a": runs["cheap"], "b": runs["smart"]}, headers=ADMIN).json()
    a, b = load_run(gw.store, runs["cheap"]), load_run(gw.store, runs["smart"])
    [compared] = body["compared"]
    assert compared["comparison"] == compare(a, b).to_dict()  # exactly `keel eval compare --json`
    c = compared["comparison"]
    assert c["shared"] == 40 and not c["notes"]
    passed = next(m for m in c["metrics"] if m["metric"] == "pass")
    assert passed["mcnemar"]["fail_to_pass"] == len(c["fail_to_pass"]) > 0 and passed["verdict"] == "better"
    assert c["cost"]["verdict"] == "higher"
    flips = {f["case_id"]: f for f in compared["flips"]}
    assert set(flips) == set(c["pass_to_fail"]) | set(c["fail_to_pass"])
    flip = flips["c03"]  # cheap missed it, smart answered
    assert (flip["direction"], flip["output"], flip["output_b"]) == (
        "fail_to_pass", "I could not find that order.", "Order 3 shipped yesterday.",
    )  # fmt: skip
    assert flip["trace_id"] != flip["trace_id_b"]
    for trace in (flip["trace_id"], flip["trace_id_b"]):
        assert client.get(f"/api/traces/{trace}", headers=ADMIN).status_code == 200
    assert [r["run_id"] for r in body["runs"]] == [runs["cheap"], runs["smart"]]


def test_compare_on_some_shared_cases_says_so_and_on_none_is_a_400(
    client: TestClient, seeded: tuple[Gateway, dict[str, str]]
) -> None:
    runs = seeded[1]
    some = client.get("/api/evals/compare", params={"a": runs["cheap"], "b": runs["later"]}, headers=ADMIN)
    assert some.status_code == 200
    c = some.json()["compared"][0]["comparison"]
    assert c["shared"] == 20 and len(c["only_a"]) == 20 and len(c["only_b"]) == 20
    assert any("compared on the 20 shared cases only" in n for n in c["notes"])
    none = client.get("/api/evals/compare", params={"a": runs["cheap"], "b": runs["other"]}, headers=ADMIN)
    assert none.status_code == 400
    assert "share no case" in none.json()["error"]["message"] and runs["other"] in none.json()["error"]["message"]


def test_the_evals_api_needs_the_admin_key_and_names_bad_input(
    client: TestClient, seeded: tuple[Gateway, dict[str, str]]
) -> None:
    runs = seeded[1]
    for path in ("/api/evals", f"/api/evals/{runs['cheap']}", f"/api/evals/compare?a={runs['cheap']}&b=x"):
        assert client.get(path).status_code == 401, path
    missing = client.get("/api/evals/no-such-run", headers=ADMIN)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "unknown_eval_run"
    assert "no evaluation run 'no-such-run'" in missing.json()["error"]["message"]
    unknown_b = client.get("/api/evals/compare", params={"a": runs["cheap"], "b": "nope"}, headers=ADMIN)
    assert unknown_b.status_code == 404 and "'nope'" in unknown_b.json()["error"]["message"]
    same = client.get("/api/evals/compare", params={"a": runs["cheap"], "b": runs["cheap"]}, headers=ADMIN)
    assert same.status_code == 400 and "two different runs" in same.json()["error"]["message"]
    for path, param in (("/api/evals?limit=0", "limit"), ("/api/evals/compare?a=x", "b"),
                        ("/api/evals/a%00b", "run_id"), ("/api/evals/" + "x" * 301, "run_id"),
                        (f"/api/evals/compare?a={runs['cheap']}&b={runs['smart']}&alpha=1", "alpha"),
                        (f"/api/evals/{runs['cheap']}?failing=-1", "failing")):  # fmt: skip
        bad = client.get(path, headers=ADMIN)
        assert bad.status_code == 400, path
        assert bad.json()["error"]["param"].endswith(param), bad.json()
    cluster = client.get("/api/evals/compare", params={"a": runs["cheap"], "b": runs["smart"], "cluster": "team"},
                         headers=ADMIN)  # fmt: skip
    assert cluster.status_code == 400 and "no shared case has a tag team:<value>" in cluster.json()["error"]["message"]


def test_no_run_yet_says_which_command_fills_the_page(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEEL_ADMIN_KEY", ADMIN_KEY)
    gw = gateway(tmp_path, "", store=str(tmp_path / "empty.db"))
    try:
        with TestClient(create_app(gateway=gw), **LOCAL) as test_client:
            body = test_client.get("/api/evals", headers=ADMIN).json()
        assert body["runs"] == [] and "keel eval run SUITE" in body["empty_hint"]
    finally:
        gw.close()


# --- the page in Chromium ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(seeded: tuple[Gateway, dict[str, str]]) -> Iterator[Server]:
    with admin_server(seeded[0], ADMIN_KEY) as running:
        yield running


@pytest.fixture(scope="module")
def browser(server: Server) -> Iterator[Browser]:
    # after the runs: Playwright's sync API leaves an event loop running in this thread, and DBOS refuses to
    # start a suite's queue under one
    with launched_browser() as launched:
        yield launched


@pytest.fixture(params=[1024, 1440])
def page(browser: Browser, request: pytest.FixtureRequest) -> Iterator[Page]:
    # an unknown run (404) and runs that share no case (400) are asked for on purpose: the banner says why
    with dashboard_page(browser, request.param, ADMIN_KEY, expected=("status of 404", "status of 400")) as opened:
        yield opened


@pytest.mark.slow
def test_the_evals_page_lists_runs_compares_two_and_opens_a_flips_trace(
    page: Page, server: Server, seeded: tuple[Gateway, dict[str, str]]
) -> None:
    runs = seeded[1]
    page.goto(server.base + "/")
    page.click("#nav a[data-view='evals']")
    rows = page.locator("#evals-view tr.eval-row")
    expect(rows).to_have_count(6)
    expect(page.locator("#nav a[data-view='evals']")).to_have_class("active")
    expect(page.locator("#filters")).to_be_hidden()
    cheap = rows.filter(has_text=runs["cheap"])
    expect(cheap.locator(".badge")).to_have_text("done")
    expect(cheap).to_contain_text("model=cheap")
    expect(cheap).to_contain_text("contains 0.")
    expect(page.locator("#eval-compare")).to_be_disabled()
    cheap.locator("input.eval-tick").check()
    rows.filter(has_text=runs["smart"]).locator("input.eval-tick").check()
    pick = f"Compare B {runs['smart']} against the baseline A {runs['cheap']}"
    expect(page.locator("#eval-pick-text")).to_have_text(pick)
    expect(rows.filter(has_text=runs["smart"]).locator(".eval-ab")).to_have_text("B")
    no_horizontal_scroll(page)
    shot(page, "evals-list")

    page.click("#eval-compare")
    expect(page).to_have_url(f"{server.base}/#/evals/compare/{runs['cheap']}/{runs['smart']}")
    expect(page.locator("#eval-verdict")).to_have_text("no significant drop · better: contains, token_f1, pass")
    table = page.locator("#evals-view table.eval-table").nth(1)
    expect(table.locator("tr", has_text="pass rate (McNemar)")).to_contain_text("better")
    expect(table.locator("tr", has_text="cost per case")).to_contain_text("higher")
    expect(page.locator("#evals-view .eval-line")).to_contain_text("fail→pass")
    expect(page.locator("#evals-view .eval-plot svg")).to_have_count(4)  # two metrics; cost and latency
    flips = page.locator("#evals-view table.eval-flips tbody tr")
    flip = flips.filter(has_text="c03")
    expect(flip).to_contain_text("fail→pass")
    expect(flip).to_contain_text("Order 3 shipped yesterday.")
    page.wait_for_timeout(200)  # the plots are drawn in the next frame
    no_horizontal_scroll(page)
    shot(page, "evals-compare")

    flip.get_by_role("link", name="trace B").click()  # the case's trace in run B
    expect(page.locator("#trace-view")).to_be_visible()
    assert seeded[0].store is not None
    smart = {c.case_id: c for c in load_run(seeded[0].store, runs["smart"]).cases}
    expect(page.locator("#trace-id")).to_have_text(str(smart["c03"].trace_id))
    expect(page.locator("#trace-back")).to_have_text("← Eval")
    page.click("#trace-back")
    expect(page.locator("#eval-verdict")).to_be_visible()

    page.goto(f"{server.base}/#/evals/{runs['cheap']}")
    expect(page.locator("#evals-view h1")).to_contain_text(runs["cheap"])
    expect(page.locator("#evals-view .kpi").first).to_contain_text("Pass rate")
    expect(page.locator("#evals-view .eval-dot")).to_have_count(4)  # two variants x (cost, latency)
    expect(page.locator("#evals-view .eval-dot.current")).to_have_count(2)
    failing = page.locator("#evals-view table.eval-table tbody tr")
    expect(failing.first).to_contain_text("I could not find that order.")
    page.wait_for_timeout(200)
    no_horizontal_scroll(page)
    shot(page, "evals-run")

    page.goto(f"{server.base}/#/evals/no-such-run")
    expect(page.locator("#banner")).to_contain_text("no evaluation run 'no-such-run'")
    page.goto(f"{server.base}/#/evals/compare/{runs['cheap']}/{runs['later']}")  # 20 cases in common
    expect(page.locator("#evals-view .eval-note").first).to_contain_text("compared on the 20 shared cases only")
    expect(page.locator("#banner")).to_be_hidden()
    page.goto(f"{server.base}/#/evals/compare/{runs['cheap']}/{runs['other']}")
    expect(page.locator("#banner")).to_contain_text("share no case: compare two runs of the same suite")


def test_the_pages_script_is_served_and_loaded_before_app_js(client: TestClient) -> None:
    script = client.get("/static/evals.js")
    assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
    assert "keelPages" in script.text
    page = client.get("/").text
    assert page.index('src="static/evals.js"') < page.index('src="static/app.js"')  # it registers, app.js routes
    assert 'href="#/evals"' in page


@pytest.mark.slow
def test_the_evals_page_with_no_run_names_the_command_that_fills_it(page: Page, tmp_path: Path) -> None:
    gw = gateway(tmp_path, "", store=str(tmp_path / "empty.db"))
    try:
        with admin_server(gw, ADMIN_KEY) as empty:
            page.goto(empty.base + "/#/evals")
            expect(page.locator("#evals-view .empty-row")).to_have_text(
                "No evaluation run yet: keel eval run SUITE records one run per variant."
            )
            expect(page.locator("#eval-compare")).to_have_count(0)  # nothing to pick
            shot(page, "evals-empty")
    finally:
        close_gateway(gw)


def _seed_run(store: Store, run_id: str, index: int, recorded: int, total: int, shift: float) -> None:
    storage.create_run(store, {
        "run_id": run_id, "job": "eval:seeded", "suite": "seeded", "variant": run_id, "variant_index": index,
        "variant_params": {}, "thresholds": {"f1": 0.5}, "spec": {}, "base_dir": ".", "source": None, "total": total,
        "created_at": time.time() - 60,
    })  # fmt: skip
    for i in range(recorded):
        f1 = min(1.0, (i % 10) / 10 + shift)
        case = CaseResult(case_id=f"c{i}", scores={"f1": f1}, passed=f1 >= 0.5, output=f"answer {i}", cost_usd=0.001,
                          latency_s=0.1, trace_id=f"{run_id}-t{i}", tags=(f"topic:{i % 3}",))  # fmt: skip
        storage.write_case(store, run_id, i, f"key-{run_id}-{i}", case, {"input": f"q{i}"})


def test_the_api_reads_runs_from_either_store(store: Store) -> None:
    """The SQL under the page (eval runs with their last write) on SQLite and PostgreSQL."""
    _seed_run(store, "base", 0, 30, 30, 0.0)
    _seed_run(store, "cut-short", 1, 20, 30, 0.2)  # a run whose job is gone before its end
    listed = {r["run_id"]: r for r in dashboard_evals.list_runs(store, 10)["runs"]}
    assert listed["base"]["status"] == "done" and listed["base"]["finished_at"] >= listed["base"]["started_at"]
    assert listed["cut-short"]["status"] == "partial" and listed["cut-short"]["finished_at"] is None
    assert (listed["base"]["cases"], listed["cut-short"]["recorded"], listed["cut-short"]["total"]) == (30, 20, 30)
    assert listed["base"]["pass_rate"] == pytest.approx(0.5) and listed["base"]["cost_usd"] == pytest.approx(0.03)
    report = dashboard_evals.run_report(store, "base", 5)
    assert [v["run_id"] for v in report["variants"]] == ["base", "cut-short"] and report["failing_total"] == [15]
    c = dashboard_evals.compare_report(store, "base", "cut-short", None, 0.05)["compared"][0]["comparison"]
    assert c["shared"] == 20 and c["only_a"] == [f"c{i}" for i in range(20, 30)]


@pytest.mark.slow
def test_the_runs_list_reloads_while_a_run_runs(page: Page, tmp_path: Path) -> None:
    gw = gateway(tmp_path, "", store=str(tmp_path / "live.db"))
    assert gw.store is not None
    ensure_tables(gw.store)
    records.create_job(gw.store, "eval:seeded", "eval.case", "default", [(str(i), i) for i in range(30)])
    _seed_run(gw.store, "live", 0, 10, 30, 0.0)
    try:
        with admin_server(gw, ADMIN_KEY) as live:
            page.goto(live.base + "/#/evals")
            row = page.locator("#evals-view tr.eval-row")
            expect(row.locator(".badge")).to_have_text("running")
            expect(row).to_contain_text("not finished")
            for i in range(10, 30):  # the worker records the rest, and the job ends
                case = CaseResult(case_id=f"c{i}", scores={"f1": 1.0}, passed=True, trace_id=f"t{i}")
                storage.write_case(gw.store, "live", i, f"key-{i}", case, {"input": f"q{i}"})
            records.set_job_status(gw.store, "eval:seeded", records.DONE, only_from=[records.RUNNING])
            expect(row.locator(".badge")).to_have_text("done", timeout=10_000)  # no click: the page reloaded itself
            expect(row).to_contain_text("30")
    finally:
        close_gateway(gw)
