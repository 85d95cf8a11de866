"""Migrations a plug-in ships: applied after the core's, in order, recorded per plug-in;
and a database from before the split (one numbered sequence, the learning tables created
by the core's 003 and a trigger on the jobs table) upgrades with nothing lost."""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path

import psycopg
import pytest

from supervisor_app.migrate import discover, migrate, sql_dir
from workers.core import plugins
from workers.core import queue as q

LEARNING = plugins.for_type("pdf")


def _previous_schema() -> list[tuple[int, str, str]]:
    """The migrations as the release before the split shipped them, (version, name, sql).

    003_learning is the learning plug-in's 001, byte for byte (moved, not changed). The
    former 008_clock_times was split in two halves that now live apart; together they are
    what it ran.
    """
    core = {m.version: m for m in discover(sql_dir())}
    learning = {m.version: m for m in discover(LEARNING.migrations_dir())}
    files = [(v, core[v].name, core[v].sql) for v in (1, 2)]
    files.append((3, "learning", learning[1].sql))
    files += [(v, core[v].name, core[v].sql) for v in (4, 5, 6, 7)]
    files.append((8, "clock_times", learning[2].sql + "\n" + core[8].sql))
    return files


def _migrate_the_old_way(dsn: str) -> None:
    """What the previous `jobvisor migrate` did: one sequence, `version` the key."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA IF NOT EXISTS jobvisor")
        conn.execute("""CREATE TABLE jobvisor.schema_migrations (
                            version integer PRIMARY KEY, name text NOT NULL,
                            checksum text NOT NULL,
                            applied_at timestamptz NOT NULL DEFAULT now())""")
        for version, name, sql in _previous_schema():
            with conn.transaction():
                conn.execute(sql)
                conn.execute("INSERT INTO jobvisor.schema_migrations (version, name, checksum)"
                             " VALUES (%s, %s, %s)",
                             (version, name, hashlib.sha256(sql.encode()).hexdigest()))


def _counts(conn: psycopg.Connection) -> dict[str, dict[str, float]]:
    """Per type and status; the age of the oldest queued job moves on, so it is left out."""
    return {t: {k: v for k, v in c.items() if k != "oldest_queued_s"}
            for t, c in q.status_counts(conn).items()}


def _recorded(conn: psycopg.Connection) -> list[tuple[str, int, str]]:
    return conn.execute("SELECT component, version, name FROM jobvisor.schema_migrations"
                        " ORDER BY component, version").fetchall()


def test_a_fresh_database_gets_the_cores_migrations_then_each_plug_ins(empty_dsn):
    applied = migrate(empty_dsn)
    core = [f"{m.version:03d}_{m.name}" for m in discover(sql_dir())]
    assert applied[:len(core)] == core
    assert applied[len(core):] == ["learning/001_learning", "learning/002_clock_times",
                                   "learning/003_outcomes", "learning/004_backends"]
    assert migrate(empty_dsn) == []
    with psycopg.connect(empty_dsn) as conn:
        recorded = _recorded(conn)
        assert ("learning", 3, "outcomes") in recorded and ("core", 3, "worker_role") in recorded
        assert conn.execute("SELECT count(*) FROM pg_trigger WHERE NOT tgisinternal AND "
                            "tgrelid = 'jobvisor.jobs'::regclass AND tgname LIKE 'learning%%'"
                            ).fetchone() == (0,)


def test_the_core_alone_runs_a_queue_without_any_plug_in(empty_dsn):
    # The core's migrations by themselves: no learning table, and jobs of any type still
    # enqueue, lease, fail, retry and complete.
    migrate(empty_dsn, sql_dir())
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        assert conn.execute("SELECT to_regclass('public.learning_submissions')").fetchone() \
            == (None,)
        job_id = q.enqueue(conn, q.NewJob("noop", {}, max_attempts=1))
        (job,) = q.lease(conn, "noop", 1, worker_id="w", lease_seconds=30)
        assert q.retry(conn, job.id, job.lease_key, code="x", message=None, delay=0) == "failed"
        assert q.retry_failed(conn, job_id)
        (job,) = q.lease(conn, "noop", 1, worker_id="w", lease_seconds=30)
        assert q.complete(conn, job.id, job.lease_key, {"ok": True})


def test_a_database_from_before_the_split_upgrades_with_nothing_lost(empty_dsn):
    _migrate_the_old_way(empty_dsn)
    alice = str(uuid.uuid4())
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        conn.execute("SELECT set_config('app.current_sub', 'alice', false)")
        conn.execute("INSERT INTO public.learning_submissions (id, owner_sub, source_key,"
                     " mime_type) VALUES (%s, 'alice', 'k', 'application/pdf')", (alice,))
        payload = {"submission_id": alice, "owner_sub": "alice"}
        vision = q.enqueue(conn, q.NewJob("vision", payload, max_attempts=1))
        q.enqueue_many(conn, [q.NewJob("noop", {"n": i}) for i in range(5)])
        (leased,) = q.lease(conn, "vision", 1, worker_id="old", lease_seconds=300)
        before = conn.execute("SELECT count(*), sum(hashtext(payload::text)) FROM jobvisor.jobs"
                              ).fetchone()
        counts_before = _counts(conn)

    applied = migrate(empty_dsn)
    # Only what is new: the core's worker role grants and its half of the clock change
    # (both idempotent), the core's migrations since that release, and the plug-in's
    # outcomes hook. Nothing is applied twice.
    since = [f"{m.version:03d}_{m.name}" for m in discover(sql_dir()) if m.version > 8]
    assert applied == ["003_worker_role", "008_batch_clock_times", *since,
                       "learning/003_outcomes", "learning/004_backends"]
    assert migrate(empty_dsn) == []
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        assert ("learning", 1, "learning") in _recorded(conn)
        assert ("learning", 2, "clock_times") in _recorded(conn)
        assert not [r for r in _recorded(conn) if r[0] == "core" and r[2] in
                    ("learning", "clock_times")]
        assert conn.execute("SELECT count(*), sum(hashtext(payload::text)) FROM jobvisor.jobs"
                            ).fetchone() == before
        assert _counts(conn) == counts_before
        assert conn.execute("SELECT count(*) FROM pg_trigger WHERE NOT tgisinternal AND "
                            "tgname = 'learning_job_outcome'").fetchone() == (0,)
        # The job leased before the upgrade finishes after it, and its failure reaches the
        # submission through the plug-in's hook instead of the trigger.
        assert q.fail(conn, vision, leased.lease_key, code="vision_failed", message=None)
        conn.execute("SELECT set_config('app.current_sub', 'alice', false)")
        assert conn.execute("SELECT analysis_status, error_code FROM"
                            " public.learning_submissions WHERE id = %s", (alice,)).fetchone() \
            == ("failed", "vision_failed")


def test_a_plug_in_that_adopts_a_name_it_does_not_ship_is_refused(empty_dsn, monkeypatch):
    broken = plugins.Plugin(name="learning", handlers=dict(LEARNING.handlers),
                            migrations=LEARNING.migrations, adopts={"003_learning": 9})
    monkeypatch.setattr(plugins, "installed", lambda: (broken,))
    with pytest.raises(ValueError, match="adopts '003_learning' -> 9"):
        migrate(empty_dsn)


def test_a_plug_ins_migration_folder_is_package_data(tmp_path: Path):
    folder = LEARNING.migrations_dir()
    assert folder is not None and folder.parent.name == "learning"
    assert [p.name for p in sorted(folder.glob("*.sql"))][0] == "001_learning.sql"
