"""A handler for the fair-share tests (`--handler tests.handlers_fair:started`).

Each run notes when it started (the database's clock, read in a short transaction before
its work) and how many jobs of its key were leased at that moment, sleeps `seconds`
(payload), then records both in `fair_starts` with its completion.
"""

from __future__ import annotations

from workers import Job, JobContext

STARTS_DDL = """
CREATE TABLE IF NOT EXISTS fair_starts (
    job_id bigint PRIMARY KEY, owner text, started_at timestamptz NOT NULL,
    same_key_leased int NOT NULL)
"""


def started(job: Job, ctx: JobContext) -> dict:
    payload = job.payload if isinstance(job.payload, dict) else {}
    with ctx.read() as conn:
        at, leased = conn.execute(
            "SELECT clock_timestamp(), (SELECT count(*) FROM jobvisor.jobs l"
            "  WHERE l.job_type = j.job_type AND l.fair_key = j.fair_key"
            "    AND l.status = 'leased')"
            " FROM jobvisor.jobs j WHERE j.id = %s", (job.id,)).fetchone()
    ctx.sleep(float(payload.get("seconds", 0)))
    ctx.db.execute("INSERT INTO fair_starts (job_id, owner, started_at, same_key_leased)"
                   " VALUES (%s, %s, %s, %s)", (job.id, payload.get("owner"), at, leased))
    return {"started_at": at.isoformat()}
