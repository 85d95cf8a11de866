"""The `jobvisor` command line as scripts use it: output, exit codes, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import start_worker, stop, wait_for
from workers.core import queue as q

REPO = Path(__file__).resolve().parent.parent


def jv(env: dict[str, str], *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "supervisor_app", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, input=stdin, timeout=120)


def test_enqueue_prints_the_id_and_keeps_options(db, worker_env):
    out = jv(worker_env, "enqueue", "noop", "--payload", '{"a": {"b": [1, 2]}}',
             "--priority", "7", "--delay", "1h", "--max-attempts", "2", "--batch", "b1")
    assert out.returncode == 0, out.stderr
    job = q.get_job(db, int(out.stdout))
    assert job["payload"] == {"a": {"b": [1, 2]}} and job["priority"] == 7
    assert job["max_attempts"] == 2 and job["batch_id"] == "b1"
    (delay,) = db.execute("SELECT extract(epoch FROM visible_at - created_at) FROM jobvisor.jobs "
                          "WHERE id = %s", (job["id"],)).fetchone()
    assert 3590 < delay <= 3600


def test_enqueue_with_a_key_returns_the_live_job(worker_env):
    first = jv(worker_env, "enqueue", "noop", "--payload", "{}", "--key", "k-1")
    again = jv(worker_env, "enqueue", "noop", "--payload", "{}", "--key", "k-1")
    assert first.returncode == again.returncode == 0
    assert first.stdout == again.stdout


def test_enqueue_file_of_json_lines_prints_one_id_per_line(db, worker_env, tmp_path):
    lines = tmp_path / "jobs.jsonl"
    lines.write_text("".join(json.dumps({"i": i}) + "\n" for i in range(12000)) + "\n")
    out = jv(worker_env, "enqueue", "noop", "--file", str(lines), "--batch", "big")
    assert out.returncode == 0, out.stderr
    ids = [int(x) for x in out.stdout.split()]
    assert len(ids) == 12000 == len(set(ids))
    assert q.get_job(db, ids[-1])["payload"] == {"i": 11999}
    (n,) = db.execute("SELECT count(*) FROM jobvisor.jobs WHERE batch_id = 'big'").fetchone()
    assert n == 12000


@pytest.mark.parametrize(("args", "needle"), [
    (["enqueue", "noop", "--payload", "{oops"], "--payload: invalid JSON"),
    (["enqueue", "noop"], "exactly one of --payload"),
    (["enqueue", "No-Such", "--payload", "{}"], "job type 'No-Such'"),
    (["enqueue", "nothing_here", "--payload", "{}"], "UNKNOWN_JOB_TYPE"),
    (["enqueue", "noop", "--payload", "{}", "--delay", "soon"], "soon"),
    (["jobs", "show", "999999"], "job 999999: no such job"),
    (["jobs", "show", "x"], "invalid int value"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_input_exits_2_with_one_line_naming_the_problem(worker_env, args, needle):
    out = jv(worker_env, *args)
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert needle in out.stderr


def test_enqueue_file_with_a_bad_line_names_the_line(worker_env, tmp_path):
    f = tmp_path / "jobs.jsonl"
    f.write_text('{"ok": 1}\n{"broken": \n')
    out = jv(worker_env, "enqueue", "noop", "--file", str(f))
    assert out.returncode == 2 and f"{f}:2: invalid JSON" in out.stderr


def test_unreachable_database_names_host_and_port_but_not_the_password(worker_env):
    password = "hunter2-secret"  # a test value, checked to stay out of every output
    env = dict(worker_env, DATABASE_URL=f"postgresql://app:{password}@127.0.0.1:1/appdb")
    out = jv(env, "status")
    assert out.returncode == 2
    assert "127.0.0.1:1" in out.stderr and "hunter2" not in out.stderr + out.stdout
    assert len(out.stderr.strip().splitlines()) == 1


def test_status_json_has_the_documented_shape(db, worker_env):
    q.enqueue_many(db, [q.NewJob("noop", {}) for _ in range(3)])
    jobs = q.lease(db, "noop", 1, worker_id="w", lease_seconds=30)
    q.complete(db, jobs[0].id, jobs[0].lease_key, None)
    out = jv(worker_env, "status", "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert set(doc) == {"queues", "workers", "plan", "unserved", "model_servers"}
    assert doc["model_servers"] == []  # read by running supervisors only
    assert doc["unserved"] == ["noop"]  # queued, and no supervisor runs
    text = jv(worker_env, "status")
    assert "warning: 2 job(s) of type 'noop' are queued and no running supervisor" in text.stderr
    noop = doc["queues"]["noop"]
    assert {k: noop[k] for k in ("queued", "leased", "completed", "failed", "cancelled")} == \
        {"queued": 2, "leased": 0, "completed": 1, "failed": 0, "cancelled": 0}
    assert noop["oldest_queued_s"] >= 0
    assert doc["workers"] == [] and doc["plan"] == {}


def test_jobs_show_retry_and_cancel(db, worker_env):
    job_id = q.enqueue(db, q.NewJob("noop", {"x": 1}))
    shown = jv(worker_env, "jobs", "show", str(job_id), "--json")
    assert json.loads(shown.stdout)["status"] == "queued"
    assert jv(worker_env, "jobs", "cancel", str(job_id)).returncode == 0
    assert q.get_job(db, job_id)["status"] == "cancelled"
    again = jv(worker_env, "jobs", "cancel", str(job_id))
    assert again.returncode == 1 and "already cancelled" in again.stderr
    assert jv(worker_env, "jobs", "retry", str(job_id)).returncode == 0
    assert q.get_job(db, job_id)["status"] == "queued"
    refused = jv(worker_env, "jobs", "retry", str(job_id))
    assert refused.returncode == 1 and "only failed or cancelled" in refused.stderr


def test_migrate_is_a_no_op_when_up_to_date(worker_env):
    out = jv(worker_env, "migrate")
    assert out.returncode == 0 and out.stdout.strip() == "up to date"


def test_db_url_prints_the_dsn_in_use(worker_env, db_dsn):
    out = jv(worker_env, "db-url")
    assert out.returncode == 0 and out.stdout.strip() == db_dsn


def test_every_command_has_help(worker_env):
    for args in (["--help"], ["run", "--help"], ["enqueue", "--help"], ["jobs", "show", "--help"],
                 ["status", "--help"], ["reload", "--help"], ["db-url", "--help"]):
        out = jv(worker_env, *args)
        assert out.returncode == 0 and "usage:" in out.stdout


def test_poll_only_worker_still_finds_jobs(db, worker_env):
    p = start_worker(worker_env, "noop", "--no-listen", "--poll", "0.2")
    try:
        wait_for(lambda: db.execute("SELECT count(*) FROM pg_stat_activity "
                                    "WHERE query LIKE 'LISTEN%'").fetchone()[0] == 0
                 and db.execute("SELECT count(*) FROM pg_stat_activity WHERE "
                                "application_name = '' AND backend_type = 'client backend'")
                 .fetchone()[0] >= 1, what="worker connected")
        job_id = q.enqueue(db, q.NewJob("noop", {}))
        wait_for(lambda: q.get_job(db, job_id)["status"] == "completed", what="polled job done")
    finally:
        stop(p)


def test_a_child_imports_only_what_its_type_needs(worker_env):
    code = ("import sys, workers.__main__, workers.core.runtime; from workers.core.registry import load; "
            "load('noop'); load('sleep'); "
            "heavy = [m for m in sys.modules if m.split('.')[0] in "
            "('pymupdf', 'fitz', 'dspy', 'litellm', 'httpx', 'supervisor_app', 'pydantic')]; "
            "print(','.join(sorted(heavy)))")
    out = subprocess.run([sys.executable, "-c", code], env=worker_env, cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""


def test_jobs_show_lists_each_attempts_error(db, worker_env):
    job_id = q.enqueue(db, q.NewJob("noop", {}, max_attempts=3))
    for n in (1, 2):
        db.execute("UPDATE jobvisor.jobs SET visible_at = now() WHERE id = %s", (job_id,))
        (job,) = q.lease(db, "noop", 1, worker_id="w", lease_seconds=30)
        q.retry(db, job.id, job.lease_key, code=f"step{n}_failed", message=f"try {n}", delay=0)
    text = jv(worker_env, "jobs", "show", str(job_id)).stdout
    assert "attempt 1: step1_failed at " in text and "— try 1" in text
    assert "attempt 2: step2_failed at " in text
    shown = json.loads(jv(worker_env, "jobs", "show", str(job_id), "--json").stdout)
    assert [e["code"] for e in shown["errors"]] == ["step1_failed", "step2_failed"]


def test_jobs_show_names_a_payload_too_deep_to_decode(db, worker_env):
    (job_id,) = db.execute("INSERT INTO jobvisor.jobs (job_type, payload) VALUES ('noop', %s)"
                           " RETURNING id", ("[" * 6000 + "]" * 6000,)).fetchone()
    out = jv(worker_env, "jobs", "show", str(job_id), "--json")
    assert out.returncode == 0, out.stderr
    shown = json.loads(out.stdout)
    assert shown["payload"] is None and "too deep" in shown["payload_error"]
