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


def crash(job: Job, ctx: JobContext) -> dict:
    """`{"crash": "segv" | "exit", "after": s}` takes the whole process down after `after`
    seconds; `{"seconds": s}` sleeps like `record` and records its effect."""
    payload = job.payload if isinstance(job.payload, dict) else {}
    how = payload.get("crash")
    if how:
        time.sleep(float(payload.get("after", 0)))
        if how == "segv":
            import ctypes

            ctypes.string_at(0)  # SIGSEGV: the interpreter dies on the spot
        import os

        os._exit(1)
    return record(job, ctx)


def hog(job: Job, ctx: JobContext) -> dict:
    """Hold `mib` MiB of written memory, then wait (cancellable) for `seconds`. With
    `"dir"`, only the first run waits `seconds`: it leaves `<dir>/<job id>` behind, and a
    later run of the same job waits `then_seconds` (default 0)."""
    from pathlib import Path

    payload = job.payload if isinstance(job.payload, dict) else {}
    block = b"x" * (int(payload.get("mib", 300)) << 20)
    seconds = float(payload.get("seconds", 60))
    if payload.get("dir"):
        mark = Path(payload["dir"]) / str(job.id)
        if mark.exists():
            seconds = float(payload.get("then_seconds", 0))
        mark.touch()
    ctx.sleep(seconds)
    return {"held": len(block)}


def bad_result(job: Job, ctx: JobContext) -> object:
    """Return what the payload names: a result jsonb can't hold, or a fine one."""
    kind = (job.payload or {}).get("kind")
    return {"nan": float("nan"), "inf": {"x": float("inf")}, "nul": "a\u0000b",
            "surrogate": ["\ud800"]}.get(kind, {"ok": job.id})


def boom(job: Job, ctx: JobContext) -> None:
    """An unexpected exception whose text carries payload content."""
    return {}[(job.payload or {}).get("text", "")]


def db_then_sleep(job: Job, ctx: JobContext) -> dict:
    """Sleep (cancellable), then write an effect through the completing transaction, or
    with `{"no_db": true}` touch no connection at all."""
    payload = job.payload if isinstance(job.payload, dict) else {}
    ctx.sleep(float(payload.get("seconds", 0)))
    if not payload.get("no_db"):
        ctx.db.execute(
            "INSERT INTO effects (job_id, attempt, pid) VALUES (%s, %s, pg_backend_pid())",
            (job.id, job.attempt))
    return {"attempt": job.attempt}


def marked_sleep(job: Job, ctx: JobContext) -> dict:
    """Touch `<dir>/<job id>` when started (so a test knows the job runs), then sleep."""
    from pathlib import Path

    payload = job.payload if isinstance(job.payload, dict) else {}
    (Path(payload["dir"]) / str(job.id)).touch()
    ctx.sleep(float(payload.get("seconds", 0)))
    return {"slept": payload.get("seconds", 0)}


def whoami(job: Job, ctx: JobContext) -> dict:
    """The database role this job's transactions run as, and what it may see: how many
    learning submissions are visible under the payload's subject (None: not allowed)."""
    import psycopg

    with ctx.read() as conn:
        (user,) = conn.execute("SELECT current_user").fetchone()
    visible = None
    with ctx.read() as conn:
        try:
            conn.execute("SELECT set_config('app.current_sub', %s, true)",
                         ((job.payload or {}).get("as", ""),))
            (visible,) = conn.execute(
                "SELECT count(*) FROM public.learning_submissions").fetchone()
        except psycopg.errors.InsufficientPrivilege:
            visible = None
    return {"user": user, "visible": visible}


def progress_note(job: Job, ctx: JobContext) -> dict:
    """Report progress with the payload's `note` (default: text with a NUL, which
    PostgreSQL refuses), wait until the runtime's loop has taken it to store, then return.
    The wait is bounded; `taken` says whether the loop took it."""
    payload = job.payload if isinstance(job.payload, dict) else {}
    ctx.progress(0.5, payload.get("note", "a\u0000b"))
    deadline = time.monotonic() + 60
    # The loop takes a note (clearing the mark) and stores it in one step of its own.
    while ctx._progress_dirty and time.monotonic() < deadline:
        ctx.sleep(0.02)
    return {"taken": not ctx._progress_dirty}


def model_call(job: Job, ctx: JobContext) -> dict:
    """One `/api/chat` request to payload["base_url"] through the real client (and so
    through the model gate)."""
    from workers.learning.ai import ollama

    text = ollama.chat(job.payload["base_url"], job.payload["model"],
                       [{"role": "user", "content": f"job {job.id}"}], timeout=(5.0, 60.0))
    return {"chars": len(text)}
