"""The dashboard's jobs page: `/api/jobs` and `/api/jobs/{name}` (admin only), and the page in Chromium.

Jobs are seeded through keel.jobs' records (the rows a worker writes), so the
page shows every state at once: running with items in flight, done, finished
with failures, cancelled. Screenshots at 1024 and 1440 px land in
tests/artifacts/dashboard/ for a person to look at.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from playwright.sync_api import Browser, Page, expect

from browsers import admin_server, close_gateway, dashboard_page, launched_browser, no_horizontal_scroll, shot
from helpers import gateway
from keel import Gateway
from keel.jobs import records
from keel.jobs.schema import ensure_tables
from keel.server.app import create_app
from keel.store import Store
from keel.trace import Span, new_id, new_trace_id
from serving import LOCAL, Server

ADMIN_KEY = "sk-keel-admin-jobs-page-0123456789"
ERRORS = {
    7: "InputError: empty file",
    19: "InputError: too large: 61,234,567 bytes (the limit is 50,000,000; see rag.max_file_bytes)",
    33: "SettingsMismatch: collection 'handbook' holds vectors of onnx:bge-small-en-v1.5, but the job was"
    " submitted for onnx:all-MiniLM-L6-v2",
}


def _run_item(store: Store, job: str, key: str, *, cost: float = 0.0, error: str | None = None) -> str:
    """One item as a worker runs it: started (with its trace), its span written, then finished."""
    trace_id = new_trace_id()
    assert records.start_item(store, job, key, 0, trace_id) is not None
    now = time.time()
    span = Span(trace_id, new_id(8), None, "job.item", now - 0.4, now, status="error" if error else "ok",
                error_type=error.split(":")[0] if error else None, error_message=error,
                attributes={"keel.job": job, "keel.job.item": key, "keel.cost_usd": cost or None})  # fmt: skip
    store.write_spans([span])
    if error is None:
        records.finish_item(store, job, key, 0, result={"chunks": 3}, cost_usd=cost)
    else:
        records.finish_item(store, job, key, 0, error=error)
    return trace_id


def seed(store: Store) -> dict[str, Any]:
    """Four jobs: running (with failures and items in flight), done, failed, cancelled."""
    ensure_tables(store)  # the jobs app's own tables, as JobRunner makes them
    traces: dict[str, str] = {}
    files = [(f"handbook/section-{i:02d}.md", {"file": f"/srv/handbook/section-{i:02d}.md"}) for i in range(40)]
    records.create_job(store, "thumbs-2026-12", "thumbnail", "default", [(str(i), i) for i in range(12)])
    for i in range(12):
        _run_item(store, "thumbs-2026-12", str(i), cost=0.0021)
    records.create_job(store, "extract-contracts", "extract.fields", "default", [(f"c{i}", i) for i in range(20)])
    for i in range(20):
        _run_item(store, "extract-contracts", f"c{i}", cost=0.013, error="ProviderTimeout: no answer" if i in (4, 9)
                  else None)  # fmt: skip
    records.create_job(store, "eval-nightly", "eval.case", "default", [(str(i), i) for i in range(50)])
    for i in range(10):
        _run_item(store, "eval-nightly", str(i), cost=0.0007)
    records.set_job_status(store, "eval-nightly", records.CANCELLED, only_from=[records.RUNNING])
    records.create_job(store, "ingest-handbook", "rag.ingest", "job:ingest-handbook", files)
    for i in range(34):
        key = files[i][0]
        traces[key] = _run_item(store, "ingest-handbook", key, cost=0.00042, error=ERRORS.get(i))
    for i in (34, 35):  # in flight
        records.start_item(store, "ingest-handbook", files[i][0], 0, new_trace_id())
    return {"traces": traces, "files": [k for k, _ in files]}


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, dict[str, Any]]]:
    tmp = tmp_path_factory.mktemp("jobs-page")
    gw = gateway(tmp, "", store=str(tmp / "keel.db"))
    assert gw.store is not None
    yield gw, seed(gw.store)
    close_gateway(gw)


@pytest.fixture
def client(seeded: tuple[Gateway, dict[str, Any]], monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    monkeypatch.setenv("KEEL_ADMIN_KEY", ADMIN_KEY)
    with TestClient(create_app(gateway=seeded[0]), **LOCAL) as test_client:
        yield test_client


ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def test_the_jobs_api_lists_progress_status_kind_and_cost(client: TestClient) -> None:
    response = client.get("/api/jobs", headers=ADMIN)
    assert response.status_code == 200
    jobs = {j["name"]: j for j in response.json()["jobs"]}
    assert next(iter(jobs)) == "ingest-handbook"  # most recently updated first
    ingest = jobs["ingest-handbook"]
    assert (ingest["kind"], ingest["status"], ingest["total"], ingest["done"], ingest["failed"]) == (
        "rag.ingest", "running", 40, 31, 3,
    )  # fmt: skip
    assert ingest["remaining"] == 6 and ingest["cost_usd"] == pytest.approx(31 * 0.00042)
    assert (jobs["extract-contracts"]["status"], jobs["extract-contracts"]["failed"]) == ("failed", 2)
    assert jobs["thumbs-2026-12"]["status"] == "done" and jobs["eval-nightly"]["status"] == "cancelled"
    only = client.get("/api/jobs", params={"status": "cancelled"}, headers=ADMIN).json()["jobs"]
    assert [j["name"] for j in only] == ["eval-nightly"]
    of_kind = client.get("/api/jobs", params={"kind": "rag.ingest"}, headers=ADMIN).json()
    assert [j["name"] for j in of_kind["jobs"]] == ["ingest-handbook"]
    assert of_kind["kinds"] == ["eval.case", "extract.fields", "rag.ingest", "thumbnail"]  # all, for the filter
    both = client.get("/api/jobs", params={"kind": "eval.case", "status": "done"}, headers=ADMIN).json()["jobs"]
    assert both == []  # eval-nightly is cancelled


def test_a_jobs_detail_has_counts_failed_items_with_errors_and_item_traces(
    client: TestClient, seeded: tuple[Gateway, dict[str, Any]]
) -> None:
    body = client.get("/api/jobs/ingest-handbook", headers=ADMIN).json()
    assert body["counts"] == {"pending": 4, "running": 2, "done": 31, "failed": 3}
    failed = {i["key"]: i for i in body["failed_items"]}
    assert failed["handbook/section-07.md"]["error"] == "InputError: empty file"
    assert set(failed) == {f"handbook/section-{i:02d}.md" for i in ERRORS}
    traces = seeded[1]["traces"]
    assert all(i["trace_id"] == traces[k] for k, i in failed.items())
    assert len(body["items"]) == 40 and body["items"][0]["status"] == "done"
    trace = client.get(f"/api/traces/{body['items'][0]['trace_id']}", headers=ADMIN).json()  # the link's target
    assert trace["spans"][0]["name"] == "job.item"
    assert len(client.get("/api/jobs/ingest-handbook", params={"limit": 5}, headers=ADMIN).json()["items"]) == 5


def test_the_jobs_api_needs_the_admin_key_and_names_bad_input(client: TestClient) -> None:
    for path in ("/api/jobs", "/api/jobs/ingest-handbook"):
        assert client.get(path).status_code == 401, path
    missing = client.get("/api/jobs/no-such-job", headers=ADMIN)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "job_not_found"
    assert "no job named 'no-such-job'" in missing.json()["error"]["message"]
    for path, param in (("/api/jobs?status=stuck", "status"), ("/api/jobs?limit=0", "limit"),
                        ("/api/jobs?kind=", "kind"), ("/api/jobs?kind=a%00b", "kind"),
                        ("/api/jobs/a%00b", "name"), ("/api/jobs/" + "x" * 201, "name")):  # fmt: skip
        bad = client.get(path, headers=ADMIN)
        assert bad.status_code == 400, path
        assert bad.json()["error"]["param"].endswith(param), bad.json()


# --- the page in Chromium ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(seeded: tuple[Gateway, dict[str, Any]]) -> Iterator[Server]:
    with admin_server(seeded[0], ADMIN_KEY) as running:
        yield running


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with launched_browser() as launched:
        yield launched


@pytest.fixture(params=[1024, 1440])
def page(browser: Browser, request: pytest.FixtureRequest) -> Iterator[Page]:
    with dashboard_page(browser, request.param, ADMIN_KEY) as opened:
        yield opened


@pytest.mark.slow
def test_the_jobs_page_shows_progress_bars_and_a_job_with_its_failures_and_traces(
    page: Page, server: Server, seeded: tuple[Gateway, dict[str, Any]]
) -> None:
    page.goto(server.base + "/")
    page.click("#nav a[data-view='jobs']")
    rows = page.locator("#jobs tbody tr.job-row")
    expect(rows).to_have_count(4)
    expect(page.locator("#filters")).to_be_hidden()  # the trace filters do not apply here
    ingest = rows.filter(has_text="ingest-handbook")
    expect(ingest.locator(".badge")).to_have_text("running")
    expect(ingest.locator(".tag")).to_have_text("rag.ingest")
    expect(ingest).to_contain_text("31 / 40")
    done_width = ingest.locator(".p-done").evaluate("el => el.style.width")
    failed_width = ingest.locator(".p-failed").evaluate("el => el.style.width")
    assert (float(done_width.rstrip("%")), float(failed_width.rstrip("%"))) == (77.5, 7.5)
    expect(rows.filter(has_text="extract-contracts").locator(".badge")).to_have_text("failed")
    expect(rows.filter(has_text="eval-nightly").locator(".badge")).to_have_text("cancelled")
    expect(page.locator("#job-count")).to_contain_text("4 jobs · 1 running")
    no_horizontal_scroll(page)
    shot(page, "20-jobs")

    ingest.locator("a.job-link").click()
    expect(page.locator("#job-view")).to_be_visible()
    expect(page.locator("#job-name")).to_contain_text("ingest-handbook")
    counts = page.locator("#job-counts .job-count .n").all_text_contents()
    assert counts == ["4", "2", "31", "3"]  # pending, running, done, failed
    expect(page.locator("#job-progress-text")).to_contain_text("34 of 40 finished")
    failed = page.locator("#job-failed tbody tr")
    expect(failed).to_have_count(3)
    expect(failed.filter(has_text="section-07.md")).to_contain_text("InputError: empty file")
    expect(page.locator("#job-failed-hint")).to_contain_text("keel jobs retry ingest-handbook")
    expect(page.locator("#job-items tbody tr")).to_have_count(40)
    no_horizontal_scroll(page)
    shot(page, "21-job")

    failed.filter(has_text="section-07.md").locator("a.trace-link").click()  # the item's trace
    expect(page.locator("#trace-view")).to_be_visible()
    expect(page.locator("#trace-id")).to_have_text(seeded[1]["traces"]["handbook/section-07.md"])
    expect(page.locator("#span-detail .error-box")).to_contain_text("empty file")
    page.click("#trace-back")  # back to the job it came from
    expect(page.locator("#job-view")).to_be_visible()
    expect(page.locator("#job-name")).to_contain_text("ingest-handbook")
    page.click("#job-back")
    expect(page.locator("#jobs-view")).to_be_visible()
    page.select_option("#job-status", "done")
    expect(rows).to_have_count(1)
    expect(rows.first).to_contain_text("thumbs-2026-12")


@pytest.fixture(scope="module")
def crowded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A day of online quality: a scoring job per 5-minute interval (288), among two jobs of other kinds."""
    tmp = tmp_path_factory.mktemp("jobs-crowded")
    gw = gateway(tmp, "", store=str(tmp / "keel.db"))
    assert gw.store is not None
    ensure_tables(gw.store)
    records.create_job(gw.store, "ingest-handbook", "rag.ingest", "default", [("a", 1)])
    records.create_job(gw.store, "thumbs-2026-12", "thumbnail", "default", [("a", 1)])
    for i in range(288):
        name = f"evals.online:20261204T{i // 12:02d}{i % 12 * 5:02d}00Z"
        records.create_job(gw.store, name, "evals.online", "evals.online", [(str(k), k) for k in range(3)])
        for k in range(3):
            _run_item(gw.store, name, str(k), cost=0.0004)
    with admin_server(gw, ADMIN_KEY) as running:
        yield running
    close_gateway(gw)


@pytest.mark.slow
def test_the_jobs_page_filters_a_day_of_online_scoring_jobs_by_kind(page: Page, crowded: Server) -> None:
    page.goto(crowded.base + "/#/jobs")
    rows = page.locator("#jobs tbody tr.job-row")
    expect(rows).to_have_count(200)  # the page's limit: the other kinds are buried under the scoring jobs
    expect(page.locator("#job-count")).to_have_text("latest 200 jobs")
    expect(page.locator("#job-kind option")).to_have_text(["Any kind", "evals.online", "rag.ingest", "thumbnail"])
    no_horizontal_scroll(page)
    shot(page, "22-jobs-crowded")
    page.select_option("#job-kind", "rag.ingest")
    expect(rows).to_have_count(1)
    expect(rows.first).to_contain_text("ingest-handbook")
    page.select_option("#job-status", "done")
    expect(page.locator("#jobs tbody")).to_contain_text("No done rag.ingest jobs.")
    page.select_option("#job-status", "")
    page.select_option("#job-kind", "evals.online")
    expect(rows).to_have_count(200)
    expect(page.locator("#job-kind")).to_have_value("evals.online")  # kept when the list reloads
    no_horizontal_scroll(page)
    shot(page, "23-jobs-online")
