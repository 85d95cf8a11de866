"""The dashboard in a real browser: Debian's Chromium, headless, driven by Playwright.

Playwright is only the driver here; it never downloads a browser (`executable_path` points
at the system Chromium). Without /usr/bin/chromium these tests skip, saying so; `.ci/run`
installs it. Set JOBVISOR_DASHBOARD_SCREENSHOT=docs/dashboard.png to refresh the README's
screenshot, taken while the supervisor is under load.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.helpers import wait_for
from tests.supervisor_harness import Supervisor, base_config, free_port
from workers.core import queue as q

CHROMIUM = Path(os.environ.get("JOBVISOR_CHROMIUM", "/usr/bin/chromium"))
TOKEN = "browser-test-token"
SMALL = {"memory_per_job": "1MiB"}
# Without the background-networking flags Chromium keeps trying to reach Google's hosts,
# which this offline machine refuses, and page connections can hang behind them.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--disable-dev-shm-usage"]
WAIT_MS = 30_000

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason=f"{CHROMIUM} not found: install Debian's chromium (apt-get install chromium)")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        # launch() gives every run a fresh temporary profile (user data dir).
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS,
                               headless=True)
        yield b
        b.close()


class Page:
    """A page on the dashboard that records console errors and uncaught exceptions."""

    def __init__(self, browser: Any, url: str, width: int = 1280, height: int = 900) -> None:
        self.context = browser.new_context(viewport={"width": width, "height": height})
        self.page = self.context.new_page()
        self.page.set_default_timeout(WAIT_MS)
        self.errors: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error"
                     else None)
        self.page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))
        self.page.goto(url)

    def text(self, selector: str) -> str:
        return self.page.locator(selector).inner_text()

    def close(self) -> None:
        self.context.close()


def assert_layout(page: Page) -> None:
    """The header on top, the sections below it across the window, nothing sideways."""
    box = page.page.evaluate("""() => {
        const r = (sel) => document.querySelector(sel).getBoundingClientRect();
        const root = document.documentElement;
        return {overflow: root.scrollWidth - root.clientWidth, width: root.clientWidth,
                headerBottom: r("header").bottom, mainTop: r("main").top,
                mainWidth: r("main").width};
    }""")
    assert box["overflow"] <= 0, box
    assert box["mainTop"] >= box["headerBottom"] - 1, box
    assert box["mainWidth"] >= box["width"] * 0.9, box


def expect(locator: Any) -> Any:
    from playwright.sync_api import expect as pw_expect

    return pw_expect(locator)


def start(tmp_path: Path, worker_env: dict[str, str], types: dict[str, Any],
          mode: str = "readonly") -> Supervisor:
    env = dict(worker_env, JOBVISOR_HEALTH_TOKEN=TOKEN, JOBVISOR_DASHBOARD=mode)
    return Supervisor(tmp_path, env, base_config(free_port(), types)).start()


def _int(text: str) -> int:
    return int(text.replace(",", "").strip() or 0)


def test_page_loads_clean_and_follows_the_queue_as_jobs_finish(browser, db, worker_env,
                                                              tmp_path):
    sup = start(tmp_path, worker_env, {
        "sleep": {**SMALL, "concurrency": 3, "processes": {"min": 2, "max": 2}},
        "noop": {**SMALL, "processes": {"min": 1, "max": 1}},
        "fail": {**SMALL, "retry": {"max_attempts": 1}, "processes": {"min": 1, "max": 1}}})
    page = Page(browser, f"http://127.0.0.1:{sup.port}/ui/")
    try:
        expect(page.page.locator("#overall")).to_contain_text("healthy")
        expect(page.page.locator('#child-rows tr[data-type="sleep"]')).to_have_count(2)
        # Half of them in a batch: its progress bar fills as they finish.
        q.enqueue_many(db, [q.NewJob("sleep", {"seconds": 0.25},
                                     batch_id="essays-1" if i % 2 else None)
                            for i in range(120)])
        q.enqueue_many(db, [q.NewJob("fail", {"kind": "permanent", "text": "student essay"})
                            for _ in range(3)])
        q.enqueue_many(db, [q.NewJob("noop", {}) for _ in range(40)])
        row = '#queue-rows tr[data-type="sleep"]'
        wait_for(lambda: _int(page.text(f"{row} .q-queued")) > 0
                 or _int(page.text(f"{row} .q-leased")) > 0, what="jobs visible as queued")
        expect(page.page.locator("#failure-rows tr[data-job]")).to_have_count(3)
        wait_for(lambda: 0 < _int(page.text(f"{row} .q-completed")) < 120,
                 what="some jobs done, some not", timeout=60)
        if batches_for_screenshot(db):
            expect(page.page.locator('#batch-list .batch[data-batch="course-17-quiz"]')
                   ).to_have_count(1)
        shot = tmp_path / "dashboard.png"
        page.page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000
        expect(page.page.locator(f"{row} .q-completed")).to_have_text("120", timeout=90_000)
        expect(page.page.locator(f"{row} .q-queued")).to_have_text("0")
        if has_batches(db):
            batch = page.page.locator('#batch-list .batch[data-batch="essays-1"]')
            expect(batch).to_contain_text("60 / 60 (100%)")
            expect(batch).to_contain_text("finished")
            assert batch.locator("progress").get_attribute("value") == "60"
        expect(page.page.locator(f"{row} .rate-num")).not_to_have_text("–")
        assert float(page.text(f"{row} .rate-num")) > 0
        # Payload text never reaches the page, and nothing needs actions without a token.
        assert "student essay" not in page.page.content()
        assert page.page.locator("#failure-rows button").count() == 0
        assert_layout(page)
        assert page.errors == [], page.errors
        if target := os.environ.get("JOBVISOR_DASHBOARD_SCREENSHOT"):
            readme_screenshot(page, db, Path(target))
    finally:
        page.close()
        assert sup.stop() == 0


def readme_screenshot(page: Page, db: psycopg.Connection, target: Path) -> None:
    """A few minutes of uneven load, so the jobs/min charts have a shape, then the shot."""
    wave = [40, 90, 160, 220, 260, 200, 120, 60, 30, 80, 180, 300]
    for i in range(50):
        q.enqueue_many(db, [q.NewJob("sleep", {"seconds": 0.3})
                            for _ in range(wave[i % len(wave)] // 6)])
        q.enqueue_many(db, [q.NewJob("noop", {}) for _ in range(wave[(i + 5) % len(wave)] // 8)])
        if i % 9 == 4:
            q.enqueue(db, q.NewJob("fail", {"kind": "permanent"}))
        time.sleep(3)
    q.enqueue_many(db, [q.NewJob("sleep", {"seconds": 0.3}) for _ in range(150)])
    page.page.fill("#token", TOKEN)  # the operator's view: with its action buttons
    page.page.click("#unlock")
    expect(page.page.locator("#operator")).to_be_visible()
    assert_layout(page)
    time.sleep(4)
    page.page.screenshot(path=str(target), full_page=True)


def has_batches(db: psycopg.Connection) -> bool:
    return db.execute("SELECT to_regclass('jobvisor.batches') IS NOT NULL").fetchone()[0]


def batches_for_screenshot(db: psycopg.Connection) -> bool:
    """For the README's screenshot only: a couple of batches, on a stand-in table while
    sql/004_batches.sql has not landed. Returns whether batches were added."""
    if not os.environ.get("JOBVISOR_DASHBOARD_SCREENSHOT"):
        return False
    if not has_batches(db):
        db.execute("""CREATE TABLE jobvisor.batches (
            id text PRIMARY KEY, total int NOT NULL, completed int NOT NULL DEFAULT 0,
            failed int NOT NULL DEFAULT 0, cancelled int NOT NULL DEFAULT 0,
            created_at timestamptz NOT NULL DEFAULT now(), finished_at timestamptz,
            callback_url text)""")
    db.execute("""INSERT INTO jobvisor.batches (id, total, completed, failed, cancelled,
                  created_at, finished_at) VALUES
                  ('course-42-essays', 120, 71, 2, 0, now() - interval '3 minutes', NULL),
                  ('course-17-quiz', 60, 58, 1, 1, now() - interval '40 minutes',
                   now() - interval '12 minutes')""")
    return True


def test_a_failed_job_is_retried_from_the_page_with_the_token_and_not_without(
        browser, db, worker_env, tmp_path):
    marker = tmp_path / "marker"
    sup = start(tmp_path, worker_env, {
        "flaky": {"handler": "tests.test_dashboard:fail_once", **SMALL,
                  "retry": {"max_attempts": 1}, "processes": {"min": 1, "max": 1}}})
    page = Page(browser, f"http://127.0.0.1:{sup.port}/ui/")
    try:
        job_id = q.enqueue(db, q.NewJob("flaky", {"marker": str(marker)}))
        failure = page.page.locator(f'#failure-rows tr[data-job="{job_id}"]')
        expect(failure).to_contain_text("demo_permanent")
        # Read-only: no button, and the API refuses a request without the token.
        assert failure.locator("button").count() == 0
        status = page.page.evaluate(
            """async (path) => (await fetch(path, {method: "POST", body: "{}",
                 headers: {"Content-Type": "application/json"}})).status""",
            f"/ui/api/jobs/{job_id}/retry")
        assert status == 401
        assert q.get_job(db, job_id)["status"] == "failed"

        page.page.fill("#token", "not-the-token")
        page.page.click("#unlock")
        expect(page.page.locator("#message")).to_contain_text("refused")
        assert failure.locator("button").count() == 0

        page.page.fill("#token", TOKEN)
        page.page.click("#unlock")
        expect(page.page.locator("#operator")).to_be_visible()
        assert_layout(page)
        failure.get_by_role("button", name=f"retry job #{job_id}").click()
        expect(page.page.locator("#message")).to_contain_text("queued")
        wait_for(lambda: q.get_job(db, job_id)["status"] == "completed", what="retry ran")
        expect(failure).to_have_count(0)
        expect(page.page.locator("#audit-rows")).to_contain_text(f"job {job_id} (flaky)")

        # Drain asks for a second click; the queue row then says the type is drained.
        plan_row = page.page.locator('#plan-rows tr[data-type="flaky"]')
        plan_row.get_by_role("button", name="drain flaky").click()
        plan_row.get_by_role("button", name="Confirm: drain flaky").click()
        expect(page.page.locator('#queue-rows tr[data-type="flaky"]')).to_contain_text(
            "drained")
        expect(plan_row).to_contain_text("paused by operator")
        expect(page.page.locator('#child-rows tr[data-type="flaky"]')).to_have_count(0)
        plan_row.get_by_role("button", name="resume flaky").click()
        expect(page.page.locator('#child-rows tr[data-type="flaky"]')).to_have_count(1)
    finally:
        page.close()
        assert sup.stop() == 0
    assert sup.events("dashboard_job_retried")[0]["job_id"] == job_id
    assert [e["reason"] for e in sup.events("dashboard_action_refused")] == ["no_token"]


def test_a_killed_child_shows_its_restart(browser, db, worker_env, tmp_path):
    sup = start(tmp_path, worker_env, {"noop": {**SMALL, "processes": {"min": 1, "max": 1}}})
    page = Page(browser, f"http://127.0.0.1:{sup.port}/ui/")
    try:
        child = page.page.locator('#child-rows tr[data-type="noop"][data-slot="0"]')
        expect(child.locator(".c-state")).to_contain_text("running", timeout=WAIT_MS)
        pid = int(child.locator(".c-pid").inner_text())
        assert child.locator(".c-restarts").inner_text() == "0"
        os.kill(pid, signal.SIGKILL)
        expect(child.locator(".c-restarts")).to_have_text("1")
        expect(child.locator(".c-pid")).not_to_have_text(str(pid))
        expect(page.page.locator('#plan-rows tr[data-type="noop"]')).to_contain_text("1")
        assert page.errors == [], page.errors
    finally:
        page.close()
        assert sup.stop() == 0


def test_narrow_window_stacks_rows_and_never_scrolls_sideways(browser, db, worker_env,
                                                              tmp_path):
    sup = start(tmp_path, worker_env, {"noop": {**SMALL, "processes": {"min": 2, "max": 2}},
                                       "fail": {**SMALL, "retry": {"max_attempts": 1}}})
    q.enqueue(db, q.NewJob("fail", {"kind": "permanent"}))
    page = Page(browser, f"http://127.0.0.1:{sup.port}/ui/", width=375, height=740)
    try:
        expect(page.page.locator('#child-rows tr[data-type="noop"]')).to_have_count(2)
        expect(page.page.locator("#failure-rows tr[data-job]")).to_have_count(1)
        assert_layout(page)
        # Each cell carries its column name, shown beside the value when rows stack.
        label = page.page.evaluate("""getComputedStyle(
            document.querySelector('#child-rows td.c-state'), '::before').content""")
        assert label == '"State"'
        # The states read without colour: a word (and a symbol) in every badge.
        state = page.page.locator('#child-rows tr[data-type="noop"] .c-state').first
        assert state.inner_text().split()[-1] in ("starting", "running")
        page.page.screenshot(path=str(tmp_path / "narrow.png"), full_page=True)
        assert page.errors == [], page.errors
    finally:
        page.close()
        assert sup.stop() == 0


def test_token_mode_shows_nothing_until_the_token_is_given(browser, db, worker_env, tmp_path):
    sup = start(tmp_path, worker_env, {"noop": {**SMALL, "processes": {"min": 1, "max": 1}}},
                mode="token")
    page = Page(browser, f"http://127.0.0.1:{sup.port}/ui/")
    try:
        expect(page.page.locator("#locked")).to_be_visible()
        expect(page.page.locator("#main")).to_be_hidden()
        assert page.page.locator('#queue-rows tr[data-type="noop"]').count() == 0
        page.page.fill("#token", TOKEN)
        page.page.click("#unlock")
        expect(page.page.locator('#queue-rows tr[data-type="noop"]')).to_have_count(1)
        expect(page.page.locator("#locked")).to_be_hidden()
        page.page.click("#lock")
        expect(page.page.locator("#locked")).to_be_visible()
    finally:
        page.close()
        assert sup.stop() == 0


def test_the_plan_panel_shows_each_model_servers_loaded_and_kept_memory(browser, db,
                                                                        worker_env, tmp_path):
    """A running supervisor reads the fake Ollama's /api/ps every replan; the page shows
    the loaded model, then, after Ollama unloads it, the memory kept for it."""
    import httpx

    from tests.fakes.ollama import FakeOllama

    model = "qwen2.5vl:7b"
    with FakeOllama(models=[model]) as fake:
        sup = start(tmp_path, dict(worker_env, OLLAMA_BASE_URL=fake.base_url),
                    {"noop": {**SMALL, "processes": {"min": 1, "max": 1}}})
        page = Page(browser, f"http://127.0.0.1:{sup.port}/ui/")
        try:
            server = page.page.locator(f'#capacity .model-server[data-url="{fake.base_url}"]')
            expect(server).to_contain_text("reachable")
            expect(server.locator(".model-loaded")).to_contain_text("0 loaded")
            httpx.post(fake.base_url + "/api/chat", json={"model": model, "messages": [],
                                                          "keep_alive": "10m"}, timeout=5)
            expect(server.locator(".model-loaded")).to_contain_text(f"1 loaded: {model} 3.7 GiB")
            httpx.post(fake.base_url + "/api/chat", json={"model": model, "messages": [],
                                                          "keep_alive": 0}, timeout=5)
            expect(server.locator(".model-reserved")).to_contain_text(
                f"3.7 GiB kept for unloaded models: {model} 3.7 GiB")
            expect(server.locator(".model-loaded")).to_contain_text("0 loaded")
            assert page.errors == [], page.errors
        finally:
            page.close()
            assert sup.stop() == 0
    # One line per change, not one per replan (it replans every 0.5 s).
    assert len(sup.events("model_server_reachable")) == 1
    assert [e["bytes"] for e in sup.events("model_memory_reserved")] == [4_000_000_000]
