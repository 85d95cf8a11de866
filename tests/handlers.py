"""Handlers used by tests through `--handler tests.handlers:NAME`.

`record` writes one row per run into `effects` in the job's own transaction, so a test
counts committed side effects: fencing must keep a lost lease's row out.
"""

from __future__ import annotations

import time

from workers import Job, JobContext


def record(job: Job, ctx: JobContext) -> dict:
    payload = job.payload if isinstance(job.payload, dict) else {}
    seconds = float(payload.get("seconds", 0))
    if payload.get("ignore_cancel"):
        time.sleep(seconds)
    elif seconds:
        ctx.sleep(seconds)
    ctx.db.execute(
        "INSERT INTO effects (job_id, attempt, pid) VALUES (%s, %s, pg_backend_pid())",
        (job.id, job.attempt),
    )
    return {"attempt": job.attempt}


EFFECTS_DDL = """
CREATE TABLE IF NOT EXISTS effects (
    job_id bigint NOT NULL, attempt int NOT NULL, pid int, at timestamptz DEFAULT now())
"""


def chain(job: Job, ctx: JobContext) -> dict:
    """Enqueue a follow-up in the job's transaction, then fail if asked to."""
    follow = ctx.enqueue("noop", {"parent": job.id})
    if (job.payload or {}).get("fail_after_enqueue"):
        raise RuntimeError("boom after enqueue")
    return {"follow_up": follow}
