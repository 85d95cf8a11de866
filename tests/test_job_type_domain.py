"""sql/011: the job type's name rule is a domain's, checked where a type is written, not
a table CHECK re-run on every lease and acknowledgement (issue #15)."""

from __future__ import annotations

import shutil

import psycopg
import pytest

from supervisor_app.migrate import migrate, sql_dir
from tests.helpers import core_migrations_before
from workers.core import queue as q


def _table_checks_naming_job_type(conn: psycopg.Connection) -> list[str]:
    rows = conn.execute("""
        SELECT c.conname FROM pg_constraint c
        JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = ANY (c.conkey)
        WHERE c.conrelid = 'jobvisor.jobs'::regclass AND c.contype = 'c'
          AND a.attname = 'job_type'""").fetchall()
    return [r[0] for r in rows]


def test_no_table_check_reruns_the_name_rule_on_updates(db):
    # A table CHECK is evaluated for every new row version (each lease and each
    # acknowledgement); the domain's only where job_type is written.
    assert _table_checks_naming_job_type(db) == []
    (typ,) = db.execute("SELECT atttypid::regtype::text FROM pg_attribute WHERE attrelid ="
                        " 'jobvisor.jobs'::regclass AND attname = 'job_type'").fetchone()
    assert typ == "jobvisor.job_type_name"


@pytest.mark.parametrize("bad", ["", "Bad-Type", "1abc", "a" * 64])
def test_the_rule_still_holds_on_every_way_a_type_is_written(db, bad):
    with pytest.raises(psycopg.errors.CheckViolation, match="job_type_name"):
        q.enqueue(db, q.NewJob(bad, {}))
    with pytest.raises(psycopg.errors.CheckViolation, match="job_type_name"):
        q.enqueue_copy(db, [q.NewJob(bad, {})])
    (jid,) = q.enqueue_many(db, [q.NewJob("alpha", {})])
    with pytest.raises(psycopg.errors.CheckViolation, match="job_type_name"):
        db.execute("UPDATE jobvisor.jobs SET job_type = %s WHERE id = %s", (bad, jid))
    assert db.execute("SELECT count(*) FROM jobvisor.jobs").fetchone() == (1,)


def test_a_leased_job_reads_its_type_as_text(db):
    q.enqueue(db, q.NewJob("alpha", {"k": 1}))
    (job,) = q.lease(db, "alpha", 1, worker_id="w", lease_seconds=30)
    assert job.job_type == "alpha" and isinstance(job.job_type, str)
    assert q.complete(db, job.id, job.lease_key, {"ok": True})


_TRIGGERS = ("SELECT tgname::text, tgenabled::text FROM pg_trigger"
             " WHERE tgrelid = 'jobvisor.jobs'::regclass AND NOT tgisinternal ORDER BY 1")


def test_upgrade_keeps_the_jobs_and_the_triggers_that_name_job_type(empty_dsn, tmp_path):
    before = core_migrations_before(11, tmp_path / "sql")
    dsn = empty_dsn
    assert migrate(dsn, before)[-1] == "010_model_limits"
    with psycopg.connect(dsn, autocommit=True) as conn:
        q.enqueue_many(conn, [q.NewJob("alpha", {"i": i}) for i in range(5)])
        # A plug-in's trigger whose WHEN names job_type: PostgreSQL refuses to change the
        # type of a column such a trigger names, so the migration must carry it over.
        conn.execute("""
            CREATE TABLE public.seen (job_id bigint);
            CREATE FUNCTION public.seen_job() RETURNS trigger LANGUAGE plpgsql AS
            $$ BEGIN INSERT INTO public.seen VALUES (NEW.id); RETURN NULL; END $$;
            CREATE TRIGGER plugin_seen AFTER UPDATE OF status ON jobvisor.jobs
                FOR EACH ROW WHEN (NEW.job_type IN ('alpha', 'beta'))
                EXECUTE FUNCTION public.seen_job();
            CREATE TRIGGER plugin_off AFTER UPDATE OF status ON jobvisor.jobs
                FOR EACH ROW WHEN (NEW.job_type = 'alpha') EXECUTE FUNCTION public.seen_job();
            ALTER TABLE jobvisor.jobs DISABLE TRIGGER plugin_off;""")
        triggers_before = conn.execute(_TRIGGERS).fetchall()
    shutil.copy(sql_dir() / "011_job_type_domain.sql", before / "011_job_type_domain.sql")
    assert migrate(dsn, before) == ["011_job_type_domain"]
    with psycopg.connect(dsn, autocommit=True) as conn:
        # every trigger back, each enabled or disabled as before (plugin_off stays off)
        assert conn.execute(_TRIGGERS).fetchall() == triggers_before
        assert ("plugin_off", "D") in triggers_before
        assert _table_checks_naming_job_type(conn) == []
        jobs = q.lease(conn, "alpha", 5, worker_id="w", lease_seconds=30)
        assert sorted(j.payload["i"] for j in jobs) == list(range(5))
        # the carried-over trigger still fires, with its WHEN
        assert conn.execute("SELECT count(*) FROM public.seen").fetchone() == (5,)
        with pytest.raises(psycopg.errors.CheckViolation, match="job_type_name"):
            q.enqueue(conn, q.NewJob("Bad", {}))
