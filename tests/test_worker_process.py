"""Sub-worker processes against a real PostgreSQL: real threads, signals and leases."""

from __future__ import annotations

import signal
import subprocess
import sys

import psycopg

from tests.handlers import EFFECTS_DDL
from tests.helpers import counts, start_worker, stop, wait_for
from workers.core import queue as q

RECORD = ("--handler", "tests.handlers:record")


def _effects(db: psycopg.Connection) -> list[tuple[int, int]]:
    return db.execute("SELECT job_id, attempt FROM effects ORDER BY job_id, attempt").fetchall()


def test_four_processes_by_four_threads_complete_2000_jobs_exactly_once(db, worker_env, tmp_path):
    db.execute(EFFECTS_DDL)
    ids = q.enqueue_many(db, [q.NewJob("rec", {"i": i}) for i in range(2000)])
    procs = [start_worker(worker_env, "rec", "--concurrency", "4", *RECORD,
                          log=tmp_path / f"w{i}.log") for i in range(4)]
    try:
        wait_for(lambda: counts(db, "rec").get("completed") == 2000, timeout=120,
                 what="2000 completed jobs")
    finally:
        codes = [stop(p) for p in procs]
    assert codes == [0, 0, 0, 0]
    effects = _effects(db)
    assert sorted(j for j, _ in effects) == ids  # one committed side effect per job
    served_by = db.execute("SELECT count(DISTINCT leased_by) FROM jobvisor.jobs").fetchone()[0]
    assert served_by == 4


def test_job_whose_heartbeat_stops_is_rescued_and_late_completion_rejected(db, worker_env,
                                                                           tmp_path):
    db.execute(EFFECTS_DDL)
    log_a = tmp_path / "a.log"
    a = start_worker(worker_env, "rec", *RECORD, "--lease", "2", "--heartbeat", "0.5",
                     log=log_a)
    b = None
    try:
        job_id = q.enqueue(db, q.NewJob("rec", {"seconds": 3, "ignore_cancel": True}))
        wait_for(lambda: counts(db, "rec").get("leased") == 1, what="worker A leasing")
        a.send_signal(signal.SIGSTOP)  # A's heartbeats stop; its handler is mid-sleep
        wait_for(lambda: db.execute(
            "SELECT leased_until < now() FROM jobvisor.jobs WHERE id = %s", (job_id,)
        ).fetchone()[0], what="lease expiry")
        assert q.rescue(db) == [(job_id, "rec", "queued")]
        b = start_worker(worker_env, "rec", *RECORD, log=tmp_path / "b.log")
        wait_for(lambda: counts(db, "rec").get("completed") == 1, what="worker B completing")
        a.send_signal(signal.SIGCONT)
        wait_for(lambda: '"lease_lost"' in log_a.read_text(), what="A noticing its lost lease")
    finally:
        a.send_signal(signal.SIGCONT)
        stop(a)
        if b:
            stop(b)
    assert _effects(db) == [(job_id, 2)]
    assert q.get_job(db, job_id)["result"] == {"attempt": 2}


def test_transient_failures_back_off_with_growing_delays_until_max_attempts(db, worker_env):
    job_id = q.enqueue(db, q.NewJob("fail", {"kind": "transient"}, max_attempts=4))
    p = start_worker(worker_env, "fail", "--backoff", "0.2", "--max-backoff", "60",
                     "--poll", "0.05")
    delays: dict[int, float] = {}
    try:
        def observe() -> bool:
            attempts, status, delay = db.execute(
                "SELECT attempts, status, extract(epoch FROM visible_at - updated_at) "
                "FROM jobvisor.jobs WHERE id = %s", (job_id,)).fetchone()
            if status == "queued" and attempts:
                delays.setdefault(attempts, float(delay))
            return status == "failed"

        wait_for(observe, interval=0.01, what="job failing after its attempts")
    finally:
        stop(p)
    row = q.get_job(db, job_id)
    assert row["attempts"] == 4 and row["error_code"] == "fail_transient"
    seen = [delays[a] for a in sorted(delays)]
    assert len(seen) >= 2
    assert all(later >= earlier for earlier, later in zip(seen, seen[1:], strict=False))
    assert all(0.1 <= d <= 0.8 for d in seen)


def test_worker_sleeping_on_listen_starts_new_job_without_waiting_for_poll(db, worker_env):
    p = start_worker(worker_env, "noop", "--poll", "3600")
    try:
        wait_for(lambda: db.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE query = 'LISTEN jobvisor_cancel'"
        ).fetchone()[0] == 1, what="the worker listening")
        # The first lease round happened at start-up; from now on only NOTIFY wakes it.
        job_id = q.enqueue(db, q.NewJob("noop", {}))
        wait_for(lambda: q.get_job(db, job_id)["status"] == "completed", timeout=30,
                 what="the job completing long before the hour-long poll")
    finally:
        stop(p)


def test_sigterm_with_jobs_in_flight_loses_none(db, worker_env, tmp_path):
    ids = q.enqueue_many(db, [q.NewJob("sleep", {"seconds": 0.5, "dir": str(tmp_path)})
                              for _ in range(12)])
    p = start_worker(worker_env, "sleep", "--concurrency", "4", "--prefetch", "4",
                     "--handler", "tests.handlers:marked_sleep")
    wait_for(lambda: counts(db, "sleep").get("leased") == 8, what="8 jobs held")
    # SIGTERM only once four jobs run: those finish; the four prefetched go back.
    wait_for(lambda: len(list(tmp_path.iterdir())) >= 4, what="4 jobs started")
    assert stop(p, signal.SIGTERM) == 0
    c = counts(db, "sleep")
    assert c.get("leased", 0) == 0 and c.get("failed", 0) == 0
    assert c.get("completed", 0) >= 4 and sum(c.values()) == len(ids)
    # The ones never started went back without an attempt counted.
    back = db.execute("SELECT attempts FROM jobvisor.jobs WHERE status = 'queued'").fetchall()
    assert all(a == 0 for (a,) in back)


def test_sigterm_past_grace_puts_running_jobs_back_uncounted(db, worker_env):
    q.enqueue_many(db, [q.NewJob("sleep", {"seconds": 600}) for _ in range(2)])
    p = start_worker(worker_env, "sleep", "--concurrency", "2", "--grace", "0.5")
    wait_for(lambda: counts(db, "sleep").get("leased") == 2, what="2 jobs running")
    assert stop(p, signal.SIGTERM) == 0
    rows = db.execute("SELECT status, attempts FROM jobvisor.jobs").fetchall()
    assert rows == [("queued", 0), ("queued", 0)]


def test_bad_payload_fails_cleanly_while_other_jobs_succeed(db, worker_env):
    good = q.enqueue_many(db, [q.NewJob("sleep", {"seconds": 0}) for _ in range(5)])
    bad = q.enqueue(db, q.NewJob("sleep", {"seconds": "ten"}))
    worse = q.enqueue(db, q.NewJob("sleep", ["not", "an", "object"]))
    p = start_worker(worker_env, "sleep", "--concurrency", "3")
    try:
        wait_for(lambda: counts(db, "sleep").get("completed") == 6, what="good jobs done")
    finally:
        stop(p)
    assert all(q.get_job(db, i)["status"] == "completed" for i in good)
    row = q.get_job(db, bad)
    assert (row["status"], row["error_code"], row["attempts"]) == ("failed", "invalid_payload", 1)
    assert "seconds" in row["error_message"]
    assert q.get_job(db, worse)["status"] == "completed"  # no 'seconds' means 0


def test_worker_for_unknown_type_exits_2_naming_the_code(worker_env):
    proc = subprocess.run([sys.executable, "-m", "workers", "--type", "no_such_type"],
                          env=worker_env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "UNKNOWN_JOB_TYPE" in proc.stderr and "no_such_type" in proc.stderr


def test_job_over_its_timeout_is_given_back_and_the_process_exits(db, worker_env):
    db.execute(EFFECTS_DDL)
    job_id = q.enqueue(db, q.NewJob("slow", {"seconds": 600, "ignore_cancel": True}))
    p = start_worker(worker_env, "slow", *RECORD, "--timeout", "1", "--backoff", "0.1")
    assert p.wait(timeout=60) == 3
    row = q.get_job(db, job_id)
    assert row["status"] == "queued" and row["error_code"] == "slow_timeout"
    assert _effects(db) == []


def test_cancel_reaches_a_running_job(db, worker_env):
    job_id = q.enqueue(db, q.NewJob("sleep", {"seconds": 600}))
    p = start_worker(worker_env, "sleep")
    try:
        wait_for(lambda: counts(db, "sleep").get("leased") == 1, what="job running")
        assert q.cancel(db, job_id) == "cancel_requested"
        wait_for(lambda: q.get_job(db, job_id)["status"] == "cancelled", timeout=30,
                 what="running job cancelled")
    finally:
        stop(p)
    assert q.get_job(db, job_id)["error_code"] == "cancelled"


def test_follow_up_enqueue_commits_with_the_job_or_not_at_all(db, worker_env):
    ok = q.enqueue(db, q.NewJob("chain", {}))
    bad = q.enqueue(db, q.NewJob("chain", {"fail_after_enqueue": True}, max_attempts=1))
    p = start_worker(worker_env, "chain", "--handler", "tests.handlers:chain",
                     "--concurrency", "2")
    try:
        wait_for(lambda: counts(db, "chain").get("completed") == 1
                 and counts(db, "chain").get("failed") == 1, what="both chain jobs finished")
    finally:
        stop(p)
    follow_ups = db.execute(
        "SELECT payload->>'parent' FROM jobvisor.jobs WHERE job_type = 'noop'").fetchall()
    assert follow_ups == [(str(ok),)]
    assert q.get_job(db, ok)["result"]["follow_up"] > bad
    assert q.get_job(db, bad)["error_code"] == "unexpected_error"


def test_follow_up_jobs_get_their_own_types_max_attempts(db, worker_env):
    job_id = q.enqueue(db, q.NewJob("chain", {}))
    p = start_worker(worker_env, "chain", "--handler", "tests.handlers:chain",
                     "--max-attempts", "2", "--attempts-by-type", '{"noop": 9}')
    try:
        wait_for(lambda: q.get_job(db, job_id)["status"] == "completed", what="chain done")
    finally:
        stop(p)
    follow = q.get_job(db, q.get_job(db, job_id)["result"]["follow_up"])
    assert follow["max_attempts"] == 9
