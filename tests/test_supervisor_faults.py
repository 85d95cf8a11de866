"""The supervisor under faults: its own death, its own bugs, database outages, mixed
fleets. Real `jobvisor run`, real children and signals, a real PostgreSQL behind a TCP
proxy the tests cut."""

from __future__ import annotations

import signal
import time
from datetime import UTC, datetime

import psutil
import psycopg
import pytest

from supervisor_app import registry_table
from supervisor_app.config import load_config
from supervisor_app.duties import (
    LOCK_TIMEOUT_MS,
    PRUNE_BATCH,
    STALE_EVERY,
    STATEMENT_TIMEOUT_MS,
    Duties,
)
from supervisor_app.supervisor import Supervisor as InProcessSupervisor
from tests.handlers import EFFECTS_DDL
from tests.helpers import counts, wait_for
from tests.supervisor_harness import Supervisor, base_config, free_port
from tests.tcp_proxy import TcpProxy
from workers.core import queue as q

SMALL = {"memory_per_job": "1MiB"}


def _children(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children()
    except psutil.NoSuchProcess:
        return []


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for p in procs:
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def test_kill_9_of_the_supervisor_ends_its_children_and_puts_their_jobs_back(
        db, worker_env, tmp_path):
    db.execute(EFFECTS_DDL)
    cfg = base_config(free_port(), {"rec": {
        "handler": "tests.handlers:record", **SMALL, "concurrency": 2,
        "processes": {"min": 2, "max": 2}}})
    cfg["queue"]["lease"] = "600s"  # only the children themselves can give these back in time
    sup = Supervisor(tmp_path, worker_env, cfg).start()
    ids = q.enqueue_many(db, [q.NewJob("rec", {"seconds": 60}) for _ in range(4)]
                         + [q.NewJob("rec", {"seconds": 60, "ignore_cancel": True})])
    wait_for(lambda: counts(db, "rec").get("leased") == 4, what="four jobs running")
    kids = _children(sup.proc.pid)
    assert len(kids) == 2
    sup.proc.kill()
    sup.proc.wait()
    wait_for(lambda: not _alive(kids), timeout=30, what="children exiting without a supervisor")
    # Put back, attempt not counted: queued at once, not after the 600 s lease.
    wait_for(lambda: counts(db, "rec") == {"queued": 5}, timeout=10, what="jobs queued again")
    assert all(q.get_job(db, i)["attempts"] == 0 for i in ids)
    assert db.execute("SELECT count(*) FROM effects").fetchone()[0] == 0
    # Nothing leases them until a supervisor runs again.
    assert counts(db, "rec") == {"queued": 5}


def test_an_exception_in_the_loop_drains_the_children_and_exits_non_zero(
        db, db_dsn, worker_env, tmp_path, monkeypatch):
    db.execute(EFFECTS_DDL)
    path = tmp_path / "jobvisor.yaml"
    import yaml

    path.write_text(yaml.safe_dump(base_config(free_port(), {"rec": {
        "handler": "tests.handlers:record", **SMALL, "processes": {"min": 1, "max": 1}}},
        grace="2s")))
    cfg = load_config(path)
    sup = InProcessSupervisor(cfg, path, db_dsn, dict(worker_env))
    job_id = q.enqueue(db, q.NewJob("rec", {"seconds": 120}))
    real = sup._kill_silent_and_stuck
    kids: list[psutil.Process] = []

    def faulty(now: float) -> None:
        real(now)
        if q.get_job(db, job_id)["status"] == "leased":
            kids.extend(psutil.Process(s.pid) for slots in sup.slots.values() for s in slots
                        if s.pid)
            raise RuntimeError("a bug in the loop")

    monkeypatch.setattr(sup, "_kill_silent_and_stuck", faulty)
    try:
        assert sup.run() == 1
    finally:
        for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
    assert kids and not _alive(kids)
    row = q.get_job(db, job_id)
    assert row["status"] == "queued" and row["attempts"] == 0  # drained: put back uncounted


@pytest.mark.parametrize("outage_s", [15, 75])
def test_a_database_outage_kills_no_child_loses_nothing_and_health_says_so(
        db, db_dsn, worker_env, tmp_path, outage_s):
    db.execute(EFFECTS_DDL)
    proxy = TcpProxy.in_front_of(db_dsn)
    env = dict(worker_env, DATABASE_URL=proxy.dsn(db_dsn))
    cfg = base_config(free_port(), {"rec": {
        "handler": "tests.handlers:record", **SMALL, "concurrency": 2,
        "processes": {"min": 2, "max": 2}}})
    cfg["supervisor"]["child_heartbeat_timeout"] = "10s"  # shorter than either outage
    sup = Supervisor(tmp_path, env, cfg).start()
    try:
        wait_for(lambda: len(sup.pids(db, "rec")) == 2, what="two children running")
        before = sup.pids(db, "rec")
        ids = q.enqueue_many(db, [q.NewJob("rec", {"seconds": 0.2}) for _ in range(200)])
        wait_for(lambda: counts(db, "rec").get("completed", 0) >= 20, what="work under way")
        proxy.cut()
        cut = time.monotonic()
        # Two probe periods (2 s each) and the time a probe may take to fail.
        wait_for(lambda: sup.get("/healthz")[0] == 503, timeout=10,
                 what="/healthz reporting the outage")
        end = cut + outage_s
        while time.monotonic() < end:  # probe through the outage: it never says 200
            answer = sup.get("/healthz")
            assert answer is None or answer[0] == 503  # None: no answer within 5 s
            time.sleep(1.0)
        proxy.restore()
        # The test's own connection goes around the proxy: the server's clock, and what
        # is left to do, at the moment the server answers the supervisor again.
        restored_at, left = db.execute(
            "SELECT clock_timestamp(), count(*) FILTER (WHERE status <> 'completed') "
            "FROM jobvisor.jobs").fetchone()
        wait_for(lambda: sup.get("/healthz")[0] == 200, what="/healthz recovering")
        wait_for(lambda: counts(db, "rec").get("completed", 0) == len(ids), timeout=60,
                 what="every job done after the outage")
        first, last = db.execute("SELECT min(finished_at), max(finished_at) FROM "
                                 "jobvisor.jobs WHERE finished_at >= %s",
                                 (restored_at,)).fetchone()
        # The guarantee: once the server answers, every job is done within 10 s
        # plus its own run time. Its "no wall-clock bound inside a test" is about speed
        # targets; this is a functional recovery bound, so it is kept, measured on the
        # server's clock (finished_at against the moment of restore) rather than by
        # racing the test's own, and with generous slack. Work resumes within the 10 s...
        assert (first - restored_at).total_seconds() <= 10.0
        # ...and what was left (queued, or held through the outage) is then worked off at
        # the fleet's pace: `left` jobs of 0.2 s on 2 children x 2 threads, with half as
        # much again for lease/ack round trips on a busy test machine (measured: ~10 s in
        # all for 180 jobs after either outage; this allows ~23 s).
        threads, run_s = 2 * 2, 0.2
        bound = 10.0 + left * run_s / threads * 1.5
        took = (last - restored_at).total_seconds()
        assert took <= bound, f"{left} jobs done {took:.1f}s after the restore (> {bound:.1f}s)"
        assert not sup.events("child_silent")
        assert sup.pids(db, "rec") == before  # the same children throughout
        effects = db.execute("SELECT job_id, count(*) FROM effects GROUP BY 1").fetchall()
        assert sorted(j for j, _ in effects) == ids and all(n == 1 for _, n in effects)
    finally:
        proxy.restore()
        assert sup.stop() == 0
        proxy.close()


def test_jobs_of_a_type_no_supervisor_serves_are_kept_and_flagged(db, worker_env, tmp_path):
    cfg = base_config(free_port(), {"noop": {**SMALL, "processes": {"min": 1, "max": 1}}})
    sup = Supervisor(tmp_path, worker_env, cfg).start()
    try:
        job_id = q.enqueue(db, q.NewJob("newtype", {}))  # a type a newer host will serve
        wait_for(lambda: 'jobvisor_queue_unserved{job_type="newtype"} 1.0'
                 in sup.get("/metrics")[1], what="the unserved queue flagged")
        assert sup.events("queue_unserved")[0]["job_type"] == "newtype"
        time.sleep(2.0)  # a few rescue rounds (rescue_every 0.5 s)
        assert q.get_job(db, job_id)["status"] == "queued"
    finally:
        assert sup.stop() == 0


class _Stub:
    """What Duties needs of a supervisor, for calling one duty directly."""

    def __init__(self, cfg, dsn: str) -> None:
        self.cfg, self.dsn, self.sup_id, self.host = cfg, dsn, "t:1", "t"

    def served_config(self):
        return self.cfg.types

    def served_types(self):
        return set(self.cfg.types)

    def wake(self) -> None:
        pass


def test_a_cron_slot_is_taken_only_once_its_enqueue_committed(db, db_dsn, tmp_path):
    import yaml

    path = tmp_path / "jobvisor.yaml"
    path.write_text(yaml.safe_dump(base_config(free_port(), {"noop": {
        **SMALL, "schedule": "0 * * * *"}})))
    duties = Duties(_Stub(load_config(path), db_dsn))
    clock = datetime(2026, 12, 2, 10, 7, tzinfo=UTC)
    broken = psycopg.connect(db_dsn, autocommit=True)
    broken.close()
    with pytest.raises(psycopg.Error):
        duties._cron(broken, clock=lambda: clock)
    assert not duties.cron_last  # the slot is still open
    assert counts(db) == {}
    with psycopg.connect(db_dsn, autocommit=True) as conn:
        duties._cron(conn, clock=lambda: clock)
        duties._cron(conn, clock=lambda: clock)
    (key,) = db.execute("SELECT idempotency_key FROM jobvisor.jobs").fetchone()
    assert key == "cron:noop:2026-12-02T10:00Z"


def _stub_duties(tmp_path, dsn: str, **queue) -> Duties:
    import yaml

    cfg = base_config(free_port(), {"noop": SMALL})
    cfg["queue"].update(queue)
    path = tmp_path / "jobvisor.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return Duties(_Stub(load_config(path), dsn))


def test_the_duties_connection_bounds_every_statement_and_lock_wait(db_dsn, tmp_path):
    duties = _stub_duties(tmp_path, db_dsn)
    conn = duties._connect(time.monotonic())
    assert conn is not None and duties.conn is conn
    try:
        (statement,) = conn.execute("SHOW statement_timeout").fetchone()
        (lock,) = conn.execute("SHOW lock_timeout").fetchone()
        # (The session defaults are 0: no bound at all.)
        assert (statement, lock) == (f"{STATEMENT_TIMEOUT_MS // 1000}s",
                                     f"{LOCK_TIMEOUT_MS // 1000}s") == ("10s", "5s")
        # A reconnect after the connection was lost sets them again.
        duties._lost(None)
        again = duties._connect(time.monotonic())
        assert again is not None and again is not conn
        assert again.execute("SHOW statement_timeout").fetchone() == ("10s",)
        assert again.execute("SHOW lock_timeout").fetchone() == ("5s",)
    finally:
        duties._lost(None)


def test_prune_removes_one_bounded_batch_a_round_and_goes_on_until_done(db, db_dsn,
                                                                       tmp_path):
    old = 12_000
    db.execute("""
        INSERT INTO jobvisor.jobs (job_type, status, finished_at, created_at)
        SELECT 'noop', 'completed', now() - interval '8 days', now() - interval '9 days'
        FROM generate_series(1, %s)""", (old,))
    db.execute("""
        INSERT INTO jobvisor.jobs (job_type, status, finished_at, created_at)
        SELECT 'noop', 'completed', now() - interval '1 day', now() - interval '1 day'
        FROM generate_series(1, 10)""")  # inside the 7 days' retention: kept
    db.execute("SELECT jobvisor.recount_jobs()")

    def left() -> int:
        return db.execute("SELECT count(*) FROM jobvisor.jobs").fetchone()[0] - 10

    duties = _stub_duties(tmp_path, db_dsn)
    with psycopg.connect(db_dsn, autocommit=True) as conn:
        duties._prune(conn)  # one call: one batch, and a note that there is more
        assert left() == old - PRUNE_BATCH
        assert duties.due["prune_more"]
        # The next rounds go on without waiting for prune_every (10 min), a batch each,
        # through the leader's round as the duties thread runs it.
        forever = float("inf")
        duties.due.update(rescue=forever, prune=forever, cron=forever, stale=forever)
        duties._leader_duties(conn, time.monotonic())
        assert duties.leader and left() == old - 2 * PRUNE_BATCH
        assert duties.due["prune_more"]
        duties._leader_duties(conn, time.monotonic())
        assert left() == 0 and not duties.due["prune_more"]  # 2,000 < a batch: done
        duties._leader_duties(conn, time.monotonic())  # nothing more until prune_every
    assert db.execute("SELECT count(*) FROM jobvisor.jobs").fetchone()[0] == 10
    assert q.status_counts(db)["noop"]["completed"] == 10  # the counts followed


def test_the_running_leader_removes_rows_of_supervisors_gone_silent(db, worker_env,
                                                                   tmp_path):
    def crashed(sup_id: str) -> None:
        registry_table.publish(db, sup_id, "gone", 1, {})
        db.execute("UPDATE jobvisor.supervisors SET heartbeat_at = now() - interval "
                   "'5 minutes' WHERE id = %s", (sup_id,))

    def ids() -> set[str]:
        return {r[0] for r in db.execute("SELECT id FROM jobvisor.supervisors")}

    crashed("gone:1:before")  # a host that crashed before this one started
    sup = Supervisor(tmp_path, worker_env, base_config(free_port(), {
        "noop": {**SMALL, "processes": {"min": 1, "max": 1}}})).start()
    try:
        # The elected leader's first round removes it.
        (removed,) = wait_for(lambda: sup.events("stale_supervisors_removed"), timeout=30,
                              what="the leader removing the stale row")
        assert removed["ids"] == ["gone:1:before"]
        wait_for(lambda: sup.view(db), what="its own row published")
        assert "gone:1:before" not in ids()
        # One that goes silent while it runs: removed on a later round (every 30 s).
        assert STALE_EVERY == 30.0
        crashed("gone:2:during")
        wait_for(lambda: "gone:2:during" not in ids(), timeout=60,
                 what="the leader removing the row that went stale meanwhile")
        assert [e["ids"] for e in sup.events("stale_supervisors_removed")] == [
            ["gone:1:before"], ["gone:2:during"]]
        assert sup.view(db) is not None  # its own, live row stays
    finally:
        assert sup.stop() == 0


def test_rows_of_supervisors_silent_past_the_timeout_are_removed(db):
    registry_table.publish(db, "dead:1", "dead", 1, {})
    registry_table.publish(db, "live:2", "live", 2, {})
    db.execute("UPDATE jobvisor.supervisors SET heartbeat_at = now() - interval '5 minutes'"
               " WHERE id = 'dead:1'")
    assert registry_table.remove_stale(db, 60) == ["dead:1"]
    assert [r[0] for r in db.execute("SELECT id FROM jobvisor.supervisors")] == ["live:2"]


def test_the_leader_runs_the_schedule_of_a_type_only_another_host_serves(db, worker_env,
                                                                         tmp_path):
    a = Supervisor(tmp_path, worker_env, base_config(free_port(), {
        "noop": {**SMALL, "processes": {"min": 1, "max": 1}}}), "a").start()
    b = None
    try:
        wait_for(lambda: a.events("leadership_taken"), what="a elected")
        b = Supervisor(tmp_path, worker_env, base_config(free_port(), {
            "sleep": {**SMALL, "schedule": "* * * * *", "processes": {"min": 1, "max": 1}}}),
            "b").start()
        wait_for(lambda: [e for e in a.events("cron_enqueued") if e["job_type"] == "sleep"],
                 what="the leader enqueueing b's schedule")
        assert not b.events("leadership_taken") and not b.events("cron_enqueued")
    finally:
        if b is not None:
            assert b.stop() == 0
        assert a.stop() == 0
