"""Finished counts kept by the queue's own statements (sql/007_job_counts.sql).

`status_counts()` reads live jobs through their partial indexes and finished ones from
jobvisor.job_counts; each test checks it against a brute-force GROUP BY over the jobs.
"""

from __future__ import annotations

import random
import shutil
import threading
import uuid

import psycopg
import pytest

from supervisor_app.migrate import migrate, sql_dir
from tests.helpers import core_migrations_before
from workers.core import queue as q

_BRUTE = """
SELECT job_type, status, count(*),
       extract(epoch FROM now() - min(visible_at) FILTER (
           WHERE status = 'queued' AND visible_at <= now()))
FROM jobvisor.jobs GROUP BY job_type, status
"""


def brute_force(conn: psycopg.Connection) -> dict[str, dict[str, float]]:
    """What status_counts() returned before sql/007: a scan of every job."""
    out: dict[str, dict[str, float]] = {}
    for job_type, status, count, oldest in conn.execute(_BRUTE).fetchall():
        entry = out.setdefault(job_type, {s: 0 for s in q.STATUSES} | {"oldest_queued_s": 0.0})
        entry[status] = count
        if oldest is not None:
            entry["oldest_queued_s"] = round(max(0.0, float(oldest)), 3)
    return out


def assert_counts_exact(conn: psycopg.Connection) -> dict[str, dict[str, float]]:
    # One transaction: both read the same now(), so oldest_queued_s agrees too.
    with conn.transaction():
        kept = q.status_counts(conn)
        scanned = brute_force(conn)
    assert kept == scanned
    return kept


def _lease_one(db: psycopg.Connection, job_type: str, worker: str = "w") -> q.LeasedJob:
    (job,) = q.lease(db, job_type, 1, worker_id=worker, lease_seconds=300)
    return job


def _expire(db: psycopg.Connection, job_id: int) -> None:
    db.execute("UPDATE jobvisor.jobs SET leased_until = now() - interval '1s' WHERE id = %s",
               (job_id,))


def test_every_transition_keeps_status_counts_equal_to_a_full_scan(db):
    check = lambda: assert_counts_exact(db)  # noqa: E731
    check()
    q.enqueue_many(db, [q.NewJob("alpha", {"i": i}) for i in range(6)]
                   + [q.NewJob("beta", {"i": i}, max_attempts=1) for i in range(8)]
                   + [q.NewJob("alpha", {}, delay=3600)])
    assert check()["alpha"]["queued"] == 7

    # complete_many: two at once, and a stale lease key that changes nothing
    jobs = q.lease(db, "alpha", 3, worker_id="w", lease_seconds=300)
    done = q.complete_many(db, [(j.id, j.lease_key, {"ok": True}) for j in jobs[:2]]
                           + [(jobs[2].id, uuid.uuid4(), None)])
    assert done == {jobs[0].id, jobs[1].id}
    assert check()["alpha"]["completed"] == 2

    # retry back to the queue (not finished: not counted), then to failed (out of attempts)
    assert q.retry(db, jobs[2].id, jobs[2].lease_key, code="t", message="m", delay=0) == \
        "queued"
    check()
    b = _lease_one(db, "beta")
    assert q.retry(db, b.id, b.lease_key, code="t", message="m", delay=0) == "failed"
    assert check()["beta"]["failed"] == 1

    # fail, as failed and as cancelled; a lost lease changes nothing
    b = _lease_one(db, "beta")
    assert q.fail(db, b.id, b.lease_key, code="p", message=None)
    b = _lease_one(db, "beta")
    assert q.fail(db, b.id, b.lease_key, code="cancelled", message=None, status="cancelled")
    assert not q.fail(db, b.id, b.lease_key, code="p", message=None)
    assert check()["beta"]["cancelled"] == 1

    # cancel: a queued job at once, a running one only asks (nothing finishes)
    queued = q.enqueue(db, q.NewJob("gamma", {}))
    assert q.cancel(db, queued) == "cancelled"
    running = _lease_one(db, "alpha")
    assert q.cancel(db, running.id) == "cancel_requested"
    assert check()["gamma"]["cancelled"] == 1

    # put_back: the cancel-requested job ends cancelled, a plain one goes back uncounted
    plain = _lease_one(db, "alpha")
    assert q.put_back(db, [(running.id, running.lease_key), (plain.id, plain.lease_key)]) \
        == {running.id, plain.id}
    assert check()["alpha"]["cancelled"] == 1

    # a retry of a cancel-requested job cancels it
    running = _lease_one(db, "alpha")
    q.cancel(db, running.id)
    assert q.retry(db, running.id, running.lease_key, code="t", message=None, delay=0) == \
        "cancelled"
    assert check()["alpha"]["cancelled"] == 2

    # rescue of expired leases: queued again, failed (out of attempts), cancelled
    again = _lease_one(db, "alpha")
    out = _lease_one(db, "beta")
    asked = _lease_one(db, "beta")
    q.cancel(db, asked.id)
    for j in (again, out, asked):
        _expire(db, j.id)
    assert sorted(q.rescue(db)) == sorted([(again.id, "alpha", "queued"),
                                           (out.id, "beta", "failed"),
                                           (asked.id, "beta", "cancelled")])
    assert check()["beta"]["failed"] == 3
    assert q.rescue(db) == []
    check()

    # rescue of a dead worker: alone (charged, out of attempts: failed), then several
    alone = _lease_one(db, "beta", worker="host:1:a")
    assert q.rescue_worker(db, "host:1:a") == [(alone.id, "beta", "failed", True)]
    check()
    several = q.lease(db, "beta", 2, worker_id="host:2:b", lease_seconds=300)
    q.cancel(db, several[0].id)
    rescued = {r[0]: r[2] for r in q.rescue_worker(db, "host:2:b")}
    assert rescued == {several[0].id: "cancelled", several[1].id: "queued"}
    assert check()["beta"]["cancelled"] == 3

    # three jobs of another type fail at once (permanent errors)
    q.enqueue_many(db, [q.NewJob("orphan", {}) for _ in range(3)])
    for j in q.lease(db, "orphan", 3, worker_id="w", lease_seconds=30):
        assert q.fail(db, j.id, j.lease_key, code="x_failed", message=None)
    assert check()["orphan"]["failed"] == 3

    # an operator's retry of failed and cancelled jobs takes them off again
    failed_id = db.execute("SELECT id FROM jobvisor.jobs WHERE job_type = 'orphan' "
                           "LIMIT 1").fetchone()[0]
    assert q.retry_failed(db, failed_id) and not q.retry_failed(db, failed_id)
    assert q.retry_failed(db, queued)                       # the cancelled gamma
    completed_id = jobs[0].id
    assert not q.retry_failed(db, completed_id)             # completed: not retried
    counts = check()
    assert counts["orphan"]["failed"] == 2 and "gamma" in counts
    assert counts["gamma"]["cancelled"] == 0 and counts["gamma"]["queued"] == 1

    # prune: old rows of one status, then everything finished
    db.execute("UPDATE jobvisor.jobs SET finished_at = now() - interval '8 days' "
               "WHERE id = %s", (completed_id,))
    assert q.prune(db, {"completed": 7 * 86400, "failed": 30 * 86400}) == 1
    assert check()["alpha"]["completed"] == 1
    db.execute("UPDATE jobvisor.jobs SET finished_at = now() - interval '60 days' "
               "WHERE finished_at IS NOT NULL")
    assert q.prune(db, {"completed": 0, "failed": 0, "cancelled": 0}, limit=2) > 0
    counts = check()
    assert all(c[s] == 0 for c in counts.values() for s in q.FINISHED)
    # a type whose jobs are all gone is gone from the counts too, as from a scan
    db.execute("DELETE FROM jobvisor.jobs WHERE job_type = 'gamma'")
    assert "orphan" in check() and "gamma" not in q.status_counts(db)


def test_a_failing_statement_leaves_the_counts_as_they_were(db):
    q.enqueue(db, q.NewJob("alpha", {}))
    job = _lease_one(db, "alpha")
    with pytest.raises(psycopg.errors.DataError), db.transaction():
        q.complete(db, job.id, job.lease_key, {"ok": 1})
        db.execute("SELECT 1 / 0")
    assert assert_counts_exact(db)["alpha"]["leased"] == 1
    assert db.execute("SELECT coalesce(sum(n), 0) FROM jobvisor.job_counts").fetchone() == (0,)


def test_concurrent_acknowledgements_end_with_exact_counts_and_no_deadlock(db_dsn, db):
    """Many connections finish jobs at once: bulk acknowledgements, retries and failures,
    and handler-style transactions that enqueue a follow-up into the job's batch (taking
    the batch row's lock) before completing: the case where counter rows shared between
    writers could close a lock cycle with the batch rows."""
    n_jobs, threads_n = 1200, 6
    q.enqueue_batch(db, "big", [q.NewJob("alpha", {"i": i}, max_attempts=2)
                                for i in range(n_jobs)])
    q.enqueue_many(db, [q.NewJob("beta", {"i": i}) for i in range(n_jobs // 2)])
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        rng = random.Random(seed)
        try:
            with psycopg.connect(db_dsn, autocommit=True) as conn:
                conn.execute("SET deadlock_timeout = '100ms'")
                while True:
                    job_type = rng.choice(["alpha", "alpha", "beta"])
                    jobs = q.lease(conn, job_type, rng.randint(1, 12), worker_id=f"w{seed}",
                                   lease_seconds=300)
                    if not jobs:
                        jobs = q.lease(conn, "beta" if job_type == "alpha" else "alpha",
                                       12, worker_id=f"w{seed}", lease_seconds=300)
                        if not jobs:
                            return
                    kind = rng.random()
                    if kind < 0.5:
                        q.complete_many(conn, [(j.id, j.lease_key, None) for j in jobs])
                    elif kind < 0.8:
                        # A handler's transaction: its follow-up joins the job's batch.
                        with conn.transaction():
                            for j in jobs:
                                if j.batch_id is not None:
                                    q.enqueue(conn, q.NewJob("follow", {"of": j.id},
                                                             batch_id=j.batch_id))
                                q.complete(conn, j.id, j.lease_key, {"by": seed})
                    else:
                        for j in jobs:
                            if rng.random() < 0.5:
                                q.retry(conn, j.id, j.lease_key, code="t", message=None,
                                        delay=0)
                            else:
                                q.fail(conn, j.id, j.lease_key, code="p", message=None)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors
    counts = assert_counts_exact(db)
    assert counts["alpha"]["queued"] == counts["alpha"]["leased"] == 0
    assert counts["alpha"]["completed"] + counts["alpha"]["failed"] == n_jobs
    assert counts["beta"]["completed"] + counts["beta"]["failed"] == n_jobs // 2
    batch = q.get_batch(db, "big")
    assert batch["completed"] + batch["failed"] == n_jobs
    # The writers spread over shards; none of them ever waited for another's row.
    (shards,) = db.execute("SELECT count(DISTINCT shard) FROM jobvisor.job_counts "
                           "WHERE job_type = 'alpha' AND status = 'completed'").fetchone()
    assert shards >= 1


def test_the_worker_role_finishes_jobs_and_reads_status(db_dsn, db):
    q.enqueue_many(db, [q.NewJob("alpha", {}, max_attempts=1) for _ in range(4)])
    with psycopg.connect(db_dsn, autocommit=True) as conn:
        conn.execute("SET ROLE jobvisor_worker")
        a, b, c, d = q.lease(conn, "alpha", 4, worker_id="w", lease_seconds=300)
        assert q.complete(conn, a.id, a.lease_key, None)
        assert q.retry(conn, b.id, b.lease_key, code="t", message=None, delay=0) == "failed"
        assert q.fail(conn, c.id, c.lease_key, code="p", message=None, status="cancelled")
        assert q.put_back(conn, [(d.id, d.lease_key)]) == {d.id}
        seen = q.status_counts(conn)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("DELETE FROM jobvisor.job_counts")
    assert_counts_exact(db)
    assert seen["alpha"] | {"oldest_queued_s": 0} == {
        "queued": 1, "leased": 0, "completed": 1, "failed": 1, "cancelled": 1,
        "oldest_queued_s": 0}


def _scans(conn: psycopg.Connection, explain: str, params: dict | None = None) -> str:
    return "\n".join(r[0] for r in conn.execute(explain, params).fetchall())


def test_periodic_queries_read_no_finished_job_they_do_not_change(db):
    # Kept by retention (completed and cancelled 7 days, failed 30): nothing to prune.
    db.execute("""
        INSERT INTO jobvisor.jobs (job_type, status, finished_at, created_at)
        SELECT (ARRAY['alpha', 'beta'])[1 + i % 2],
               (ARRAY['completed', 'completed', 'failed', 'cancelled'])[1 + i % 4],
               now() - make_interval(secs => (i % CASE WHEN i % 4 = 2 THEN 29 ELSE 6 END)
                                             * 86400 + 60),
               now() - interval '30 days'
        FROM generate_series(1, 60000) i""")
    db.execute("SELECT jobvisor.recount_jobs()")
    q.enqueue_many(db, [q.NewJob("alpha", {}) for _ in range(20)])
    q.lease(db, "alpha", 5, worker_id="w", lease_seconds=300)
    db.execute("ANALYZE jobvisor.jobs")
    plan = _scans(db, "EXPLAIN " + q._COUNTS)
    assert "Seq Scan on jobs" not in plan, plan
    assert "jobs_lease_order" in plan and "jobs_leased" in plan, plan
    counts = assert_counts_exact(db)
    assert counts["alpha"]["completed"] + counts["beta"]["completed"] == 30000
    # Prune reads through the index by status...
    for status, age in (("completed", 7 * 86400.0), ("failed", 30 * 86400.0),
                        ("cancelled", 7 * 86400.0)):
        plan = _scans(db, "EXPLAIN " + q._PRUNE, {"status": status, "age": age, "limit": 5000})
        assert "Seq Scan on jobs" not in plan and "jobs_finished_by_status" in plan, plan
    # ...and never with a generic plan, blind to the cutoff, however often it runs.
    for _ in range(12):
        assert q.prune(db, {"completed": 7 * 86400.0}, limit=5000) == 0
    assert db.execute("SELECT count(*) FROM pg_prepared_statements "
                      "WHERE statement LIKE '%%DELETE FROM jobvisor.jobs%%'").fetchone() == (0,)


def test_migration_counts_the_finished_jobs_already_there(empty_dsn, tmp_path):
    before = core_migrations_before(7, tmp_path / "sql")
    dsn = empty_dsn
    assert migrate(dsn, before)[-1] == "006_runtime_edges"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("""
            INSERT INTO jobvisor.jobs (job_type, status, finished_at)
            SELECT (ARRAY['alpha', 'beta', 'gamma'])[1 + i % 3],
                   (ARRAY['completed', 'failed', 'cancelled', 'completed'])[1 + i % 4],
                   now()
            FROM generate_series(1, 1000) i""")
        conn.execute("INSERT INTO jobvisor.jobs (job_type) SELECT 'alpha' "
                     "FROM generate_series(1, 7)")
        conn.execute("""UPDATE jobvisor.jobs SET status = 'leased', lease_key =
                        gen_random_uuid(), leased_until = now() + interval '1 min'
                        WHERE id IN (SELECT id FROM jobvisor.jobs WHERE status = 'queued'
                                     LIMIT 2)""")
    shutil.copy(sql_dir() / "007_job_counts.sql", before / "007_job_counts.sql")
    assert migrate(dsn, before) == ["007_job_counts"]
    assert migrate(dsn, before) == []
    with psycopg.connect(dsn, autocommit=True) as conn:
        counts = assert_counts_exact(conn)
        assert sum(c[s] for c in counts.values() for s in q.FINISHED) == 1000
        assert counts["alpha"]["queued"] == 5 and counts["alpha"]["leased"] == 2
        # ...and the queue goes on counting from there
        (job,) = q.lease(conn, "alpha", 1, worker_id="w", lease_seconds=30)
        assert q.complete(conn, job.id, job.lease_key, None)
        assert assert_counts_exact(conn)["alpha"]["completed"] == counts["alpha"][
            "completed"] + 1
        privileges = conn.execute(
            "SELECT has_table_privilege('jobvisor_worker', 'jobvisor.job_counts', p) "
            "FROM unnest(ARRAY['SELECT', 'INSERT', 'UPDATE', 'DELETE']) p").fetchall()
        assert [p for (p,) in privileges] == [True, True, True, False]


def test_recount_repairs_counts_that_drifted(db):
    q.enqueue_many(db, [q.NewJob("alpha", {}) for _ in range(3)])
    jobs = q.lease(db, "alpha", 3, worker_id="w", lease_seconds=30)
    q.complete_many(db, [(j.id, j.lease_key, None) for j in jobs])
    # A finish written by code that predates the counts (a rolling upgrade):
    db.execute("UPDATE jobvisor.job_counts SET n = n + 5")
    assert q.status_counts(db) != brute_force(db)
    db.execute("SELECT jobvisor.recount_jobs()")
    assert assert_counts_exact(db)["alpha"]["completed"] == 3
