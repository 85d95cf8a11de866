"""No database transaction stays open while a handler waits on slow work.

A handler reads in `ctx.read()` (a short READ ONLY transaction, handed back at once),
calls the model (or renders the pages) with no transaction open, and only then opens
`ctx.db`, the transaction that writes the outcome and completes the job. So the worker's
connections are never `idle in transaction` during a model call or a render, and the
times the job and the submission record (`finished_at`, `extracted_at`) come after the
slow work, not before it.

The pipeline tests run a real worker process under the least-privilege worker role (its
backends are told apart by that role) against a fake Ollama whose every request takes
`LATENCY` seconds; the pdf stage's render is held up by the test (tests.handlers_pdf).
"""

from __future__ import annotations

import secrets
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo
from psycopg_pool import ConnectionPool

from tests.fakes.ollama import FakeOllama
from tests.helpers import start_worker, stop, wait_for
from tests.test_pipeline import (
    FAST,
    FEEDBACK,
    VISION,
    add_submission,
    enqueue_feedback,
    enqueue_pdf,
    enqueue_vision,
    make_pdf,
    submission,
)
from workers import Job, JobContext
from workers.core import plugins
from workers.core import queue as q
from workers.learning.storage import LocalStorage

LATENCY = 2.5  # seconds each model request takes at the fake


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture
def fake() -> Iterator[FakeOllama]:
    with FakeOllama(slots=2, latency=LATENCY) as server:
        yield server


@pytest.fixture
def worker_role(db: psycopg.Connection, db_dsn: str) -> Iterator[tuple[str, str]]:
    """(role name, DSN) of a fresh login role in jobvisor_worker; roles are cluster-wide,
    so the name is random and the role dropped afterwards."""
    name = f"jv_test_{secrets.token_hex(6)}"
    password = secrets.token_urlsafe(16)
    db.execute(f"CREATE ROLE {name} LOGIN PASSWORD '{password}' IN ROLE jobvisor_worker")
    try:
        yield name, make_conninfo(db_dsn, user=name, password=password)
    finally:
        db.execute(f"DROP ROLE IF EXISTS {name}")


@pytest.fixture
def storage(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "storage")


@pytest.fixture
def env(worker_env: dict[str, str], worker_role: tuple[str, str], storage: LocalStorage,
        fake: FakeOllama) -> dict[str, str]:
    out = {k: v for k, v in worker_env.items() if not k.startswith(("AI_", "OLLAMA_"))}
    return out | {"LEARNING_DATABASE_URL": worker_role[1], "STORAGE_DIR": str(storage.root),
                  "AI_BACKEND": "local", "AI_VISION_BACKEND": "ollama",
                  "AI_FEEDBACK_BACKEND": "ollama", "OLLAMA_BASE_URL": fake.base_url,
                  "AI_VISION_MODEL": VISION, "AI_FEEDBACK_MODEL": FEEDBACK,
                  "AI_READ_TIMEOUT": "60"}


def _backends(db: psycopg.Connection, role: str) -> list[tuple[int, str | None, Any]]:
    """(pid, state, xact_start) of every backend the worker role has on this database."""
    return db.execute(
        "SELECT pid, state, xact_start FROM pg_stat_activity"
        " WHERE datname = current_database() AND usename = %s AND backend_type = 'client backend'",
        (role,)).fetchall()


def _states_during_model_call(db: psycopg.Connection, fake: FakeOllama, role: str
                              ) -> list[tuple[int, str | None, Any]]:
    """The worker's backends, sampled while its one model request is in flight.

    A sample counts only when the request is still in flight after it was taken: the fake
    frees its slot just before answering, and right after the answer the handler opens
    its completing transaction, which is not what this looks for.
    """
    wait_for(lambda: fake.stats()["in_flight"] == 1, what="a model call in flight")
    seen: list[tuple[int, str | None, Any]] = []
    while True:
        sample = _backends(db, role)
        if fake.stats()["in_flight"] == 0:
            return seen
        seen += sample
        time.sleep(0.1)


def _job(db: psycopg.Connection, job_id: int) -> dict[str, Any]:
    return wait_for(lambda: (j := q.get_job(db, job_id)) and j["status"] == "completed" and j,
                    what=f"job {job_id} completed")


# --- a real worker, a slow model -------------------------------------------------------------


def _states_during_render(db: psycopg.Connection, gate: Path, role: str
                          ) -> tuple[list[tuple[int, str | None, Any]], Any, Any]:
    """The worker's backends, sampled while its render waits at the gate
    (tests.handlers_pdf), then the gate opened; with the database clock's time when the
    render was seen waiting and when it was let go."""
    wait_for(lambda: (gate / "rendering").exists(), what="a render under way")
    (held_from,) = db.execute("SELECT clock_timestamp()").fetchone()
    seen: list[tuple[int, str | None, Any]] = []
    for _ in range(10):
        seen += _backends(db, role)
        time.sleep(0.1)
    (released,) = db.execute("SELECT clock_timestamp()").fetchone()
    (gate / "go").touch()
    return seen, held_from, released


@pytest.mark.parametrize("stage", ["pdf", "vision", "feedback"])
def test_no_worker_connection_is_idle_in_transaction_during_the_slow_work(
        db, env, storage, fake, worker_role, tmp_path, stage):
    """The slow work: the pdf stage's render (held up by the test), the vision and
    feedback stages' model call (the fake's latency)."""
    role = worker_role[0]
    args: tuple[str, ...] = FAST
    if stage == "pdf":
        sid = add_submission(db, storage, make_pdf("Ein Aufsatz über den langsamen Fluss."))
        job_id = enqueue_pdf(db, sid)
        gate = tmp_path / "gate"
        gate.mkdir()
        env = env | {"JOBVISOR_TEST_RENDER_GATE": str(gate)}
        args = ("--handler", "tests.handlers_pdf:gated", *FAST)
    elif stage == "vision":
        data = make_pdf("Ein Aufsatz über den langsamen Fluss.")
        sid = add_submission(db, storage, data)
        job_id = enqueue_vision(db, storage, sid, data)
    else:
        sid = add_submission(db, storage, make_pdf("egal"), status="extracted",
                             text="Ein Aufsatz über den langsamen Fluss.")
        job_id = enqueue_feedback(db, sid)
    proc = start_worker(env, stage, *args, log=tmp_path / f"{stage}.log")
    try:
        if stage == "pdf":
            seen, held_from, released = _states_during_render(db, gate, role)
        else:
            seen = _states_during_model_call(db, fake, role)
        job = _job(db, job_id)
    finally:
        assert stop(proc) == 0
    assert seen, "the worker had no connection open during the slow work"
    held = sorted({(pid, str(xact_start)) for pid, state, xact_start in seen
                   if (state or "").startswith("idle in transaction")})
    assert held == [], f"worker backends idle in transaction during the slow work: {held}"

    # Everything the job wrote was written after the slow work ended.
    if stage == "pdf":
        assert job["started_at"] <= held_from and job["finished_at"] >= released
        follow = q.get_job(db, job["result"]["vision_job"])
        assert follow["job_type"] == "vision" and follow["created_at"] >= released
        return
    row = submission(db, sid)
    latency = timedelta(seconds=LATENCY)
    assert job["finished_at"] - job["started_at"] >= latency
    if stage == "vision":
        assert row["analysis_status"] == "extracted"
        assert row["extracted_at"] - job["started_at"] >= latency
        assert row["extracted_at"] - row["created_at"] >= latency
    else:
        assert row["analysis_status"] == "completed"
        assert row["finished_at"] - job["started_at"] >= latency
        assert row["finished_at"] - row["created_at"] >= latency


# --- JobContext.read() -----------------------------------------------------------------------


@pytest.fixture
def pool(db_dsn: str) -> Iterator[ConnectionPool]:
    """One connection only: a connection `read()` did not hand back would be missed."""
    with ConnectionPool(db_dsn, min_size=1, max_size=1, kwargs={"autocommit": False},
                        open=True) as p:
        p.wait(timeout=30)
        yield p


def _ctx(pool: ConnectionPool, owner: str = "alice") -> JobContext:
    job = Job(1, "vision", {"owner_sub": owner}, attempt=1, max_attempts=3)
    # The runtime hands each context its type's plug-in settings hook (here the learning
    # plug-in's subject), as workers.core.runtime does.
    return JobContext(job, uuid.uuid4(), {}, pool, _settings=plugins.job_settings("vision"))


def _check_returned(pool: ConnectionPool) -> None:
    """The pool's only connection is back, idle, and without the job's settings."""
    assert pool.get_stats()["pool_available"] == 1
    with pool.connection(timeout=30) as conn:
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        assert conn.execute("SELECT current_setting('app.current_sub', true)").fetchone()[0] \
            in (None, "")


def test_read_is_a_read_only_transaction_with_the_jobs_subject_and_hands_back_its_connection(
        pool):
    ctx = _ctx(pool)
    with ctx.read() as conn:
        assert conn.execute("SHOW transaction_read_only").fetchone()[0] == "on"
        assert conn.execute("SELECT current_setting('app.current_sub', true)").fetchone()[0] \
            == "alice"
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
        assert pool.get_stats()["pool_available"] == 0
    assert not ctx.touched_db and ctx.db_opened_at is None
    _check_returned(pool)


def test_a_write_inside_read_raises_and_the_connection_still_goes_back(pool, db):
    ctx = _ctx(pool)
    with pytest.raises(psycopg.errors.ReadOnlySqlTransaction), ctx.read() as conn:
        conn.execute("INSERT INTO learning_submissions (owner_sub, source_key, mime_type)"
                     " VALUES ('alice', 'submissions/x', 'application/pdf')")
    assert db.execute("SELECT count(*) FROM learning_submissions").fetchone()[0] == 0
    assert not ctx.touched_db
    _check_returned(pool)


def test_db_records_when_it_was_opened_and_read_refuses_once_it_is_open(pool):
    ctx = _ctx(pool)
    with ctx.read() as conn:
        conn.execute("SELECT 1")
    before = time.monotonic()
    ctx.db.execute("SELECT 1")
    opened = ctx.db_opened_at
    assert opened is not None and opened >= before
    ctx.db.execute("SELECT 1")
    assert ctx.db_opened_at == opened  # the first opening, not the latest use
    with pytest.raises(RuntimeError, match="read through ctx.db"), ctx.read():
        pass
    conn = ctx.release_connection()
    assert conn is not None
    conn.rollback()
    pool.putconn(conn)


def test_a_plug_ins_settings_hook_decides_what_each_job_transaction_sets(pool):
    job = Job(2, "custom", {"tenant": "t-7"}, attempt=1, max_attempts=3)
    ctx = JobContext(job, uuid.uuid4(), {}, pool,
                     _settings=lambda j: {"app.tenant": j.payload["tenant"], "app.mode": "x"})
    with ctx.read() as conn:
        assert conn.execute("SELECT current_setting('app.tenant', true),"
                            " current_setting('app.mode', true)").fetchone() == ("t-7", "x")
    _check_returned(pool)
    # A type no plug-in declares sets nothing: the core knows no subject of its own.
    bare = JobContext(Job(3, "noop", {"owner_sub": "alice"}, attempt=1, max_attempts=3),
                      uuid.uuid4(), {}, pool, _settings=plugins.job_settings("noop"))
    with bare.read() as conn:
        assert conn.execute("SELECT current_setting('app.current_sub', true)").fetchone()[0] \
            in (None, "")
    _check_returned(pool)
