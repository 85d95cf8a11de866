"""`jobvisor backup [--wait]` and `jobvisor backups list [--json]`.

`backup` enqueues one `backup` job now (a sub-worker of a running supervisor does the
dump) and prints its id; with `--wait` it follows the job and prints one line with
the dump's file, size and SHA-256, or exits 1 naming the error code. `backups list`
reads the manifests under BACKUP_DIR on this host; it needs no database.

The backup plug-in's `commands` (workers/backup/plugin.py): the CLI calls `register`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import psycopg

from workers.backup import backup_dir_from_env, list_backups
from workers.core import queue
from workers.core.commands import EXIT_OK, CommandKit, Failed

JOB_TYPE = "backup"
DEFAULT_MAX_ATTEMPTS = 3  # the shipped config's, for a config without a backup type
DEFAULT_WAIT = "1h"  # several attempts of a BACKUP_TIMEOUT (5 min) each, with backoff
POLL_S = 0.5


def register(subparsers: Any, kit: CommandKit) -> None:
    """The plug-in's commands: `backup` and `backups list` (Plugin.commands)."""
    add, _duration = kit.add, kit.duration
    sp = add("backup", cmd_backup, "enqueue a database backup now (run by the `backup` "
             "workers of a running supervisor); prints the job id", subparsers)
    sp.add_argument("--wait", action="store_true",
                    help="wait for the job and print the dump's file, size and SHA-256; "
                         "exit 1 if it fails or the wait times out")
    sp.add_argument("--timeout", type=_duration, default=_duration(DEFAULT_WAIT),
                    metavar="SECONDS",
                    help=f"how long --wait waits, e.g. 600 or 30m (default {DEFAULT_WAIT})")

    bsub = kit.group("backups", "inspect backups in BACKUP_DIR", subparsers, "backups_command")
    sp = add("list", cmd_list, "list backup runs (manifests), newest first; reads "
             "BACKUP_DIR (default ./.jobvisor/backups)", bsub)
    sp.add_argument("--json", action="store_true", help="one JSON array of manifests")


# --- backup ------------------------------------------------------------------------------


def cmd_backup(args: argparse.Namespace) -> int:
    job = queue.NewJob(JOB_TYPE, {"trigger": "cli"},
                       max_attempts=args.kit.max_attempts(JOB_TYPE, DEFAULT_MAX_ATTEMPTS))
    with psycopg.connect(args.kit.dsn("owner"), autocommit=True) as conn:
        # No idempotency key: an operator asking for a backup now (say, after a
        # migration) wants a fresh dump, not the one a running job started earlier.
        job_id = queue.enqueue(conn, job)
        print(job_id, flush=True)
        if not args.wait:
            return EXIT_OK
        row = _wait(conn, job_id, args.timeout)
    print(_outcome(job_id, row.get("result") or {}))
    return EXIT_OK


def _wait(conn: psycopg.Connection, job_id: int, timeout: float) -> dict[str, Any]:
    """Poll until the job finished; the completed row, else Failed (exit 1).

    Failed attempts that will be retried and progress notes go to stderr, so stdout
    stays the job id and the outcome line.
    """
    deadline = time.monotonic() + timeout
    reported_attempt = 0
    last_note: str | None = None
    while True:
        row = queue.get_job(conn, job_id)
        if row is None:
            raise Failed(f"backup job {job_id} disappeared (pruned or deleted)")
        status = row["status"]
        if status == "completed":
            return row
        if status == "failed":
            raise Failed(f"backup job {job_id} failed after {row['attempts']} of "
                         f"{row['max_attempts']} attempts: {_error(row)}")
        if status == "cancelled":
            raise Failed(f"backup job {job_id} was cancelled")
        # The last failure's code stays on the row while the next attempt runs, so a
        # retry is noticed even when the poll misses the short `queued` spell between.
        failed_attempts = row["attempts"] - (1 if status == "leased" else 0)
        if row["error_code"] and failed_attempts > reported_attempt:
            reported_attempt = failed_attempts
            _say(f"backup job {job_id}: attempt {failed_attempts} of "
                 f"{row['max_attempts']} failed ({_error(row)}), retrying")
        # Progress is for a person watching; on a pipe, stderr keeps to the failures above.
        note = row["progress_note"] if status == "leased" and sys.stderr.isatty() else None
        if note and note != last_note:
            _say(f"backup job {job_id}: {note}")
            last_note = note
        if time.monotonic() >= deadline:
            hint = " (is a supervisor with a `backup` worker running?)" if status == "queued" else ""
            raise Failed(f"backup job {job_id}: still {status} after {timeout:g}s{hint}; "
                         "the job stays in the queue")
        time.sleep(POLL_S)


def _error(row: dict[str, Any]) -> str:
    code = row["error_code"] or "unknown_error"
    # The message is the engine's sanitized sentence: no hosts, users or passwords.
    return f"{code}: {row['error_message']}" if row["error_message"] else code


def _outcome(job_id: int, result: dict[str, Any]) -> str:
    where = result.get("path") or f"{result.get('run_id')}/{result.get('file')}"
    return (f"backup job {job_id} succeeded: {where}, {result.get('bytes')} bytes, "
            f"sha256 {result.get('sha256')}")


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# --- backups list --------------------------------------------------------------------------


def cmd_list(args: argparse.Namespace) -> int:
    backup_dir = backup_dir_from_env()
    manifests = list_backups(backup_dir)
    if args.json:
        rows = [dict(m.to_dict(), directory=str(m.directory)) for m in manifests]
        print(json.dumps(rows, indent=2, sort_keys=True))
        return EXIT_OK
    if not manifests:
        _say(f"no backups in {backup_dir}")
        return EXIT_OK
    print(f"{'run':<31}{'status':<11}{'size':>11}{'duration':>10}  error")
    for m in manifests:
        size = _size(m.bytes) if m.bytes is not None else "-"
        duration = f"{m.duration_s:.1f}s" if m.duration_s is not None else "-"
        print(f"{m.run_id:<31}{m.status:<11}{size:>11}{duration:>10}  {m.error_code or ''}"
              .rstrip())
    return EXIT_OK


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"
