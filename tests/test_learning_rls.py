"""Row-level security and least privilege for learning submissions
(workers/learning/sql/001_learning.sql).

Each test creates its own login role (random name, dropped afterwards): roles are
cluster-wide and other databases on the same server run tests at the same time.
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pymupdf
import pytest
from psycopg.conninfo import make_conninfo

from tests.helpers import start_worker, stop, wait_for


def _login_role(db: psycopg.Connection, db_dsn: str, *, member: bool) -> Iterator[str]:
    name = f"jv_test_{secrets.token_hex(6)}"
    password = secrets.token_urlsafe(16)
    db.execute(f"CREATE ROLE {name} LOGIN PASSWORD '{password}'"
               + (" IN ROLE jobvisor_worker" if member else ""))
    try:
        yield make_conninfo(db_dsn, user=name, password=password)
    finally:
        db.execute(f"REVOKE ALL ON ALL FUNCTIONS IN SCHEMA public FROM {name}")
        db.execute(f"DROP ROLE IF EXISTS {name}")


@pytest.fixture
def worker_dsn(db: psycopg.Connection, db_dsn: str) -> Iterator[str]:
    """DSN of a fresh login role that is a member of jobvisor_worker."""
    yield from _login_role(db, db_dsn, member=True)


@pytest.fixture
def outsider_dsn(db: psycopg.Connection, db_dsn: str) -> Iterator[str]:
    """DSN of a fresh login role with no grants at all."""
    yield from _login_role(db, db_dsn, member=False)


def _submission(db: psycopg.Connection, owner: str, status: str = "pending",
                text: str | None = None) -> str:
    return str(db.execute(
        "INSERT INTO learning_submissions (owner_sub, source_key, mime_type, analysis_status,"
        " text_body) VALUES (%s, %s, 'application/pdf', %s, %s) RETURNING id",
        (owner, f"submissions/{owner}/source.pdf", status, text),
    ).fetchone()[0])


def _row(db: psycopg.Connection, submission_id: str) -> tuple:
    return db.execute(
        "SELECT analysis_status, text_body, feedback_md, error_code FROM learning_submissions"
        " WHERE id = %s", (submission_id,)).fetchone()


def _as(dsn: str, sub: str | None) -> psycopg.Connection:
    conn = psycopg.connect(dsn, autocommit=True)
    if sub is not None:
        # Session-wide here; a job sets it per transaction (is_local = true).
        conn.execute("SELECT set_config('app.current_sub', %s, false)", (sub,))
    return conn


def test_worker_role_with_another_owners_subject_can_neither_read_nor_update(db, worker_dsn):
    alice = _submission(db, "alice", "extracted", "Alices Text")
    bob = _submission(db, "bob")
    before = _row(db, alice)
    with _as(worker_dsn, "bob") as conn:
        seen = [r[0] for r in conn.execute("SELECT id::text FROM learning_submissions")]
        assert seen == [bob]
        assert conn.execute("SELECT text_body FROM learning_submissions WHERE id = %s",
                            (alice,)).fetchall() == []
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("UPDATE learning_submissions SET analysis_status = 'failed',"
                         " error_code = 'x' WHERE id = %s", (alice,))
        for call, args in [
            ("learning_worker_update_extracted(%s, %s)", (alice, "forged")),
            ("learning_worker_update_completed(%s, %s, '{}')", (alice, "forged")),
            ("learning_worker_update_failed(%s, %s)", (alice, "forged")),
            ("learning_worker_update_extracted(%s, %s, 'ollama')", (alice, "forged")),
            ("learning_worker_update_completed(%s, %s, '{}', 'ollama')", (alice, "forged")),
        ]:
            # Someone else's submission looks exactly like a missing one.
            with pytest.raises(psycopg.errors.NoDataFound):
                conn.execute(f"SELECT {call}", args)
    assert _row(db, alice) == before


def test_worker_role_without_a_subject_sees_no_submission(db, worker_dsn):
    _submission(db, "alice")
    with _as(worker_dsn, None) as conn:
        assert conn.execute("SELECT count(*) FROM learning_submissions").fetchone()[0] == 0


def test_owner_subject_writes_only_through_guarded_functions_in_the_expected_state(
        db, worker_dsn):
    alice = _submission(db, "alice")
    with _as(worker_dsn, "alice") as conn:
        assert conn.execute("SELECT analysis_status FROM learning_submissions WHERE id = %s",
                            (alice,)).fetchone() == ("pending",)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("UPDATE learning_submissions SET text_body = 'x' WHERE id = %s", (alice,))
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("INSERT INTO learning_submissions (owner_sub, source_key, mime_type)"
                         " VALUES ('alice', 'k', 'application/pdf')")
        # Feedback before text: the guarded write refuses and says so.
        assert conn.execute("SELECT learning_worker_update_completed(%s, 'fb', '{}')",
                            (alice,)).fetchone() == (False,)
        assert conn.execute("SELECT learning_worker_update_extracted(%s, 'Text')",
                            (alice,)).fetchone() == (True,)
        assert conn.execute("SELECT learning_worker_update_extracted(%s, 'again')",
                            (alice,)).fetchone() == (False,)
        assert conn.execute("SELECT learning_worker_update_completed(%s, 'fb', '{\"a\": 1}')",
                            (alice,)).fetchone() == (True,)
        assert conn.execute("SELECT learning_worker_update_failed(%s, 'late_failure')",
                            (alice,)).fetchone() == (False,)
    assert _row(db, alice) == ("completed", "Text", "fb", None)


def _backends(db: psycopg.Connection, submission_id: str) -> tuple:
    return db.execute("SELECT text_backend, feedback_backend FROM learning_submissions"
                      " WHERE id = %s", (submission_id,)).fetchone()


def test_the_backend_overloads_record_who_wrote_text_and_feedback(db, worker_dsn):
    alice = _submission(db, "alice")
    with _as(worker_dsn, "alice") as conn:
        # The same guards as the old signatures: feedback before text is refused.
        assert conn.execute("SELECT learning_worker_update_completed(%s, 'fb', '{}', 'stub')",
                            (alice,)).fetchone() == (False,)
        assert conn.execute("SELECT learning_worker_update_extracted(%s, 'Text', 'tesseract')",
                            (alice,)).fetchone() == (True,)
        assert conn.execute("SELECT learning_worker_update_extracted(%s, 'again', 'ollama')",
                            (alice,)).fetchone() == (False,)
        assert _backends(db, alice) == ("tesseract", None)
        for bad in ("", "Ollama", "x y", "a" * 40):
            with pytest.raises(psycopg.errors.InvalidParameterValue):
                conn.execute("SELECT learning_worker_update_completed(%s, 'fb', '{}', %s)",
                             (alice, bad))
        assert conn.execute("SELECT learning_worker_update_completed(%s, 'fb', '{}', 'dspy')",
                            (alice,)).fetchone() == (True,)
    assert _row(db, alice) == ("completed", "Text", "fb", None)
    assert _backends(db, alice) == ("tesseract", "dspy")
    stamps = db.execute("SELECT extracted_at <= finished_at, finished_at = updated_at"
                        " FROM learning_submissions WHERE id = %s", (alice,)).fetchone()
    assert stamps == (True, True)


def test_the_old_signatures_still_work_for_older_workers_and_record_no_backend(
        db, worker_dsn):
    # A worker from before 004 during a rolling upgrade: its calls still succeed; the
    # backend is unknown (NULL), never a guess.
    alice = _submission(db, "alice")
    with _as(worker_dsn, "alice") as conn:
        assert conn.execute("SELECT learning_worker_update_extracted(%s, 'Text')",
                            (alice,)).fetchone() == (True,)
        assert conn.execute("SELECT learning_worker_update_completed(%s, 'fb', '{}')",
                            (alice,)).fetchone() == (True,)
    assert _row(db, alice) == ("completed", "Text", "fb", None)
    assert _backends(db, alice) == (None, None)


def test_the_backend_overloads_are_security_definer_with_a_pinned_search_path(db):
    rows = db.execute(
        "SELECT p.oid::regprocedure::text, p.prosecdef, p.proconfig,"
        " has_function_privilege('public', p.oid, 'EXECUTE'),"
        " has_function_privilege('jobvisor_worker', p.oid, 'EXECUTE')"
        " FROM pg_proc p WHERE p.proname IN ('learning_worker_update_extracted',"
        " 'learning_worker_update_completed') ORDER BY 1").fetchall()
    assert [r[0] for r in rows] == [
        "learning_worker_update_completed(uuid,text,jsonb)",
        "learning_worker_update_completed(uuid,text,jsonb,text)",
        "learning_worker_update_extracted(uuid,text)",
        "learning_worker_update_extracted(uuid,text,text)",
    ]
    for _name, definer, config, public, worker in rows:
        assert definer and config == ["search_path=pg_catalog, pg_temp"]
        assert not public and worker


def test_guarded_functions_are_not_executable_by_roles_outside_jobvisor_worker(
        db, outsider_dsn):
    alice = _submission(db, "alice")
    with _as(outsider_dsn, "alice") as conn:
        for call in ("learning_worker_update_extracted(%s, 'x')",
                     "learning_worker_update_completed(%s, 'x', '{}')",
                     "learning_worker_update_failed(%s, 'x')",
                     "learning_worker_update_extracted(%s, 'x', 'stub')",
                     "learning_worker_update_completed(%s, 'x', '{}', 'stub')"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(f"SELECT {call}", (alice,))
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT * FROM learning_worker_health_probe()")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT count(*) FROM learning_submissions")


def test_health_probe_is_healthy_for_a_worker_role_member(db, worker_dsn):
    with _as(worker_dsn, None) as conn:
        checks = {name: (ok, detail) for name, ok, detail in
                  conn.execute("SELECT * FROM learning_worker_health_probe()")}
    assert set(checks) == {"db_role", "current_role", "queue_visible", "submissions_rls",
                           "worker_functions"}
    assert all(ok for ok, _ in checks.values()), checks
    assert "member of jobvisor_worker" in checks["current_role"][1]
    assert checks["queue_visible"][1] == "queued learning jobs: 0"


def test_health_probe_flags_a_caller_outside_the_worker_role(db, outsider_dsn):
    # Only so the outsider can call it at all: the probe must still report it unfit.
    db.execute("GRANT EXECUTE ON FUNCTION learning_worker_health_probe() TO "
               + psycopg.conninfo.conninfo_to_dict(outsider_dsn)["user"])
    with _as(outsider_dsn, None) as conn:
        checks = {name: ok for name, ok, _ in
                  conn.execute("SELECT * FROM learning_worker_health_probe()")}
    assert checks["db_role"] and checks["submissions_rls"]
    assert not checks["current_role"]
    assert not checks["queue_visible"]
    assert not checks["worker_functions"]


def test_the_whole_pipeline_runs_under_the_least_privilege_worker_role(
        db, worker_dsn, worker_env, tmp_path: Path):
    storage = tmp_path / "storage"
    doc = pymupdf.open()
    doc.new_page().insert_text((72, 72), "Ein kurzer Aufsatz über Bäume.")
    (storage / "submissions").mkdir(parents=True)
    (storage / "submissions" / "s.pdf").write_bytes(doc.tobytes())
    sid = str(uuid.uuid4())
    db.execute("INSERT INTO learning_submissions (id, owner_sub, source_key, mime_type, criteria)"
               " VALUES (%s, 'alice', 'submissions/s.pdf', 'application/pdf', '[\"Bäume\"]')",
               (sid,))
    db.execute("INSERT INTO jobvisor.jobs (job_type, payload) VALUES ('pdf', %s)",
               (psycopg.types.json.Jsonb({"submission_id": sid, "owner_sub": "alice"}),))
    env = worker_env | {"LEARNING_DATABASE_URL": worker_dsn, "STORAGE_DIR": str(storage),
                        "AI_BACKEND": "stub"}
    env.pop("AI_VISION_BACKEND", None)
    env.pop("AI_FEEDBACK_BACKEND", None)
    role = psycopg.conninfo.conninfo_to_dict(worker_dsn)["user"]
    procs = [start_worker(env, t, "--poll", "0.2", log=tmp_path / f"{t}.log")
             for t in ("pdf", "vision", "feedback")]
    try:
        wait_for(lambda: db.execute(
            "SELECT count(*) >= 3 FROM pg_stat_activity WHERE usename = %s",
            (role,)).fetchone()[0],
            what="workers connected as the worker role")
        wait_for(lambda: _row(db, sid)[0] in ("completed", "failed"), timeout=120,
                 what="the submission finishing")
    finally:
        codes = [stop(p) for p in procs]
    assert codes == [0, 0, 0]
    status, text, feedback, error = _row(db, sid)
    assert (status, error) == ("completed", None)
    assert "Bäume" in text and feedback
    assert _backends(db, sid) == ("text_layer", "stub")
