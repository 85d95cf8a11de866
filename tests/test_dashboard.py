"""The operator dashboard without a browser: access modes, CSRF guards, actions, what the
state shows (and never shows), throughput history, and the queue's operator reads."""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import psycopg
import pytest

from supervisor_app import dashboard
from supervisor_app.config import parse_config
from supervisor_app.supervisor import Supervisor as LocalSupervisor
from tests.helpers import wait_for
from tests.supervisor_harness import Supervisor, base_config, free_port
from workers import Job, JobContext, PermanentError
from workers.core import queue as q
from workers.core.model_gate import ModelGate, Policy

TOKEN = "op-token-for-tests"
SECRET = "Aufsatz von Schülerin Jana: SECRET-STUDENT-TEXT"
SMALL = {"memory_per_job": "1MiB"}


def fail_once(job: Job, ctx: JobContext) -> dict[str, Any]:
    """Fails permanently the first time it ever runs (a marker file says so), then works:
    a retry from the dashboard visibly succeeds. Used by the browser tests too."""
    marker = Path(job.payload["marker"])
    if not marker.exists():
        marker.write_text("failed once\n")
        raise PermanentError("demo_permanent", "first run fails on purpose")
    return {"ok": True}


# --- an in-process supervisor object (not running its loop): route() called directly -----------

@pytest.fixture
def local(db_dsn: str, monkeypatch: pytest.MonkeyPatch) -> LocalSupervisor:
    monkeypatch.setenv("JOBVISOR_HEALTH_TOKEN", TOKEN)
    monkeypatch.delenv(dashboard.MODE_ENV, raising=False)
    cfg = parse_config({"types": {"noop": {}, "fail": {"processes": {"min": 1, "max": 3}}}},
                       "test.yaml")
    return LocalSupervisor(cfg, Path("test.yaml"), db_dsn, {})


def call(sup: Any, method: str, path: str, headers: dict[str, str] | None = None,
         client: str = "192.0.2.7") -> tuple[int, dict[str, str], Any]:
    answer = dashboard.route(sup, method, path, headers or {}, b"{}", client)
    assert answer is not None, f"{method} {path} was not routed"
    code, hdrs, body = answer
    if hdrs["Content-Type"] == "application/json":
        return code, hdrs, json.loads(body)
    return code, hdrs, body


def operator(extra: dict[str, str] | None = None) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}", "Host": "127.0.0.1:9464", **(extra or {})}


def failed_job(db: psycopg.Connection, job_type: str = "fail") -> int:
    """A job that failed for good, with student text in its payload and error message."""
    job_id = q.enqueue(db, q.NewJob(job_type, {"text": SECRET}, max_attempts=1))
    (leased,) = q.lease(db, job_type, 1, worker_id="test:1", lease_seconds=30)
    assert q.retry(db, leased.id, leased.lease_key, code="demo_permanent",
                   message=SECRET, delay=0) == "failed"
    return job_id


def test_page_and_assets_are_served_from_the_package_with_a_strict_csp(local):
    code, headers, body = call(local, "GET", "/ui/")
    assert code == 200 and headers["Content-Type"].startswith("text/html")
    csp = headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert headers["X-Content-Type-Options"] == "nosniff"
    html = body.decode()
    # Only our own files: no CDN, nothing a browser would fetch from elsewhere.
    assert "/ui/static/app.js" in html and "/ui/static/app.css" in html
    assert "http://" not in html and "https://" not in html
    for name, ctype in (("app.js", "text/javascript"), ("app.css", "text/css"),
                        ("favicon.svg", "image/svg+xml")):
        code, headers, _ = call(local, "GET", f"/ui/static/{name}")
        assert code == 200 and headers["Content-Type"].startswith(ctype)
    js = call(local, "GET", "/ui/static/app.js")[2].decode()
    assert ".innerHTML" not in js and "insertAdjacentHTML" not in js
    assert dashboard.route(local, "GET", "/ui/static/../dashboard.py", {}, b"", "x") is None
    assert dashboard.route(local, "GET", "/ui/static/nope.js", {}, b"", "x") is None
    code, headers, _ = call(local, "GET", "/")
    assert code == 302 and headers["Location"] == "/ui/"


def test_state_shows_queue_plan_children_and_failures_but_never_payload_text(local, db):
    failed = failed_job(db)
    queued = q.enqueue(db, q.NewJob("noop", {"text": SECRET}))
    with psycopg.connect(local.dsn, autocommit=True) as conn:
        local.duties._queue_stats(conn)
    code, headers, state = call(local, "GET", "/ui/api/state")
    assert code == 200 and headers["Cache-Control"] == "no-store"
    assert state["mode"] == "readonly" and state["operator"] is False
    assert state["actions_enabled"] is True and state["audit"] is None
    by_type = {t["name"]: t for t in state["types"]}
    assert by_type["noop"]["queue"]["queued"] == 1
    assert by_type["fail"]["queue"]["failed"] == 1
    assert by_type["fail"]["settings"]["max"] == 3
    assert [f["id"] for f in state["failures"]] == [failed]
    assert state["failures"][0]["error_code"] == "demo_permanent"
    assert set(state["failures"][0]) == {"id", "job_type", "error_code", "attempts",
                                         "max_attempts", "finished_at"}
    assert {c["name"] for c in state["health"]["checks"]} >= {"supervisor_loop", "database"}
    raw = json.dumps(state)
    assert "SECRET-STUDENT-TEXT" not in raw and "Jana" not in raw
    assert queued not in [f["id"] for f in state["failures"]]


def test_state_shows_each_model_endpoints_limit_in_flight_and_latency(local, db):
    """Issue #16: the dashboard's model endpoints, as the workers' gate keeps them."""
    gate = ModelGate(local.dsn, Policy("adaptive", None, 16))
    ticket = gate.acquire("http://gpu:11434", "qwen2.5vl:7b", 5.0)
    with psycopg.connect(local.dsn, autocommit=True) as conn:
        local.duties._queue_stats(conn)
    _, _, state = call(local, "GET", "/ui/api/state")
    [m] = state["models"]
    assert (m["endpoint"], m["model"], m["limit"], m["max_limit"], m["fixed"]) == \
        ("http://gpu:11434", "qwen2.5vl:7b", 1, 16, False)
    assert m["in_flight"] == 1 and m["requests"] == 0 and m["latency_s"] is None
    gate.release(ticket, "ok", 0.0)
    with psycopg.connect(local.dsn, autocommit=True) as conn:
        local.duties._queue_stats(conn)
    _, _, state = call(local, "GET", "/ui/api/state")
    [m] = state["models"]
    assert m["in_flight"] == 0 and m["requests"] == 1
    assert m["latency_s"] is not None and m["wait_share"] == 0.0 and m["observed_at"]


def test_actions_need_the_bearer_token_and_are_refused_cross_site(local, db, caplog):
    job_id = failed_job(db)
    path = f"/ui/api/jobs/{job_id}/retry"
    caplog.set_level(logging.INFO, logger="jobvisor.dashboard")

    assert call(local, "POST", path, {"Host": "127.0.0.1:9464"})[0] == 401
    assert call(local, "POST", path, {"Authorization": "Bearer wrong",
                                      "Host": "127.0.0.1:9464"})[0] == 401
    # A page elsewhere: the browser says so in Origin / Sec-Fetch-Site, token or not.
    assert call(local, "POST", path, operator({"Origin": "http://evil.example"}))[0] == 403
    assert call(local, "POST", path, operator({"Sec-Fetch-Site": "cross-site"}))[0] == 403
    assert call(local, "POST", path, operator({"Origin": "null"}))[0] == 403
    assert q.get_job(db, job_id)["status"] == "failed"

    code, _, body = call(local, "POST", path, operator(
        {"Origin": "http://127.0.0.1:9464", "Sec-Fetch-Site": "same-origin"}))
    assert code == 200 and body == {"job_id": job_id, "job_type": "fail", "result": "queued"}
    assert q.get_job(db, job_id)["status"] == "queued"
    # Retrying a queued job is a conflict, not a second run.
    assert call(local, "POST", path, operator())[0] == 409

    refused = [r for r in caplog.records if r.getMessage() == "dashboard_action_refused"]
    assert [r.reason for r in refused] == ["no_token", "bad_token", "cross_site", "cross_site",
                                           "cross_site"]
    assert all(r.client == "192.0.2.7" for r in refused)
    (done,) = [r for r in caplog.records if r.getMessage() == "dashboard_job_retried"
               and r.result == "queued"]
    assert (done.job_id, done.job_type, done.client) == (job_id, "fail", "192.0.2.7")
    assert SECRET not in caplog.text

    # The audit trail is shown to operators only.
    assert call(local, "GET", "/ui/api/state")[2]["audit"] is None
    audit = call(local, "GET", "/ui/api/state", operator())[2]["audit"]
    assert audit[0]["action"] == "retry" and audit[0]["result"] == "conflict"
    assert any(a["result"] == "refused: cross_site" for a in audit)


def test_cancel_of_queued_and_running_jobs_and_of_finished_ones(local, db):
    queued = q.enqueue(db, q.NewJob("noop", {}))
    running = q.enqueue(db, q.NewJob("fail", {}))
    q.lease(db, "fail", 1, worker_id="test:1", lease_seconds=30)
    assert call(local, "POST", f"/ui/api/jobs/{queued}/cancel", operator())[2]["result"] == \
        "cancelled"
    assert call(local, "POST", f"/ui/api/jobs/{running}/cancel", operator())[2]["result"] == \
        "cancel_requested"
    assert q.get_job(db, running)["cancel_requested"] is True
    code, _, body = call(local, "POST", f"/ui/api/jobs/{queued}/cancel", operator())
    assert code == 409 and "cancelled" in body["error"]
    assert call(local, "POST", "/ui/api/jobs/999999/cancel", operator())[0] == 404


def test_drain_and_resume_a_configured_type_only(local):
    assert call(local, "POST", "/ui/api/types/fail/pause", operator())[0] == 200
    assert local.paused == {"fail"}
    state = call(local, "GET", "/ui/api/state")[2]
    assert {t["name"]: t["paused"] for t in state["types"]} == {"fail": True, "noop": False}
    assert call(local, "POST", "/ui/api/types/fail/resume", operator())[0] == 200
    assert local.paused == set()
    assert call(local, "POST", "/ui/api/types/nosuch/pause", operator())[0] == 404
    assert dashboard.route(local, "POST", "/ui/api/types/Bad-Name/pause", operator(), b"",
                           "x") is None


def test_token_mode_refuses_the_data_without_the_token(local, monkeypatch):
    monkeypatch.setenv(dashboard.MODE_ENV, "token")
    assert call(local, "GET", "/ui/")[0] == 200  # the shell has no data; it asks for a token
    assert call(local, "GET", "/ui/api/state")[0] == 401
    code, _, state = call(local, "GET", "/ui/api/state", operator())
    assert code == 200 and state["operator"] is True and state["mode"] == "token"
    monkeypatch.setenv(dashboard.MODE_ENV, "tokne")  # a typo fails closed
    assert call(local, "GET", "/ui/api/state")[0] == 401


def test_off_mode_serves_nothing_and_no_token_disables_actions(local, db, monkeypatch):
    monkeypatch.setenv(dashboard.MODE_ENV, "off")
    for path in ("/", "/ui/", "/ui/api/state", "/ui/static/app.js"):
        assert dashboard.route(local, "GET", path, {}, b"", "x") is None
    monkeypatch.setenv(dashboard.MODE_ENV, "readonly")
    monkeypatch.delenv("JOBVISOR_HEALTH_TOKEN")
    job_id = failed_job(db)
    code, _, body = call(local, "POST", f"/ui/api/jobs/{job_id}/retry", operator())
    assert code == 403 and "JOBVISOR_HEALTH_TOKEN" in body["error"]
    assert call(local, "GET", "/ui/api/state")[2]["actions_enabled"] is False


def test_wrong_token_on_a_read_is_reported_not_silently_ignored(local):
    assert call(local, "GET", "/ui/api/state", {"Authorization": "Bearer nope"})[0] == 401


def test_an_unreachable_database_is_shown_not_raised(monkeypatch):
    monkeypatch.delenv(dashboard.MODE_ENV, raising=False)
    cfg = parse_config({"types": {"noop": {}}}, "test.yaml")
    sup = LocalSupervisor(cfg, Path("test.yaml"), f"postgresql://127.0.0.1:{free_port()}/x", {})
    code, _, state = call(sup, "GET", "/ui/api/state")
    assert code == 200 and state["db_error"] == "OperationalError"
    assert state["failures"] == [] and [t["name"] for t in state["types"]] == ["noop"]


# --- throughput history -----------------------------------------------------------------------

def test_rates_turn_cumulative_counts_into_jobs_per_minute():
    rates = dashboard.Rates(every=5.0, history=600.0)
    assert rates.per_minute("a", 0.0, 0.0) is None
    for i in range(0, 25):  # 2 minutes at 30 jobs/min, sampled every 5 s
        rates.sample(1000.0 + 5 * i, {"a": 2.5 * i})
    now = 1000.0 + 120
    assert rates.per_minute("a", now, 60.0) == pytest.approx(30.0)
    assert rates.per_minute("b", now, 0.0) == 0.0
    series = rates.series("a", now, 60.0, points=30)
    assert len(series) == 30
    assert series[:20] == [None] * 20  # before the first sample: a gap, not zeros
    assert all(v == pytest.approx(30.0) for v in series[-5:])
    rates.sample(now + 1, {"a": 99})  # too soon after the last sample: ignored
    assert rates.samples[-1][0] == 1000.0 + 120


def test_the_rate_covers_the_five_minutes_its_column_names_like_the_sparkline():
    # 30 jobs in a burst, then 2.5 idle minutes: the "Jobs/min (5 min)" column showed 0.0
    # (it averaged the last minute only) while the sparkline beside it showed the burst.
    rates = dashboard.Rates()
    rates.sample(1000.0, {"a": 0.0})
    rates.sample(1010.0, {"a": 30.0})
    for i in range(1, 31):
        rates.sample(1010.0 + 5 * i, {"a": 30.0})
    now = 1010.0 + 150
    assert rates.per_minute("a", now, 30.0) == pytest.approx(30 * 60 / 160)
    assert any(v for v in rates.series("a", now, 30.0))
    # Older than the window, a burst no longer counts.
    for i in range(31, 100):
        rates.sample(1010.0 + 5 * i, {"a": 30.0})
    assert rates.per_minute("a", 1010.0 + 5 * 99, 30.0) == 0.0


def test_finished_totals_count_jobs_that_left_the_queue():
    outcomes = {("a", "completed", None): [3, 1.0], ("a", "failed", "x"): [1, 0.1],
                ("a", "retried", "y"): [5, 0.2], ("b", "cancelled", "cancelled"): [2, 0.0]}
    assert dashboard.finished_totals(outcomes) == {"a": 4, "b": 2}


# --- the queue's operator reads -------------------------------------------------------------------

def test_recent_failures_running_jobs_and_job_brief_read_no_payload(db):
    failed = failed_job(db)
    running = q.enqueue(db, q.NewJob("noop", {"text": SECRET}))
    q.lease(db, "noop", 1, worker_id="host:1", lease_seconds=30)
    (f,) = q.recent_failures(db)
    assert f["id"] == failed and f["error_code"] == "demo_permanent"
    (r,) = q.running_jobs(db)
    assert r["id"] == running and r["leased_by"] == "host:1" and r["attempts"] == 1
    assert q.job_brief(db, running)["status"] == "leased"
    assert q.job_brief(db, 10**12) is None
    assert SECRET not in repr([f, r, q.job_brief(db, failed)])


def test_batches_are_none_without_the_table_and_listed_with_it(db):
    exists = db.execute("SELECT to_regclass('jobvisor.batches') IS NOT NULL").fetchone()[0]
    if not exists:  # before sql/004_batches.sql: nothing to show, and no error
        assert q.recent_batches(db) is None
        db.execute("""CREATE TABLE jobvisor.batches (
            id text PRIMARY KEY, total int NOT NULL, completed int NOT NULL DEFAULT 0,
            failed int NOT NULL DEFAULT 0, cancelled int NOT NULL DEFAULT 0,
            created_at timestamptz NOT NULL DEFAULT now(), finished_at timestamptz,
            callback_url text)""")
    db.execute("INSERT INTO jobvisor.batches (id, total, completed, finished_at, callback_url) "
               "VALUES ('old', 2, 2, now(), 'https://x.example/?secret=1'), "
               "('open', 10, 3, NULL, NULL)")
    rows = q.recent_batches(db)
    assert [b["id"] for b in rows] == ["open", "old"]
    assert (rows[0]["total"], rows[0]["completed"], rows[0]["finished_at"]) == (10, 3, None)
    assert "callback_url" not in rows[0]


# --- over real HTTP, from a running `jobvisor run` ---------------------------------------------------

def _post(port: int, path: str, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=b"{}", method="POST",
                                 headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def test_running_supervisor_serves_the_dashboard_and_logs_each_action(db, worker_env, tmp_path):
    marker = tmp_path / "marker"
    env = dict(worker_env, JOBVISOR_HEALTH_TOKEN=TOKEN)
    cfg = base_config(free_port(), {
        "flaky": {"handler": "tests.test_dashboard:fail_once", **SMALL,
                  "retry": {"max_attempts": 1}, "processes": {"min": 1, "max": 1}},
        "noop": {**SMALL, "processes": {"min": 1, "max": 1}}})
    sup = Supervisor(tmp_path, env, cfg).start()
    try:
        status, html, headers = sup.get("/ui/")
        assert status == 200 and "Content-Security-Policy" in headers
        job_id = q.enqueue(db, q.NewJob("flaky", {"marker": str(marker), "text": SECRET}))
        wait_for(lambda: q.get_job(db, job_id)["status"] == "failed", what="job failed")

        def failures() -> list[int]:
            return [f["id"] for f in json.loads(sup.get("/ui/api/state")[1])["failures"]]

        wait_for(lambda: job_id in failures(), what="failure on the dashboard")
        path = f"/ui/api/jobs/{job_id}/retry"
        host = f"127.0.0.1:{sup.port}"
        assert _post(sup.port, path, {})[0] == 401
        assert _post(sup.port, path, {"Authorization": f"Bearer {TOKEN}",
                                      "Origin": "http://attacker.example"})[0] == 403
        assert q.get_job(db, job_id)["status"] == "failed"
        code, body = _post(sup.port, path, {"Authorization": f"Bearer {TOKEN}",
                                            "Origin": f"http://{host}"})
        assert (code, body["result"]) == (200, "queued")
        wait_for(lambda: q.get_job(db, job_id)["status"] == "completed", what="retry ran")

        # Drain a type: its child stops, the plan says why; resume brings one back.
        assert _post(sup.port, "/ui/api/types/noop/pause",
                     {"Authorization": f"Bearer {TOKEN}"})[0] == 200
        wait_for(lambda: not sup.pids(db, "noop", "running") and not sup.pids(db, "noop",
                                                                               "starting"),
                 what="noop drained")
        state = json.loads(sup.get("/ui/api/state")[1])
        noop = next(t for t in state["types"] if t["name"] == "noop")
        assert noop["paused"] and noop["plan"]["reason"] == "paused by operator"
        assert _post(sup.port, "/ui/api/types/noop/resume",
                     {"Authorization": f"Bearer {TOKEN}"})[0] == 200
        wait_for(lambda: sup.pids(db, "noop", "starting") or sup.pids(db, "noop"),
                 what="noop back")

        events = {e["event"]: e for e in
                  sup.events("dashboard_job_retried") + sup.events("dashboard_type_paused")
                  + sup.events("dashboard_type_resumed") + sup.events("dashboard_action_refused")}
        assert events["dashboard_job_retried"]["job_id"] == job_id
        assert events["dashboard_job_retried"]["job_type"] == "flaky"
        assert events["dashboard_job_retried"]["client"] == "127.0.0.1"
        assert events["dashboard_type_paused"]["job_type"] == "noop"
        assert "ts" in events["dashboard_type_resumed"]
        assert len(sup.events("dashboard_action_refused")) == 2
        assert "SECRET-STUDENT-TEXT" not in sup.log()
    finally:
        assert sup.stop() == 0
