"""The `backup` job type: one `pg_dump` of the database into BACKUP_DIR, per job.

Jobs come from the supervisor's cron schedule (`types.backup.schedule`, one sticky
idempotency key per slot) or from `jobvisor backup`. The engine in `workers.backup`
does the work, applies retention after every attempt and writes the manifest; this
wrapper only reads the settings, passes cancellation and progress through, and turns
the outcome into the job's result or error. See docs/backups.md.
"""

from __future__ import annotations

import logging
from typing import Any

from workers import Job, JobContext, PermanentError
from workers.backup import (
    BACKUP_CONFIG_INVALID,
    BackupConfigError,
    BackupSettings,
    run_backup_or_raise,
)

log = logging.getLogger("jobvisor.backup")

# Progress has no known total (a custom-format dump is compressed, its final size is
# unknown up front), so the fraction marks the phase and the note carries the bytes.
DUMPING = 0.1


def handle(job: Job, ctx: JobContext) -> dict[str, Any]:
    """Dump the database; the result is the run's manifest plus the dump's path.

    Errors: `PermanentError` for tool missing, version mismatch and bad settings,
    `TransientError` for everything that may pass next time, `Cancelled` when the job
    was asked to stop (the runtime puts it back on shutdown). The dump runs on its own
    connections, outside this job's transaction: `ctx.db` is never opened.
    """
    try:
        # BACKUP_DATABASE_URL, else DATABASE_URL (the supervisor always sets it for its
        # children). No further fallback on purpose: LEARNING_DATABASE_URL is the worker's
        # least-privilege role, which row-level security keeps from seeing every row.
        settings = BackupSettings.from_env()
    except BackupConfigError as exc:
        # The message names the variable, never its value.
        raise PermanentError(BACKUP_CONFIG_INVALID, str(exc)) from None

    trigger = job.payload.get("scheduled_for") if isinstance(job.payload, dict) else None
    log.info("backup_job_started", extra={"job_id": job.id, "attempt": job.attempt,
                                          "scheduled_for": trigger})
    ctx.progress(0.0, "starting")

    def on_progress(written: int) -> None:
        ctx.progress(DUMPING, f"pg_dump: {_size(written)} written")

    manifest = run_backup_or_raise(
        settings, should_stop=lambda: ctx.cancelled, progress=on_progress
    )
    result = manifest.to_dict()
    # Where the dump lies on the worker's host, for `jobvisor backup --wait` and scripts.
    result["path"] = str(manifest.dump_path) if manifest.dump_path else None
    return result


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB"):
        if value < 1024:
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"
