"""The sub-worker at its edges: bad payloads and results, lost leases, a database that
goes away, identities, tracebacks. Real processes and a real PostgreSQL throughout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg

from tests.handlers import EFFECTS_DDL
from tests.helpers import log_events, start_worker, stop, wait_for
from tests.tcp_proxy import TcpProxy
from workers.core import queue as q
from workers.core.registry import load
from workers.core.runtime import Runtime, WorkerSettings

REPO = Path(__file__).resolve().parent.parent


def _job(db: psycopg.Connection, job_id: int) -> dict:
    return q.get_job(db, job_id)


def _events(log: Path, name: str) -> list[dict]:
    return log_events(log.read_text(errors="replace"), name)


def test_a_payload_the_worker_cannot_decode_fails_alone_as_payload_invalid(db, worker_env,
                                                                           tmp_path):
    deep = "[" * 6000 + "]" * 6000
    (bad,) = db.execute("INSERT INTO jobvisor.jobs (job_type, payload) VALUES ('noop', %s::jsonb)"
                        " RETURNING id", (deep,)).fetchone()
    good = q.enqueue_many(db, [q.NewJob("noop", {"i": i}) for i in range(5)])
    w = start_worker(worker_env, "noop", "--concurrency", "2", "--prefetch", "8",
                     log=tmp_path / "w.log")
    try:
        wait_for(lambda: all(_job(db, i)["status"] == "completed" for i in good)
                 and q.job_brief(db, bad)["status"] == "failed", what="jobs finished")
        assert q.job_brief(db, bad)["error_code"] == "payload_invalid"
        (message,) = db.execute("SELECT error_message FROM jobvisor.jobs WHERE id = %s",
                                (bad,)).fetchone()
        assert "too deep" in message
        assert w.poll() is None  # the worker lives on
        later = q.enqueue(db, q.NewJob("noop", {}))
        wait_for(lambda: _job(db, later)["status"] == "completed", what="later job served")
    finally:
        assert stop(w) == 0


def test_a_result_jsonb_cannot_hold_fails_that_job_alone_and_its_batch_commits(db, worker_env,
                                                                             tmp_path):
    kinds = ["ok"] * 6 + ["nan", "inf", "nul", "surrogate"] + ["ok"] * 6
    ids = q.enqueue_many(db, [q.NewJob("bad", {"kind": k}) for k in kinds])
    w = start_worker(worker_env, "bad", "--handler", "tests.handlers:bad_result",
                     "--concurrency", "4", "--prefetch", "16", log=tmp_path / "w.log")
    try:
        wait_for(lambda: all(_job(db, i)["status"] in ("completed", "failed") for i in ids),
                 what="all finished")
        for job_id, kind in zip(ids, kinds, strict=True):
            row = _job(db, job_id)
            if kind == "ok":
                assert row["status"] == "completed" and row["result"] == {"ok": job_id}
            else:
                assert row["status"] == "failed" and row["error_code"] == "result_invalid", kind
                assert row["attempts"] == 1
    finally:
        assert stop(w) == 0


def test_a_psycopg_error_other_than_operational_in_a_loop_duty_costs_no_job_nor_the_worker(
        db, worker_env, tmp_path):
    # The loop stores progress notes on its control connection; a note with a NUL is
    # refused (DataError, not OperationalError) while the job is held.
    log = tmp_path / "w.log"
    bad = q.enqueue(db, q.NewJob("prog", {}))
    w = start_worker(worker_env, "prog", "--handler", "tests.handlers:progress_note",
                     "--poll", "0.2", log=log)
    try:
        wait_for(lambda: _job(db, bad)["status"] == "completed", what="job completed")
        row = _job(db, bad)
        assert row["result"] == {"taken": True}  # the loop did try to store the note
        assert row["attempts"] == 1 and row["progress_note"] is None
        wait_for(lambda: _events(log, "worker_loop_error"), what="the loop error logged")
        assert w.poll() is None  # the worker lives on…
        later = q.enqueue(db, q.NewJob("prog", {"note": "half way"}))
        wait_for(lambda: _job(db, later)["status"] == "completed", what="later job served")
        assert _job(db, later)["progress_note"] == "half way"  # …and still stores progress
        assert w.poll() is None
    finally:
        assert stop(w) == 0
    (event,) = _events(log, "worker_loop_error")
    assert event["exc_type"] == "DataError"


def _runtime(dsn: str, job_type: str, handler: str, **settings) -> Runtime:
    return Runtime(dsn, WorkerSettings(job_type=job_type, **settings),
                   load(job_type, handler))


def _in_thread(rt: Runtime) -> threading.Thread:
    t = threading.Thread(target=rt.run, daemon=True)
    t.start()
    return t


def test_a_batched_ack_the_database_refuses_falls_back_to_one_by_one(db_dsn, db):
    ids = q.enqueue_many(db, [q.NewJob("noop", {}) for _ in range(3)])
    rt = _runtime(db_dsn, "noop", "workers.core.builtin:noop")
    rt.control = psycopg.connect(db_dsn, autocommit=True)
    try:
        rt._lease(3)
        runs = [rt.held[i] for i in ids]
        # Text that passes no check of ours but that jsonb refuses: the whole statement fails.
        rt.acks = [(runs[0], '{"a": 1}'), (runs[1], '"\\u0000"'), (runs[2], None)]
        rt._flush_acks()
    finally:
        rt.control.close()
        rt.pool.close()
    assert [_job(db, i)["status"] for i in ids] == ["completed", "failed", "completed"]
    assert _job(db, ids[1])["error_code"] == "result_invalid"
    assert not rt.held


class _OwnedDict(dict):
    """A dict that remembers every thread that changed it."""

    def __init__(self) -> None:
        super().__init__()
        self.writers: set[str] = set()

    def __setitem__(self, key, value) -> None:
        self.writers.add(threading.current_thread().name)
        super().__setitem__(key, value)

    def pop(self, *args):
        self.writers.add(threading.current_thread().name)
        return super().pop(*args)

    def __delitem__(self, key) -> None:
        self.writers.add(threading.current_thread().name)
        super().__delitem__(key)

    def clear(self) -> None:
        self.writers.add(threading.current_thread().name)
        super().clear()


def test_only_the_control_loop_changes_what_the_runtime_holds(db_dsn, db):
    db.execute(EFFECTS_DDL)
    ids = q.enqueue_many(db, [q.NewJob("rec", {}) for _ in range(300)]
                         + [q.NewJob("rec", {"seconds": 0.01}) for _ in range(20)])
    rt = _runtime(db_dsn, "rec", "tests.handlers:record", concurrency=4, prefetch=8,
                  poll=0.2, listen=False)
    rt.held = _OwnedDict()
    t = threading.Thread(target=rt.run, name="control", daemon=True)
    t.start()
    try:
        wait_for(lambda: db.execute("SELECT count(*) FROM jobvisor.jobs WHERE status = "
                                    "'completed'").fetchone()[0] == len(ids), what="all done")
    finally:
        rt.stop()
        t.join(30)
    assert rt.held.writers == {"control"}


def test_a_prefetched_job_whose_lease_is_gone_is_not_started(db, worker_env, tmp_path):
    db.execute(EFFECTS_DDL)
    first = q.enqueue(db, q.NewJob("rec", {"seconds": 3}))
    second = q.enqueue(db, q.NewJob("rec", {}))
    w = start_worker(worker_env, "rec", "--handler", "tests.handlers:record", "--concurrency",
                     "1", "--prefetch", "1", "--heartbeat", "0.5", "--lease", "30",
                     log=tmp_path / "w.log")
    try:
        wait_for(lambda: _job(db, second)["status"] == "leased", what="second prefetched")
        # Another worker took it over (as after a rescue): the lease key is no longer ours.
        db.execute("UPDATE jobvisor.jobs SET lease_key = gen_random_uuid(), leased_by = 'other'"
                   " WHERE id = %s", (second,))
        wait_for(lambda: _job(db, first)["status"] == "completed", what="first completed")
        wait_for(lambda: _events(tmp_path / "w.log", "jobs_put_back"), what="second let go")
        effects = db.execute("SELECT job_id FROM effects").fetchall()
        assert effects == [(first,)]  # the second never ran here
        assert _job(db, second)["leased_by"] == "other"
    finally:
        assert stop(w) == 0


def test_two_runtimes_sharing_host_and_pid_never_rescue_each_other(db_dsn, db):
    db.execute(EFFECTS_DDL)
    q.enqueue_many(db, [q.NewJob("rec", {"seconds": 30}) for _ in range(2)])
    a = _runtime(db_dsn, "rec", "tests.handlers:record", listen=False, poll=0.2)
    b = _runtime(db_dsn, "rec", "tests.handlers:record", listen=False, poll=0.2)
    host_pid = a.s.worker_id.rsplit(":", 1)[0]
    assert b.s.worker_id.rsplit(":", 1)[0] == host_pid and a.s.worker_id != b.s.worker_id
    ta, tb = _in_thread(a), _in_thread(b)
    try:
        wait_for(lambda: db.execute("SELECT count(DISTINCT leased_by) FROM jobvisor.jobs "
                                    "WHERE status = 'leased'").fetchone()[0] == 2,
                 what="each runtime holding one job")
        rescued = q.rescue_worker(db, a.s.worker_id)
        assert len(rescued) == 1
        (owner,) = db.execute("SELECT leased_by FROM jobvisor.jobs WHERE status = 'leased'"
                              ).fetchone()
        assert owner == b.s.worker_id
    finally:
        a.stop()
        b.stop()
        ta.join(30)
        tb.join(30)


def test_an_unexpected_exception_logs_its_frames_once_and_no_payload_text(db, worker_env,
                                                                         tmp_path):
    secret = "student wrote: Geheimnis 4711"
    job_id = q.enqueue(db, q.NewJob("boom", {"text": secret}, max_attempts=1))
    log = tmp_path / "w.log"
    w = start_worker(worker_env, "boom", "--handler", "tests.handlers:boom", log=log)
    try:
        wait_for(lambda: _job(db, job_id)["status"] == "failed", what="job failed")
    finally:
        assert stop(w) == 0
    (event,) = _events(log, "job_unexpected_error")
    assert event["exc_type"] == "KeyError" and event["job_id"] == job_id
    assert any("tests/handlers.py" in f and "in boom" in f for f in event["traceback"])
    row = _job(db, job_id)
    assert row["error_code"] == "unexpected_error"
    assert row["error_message"].startswith("KeyError at ") and "in boom" in row["error_message"]
    assert secret not in log.read_text() and "Geheimnis" not in json.dumps(row["errors"])


def test_finishing_statements_record_when_the_job_finished_not_when_its_transaction_began(db):
    job_id = q.enqueue(db, q.NewJob("noop", {}))
    (job,) = q.lease(db, "noop", 1, worker_id="w", lease_seconds=30)
    with db.transaction():
        (began,) = db.execute("SELECT now()").fetchone()
        time.sleep(0.3)
        assert q.complete(db, job.id, job.lease_key, {"x": 1})
    finished = _job(db, job_id)["finished_at"]
    assert (finished - began).total_seconds() >= 0.3


# --- the database goes away ------------------------------------------------------------

def _status_reader(fd: int, lines: list[dict]) -> threading.Thread:
    def read() -> None:
        buf = b""
        while True:
            try:
                data = os.read(fd, 65536)
            except OSError:
                return
            if not data:
                return
            buf += data
            *done, buf = buf.split(b"\n")
            lines.extend({"t": time.monotonic(), **json.loads(x)} for x in done if x)
    t = threading.Thread(target=read, daemon=True)
    t.start()
    return t


def test_jobs_finishing_during_an_outage_are_acked_or_put_back_once_the_server_answers(
        db_dsn, db, worker_env, tmp_path):
    db.execute(EFFECTS_DDL)
    db.execute("GRANT ALL ON effects TO PUBLIC")
    proxy = TcpProxy.in_front_of(db_dsn)
    env = dict(worker_env, DATABASE_URL=proxy.dsn(db_dsn))
    with_db = q.enqueue(db, q.NewJob("slow", {"seconds": 2}))
    no_db = q.enqueue(db, q.NewJob("slow", {"seconds": 2, "no_db": True}))
    read_fd, write_fd = os.pipe()
    env["JOBVISOR_STATUS_FD"] = str(write_fd)
    # A lease of 10 minutes and no supervisor: nothing but the worker itself can finish
    # these jobs in time; left for lease expiry they would sit leased for the whole test.
    w = subprocess.Popen(
        [sys.executable, "-m", "workers", "--type", "slow", "--handler",
         "tests.handlers:db_then_sleep", "--concurrency", "2", "--lease", "600",
         "--heartbeat", "1"],
        env=env, cwd=REPO, pass_fds=(write_fd,), stdout=open(tmp_path / "w.log", "ab"),  # noqa: SIM115
        stderr=subprocess.STDOUT)
    os.close(write_fd)
    reports: list[dict] = []
    _status_reader(read_fd, reports)
    try:
        wait_for(lambda: all(_job(db, i)["status"] == "leased" for i in (with_db, no_db))
                 and db.execute("SELECT count(*) FROM jobvisor.jobs WHERE started_at IS NOT NULL"
                                ).fetchone()[0] == 2, what="both running")
        time.sleep(0.2)
        proxy.cut()
        cut_at = time.monotonic()
        wait_for(lambda: any(r["t"] > cut_at and not r["db_ok"] for r in reports),
                 what="worker reporting the outage")
        # Both handlers finish during the outage; the worker keeps reporting meanwhile.
        outage_end = cut_at + 5
        wait_for(lambda: time.monotonic() > outage_end, timeout=10, what="outage")
        during = [r for r in reports if cut_at < r["t"] < outage_end]
        assert len(during) >= 3 and w.poll() is None
        proxy.restore()
        wait_for(lambda: all(_job(db, i)["status"] == "completed" for i in (with_db, no_db)),
                 timeout=60, what="both completed after the outage")
        assert _job(db, no_db)["attempts"] == 1  # acknowledged on a fresh connection
        row = _job(db, with_db)
        # Its transaction died with the connection: put back uncounted, run again.
        assert row["attempts"] == 1 and row["error_code"] is None
        assert db.execute("SELECT count(*) FROM effects WHERE job_id = %s",
                          (with_db,)).fetchone()[0] == 1
    finally:
        proxy.restore()
        assert stop(w) == 0
        proxy.close()


def test_a_pooled_connection_the_server_dropped_is_replaced_before_a_job_gets_it(
        db, worker_env, tmp_path):
    db.execute(EFFECTS_DDL)
    log = tmp_path / "w.log"
    first = q.enqueue(db, q.NewJob("rec", {}))
    w = start_worker(worker_env, "rec", "--handler", "tests.handlers:record",
                     "--concurrency", "1", "--poll", "0.2", log=log)
    try:
        wait_for(lambda: _job(db, first)["status"] == "completed", what="first completed")
        # The job wrote through a pooled connection, now back in the pool, idle.
        (pooled,) = db.execute("SELECT pid FROM effects WHERE job_id = %s", (first,)).fetchone()
        others = ("SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
                  " AND pid <> pg_backend_pid() AND backend_type = 'client backend'")
        worker_pids = [pid for (pid,) in db.execute(others).fetchall()]
        assert pooled in worker_pids
        # The server drops every connection the worker has (as a restart would).
        db.execute("SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS t(pid)",
                   (worker_pids,))
        wait_for(lambda: not db.execute(others + " AND pid = ANY(%s)",
                                        (worker_pids,)).fetchall(),
                 what="the worker's backends gone")
        second = q.enqueue(db, q.NewJob("rec", {}))
        wait_for(lambda: _job(db, second)["status"] == "completed", what="second completed")
        row = _job(db, second)
        assert row["attempts"] == 1 and row["error_code"] is None and not row["errors"]
        ((pid,),) = db.execute("SELECT pid FROM effects WHERE job_id = %s", (second,)).fetchall()
        assert pid not in worker_pids  # written through a fresh connection
        assert w.poll() is None
    finally:
        assert stop(w) == 0
    # The handler never got the dead connection: nothing failed under it, nothing went back.
    assert [(e["reason"], e.get("job_id")) for e in _events(log, "jobs_put_back")] == []
    assert [e["exc_type"] for e in _events(log, "job_bookkeeping_failed")] == []


def test_a_suspect_gets_its_turn_under_a_steady_backlog(db, worker_env, tmp_path):
    db.execute(EFFECTS_DDL)
    backlog = q.enqueue_many(db, [q.NewJob("rec", {"seconds": 0.1}) for _ in range(300)])
    w = start_worker(worker_env, "rec", "--handler", "tests.handlers:record", "--concurrency",
                     "2", "--prefetch", "2", "--poll", "0.5", log=tmp_path / "w.log")
    try:
        wait_for(lambda: db.execute("SELECT count(*) FROM effects").fetchone()[0] >= 10,
                 what="backlog under way")
        suspect = q.enqueue(db, q.NewJob("rec", {}))
        db.execute("UPDATE jobvisor.jobs SET suspect = true WHERE id = %s", (suspect,))
        wait_for(lambda: _job(db, suspect)["status"] == "completed", what="suspect run")
        done = db.execute("SELECT count(*) FROM jobvisor.jobs WHERE id = ANY(%s) AND status ="
                          " 'completed'", (backlog,)).fetchone()[0]
        assert done < len(backlog)  # it did not wait for the backlog to end
        wait_for(lambda: db.execute("SELECT count(*) FROM effects").fetchone()[0] == 301,
                 what="all done")
    finally:
        assert stop(w) == 0
