"""Batches: totals and counts kept by the database in the transaction that changes a job."""

from __future__ import annotations

import argparse
import io
import json
import random
import subprocess
import sys
import threading
from pathlib import Path

import psycopg
import pytest

from supervisor_app.cli import batches as cli_batches
from supervisor_app.cli.main import build_parser
from supervisor_app.errors import BadInput, Failed
from tests.helpers import start_worker, stop, wait_for
from workers.core import queue as q
from workers.learning.cli import submit_directory

REPO = Path(__file__).resolve().parent.parent
TRUTH = """
SELECT b.id, b.total, b.completed, b.failed, b.cancelled, b.finished_at IS NOT NULL,
       t.total, t.completed, t.failed, t.cancelled, t.unfinished = 0
FROM jobvisor.batches b
JOIN (SELECT batch_id, count(*) AS total,
             count(*) FILTER (WHERE status = 'completed') AS completed,
             count(*) FILTER (WHERE status = 'failed') AS failed,
             count(*) FILTER (WHERE status = 'cancelled') AS cancelled,
             count(*) FILTER (WHERE finished_at IS NULL) AS unfinished
      FROM jobvisor.jobs WHERE batch_id IS NOT NULL GROUP BY batch_id) t ON t.batch_id = b.id
ORDER BY b.id
"""


def _mismatches(conn: psycopg.Connection) -> list[tuple]:
    """Batches whose stored counts differ from what their jobs say (empty: all agree)."""
    return [r for r in conn.execute(TRUTH).fetchall() if tuple(r[1:6]) != tuple(r[6:11])]


def _live(conn: psycopg.Connection) -> int:
    return conn.execute("SELECT count(*) FROM jobvisor.jobs WHERE finished_at IS NULL"
                        ).fetchone()[0]


# --- enqueue -------------------------------------------------------------------------------

def test_enqueue_batch_creates_the_batch_with_its_total_in_one_statement(db):
    jobs = [q.NewJob("noop", {"i": i}) for i in range(5)] + [q.NewJob("sleep", {"seconds": 0})]
    ids = q.enqueue_batch(db, "b-1", jobs)
    assert ids == sorted(ids) and len(ids) == 6
    batch = q.get_batch(db, "b-1")
    assert (batch["total"], batch["queued"], batch["done"], batch["finished"]) == (6, 6, 0, False)
    assert {q.get_job(db, i)["batch_id"] for i in ids} == {"b-1"}
    # More work later adds to the total; a duplicate idempotency key joins the live job and
    # is not counted twice.
    q.enqueue_batch(db, "b-1", [q.NewJob("noop", {}, key="k"), q.NewJob("noop", {}, key="k")])
    assert q.get_batch(db, "b-1")["total"] == 7


def test_jobs_enqueued_with_a_batch_id_by_any_path_count_towards_its_total(db):
    q.enqueue_many(db, [q.NewJob("noop", {}, batch_id="plain") for _ in range(3)])
    q.enqueue(db, q.NewJob("noop", {}, batch_id="plain"))
    db.execute("INSERT INTO jobvisor.jobs (job_type, batch_id) VALUES ('noop', 'plain')")
    assert q.get_batch(db, "plain")["total"] == 5


def test_a_batch_finishes_with_its_last_job_and_reopens_when_a_job_is_retried(db):
    ids = q.enqueue_batch(db, "b", [q.NewJob("noop", {}), q.NewJob("noop", {})])
    first, second = q.lease(db, "noop", 2, worker_id="w", lease_seconds=30)
    assert q.complete(db, first.id, first.lease_key, None)
    batch = q.get_batch(db, "b")
    assert (batch["completed"], batch["leased"], batch["finished"]) == (1, 1, False)
    assert q.fail(db, second.id, second.lease_key, code="boom", message=None)
    batch = q.get_batch(db, "b")
    assert (batch["completed"], batch["failed"], batch["finished"], batch["progress"]) == (
        1, 1, True, 1.0)
    # An operator retry puts the job back: the batch is open again, its count undone.
    assert q.retry_failed(db, ids[1])
    batch = q.get_batch(db, "b")
    assert (batch["failed"], batch["queued"], batch["finished"]) == (0, 1, False)
    (again,) = q.lease(db, "noop", 1, worker_id="w", lease_seconds=30)
    q.complete(db, again.id, again.lease_key, None)
    batch = q.get_batch(db, "b")
    assert (batch["completed"], batch["failed"], batch["finished"]) == (2, 0, True)


def test_cancelling_a_queued_job_counts_it_as_cancelled(db):
    ids = q.enqueue_batch(db, "c", [q.NewJob("noop", {}) for _ in range(2)])
    assert q.cancel(db, ids[0]) == "cancelled"
    assert q.cancel(db, ids[1]) == "cancelled"
    batch = q.get_batch(db, "c")
    assert (batch["cancelled"], batch["finished"]) == (2, True)


def test_running_jobs_progress_shows_in_the_batch_progress(db):
    q.enqueue_batch(db, "p", [q.NewJob("noop", {}) for _ in range(4)])
    a, b, *_ = q.lease(db, "noop", 4, worker_id="w", lease_seconds=30)
    q.complete(db, a.id, a.lease_key, None)
    q.save_progress(db, [(b.id, b.lease_key, 0.5, "page 1/2")])
    assert q.get_batch(db, "p")["progress"] == pytest.approx((1 + 0.5) / 4)


def test_batch_ids_are_checked(db):
    with pytest.raises(ValueError, match="batch id"):
        q.enqueue_batch(db, "", [q.NewJob("noop", {})])
    with pytest.raises(ValueError, match="another batch"):
        q.enqueue_batch(db, "x", [q.NewJob("noop", {}, batch_id="y")])


def test_prune_batches_removes_only_long_finished_ones(db):
    q.enqueue_batch(db, "old", [q.NewJob("noop", {})])
    q.enqueue_batch(db, "open", [q.NewJob("noop", {})])
    (job, _) = q.lease(db, "noop", 2, worker_id="w", lease_seconds=30)
    q.complete(db, job.id, job.lease_key, None)
    db.execute("UPDATE jobvisor.batches SET finished_at = now() - interval '2 days'"
               " WHERE finished_at IS NOT NULL")
    assert q.prune_batches(db, 86400) == 1
    assert [r[0] for r in db.execute("SELECT id FROM jobvisor.batches")] == ["open"]


# --- concurrency ---------------------------------------------------------------------------

def test_batch_counts_equal_the_truth_under_many_concurrent_completions(db_dsn, db):
    """Eight connections finish the jobs of three batches every way the queue knows
    (bulk acks, failures, retries, handler transactions that enqueue follow-ups into the
    batch, cancels, operator retries) while a checker compares, snapshot after snapshot,
    each batch's stored counts with its jobs."""
    for b in range(3):
        q.enqueue_batch(db, f"b{b}", [q.NewJob(random.choice(("ta", "tb")), {"gen": 0})
                                      for _ in range(300)])
    stop_checking = threading.Event()
    retried: set[int] = set()
    lock = threading.Lock()
    problems: list[object] = []
    snapshots = 0

    def finish_some(conn: psycopg.Connection, rng: random.Random) -> int:
        jobs = q.lease(conn, rng.choice(("ta", "tb")), rng.randint(1, 12), worker_id="t",
                       lease_seconds=60)
        acks = []
        for job in jobs:
            roll = rng.random()
            if roll < 0.5:
                acks.append((job.id, job.lease_key, None))
            elif roll < 0.6:
                q.fail(conn, job.id, job.lease_key, code="boom", message=None)
            elif roll < 0.75:
                q.retry(conn, job.id, job.lease_key, code="again", message=None, delay=0)
            elif roll < 0.9 and job.payload.get("gen") == 0:
                with conn.transaction():  # as a handler: follow-up first, then completion
                    q.enqueue(conn, q.NewJob("ta", {"gen": 1}, batch_id=job.batch_id))
                    q.complete(conn, job.id, job.lease_key, {"follow_up": True})
            else:
                q.fail(conn, job.id, job.lease_key, code="stop", message=None,
                       status="cancelled")
        q.complete_many(conn, acks)
        if rng.random() < 0.1:  # cancel a queued job, or re-queue a failed one, somewhere
            row = conn.execute("SELECT id, status FROM jobvisor.jobs WHERE status IN "
                               "('queued', 'failed') ORDER BY random() LIMIT 1").fetchone()
            if row and row[1] == "queued":
                q.cancel(conn, row[0])
            elif row:
                with lock:
                    fresh = row[0] not in retried
                    retried.add(row[0])
                if fresh:
                    q.retry_failed(conn, row[0])
        return len(jobs)

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            with psycopg.connect(db_dsn, autocommit=True) as conn:
                while finish_some(conn, rng) or _live(conn):
                    pass
        except Exception as exc:  # noqa: BLE001 - reported by the test below
            problems.append(exc)

    def checker() -> None:
        nonlocal snapshots
        with psycopg.connect(db_dsn, autocommit=True) as conn:
            while not stop_checking.is_set():
                with conn.transaction():
                    conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                    bad = _mismatches(conn)
                if bad:
                    problems.append(bad)
                snapshots += 1

    check = threading.Thread(target=checker)
    check.start()
    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    stop_checking.set()
    check.join(timeout=30)
    assert not problems, problems[:3]
    assert snapshots > 0
    rows = db.execute(TRUTH).fetchall()
    assert len(rows) == 3 and not _mismatches(db)
    assert all(r[5] and r[10] for r in rows)  # every batch finished, as its jobs say
    follow_ups = db.execute("SELECT count(*) FROM jobvisor.jobs WHERE payload->>'gen' = '1'"
                            ).fetchone()[0]
    assert sum(r[1] for r in rows) == 900 + follow_ups


def test_batch_counts_match_when_worker_processes_finish_a_mixed_batch(db, worker_env,
                                                                        tmp_path):
    """Real sub-workers: bulk acknowledgements, handler transactions with follow-ups
    (which join the batch), permanent failures and retries, all at once."""
    jobs = ([q.NewJob("chainy", {}) for _ in range(100)]
            + [q.NewJob("noop", {}) for _ in range(300)]
            + [q.NewJob("fail", {"kind": "permanent"}) for _ in range(20)]
            + [q.NewJob("fail", {"kind": "transient", "times": 1}) for _ in range(20)])
    random.shuffle(jobs)
    q.enqueue_batch(db, "mixed", jobs)
    fast = ("--poll", "0.2", "--backoff", "0.05", "--max-backoff", "0.1")
    procs = [start_worker(worker_env, "noop", "--concurrency", "4", "--prefetch", "8", *fast,
                          log=tmp_path / f"noop{i}.log") for i in range(2)]
    procs += [start_worker(worker_env, "chainy", "--handler", "tests.handlers:chain",
                           "--concurrency", "4", *fast, log=tmp_path / f"chain{i}.log")
              for i in range(2)]
    procs.append(start_worker(worker_env, "fail", "--concurrency", "4", *fast,
                              log=tmp_path / "fail.log"))
    try:
        batch = wait_for(lambda: (b := q.get_batch(db, "mixed"))["finished"] and b,
                         timeout=180, what="the batch to finish")
    finally:
        codes = [stop(p) for p in procs]
    assert codes == [0] * len(procs)
    assert (batch["total"], batch["completed"], batch["failed"], batch["cancelled"]) == (
        540, 520, 20, 0)
    assert not _mismatches(db)


# --- CLI -------------------------------------------------------------------------------------

def _kit():
    """The command kit the CLI hands every command (workers.core.commands)."""
    return build_parser().parse_args(["status"]).kit


def _show(monkeypatch, capsys, db_dsn: str, batch_id: str, **kw) -> tuple[int, str]:
    monkeypatch.setenv("DATABASE_URL", db_dsn)
    monkeypatch.delenv("LEARNING_DATABASE_URL", raising=False)
    args = argparse.Namespace(id=batch_id, json=kw.get("json", True), wait=kw.get("wait", False),
                              timeout=kw.get("timeout", 5.0), kit=_kit())
    code = cli_batches.cmd_batches_show(args)
    return code, capsys.readouterr().out


def test_batches_show_prints_counts_and_hides_the_callback_query(db, db_dsn, monkeypatch,
                                                                  capsys):
    monkeypatch.setenv("JOBVISOR_WEBHOOK_ALLOWED_HOSTS", "hooks.example")
    q.enqueue_batch(db, "shown", [q.NewJob("noop", {}) for _ in range(3)],
                    callback_url="https://hooks.example/done?token=s3cret")
    (job,) = q.lease(db, "noop", 1, worker_id="w", lease_seconds=30)
    q.complete(db, job.id, job.lease_key, None)
    code, out = _show(monkeypatch, capsys, db_dsn, "shown")
    view = json.loads(out)
    assert code == 0
    assert {k: view[k] for k in ("id", "total", "completed", "queued", "leased", "finished")} \
        == {"id": "shown", "total": 3, "completed": 1, "queued": 2, "leased": 0,
            "finished": False}
    assert view["callback_url"] == "https://hooks.example/done"
    assert "s3cret" not in out
    code, out = _show(monkeypatch, capsys, db_dsn, "shown", json=False)
    assert "completed: 1" in out and "not yet" in out and "s3cret" not in out
    with pytest.raises(BadInput, match="no such batch"):
        _show(monkeypatch, capsys, db_dsn, "nope")


def test_batches_show_wait_fails_when_a_job_failed(db, db_dsn, monkeypatch, capsys):
    q.enqueue_batch(db, "w", [q.NewJob("noop", {})])
    (job,) = q.lease(db, "noop", 1, worker_id="w", lease_seconds=30)
    q.fail(db, job.id, job.lease_key, code="boom", message=None)
    with pytest.raises(Failed, match="1 failed"):
        _show(monkeypatch, capsys, db_dsn, "w", wait=True)


def test_progress_bar_draws_in_place_on_a_terminal_and_stays_quiet_elsewhere():
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty = Tty()
    bar = cli_batches.ProgressBar(tty, width=10)
    bar.update(0.5, "5/10 jobs")
    bar.update(1.0, "10/10 jobs")
    bar.close()
    assert tty.getvalue().count("\r") == 2 and tty.getvalue().endswith("\n")
    assert "[#####.....]  50% 5/10 jobs" in tty.getvalue()
    log = io.StringIO()
    bar = cli_batches.ProgressBar(log, width=10)
    for i in range(101):
        bar.update(i / 100, f"{i}/100 jobs")
    bar.close()
    assert log.getvalue() == ""  # a pipe or a log file: the outcome, not the waiting


def test_bar_fraction_does_not_go_back_when_follow_ups_grow_the_total():
    batch = {"total": 2, "done": 1, "running_progress": 0.0, "finished": False, "leased": 0,
             "failed": 0, "cancelled": 0}
    early = cli_batches.batch_fraction(batch, expected_total=6)
    batch |= {"total": 4, "done": 2}
    assert cli_batches.batch_fraction(batch, expected_total=6) > early
    assert cli_batches.batch_label(batch, expected_total=6) == "2/6 jobs"


# --- submit DIR --wait -----------------------------------------------------------------------

def _make_pdf(text: str) -> bytes:
    import pymupdf

    doc = pymupdf.open()
    doc.new_page().insert_text((72, 72), text, fontsize=12)
    return doc.tobytes()


def test_submit_directory_waits_for_the_whole_folder_as_one_batch(db, db_dsn, worker_env,
                                                                   tmp_path, monkeypatch,
                                                                   capsys):
    folder = tmp_path / "hand-ins"
    folder.mkdir()
    for i in range(3):
        (folder / f"essay{i}.pdf").write_bytes(_make_pdf(f"Essay number {i} about trees."))
    (folder / "notes.txt").write_text("not a submission")
    storage = tmp_path / "storage"
    env = {k: v for k, v in worker_env.items() if not k.startswith(("AI_", "OLLAMA_"))}
    env |= {"STORAGE_DIR": str(storage), "AI_BACKEND": "stub"}
    for key in ("STORAGE_DIR", "AI_BACKEND", "DATABASE_URL"):
        monkeypatch.setenv(key, env[key])
    monkeypatch.delenv("LEARNING_DATABASE_URL", raising=False)
    fast = ("--poll", "0.2", "--backoff", "0.1", "--max-backoff", "0.5")
    procs = [start_worker(env, t, *fast, log=tmp_path / f"{t}.log")
             for t in ("pdf", "vision", "feedback")]
    try:
        code = submit_directory(_kit(), folder, owner="alice", wait=True, timeout=120)
    finally:
        codes = [stop(p) for p in procs]
    assert codes == [0, 0, 0]
    out, err = capsys.readouterr()
    lines = out.splitlines()
    batch_id = lines[0]
    summary = [line.split("\t") for line in lines[4:]]
    assert code == 0
    assert sorted(s[1] for s in summary) == ["essay0.pdf", "essay1.pdf", "essay2.pdf"]
    assert all(s[2] == "completed" for s in summary)
    assert "skipped notes.txt" in err and "%" not in err  # no bar: stderr is not a terminal
    batch = q.get_batch(db, batch_id)
    assert (batch["total"], batch["completed"], batch["finished"]) == (9, 9, True)


def test_submit_directory_refuses_a_folder_without_uploads(tmp_path: Path, db_dsn,
                                                            monkeypatch):
    monkeypatch.setenv("DATABASE_URL", db_dsn)
    monkeypatch.setenv("STORAGE_DIR", str(tmp_path / "storage"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadInput, match="no PDF, PNG or JPEG"):
        submit_directory(_kit(), tmp_path / "empty", owner="alice")


def test_jobvisor_submit_with_a_folder_enqueues_one_batch(db, worker_env, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.pdf").write_bytes(_make_pdf("first"))
    (folder / "b.pdf").write_bytes(_make_pdf("second"))
    env = worker_env | {"STORAGE_DIR": str(tmp_path / "storage")}
    proc = subprocess.run([sys.executable, "-m", "supervisor_app", "submit", str(folder),
                           "--owner", "bob"], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    batch_id, *submissions = proc.stdout.splitlines()
    assert [s.split("\t")[1] for s in submissions] == ["a.pdf", "b.pdf"]
    batch = q.get_batch(db, batch_id)
    assert (batch["total"], batch["queued"]) == (2, 2)
    owners = db.execute("SELECT DISTINCT owner_sub FROM learning_submissions").fetchall()
    assert owners == [("bob",)]


def test_the_least_privileged_worker_role_keeps_batches_and_enqueues_webhooks(
        db, db_dsn, monkeypatch):
    """The triggers run as the role that finishes a job: jobvisor_worker's grants must do."""
    import secrets

    from psycopg.conninfo import make_conninfo

    monkeypatch.setenv("JOBVISOR_WEBHOOK_ALLOWED_HOSTS", "hooks.example")
    q.enqueue_batch(db, "least", [q.NewJob("noop", {}, callback_url="https://hooks.example/j")],
                    callback_url="https://hooks.example/b")
    name, password = f"jv_test_{secrets.token_hex(6)}", secrets.token_urlsafe(16)
    db.execute(f"CREATE ROLE {name} LOGIN PASSWORD '{password}' IN ROLE jobvisor_worker")
    try:
        with psycopg.connect(make_conninfo(db_dsn, user=name, password=password),
                             autocommit=True) as worker:
            (job,) = q.lease(worker, "noop", 1, worker_id="w", lease_seconds=30)
            with worker.transaction():  # as a handler: a follow-up into the batch, then done
                q.enqueue(worker, q.NewJob("noop", {}, batch_id="least"))
                assert q.complete(worker, job.id, job.lease_key, None)
            (follow,) = q.lease(worker, "noop", 1, worker_id="w", lease_seconds=30)
            assert q.complete(worker, follow.id, follow.lease_key, None)
    finally:
        db.execute(f"DROP ROLE IF EXISTS {name}")
    batch = q.get_batch(db, "least")
    assert (batch["total"], batch["completed"], batch["finished"]) == (2, 2, True)
    keys = [r[0] for r in db.execute("SELECT idempotency_key FROM jobvisor.jobs"
                                     " WHERE job_type = 'webhook' ORDER BY id")]
    assert keys == [f"webhook:job:{job.id}", "webhook:batch:least"]
