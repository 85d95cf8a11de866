"""A bad job hurts only itself: a child that crashes or outgrows its memory limit while
holding several jobs charges only the job that did it. Real `jobvisor run`, real
children, real signals (SIGSEGV, os._exit, SIGUSR1 recycling), real PostgreSQL."""

from __future__ import annotations

import pytest

from tests.handlers import EFFECTS_DDL
from tests.helpers import wait_for
from tests.supervisor_harness import Supervisor, base_config, free_port
from workers.core import queue as q

SMALL = {"memory_per_job": "1MiB"}


@pytest.mark.parametrize("how", ["segv", "exit"])
def test_a_crashing_job_fails_alone_and_the_jobs_beside_it_complete_unharmed(
        db, worker_env, tmp_path, how):
    db.execute(EFFECTS_DDL)
    cfg = base_config(free_port(), {"crashy": {
        "handler": "tests.handlers:crash", **SMALL, "concurrency": 4,
        "processes": {"min": 1, "max": 1}, "retry": {"max_attempts": 3}}})
    sup = Supervisor(tmp_path, worker_env, cfg).start()
    try:
        wait_for(lambda: sup.pids(db, "crashy", "starting") or sup.pids(db, "crashy"),
                 what="child up")
        jobs = [q.NewJob("crashy", {"seconds": 2}, max_attempts=3) for _ in range(3)]
        jobs.insert(1, q.NewJob("crashy", {"crash": how, "after": 0.5}, max_attempts=3))
        innocent_a, culprit, innocent_b, innocent_c = q.enqueue_many(db, jobs)
        innocents = (innocent_a, innocent_b, innocent_c)
        wait_for(lambda: sup.events("leases_rescued"), what="first crash")
        first = sup.events("leases_rescued")[0]
        assert sorted(first["jobs"]) == sorted([culprit, *innocents]) and not first["charged"]
        # The type keeps serving new work throughout.
        later = q.enqueue(db, q.NewJob("crashy", {}, max_attempts=3))
        wait_for(lambda: q.get_job(db, culprit)["status"] == "failed"
                 and all(q.get_job(db, i)["status"] == "completed" for i in (*innocents, later)),
                 timeout=120, what="culprit failed, the others completed")
        bad = q.get_job(db, culprit)
        assert bad["error_code"] == "worker_died" and bad["attempts"] == 3
        for i in innocents:
            row = q.get_job(db, i)
            assert row["attempts"] == 1, row  # the crash beside them was not charged
            assert [e["code"] for e in row["errors"]] == ["worker_died"]
        effects = sorted(r[0] for r in db.execute("SELECT job_id FROM effects").fetchall())
        assert effects == sorted([*innocents, later])  # each ran to its commit once
        assert not sup.events("child_fatal")
        assert [r["charged"] for r in sup.events("leases_rescued")][1:] == \
            [[culprit]] * 3  # alone, three times: its three attempts
    finally:
        assert sup.stop() == 0


def test_a_job_that_outgrows_the_memory_limit_is_charged_and_fails_after_its_attempts(
        db, worker_env, tmp_path):
    cfg = base_config(free_port(), {"hog": {
        "handler": "tests.handlers:hog", **SMALL, "memory_limit": "150MiB",
        "processes": {"min": 1, "max": 1}, "retry": {"max_attempts": 2, "backoff": "0.1s"}}},
        grace="1s")
    sup = Supervisor(tmp_path, worker_env, cfg).start()
    try:
        job_id = q.enqueue(db, q.NewJob("hog", {"mib": 300, "seconds": 120}, max_attempts=2))
        wait_for(lambda: q.get_job(db, job_id)["status"] == "failed", timeout=120,
                 what="the hog failing")
        row = q.get_job(db, job_id)
        assert row["error_code"] == "hog_memory_exceeded" and row["attempts"] == 2
        assert [e["code"] for e in row["errors"]] == ["hog_memory_exceeded"] * 2
        assert len(sup.events("child_recycled")) >= 2
        # A job that stays in bounds is served by the recycled type as usual.
        small = q.enqueue(db, q.NewJob("hog", {"mib": 1, "seconds": 0}))
        wait_for(lambda: q.get_job(db, small)["status"] == "completed", what="small job")
    finally:
        assert sup.stop() == 0


def test_jobs_running_together_when_memory_runs_over_go_back_uncounted_as_suspects(
        db, worker_env, tmp_path):
    cfg = base_config(free_port(), {"hog": {
        "handler": "tests.handlers:hog", **SMALL, "memory_limit": "150MiB", "concurrency": 2,
        "processes": {"min": 1, "max": 1}, "retry": {"max_attempts": 2, "backoff": "0.1s"}}},
        grace="1s")
    sup = Supervisor(tmp_path, worker_env, cfg).start()
    try:
        wait_for(lambda: sup.pids(db, "hog"), what="child running")
        hog_id, quiet_id = q.enqueue_many(db, [
            q.NewJob("hog", {"mib": 300, "seconds": 120}, max_attempts=2),
            # The quiet job's first run lasts until the recycle stops it (so it is surely
            # running beside the hog then); its rerun is quick.
            q.NewJob("hog", {"mib": 1, "seconds": 300, "dir": str(tmp_path)}, max_attempts=2)])
        wait_for(lambda: q.get_job(db, hog_id)["status"] == "failed"
                 and q.get_job(db, quiet_id)["status"] == "completed", timeout=180,
                 what="hog failed, quiet one completed")
        quiet = q.get_job(db, quiet_id)
        assert quiet["attempts"] == 1 and quiet["suspect"]
        hog = q.get_job(db, hog_id)
        assert hog["error_code"] == "hog_memory_exceeded" and hog["attempts"] == 2
    finally:
        assert sup.stop() == 0
