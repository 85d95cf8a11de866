"""Fair share between the owners of one job type (issue #16, docs/fair_share.md): start
tags at insert (sql/009), the tag-ordered lease, max_running_per_key, the configuration
the supervisor writes. Against a real PostgreSQL, with real worker processes where the
runtime decides."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import threading
import uuid
from collections import Counter

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from supervisor_app.children import worker_command
from supervisor_app.config import Config, ConfigError, parse_config
from supervisor_app.migrate import migrate, sql_dir
from tests.handlers_fair import STARTS_DDL
from tests.helpers import core_migrations_before, counts, start_worker, stop, wait_for
from tests.supervisor_harness import REPO, Supervisor, base_config, free_port
from workers.core import queue as q

HANDLER = ("--handler", "tests.handlers_fair:started")


def _fair(db: psycopg.Connection, job_type: str, field: str = "owner", **kw) -> None:
    q.configure_fair_share(db, {job_type: q.FairShare(field, **kw)}, [job_type])


def _jobs(job_type: str, owner: str | None, n: int, **payload) -> list[q.NewJob]:
    extra = {} if owner is None else {"owner": owner}
    return [q.NewJob(job_type, {**extra, "i": i, **payload}) for i in range(n)]


def _lease_one_by_one(db: psycopg.Connection, job_type: str, n: int,
                      **kw) -> list[q.LeasedJob]:
    out = []
    for _ in range(n):
        got = q.lease(db, job_type, 1, worker_id="w", lease_seconds=60, fair=True, **kw)
        out += got
    return out


def _owners(jobs: list[q.LeasedJob]) -> list[str]:
    return [j.payload.get("owner") for j in jobs]


# --- the test: real processes --------------------------------------------------------

def test_a_second_owner_is_served_within_the_first_owners_backlog(db, worker_env, tmp_path):
    # 300 jobs of owner A queued, then 5 of B, all before any worker runs (so the order
    # the queue hands them out is all that decides): each of B's starts before A's
    # (P × C + 5)-th. First in, first out, B would wait for all 300.
    processes, concurrency = 2, 2
    db.execute(STARTS_DDL)
    _fair(db, "fair_t")
    q.enqueue_many(db, _jobs("fair_t", "A", 300, seconds=0.02))
    q.enqueue_many(db, _jobs("fair_t", "B", 5, seconds=0.02))
    procs = [start_worker(worker_env, "fair_t", "--concurrency", str(concurrency), "--fair",
                          *HANDLER, log=tmp_path / f"w{i}.log") for i in range(processes)]
    try:
        wait_for(lambda: db.execute("SELECT count(*) FROM jobvisor.jobs WHERE job_type ="
                                    " 'fair_t' AND status = 'completed'"
                                    " AND payload->>'owner' = 'B'").fetchone()[0] == 5,
                 timeout=120, what="B's five jobs done")
    finally:
        codes = [stop(p) for p in procs]
    assert codes == [0] * processes
    order = [r[0] for r in db.execute(
        "SELECT owner FROM fair_starts ORDER BY started_at, job_id").fetchall()]
    a_before_each_b = [order[:i].count("A") for i, o in enumerate(order) if o == "B"]
    assert len(a_before_each_b) == 5
    assert max(a_before_each_b) < processes * concurrency + 5, order[:40]


def test_a_lone_owner_gets_every_slot(db, worker_env, tmp_path):
    # Work-conserving: no share is held back for owners that have nothing queued.
    processes, concurrency = 2, 2
    db.execute(STARTS_DDL)
    _fair(db, "fair_t")
    q.enqueue_many(db, _jobs("fair_t", "A", 12, seconds=1.0))
    procs = [start_worker(worker_env, "fair_t", "--concurrency", str(concurrency), "--fair",
                          *HANDLER, log=tmp_path / f"w{i}.log") for i in range(processes)]
    try:
        wait_for(lambda: counts(db, "fair_t").get("leased") == processes * concurrency,
                 timeout=60, what="every slot busy with A's jobs")
    finally:
        codes = [stop(p) for p in procs]
    assert codes == [0] * processes
    # Four of them ran at once: each saw the four leased.
    assert db.execute("SELECT max(same_key_leased) FROM fair_starts").fetchone()[0] \
        == processes * concurrency


# --- the order, leased directly ---------------------------------------------------------------

def test_priority_stays_strict_between_levels_and_owners_alternate_within_one(db):
    _fair(db, "fair_t")
    q.enqueue_many(db, _jobs("fair_t", "A", 6))  # a backlog at priority 0
    q.enqueue_many(db, [q.NewJob("fair_t", {"owner": o, "i": i}, priority=5)
                        for o, n in (("B", 4), ("C", 2)) for i in range(n)])
    leased = _lease_one_by_one(db, "fair_t", 12)
    assert [(j.priority, j.payload["owner"]) for j in leased] == [
        (5, "B"), (5, "C"), (5, "B"), (5, "C"), (5, "B"), (5, "B"),
        (0, "A"), (0, "A"), (0, "A"), (0, "A"), (0, "A"), (0, "A")]
    # Leased in batches, the same order.
    _fair(db, "fair_u")
    q.enqueue_many(db, _jobs("fair_u", "A", 4) + _jobs("fair_u", "B", 2))
    batch = q.lease(db, "fair_u", 4, worker_id="w", lease_seconds=60, fair=True)
    assert Counter(_owners(batch)) == {"A": 2, "B": 2}


def test_an_owner_with_weight_two_gets_twice_the_share(db):
    _fair(db, "fair_t", weights={"A": 2.0})
    q.enqueue_many(db, _jobs("fair_t", "A", 30))
    q.enqueue_many(db, _jobs("fair_t", "B", 30))
    first = _owners(_lease_one_by_one(db, "fair_t", 30))
    assert Counter(first) == {"A": 20, "B": 10}
    # Interleaved all along, not one owner's run and then the other's.
    assert Counter(first[:6]) == {"A": 4, "B": 2}


def test_an_idle_owner_comes_back_at_the_current_turn_and_retries_keep_their_place(db):
    _fair(db, "fair_t")
    q.enqueue_many(db, _jobs("fair_t", "A", 3))
    for j in _lease_one_by_one(db, "fair_t", 3):
        assert q.complete(db, j.id, j.lease_key, None)
    q.enqueue_many(db, _jobs("fair_t", "B", 10))
    # A's state is its live jobs, nothing else: gone with them, so A's new job waits
    # for no old finish tag, and nothing per key is left behind to prune.
    (a_again,) = q.enqueue_many(db, _jobs("fair_t", "A", 1))
    tags = dict(db.execute("SELECT id, fair_tag FROM jobvisor.jobs WHERE status = 'queued'"
                           ).fetchall())
    assert tags[a_again] == min(tags.values())
    b0 = _lease_one_by_one(db, "fair_t", 2)
    assert _owners(b0) == ["B", "A"]  # tag 0: B's first (lower id), then A's
    b_first, a_job = b0
    # A retry keeps its tag: back at the front once visible.
    assert q.retry(db, a_job.id, a_job.lease_key, code="x", message=None, delay=0) == "queued"
    assert _owners(_lease_one_by_one(db, "fair_t", 1)) == ["A"]
    # A retry waiting out a backoff keeps its (low) tag but does not pull the turn back:
    # an owner arriving meanwhile starts where the lease is, not before it.
    (b_next,) = _lease_one_by_one(db, "fair_t", 1)
    assert q.retry(db, b_next.id, b_next.lease_key, code="x", message=None,
                   delay=3600) == "queued"
    (c,) = q.enqueue_many(db, _jobs("fair_t", "C", 1))
    queued_b = db.execute("SELECT min(fair_tag) FROM jobvisor.jobs WHERE status = 'queued'"
                          " AND visible_at <= now() AND payload->>'owner' = 'B'").fetchone()[0]
    assert db.execute("SELECT fair_tag FROM jobvisor.jobs WHERE id = %s", (c,)).fetchone()[0] \
        == queued_b
    assert q.complete(db, b_first.id, b_first.lease_key, None)


# --- max_running_per_key ---------------------------------------------------------------------

def _leased_by_key(db: psycopg.Connection, job_type: str) -> Counter:
    return Counter(dict(db.execute(
        "SELECT fair_key, count(*) FROM jobvisor.jobs WHERE job_type = %s"
        " AND status = 'leased' GROUP BY fair_key", (job_type,)).fetchall()))


def test_max_running_per_key_counts_running_jobs_and_batch_mates(db):
    _fair(db, "fair_t", max_running_per_key=2)
    q.enqueue_many(db, _jobs("fair_t", "A", 20))
    q.enqueue_many(db, _jobs("fair_t", "B", 20))
    q.enqueue_many(db, _jobs("fair_t", "C", 1))
    kw = {"worker_id": "w", "lease_seconds": 60, "fair": True, "per_key_limit": 2}
    first = q.lease(db, "fair_t", 10, **kw)
    assert Counter(_owners(first)) == {"A": 2, "B": 2, "C": 1}
    assert q.lease(db, "fair_t", 10, **kw) == []  # every key with work is at its limit
    a = next(j for j in first if j.payload["owner"] == "A")
    assert q.complete(db, a.id, a.lease_key, None)
    assert _owners(q.lease(db, "fair_t", 10, **kw)) == ["A"]
    assert _leased_by_key(db, "fair_t") == {"A": 2, "B": 2, "C": 1}
    # A suspect (crash isolation: it runs alone) obeys the limit too.
    (suspect,) = db.execute("UPDATE jobvisor.jobs SET suspect = true WHERE id = (SELECT min(id)"
                            " FROM jobvisor.jobs WHERE status = 'queued' AND fair_key = 'A')"
                            " RETURNING id").fetchone()
    assert q.lease(db, "fair_t", 10, **kw, alone=True) == []
    a = next(j for j in first if j.payload["owner"] == "A" and j.id != a.id)
    assert q.complete(db, a.id, a.lease_key, None)
    assert [(j.id, j.suspect) for j in q.lease(db, "fair_t", 10, **kw, alone=True)] \
        == [(suspect, True)]
    # A lone key over its limit leaves the other slots idle: that is what the limit is.
    _fair(db, "fair_u", max_running_per_key=1)
    q.enqueue_many(db, _jobs("fair_u", "A", 5))
    assert len(q.lease(db, "fair_u", 5, **kw | {"per_key_limit": 1})) == 1
    # The global cap and the per-key cap together.
    _fair(db, "fair_v", max_running_per_key=2)
    q.enqueue_many(db, _jobs("fair_v", "A", 5) + _jobs("fair_v", "B", 5))
    assert len(q.lease(db, "fair_v", 10, **kw, global_limit=3)) == 3
    assert len(q.lease(db, "fair_v", 10, **kw, global_limit=3)) == 0


def test_max_running_per_key_holds_across_processes_while_other_keys_progress(
        db, db_dsn, worker_env, tmp_path):
    processes, concurrency, limit = 2, 4, 2
    db.execute(STARTS_DDL)
    _fair(db, "fair_t", max_running_per_key=limit)
    for owner in ("A", "B", "C"):
        q.enqueue_many(db, _jobs("fair_t", owner, 20, seconds=0.1))
    seen: Counter = Counter()
    stopping = threading.Event()

    def watch() -> None:  # the leased jobs per key, as often as the database answers
        with psycopg.connect(db_dsn, autocommit=True) as conn:
            while not stopping.is_set():
                for key, n in _leased_by_key(conn, "fair_t").items():
                    seen[key] = max(seen[key], n)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    procs = [start_worker(worker_env, "fair_t", "--concurrency", str(concurrency), "--fair",
                          "--max-running-per-key", str(limit), "--poll", "0.2", *HANDLER,
                          log=tmp_path / f"w{i}.log") for i in range(processes)]
    try:
        wait_for(lambda: counts(db, "fair_t").get("completed") == 60, timeout=120,
                 what="all 60 jobs done")
    finally:
        codes = [stop(p) for p in procs]
        stopping.set()
        watcher.join(10)
    assert codes == [0] * processes
    assert seen == {"A": limit, "B": limit, "C": limit}  # each key got its 2, never more
    # What each job saw as it started, too.
    per_key = dict(db.execute("SELECT owner, max(same_key_leased) FROM fair_starts"
                              " GROUP BY owner").fetchall())
    assert set(per_key) == {"A", "B", "C"} and max(per_key.values()) == limit, per_key
    assert db.execute("SELECT count(DISTINCT leased_by) FROM jobvisor.jobs").fetchone()[0] \
        == processes


def test_a_key_at_its_limit_gets_its_next_job_as_soon_as_one_finishes(db, worker_env, tmp_path):
    # Not at the next poll (30 s here): the process that finished a job of a capped key
    # leases again at once. A lone key over its limit gets one slot of the four.
    db.execute(STARTS_DDL)
    _fair(db, "fair_t", max_running_per_key=1)
    q.enqueue_many(db, _jobs("fair_t", "A", 6, seconds=0.05))
    proc = start_worker(worker_env, "fair_t", "--concurrency", "4", "--fair",
                        "--max-running-per-key", "1", "--poll", "30", *HANDLER,
                        log=tmp_path / "w.log")
    try:
        wait_for(lambda: counts(db, "fair_t").get("completed") == 6, timeout=20,
                 what="six jobs, one at a time")
    finally:
        assert stop(proc) == 0
    assert db.execute("SELECT max(same_key_leased) FROM fair_starts").fetchone()[0] == 1


# --- configuration over time, and every way in ------------------------------------------------

def test_jobs_queued_before_fair_by_are_keyed_and_leased_first_and_removal_restores_fifo(db):
    old = q.enqueue_many(db, _jobs("fair_t", "A", 3) + _jobs("fair_t", "B", 1))
    _fair(db, "fair_t")
    assert db.execute("SELECT jobvisor.fair_share_types()").fetchone()[0] == ["fair_t"]
    new = q.enqueue_many(db, _jobs("fair_t", "C", 2))
    # Until they have a key the fair lease does not see them; the supervisor keys them
    # (duties: key_fair_backlog) in batches, and then they go first.
    assert q.key_fair_backlog(db, limit=3) == (3, True)
    assert q.key_fair_backlog(db, limit=3) == (1, True)
    assert q.key_fair_backlog(db, limit=3) == (0, False)
    rows = {r[0]: r[1:] for r in db.execute("SELECT id, fair_key, fair_tag FROM jobvisor.jobs")}
    assert [rows[i] for i in old] == [("A", None)] * 3 + [("B", None)]
    leased = q.lease(db, "fair_t", 10, worker_id="w", lease_seconds=60, fair=True)
    assert sorted(j.id for j in leased) == sorted(old + new)
    for j in leased:
        assert q.retry(db, j.id, j.lease_key, code="x", message=None, delay=0) == "queued"
    # Without fair_by: first in, first out again, whatever tags the jobs carry.
    assert q.configure_fair_share(db, {}, ["fair_t"]) is True
    assert db.execute("SELECT count(*) FROM jobvisor.fair_types").fetchone()[0] == 0
    later = q.enqueue_many(db, _jobs("fair_t", "D", 1))
    assert db.execute("SELECT fair_key FROM jobvisor.jobs WHERE id = %s", later).fetchone() \
        == (None,)
    fifo = q.lease(db, "fair_t", 10, worker_id="w", lease_seconds=60)
    assert [j.id for j in fifo] == old + new + later


def test_copy_plain_sql_and_nested_fields_get_keys_and_a_missing_field_shares_one(db):
    _fair(db, "fair_t")
    _fair(db, "fair_n", field="sub.owner")
    assert q.enqueue_copy(db, _jobs("fair_t", "A", 2) + _jobs("fair_t", None, 2)) == 4
    db.execute("INSERT INTO jobvisor.jobs (job_type, payload) VALUES"
               " ('fair_t', '{\"owner\": \"A\"}'), ('fair_t', '{\"owner\": 42}'),"
               " ('fair_t', '[1, 2]'), ('fair_t', '{\"owner\": null}'),"
               " ('fair_n', '{\"sub\": {\"owner\": \"Z\"}}'), ('other', '{\"owner\": \"A\"}')")
    long_owner = "x" * 500
    q.enqueue(db, q.NewJob("fair_t", {"owner": long_owner}))
    rows = db.execute("SELECT job_type, fair_key, fair_tag FROM jobvisor.jobs ORDER BY id"
                      ).fetchall()
    assert [r[:2] for r in rows[:-1]] == [
        ("fair_t", "A"), ("fair_t", "A"), ("fair_t", ""), ("fair_t", ""),
        ("fair_t", "A"), ("fair_t", "42"), ("fair_t", ""), ("fair_t", ""),
        ("fair_n", "Z"), ("other", None)]
    assert [r[2] for r in rows[:-2]] == [0, 1, 0, 1, 2, 0, 2, 3, 0]
    assert rows[-2][2] is None
    key = rows[-1][1]
    assert len(key) == 200 and key.startswith("x" * 167)
    # A worker enqueues follow-ups through the same trigger (tests/test_db_roles: the
    # worker role's grants); an operator's retry of a job failed before fair_by keys it.
    assert q.configure_fair_share(db, {}, ["fair_t", "fair_n"])
    (unkeyed,) = q.enqueue_many(db, [q.NewJob("fair_t", {"owner": "Q"}, max_attempts=1)])
    (j,) = [x for x in q.lease(db, "fair_t", 100, worker_id="w", lease_seconds=60)
            if x.id == unkeyed]
    assert q.fail(db, j.id, j.lease_key, code="x", message=None)
    _fair(db, "fair_t")
    assert q.retry_failed(db, unkeyed)
    assert db.execute("SELECT fair_key FROM jobvisor.jobs WHERE id = %s", (unkeyed,)
                      ).fetchone() == ("Q",)


def test_the_fair_lease_reads_its_index_in_order_without_sorting_the_queue(db):
    _fair(db, "fair_t")
    db.execute("INSERT INTO jobvisor.jobs (job_type, payload) SELECT 'fair_t',"
               " jsonb_build_object('owner', (i % 5000)::text) FROM generate_series(1, 20000) i")
    db.execute("INSERT INTO jobvisor.jobs (job_type) SELECT 'noop' FROM generate_series(1, 5000)")
    db.execute("ANALYZE jobvisor.jobs")
    params = {"type": "fair_t", "n": 100, "by": "w", "lease": 30.0, "alone": True,
              "per_key": 2, "scan": q.fair_scan(100)}
    for sql in (q._LEASE_FAIR, q._LEASE_FAIR_LIMITED):  # noqa: SLF001 - under test
        with db.transaction():
            plan = "\n".join(r[0] for r in db.execute("EXPLAIN " + sql, params).fetchall())
        assert "Seq Scan on jobs" not in plan, plan
        assert "Index Scan using jobs_fair_lease_order" in plan, plan
        if sql is q._LEASE_FAIR:  # noqa: SLF001 - (the limited one sorts its candidates)
            assert "Sort" not in plan, plan
    with db.transaction():
        assert len(db.execute(q._LEASE_FAIR, params).fetchall()) == 100  # noqa: SLF001
    # The fill ran before the table was ever analyzed: a tag per key and job all the same.
    (tags,) = db.execute("SELECT count(DISTINCT fair_tag) FROM jobvisor.jobs"
                         " WHERE job_type = 'fair_t'").fetchone()
    assert tags == 4


_FAIR_TRIGGER = ("SELECT tgenabled::text FROM pg_trigger"
                 " WHERE tgrelid = 'jobvisor.jobs'::regclass AND tgname = 'jobs_fair_tag'")


def test_the_insert_trigger_runs_only_while_some_type_is_fair(db):
    """sql/013: with no fair type an insert does not look at the trigger at all (its WHEN
    was planned again by every inserting statement); configure_fair_share switches it
    under the lock it takes when the set of fair types changes."""
    assert db.execute(_FAIR_TRIGGER).fetchone() == ("D",)
    _fair(db, "fair_t")
    assert db.execute(_FAIR_TRIGGER).fetchone() == ("O",)
    q.configure_fair_share(db, {"fair_t": q.FairShare("owner"),
                                "fair_u": q.FairShare("owner")}, ["fair_t", "fair_u"])
    assert q.configure_fair_share(db, {"fair_u": q.FairShare("owner")}, ["fair_t", "fair_u"])
    assert db.execute(_FAIR_TRIGGER).fetchone() == ("O",)  # one fair type is left
    (tagged,) = q.enqueue_many(db, _jobs("fair_u", "A", 1))
    assert q.configure_fair_share(db, {}, ["fair_t", "fair_u"])
    assert db.execute(_FAIR_TRIGGER).fetchone() == ("D",)
    (plain,) = q.enqueue_many(db, _jobs("fair_u", "A", 1))
    rows = dict(db.execute("SELECT id, fair_key FROM jobvisor.jobs").fetchall())
    assert rows == {tagged: "A", plain: None}


@pytest.mark.parametrize("fair_before", [False, True])
def test_upgrade_switches_the_trigger_off_only_where_no_type_is_fair(empty_dsn, tmp_path,
                                                                     fair_before):
    before = core_migrations_before(13, tmp_path / "sql")
    assert migrate(empty_dsn, before)[-1] == "012_one_insert_trigger"
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        if fair_before:
            _fair(conn, "fair_t")
        assert conn.execute(_FAIR_TRIGGER).fetchone() == ("O",)
    shutil.copy(sql_dir() / "013_fair_tag_trigger_off.sql", before)
    assert migrate(empty_dsn, before) == ["013_fair_tag_trigger_off"]
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        assert conn.execute(_FAIR_TRIGGER).fetchone() == (("O",) if fair_before else ("D",))
        q.enqueue_many(conn, _jobs("fair_t", "A", 2))
        tags = [r[0] for r in conn.execute("SELECT fair_tag FROM jobvisor.jobs ORDER BY id")]
        assert tags == ([0, 1] if fair_before else [None, None])
        # configuring afterwards switches it with the new configure_fair_share
        _fair(conn, "fair_v")
        assert conn.execute(_FAIR_TRIGGER).fetchone() == ("O",)


# --- configuration ---------------------------------------------------------------------------

@pytest.mark.parametrize(("settings", "key", "problem"), [
    ({"max_running_per_key": 2}, "types.t.max_running_per_key", "needs fair_by"),
    ({"fair_weights": {"a": 2}}, "types.t.fair_weights", "needs fair_by"),
    ({"fair_by": "owner", "fair_weights": {"a": 0}}, "types.t.fair_weights.a", "must be > 0"),
    ({"fair_by": "owner", "fair_weights": {"a": -1}}, "types.t.fair_weights.a", "must be > 0"),
    ({"fair_by": "owner", "fair_weights": {"a": "x"}}, "types.t.fair_weights.a",
     "must be a number"),
    ({"fair_by": "owner", "max_running_per_key": 0}, "types.t.max_running_per_key",
     "must be >= 1"),
    ({"fair_by": "owner id"}, "types.t.fair_by", "is not a payload field name"),
    ({"fair_by": "owner."}, "types.t.fair_by", "is not a payload field name"),
    ({"fair_by": "1st"}, "types.t.fair_by", "is not a payload field name"),
])
def test_bad_fair_share_settings_are_refused_naming_the_key(settings, key, problem):
    with pytest.raises(ConfigError) as err:
        parse_config({"types": {"t": settings}}, "jobvisor.yaml")
    assert str(err.value).startswith(f"jobvisor.yaml: {key}: "), str(err.value)
    assert problem in str(err.value)


def test_fair_share_settings_reach_the_worker_and_weights_restart_nothing():
    cfg = Config.model_validate({"types": {
        "fair": {"fair_by": "sub.owner", "fair_weights": {42: 2, "b": 0.5},
                 "max_running_per_key": 3},
        "plain": {}}})
    t = cfg.types["fair"]
    assert t.fair_share == q.FairShare("sub.owner", {"42": 2.0, "b": 0.5}, 3)
    cmd = worker_command(cfg, "fair")
    assert "--fair" in cmd and cmd[cmd.index("--max-running-per-key") + 1] == "3"
    assert "--fair" not in worker_command(cfg, "plain")
    reweighted = Config.model_validate({"types": {
        "fair": {"fair_by": "sub.owner", "fair_weights": {"c": 3}, "max_running_per_key": 3},
        "plain": {}}})
    assert reweighted.worker_fingerprint("fair") == cfg.worker_fingerprint("fair")
    limited = Config.model_validate({"types": {"fair": {"fair_by": "sub.owner"}}})
    assert limited.worker_fingerprint("fair") != cfg.worker_fingerprint("fair")


def test_the_worker_refuses_a_per_key_limit_without_fair_share():
    out = subprocess.run([sys.executable, "-m", "workers", "--type", "x",
                          "--max-running-per-key", "2"], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2
    assert "--max-running-per-key must be >= 1 and needs --fair" in out.stderr


def test_the_worker_role_tags_what_it_enqueues_but_cannot_configure(db, db_dsn):
    _fair(db, "fair_t", max_running_per_key=1)
    role = f"jv_fair_{uuid.uuid4().hex[:8]}"
    db.execute(f"CREATE ROLE {role} LOGIN NOSUPERUSER IN ROLE jobvisor_worker")
    try:
        dsn = conninfo_to_dict(db_dsn)
        dsn.pop("password", None)  # trust auth here, as in tests/test_db_roles.py
        with psycopg.connect(make_conninfo(**{**dsn, "user": role}), autocommit=True) as w:
            q.enqueue_many(w, _jobs("fair_t", "A", 2))
            assert q.enqueue_copy(w, _jobs("fair_t", "B", 1)) == 1
            leased = q.lease(w, "fair_t", 5, worker_id="w", lease_seconds=60, fair=True,
                             per_key_limit=1)
            assert Counter(_owners(leased)) == {"A": 1, "B": 1}
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                q.configure_fair_share(w, {}, ["fair_t"])
    finally:
        db.execute(f"DROP OWNED BY {role}")
        db.execute(f"DROP ROLE {role}")
    assert [r[0] for r in db.execute("SELECT fair_tag FROM jobvisor.jobs ORDER BY id")] \
        == [0, 1, 0]


def test_the_supervisor_writes_fair_by_at_start_and_on_reload(db, worker_env, tmp_path):
    q.enqueue_many(db, _jobs("fair_t", "A", 2))  # before the type is fair
    types = {"fair_t": {"handler": "workers.core.builtin:noop", "memory_per_job": "1MiB",
                        "processes": {"min": 0, "max": 1},
                        "fair_by": "owner", "fair_weights": {"A": 3}, "max_running_per_key": 2}}
    cfg = base_config(free_port(), types)
    sup = Supervisor(tmp_path, worker_env, cfg).start()
    try:
        wait_for(lambda: db.execute("SELECT field, weights, max_running_per_key, backlog_done"
                                    " FROM jobvisor.fair_types").fetchall()
                 == [("owner", {"A": 3}, 2, True)], what="fair_t configured, backlog keyed")
        assert db.execute("SELECT count(*) FROM jobvisor.jobs WHERE fair_key = 'A'"
                          ).fetchone()[0] == 2
        del types["fair_t"]["fair_by"], types["fair_t"]["fair_weights"]
        del types["fair_t"]["max_running_per_key"]
        sup.write_config(cfg)
        sup.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: db.execute("SELECT count(*) FROM jobvisor.fair_types").fetchone()
                 == (0,), what="fair_by removed on reload")
        assert db.execute("SELECT jobvisor.fair_share_types()").fetchone()[0] == []
    finally:
        assert sup.stop() == 0
