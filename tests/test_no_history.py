"""Types that keep no history (`keep_completed: false`), the lease's plan and bulk COPY
enqueue: the fast paths of issue #15, each against a real PostgreSQL (and real worker
processes where the runtime decides)."""

from __future__ import annotations

import uuid

import psycopg
import pytest

from supervisor_app.children import worker_command
from supervisor_app.config import Config
from tests.handlers import EFFECTS_DDL
from tests.helpers import counts, start_worker, stop, wait_for
from workers.core import queue as q
from workers.core import webhooks


def _finished_counts(db: psycopg.Connection, job_type: str) -> dict[str, int]:
    return {s: int(n) for s, n in db.execute(
        "SELECT status, sum(n) FROM jobvisor.job_counts WHERE job_type = %s GROUP BY status",
        (job_type,)).fetchall() if n}


def test_without_keep_completed_jobs_are_deleted_as_they_complete_unless_read_later(db):
    db.execute("INSERT INTO jobvisor.batches (id) VALUES ('b1')")
    plain = q.enqueue_many(db, [q.NewJob("noop", {"i": i}) for i in range(3)])
    in_batch = q.enqueue(db, q.NewJob("noop", {}, batch_id="b1"))
    sticky = q.enqueue(db, q.NewJob("noop", {}, key="cron:x:1", sticky_key=True))
    leased = q.lease(db, "noop", 10, worker_id="w", lease_seconds=30)
    assert [j.id for j in leased] == [*plain, in_batch, sticky]
    stale, rest = leased[0], leased[1:]
    # A lease that no longer holds changes nothing: the fence applies to the delete too.
    done = q.complete_many(db, [(j.id, j.lease_key, {"r": j.id}) for j in rest]
                           + [(stale.id, uuid.uuid4(), None)], keep=False)
    assert done == {j.id for j in rest}
    rows = dict(db.execute("SELECT id, status FROM jobvisor.jobs").fetchall())
    # Plain jobs are gone; the batch's job and the sticky cron slot are kept, completed.
    assert rows == {stale.id: "leased", in_batch: "completed", sticky: "completed"}
    # Only what is kept is counted (the counts are of the finished jobs retention keeps).
    assert _finished_counts(db, "noop") == {"completed": 2}
    # The batch still counts its job, and the sticky key stays taken.
    assert db.execute("SELECT completed FROM jobvisor.batches WHERE id = 'b1'").fetchone()[0] == 1
    assert q.enqueue(db, q.NewJob("noop", {}, key="cron:x:1", sticky_key=True)) == sticky


def test_with_keep_completed_every_job_stays_completed_and_counted(db):
    q.enqueue_many(db, [q.NewJob("noop", {}) for _ in range(4)])
    leased = q.lease(db, "noop", 10, worker_id="w", lease_seconds=30)
    assert len(q.complete_many(db, [(j.id, j.lease_key, None) for j in leased])) == 4
    assert counts(db, "noop") == {"completed": 4}
    assert _finished_counts(db, "noop") == {"completed": 4}


@pytest.mark.parametrize("handler", ["workers.core.builtin:noop", "tests.handlers:record"])
def test_a_worker_without_history_deletes_what_it_completes(db, worker_env, tmp_path, handler):
    # noop: acknowledged in the loop's batches; record: completed in the handler's own
    # transaction together with its side effect.
    db.execute(EFFECTS_DDL)
    ids = q.enqueue_many(db, [q.NewJob("kc", {"i": i}) for i in range(200)])
    worker = start_worker(worker_env, "kc", "--concurrency", "4", "--prefetch", "20",
                          "--handler", handler, "--no-keep-completed",
                          log=tmp_path / "w.log")
    try:
        wait_for(lambda: not counts(db, "kc"), timeout=60, what="every job deleted")
    finally:
        assert stop(worker) == 0
    if handler.endswith("record"):
        effects = db.execute("SELECT job_id FROM effects ORDER BY job_id").fetchall()
        assert [r[0] for r in effects] == ids  # each job's effect committed exactly once
    assert _finished_counts(db, "kc") == {}


def test_keep_completed_false_in_the_yaml_reaches_the_worker(tmp_path):
    cfg = Config.model_validate({"types": {
        "fast": {"keep_completed": False}, "kept": {}}})
    assert "--no-keep-completed" in worker_command(cfg, "fast")
    assert "--no-keep-completed" not in worker_command(cfg, "kept")


def test_the_lease_finds_its_rows_by_primary_key_whatever_the_table_holds(db):
    # Joined to the picked rows, the update was planned as a scan of the whole table
    # with a hash join (an estimate of one picked row): a lease cost that grew with
    # the backlog. Picked as an array, each row is found through the primary key.
    db.execute("INSERT INTO jobvisor.jobs (job_type) SELECT 'noop' FROM generate_series(1, 20000)")
    db.execute("ANALYZE jobvisor.jobs")
    sql = q._LEASE  # noqa: SLF001 - the statement under test
    params = {"type": "noop", "n": 100, "by": "w", "lease": 30.0, "alone": False}
    with db.transaction():
        plan = "\n".join(r[0] for r in db.execute("EXPLAIN " + sql, params).fetchall())
    assert "Seq Scan on jobs" not in plan, plan
    # And it still commits without waiting for the disk (the fenced completion does).
    with db.transaction():
        assert len(db.execute(sql, params).fetchall()) == 100
        assert db.execute("SHOW synchronous_commit").fetchone()[0] == "off"
    assert db.execute("SHOW synchronous_commit").fetchone()[0] == "on"


def test_enqueue_copy_inserts_in_bulk_with_batches_delays_and_wake_ups(db, db_dsn):
    db.execute("INSERT INTO jobvisor.batches (id) VALUES ('bulk')")
    with psycopg.connect(db_dsn, autocommit=True) as listener:
        listener.execute(f'LISTEN "{q.jobs_channel("bulk_t")}"')
        jobs = ([q.NewJob("bulk_t", {"i": i, "s": "ä\"x"}, priority=i % 3) for i in range(500)]
                + [q.NewJob("bulk_t", {"late": True}, delay=3600)]
                + [q.NewJob("bulk_t", {"b": i}, batch_id="bulk") for i in range(7)])
        assert q.enqueue_copy(db, jobs) == 508
        assert [n.channel for n in listener.notifies(timeout=5, stop_after=1)] == [
            q.jobs_channel("bulk_t")]
    rows = db.execute("SELECT payload, priority, status, attempts, max_attempts,"
                      " visible_at > now() + interval '59 minutes'"
                      " FROM jobvisor.jobs ORDER BY id").fetchall()
    assert [r[0] for r in rows[:500]] == [{"i": i, "s": "ä\"x"} for i in range(500)]
    assert [r[1] for r in rows[:6]] == [0, 1, 2, 0, 1, 2]
    assert {(r[2], r[3], r[4]) for r in rows} == {("queued", 0, 5)}
    assert [r[5] for r in rows] == [False] * 500 + [True] + [False] * 7
    assert db.execute("SELECT total FROM jobvisor.batches WHERE id = 'bulk'").fetchone()[0] == 7
    # Leased like any other job: the delayed one is not visible yet.
    assert len(q.lease(db, "bulk_t", 1000, worker_id="w", lease_seconds=30)) == 507


def test_enqueue_copy_refuses_a_keyed_job_and_inserts_nothing(db, monkeypatch):
    jobs = [q.NewJob("noop", {}), q.NewJob("noop", {}, key="k1")]
    with pytest.raises(ValueError, match="job 2: enqueue_copy takes no idempotency key"):
        q.enqueue_copy(db, jobs)
    assert counts(db) == {}
    # A callback outside the allow-list is refused, naming it, and nothing is kept.
    monkeypatch.setenv(webhooks.ALLOWED_HOSTS_ENV, "hooks.example")
    with pytest.raises(webhooks.WebhookURLError, match=r"evil\.example:443 is not in"):
        q.enqueue_copy(db, [q.NewJob("noop", {}, callback_url="https://hooks.example/a"),
                            q.NewJob("noop", {}, callback_url="https://evil.example/b")])
    assert counts(db) == {}
    # A payload jsonb can't hold fails the whole COPY; nothing of it is kept.
    with pytest.raises(psycopg.DataError):
        q.enqueue_copy(db, [q.NewJob("noop", {}), q.NewJob("noop", {"x": float("nan")})])
    assert counts(db) == {}
