"""`jobvisor batches show ID` and the folder side of `jobvisor submit DIR --wait`.

A batch's totals and counts are kept by the database (sql/004_batches.sql); this module
only reads them, draws a progress bar over them, and submits a folder of uploads as one
batch. cli.py wires the commands in with `cli_batches.register(sub, add)`; cli_learning's
`submit` hands a directory to `submit_directory`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import psycopg

from supervisor_app import database
from supervisor_app.errors import BadInput, Failed
from workers import queue, webhooks

EXIT_OK, EXIT_BAD_INPUT = 0, 2
POLL_S = 0.5
DEFAULT_WAIT = "10m"
# pdf → vision → feedback: the jobs one submission adds to its batch when all goes well.
SUBMISSION_STAGES = 3

Add = Callable[..., argparse.ArgumentParser]


def register(subparsers: Any, add: Add) -> None:
    """Add `batches show` to the jobvisor parser (`add` as in cli.py)."""
    from supervisor_app.cli import _duration

    group = add("batches", lambda _a: EXIT_BAD_INPUT, "inspect batches of jobs", subparsers)
    bsub = group.add_subparsers(dest="batches_command", required=True, metavar="ACTION",
                                parser_class=subparsers._parser_class)
    sp = add("show", cmd_batches_show, "show a batch: total, counts by status, progress, "
             "finished, webhook delivery", bsub)
    sp.add_argument("id", metavar="ID")
    sp.add_argument("--json", action="store_true", help="one JSON object")
    sp.add_argument("--wait", action="store_true",
                    help="first follow the batch with a progress bar on stderr until it "
                         "has finished (exit 1 if a job failed or the wait timed out)")
    sp.add_argument("--timeout", type=_duration, default=_duration(DEFAULT_WAIT),
                    help=f"how long --wait waits (default {DEFAULT_WAIT})")


def check_callback_url(url: str | None) -> str | None:
    """For `enqueue --callback-url`: the URL, or BadInput naming why it is refused."""
    if url is None:
        return None
    try:
        return webhooks.check_url(url)
    except webhooks.WebhookURLError as exc:
        raise BadInput(f"--callback-url: {exc}") from None


def _dsn() -> str:
    dsn = database.resolve_dsn()
    database.check(dsn)
    return dsn


# --- batches show ------------------------------------------------------------------------------

def cmd_batches_show(args: argparse.Namespace) -> int:
    with psycopg.connect(_dsn(), autocommit=True) as conn:
        batch = queue.get_batch(conn, args.id)
        if batch is None:
            raise BadInput(f"batch {args.id!r}: no such batch")
        if args.wait:
            batch = wait_for_batch(conn, args.id, timeout=args.timeout)
    view = batch_view(batch)
    if args.json:
        print(json.dumps(view, sort_keys=True, default=str))
    else:
        _print_batch(view)
    if args.wait and (batch["failed"] or batch["cancelled"]):
        raise Failed(f"batch {args.id}: {batch['failed']} failed, {batch['cancelled']} "
                     f"cancelled of {batch['total']} jobs")
    return EXIT_OK


def batch_view(batch: dict[str, Any]) -> dict[str, Any]:
    """What `batches show` prints: timestamps as text, and the callback URL without its
    query string (it may carry the receiver's token)."""
    view = queue.jsonable({k: v for k, v in batch.items() if k != "running_progress"})
    if view.get("callback_url"):
        view["callback_url"] = webhooks.redact(view["callback_url"])
    return view


def _print_batch(view: dict[str, Any]) -> None:
    rows: list[tuple[str, Any]] = [
        ("id", view["id"]), ("total", view["total"]), ("completed", view["completed"]),
        ("failed", view["failed"]), ("cancelled", view["cancelled"]),
        ("queued", view["queued"]), ("leased", view["leased"]),
        ("progress", f"{view['progress']:.0%}"), ("finished", "yes" if view["finished"] else "no"),
        ("created_at", view["created_at"]), ("finished_at", view["finished_at"]),
        ("callback_url", view["callback_url"]),
    ]
    hook = view.get("webhook")
    if hook:
        detail = f"{hook['status']} (attempt {hook['attempts']}/{hook['max_attempts']}"
        detail += f", {hook['error_code']})" if hook["error_code"] else ")"
        rows.append(("webhook", f"{detail}, job {hook['job_id']}"))
    elif view["callback_url"]:
        rows.append(("webhook", "not yet (fires once the batch has finished)"))
    for key, value in rows:
        if value is not None:
            print(f"{key:>16}: {value}")


# --- progress ------------------------------------------------------------------------------------

def render_bar(fraction: float, width: int = 30) -> str:
    """`[#########.....]  60%`: a text bar for a fraction in [0, 1]."""
    fraction = min(1.0, max(0.0, fraction))
    filled = int(round(fraction * width))
    return f"[{'#' * filled}{'.' * (width - filled)}] {fraction:4.0%}"


class ProgressBar:
    """One bar redrawn in place on a terminal; on a pipe or log file, a line at every
    tenth and at the end, so logs stay short."""

    def __init__(self, stream: TextIO | None = None, width: int = 30) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last_len = 0
        self._last_step = -1
        self._last_line = ""

    def update(self, fraction: float, label: str = "") -> None:
        line = f"{render_bar(fraction, self.width)} {label}".rstrip()
        if self.tty:
            self.stream.write("\r" + line.ljust(self._last_len))
            self._last_len = len(line)
        else:
            step = int(min(1.0, max(0.0, fraction)) * 10)
            if step == self._last_step or line == self._last_line:
                return
            self._last_step = step
            self.stream.write(line + "\n")
        self._last_line = line
        self.stream.flush()

    def close(self) -> None:
        if self.tty and self._last_len:
            self.stream.write("\n")
            self.stream.flush()
            self._last_len = 0


def batch_fraction(batch: dict[str, Any], expected_total: int | None = None) -> float:
    """Finished jobs plus running jobs' reported progress, over the total.

    `expected_total` covers batches whose jobs enqueue follow-ups into them (a submission
    grows from 1 job to 3): the bar then doesn't jump back as the total grows.
    """
    if batch["finished"]:
        return 1.0
    denominator = max(batch["total"], expected_total or 0)
    if not denominator:
        return 0.0
    return min(1.0, (batch["done"] + batch.get("running_progress", 0.0)) / denominator)


def batch_label(batch: dict[str, Any], expected_total: int | None = None) -> str:
    denominator = batch["total"] if batch["finished"] else max(batch["total"],
                                                                expected_total or 0)
    parts = [f"{batch['done']}/{denominator} jobs"]
    if batch["leased"]:
        parts.append(f"{batch['leased']} running")
    if batch["failed"]:
        parts.append(f"{batch['failed']} failed")
    if batch["cancelled"]:
        parts.append(f"{batch['cancelled']} cancelled")
    return ", ".join(parts)


def wait_for_batch(conn: psycopg.Connection, batch_id: str, *, timeout: float,
                   expected_total: int | None = None, bar: ProgressBar | None = None,
                   poll: float = POLL_S) -> dict[str, Any]:
    """Poll the batch, drawing the bar, until it has finished; Failed on timeout."""
    bar = bar or ProgressBar()
    deadline = time.monotonic() + timeout
    try:
        while True:
            batch = queue.get_batch(conn, batch_id)
            if batch is None:
                raise Failed(f"batch {batch_id} no longer exists")
            bar.update(batch_fraction(batch, expected_total), batch_label(batch, expected_total))
            if batch["finished"]:
                return batch
            if time.monotonic() >= deadline:
                raise Failed(f"batch {batch_id}: {batch['done']} of {batch['total']} jobs "
                             f"finished after {timeout:g}s")
            time.sleep(poll)
    finally:
        bar.close()


# --- submit DIR ----------------------------------------------------------------------------------

def submit_directory(directory: Path, *, owner: str | None = None,
                     criteria: str | None = None, wait: bool = False,
                     timeout: float = 600.0) -> int:
    """Submit every PDF, PNG and JPEG directly in `directory` as one batch.

    Prints the batch id, then `<submission id>\\t<file name>` per file. All submissions
    and their pdf jobs are inserted in one transaction, so the batch starts complete.
    With `wait`, draws a progress bar over the batch on stderr and, once it finished,
    prints `<submission id>\\t<file name>\\t<status>[\\t<error code>]` per file; exit 1
    when a submission did not complete or the wait timed out.
    """
    from supervisor_app import cli_learning as learning
    from workers.storage import storage_from_env

    if not directory.is_dir():
        raise BadInput(f"{directory}: not a directory")
    crit = learning._criteria(Path(criteria)) if criteria else []
    owner = owner or learning._default_owner()
    if not owner.strip():
        raise BadInput("--owner must not be empty")
    candidates = sorted(p for p in directory.iterdir()
                        if p.is_file() and not p.name.startswith("."))
    dsn = _dsn()
    storage = storage_from_env()
    batch_id = f"submit-{uuid.uuid4()}"
    submitted: list[tuple[str, str, str, str]] = []  # (submission id, file name, key, mime)
    try:
        for path in candidates:
            # One file in memory at a time: a folder may hold many large scans.
            try:
                data = path.read_bytes()
                mime, suffix = learning._sniff(data, path)
            except (OSError, BadInput) as exc:
                reason = exc.strerror if isinstance(exc, OSError) else str(exc)
                print(f"skipped {path.name}: {reason}", file=sys.stderr)
                continue
            submission_id = str(uuid.uuid4())
            key = f"submissions/{submission_id}/source{suffix}"
            # Stored first: a pdf job may start the moment the transaction commits.
            storage.write(key, data)
            submitted.append((submission_id, path.name, key, mime))
        if not submitted:
            raise BadInput(f"{directory}: no PDF, PNG or JPEG files in it")
        _insert_batch(dsn, batch_id, owner, submitted, crit)
    except BaseException:
        for submission_id, *_rest in submitted:
            storage.delete_prefix(f"submissions/{submission_id}/")
        raise
    print(batch_id)
    for submission_id, name, _key, _mime in submitted:
        print(f"{submission_id}\t{name}")
    sys.stdout.flush()
    print(f"batch {batch_id}: {len(submitted)} submission(s)", file=sys.stderr)
    if not wait:
        return EXIT_OK
    return _wait_submissions(dsn, batch_id, owner, submitted, timeout)


# The same row cli_learning._insert writes for one file, here for many in one transaction.
_INSERT_SUBMISSION = (
    "INSERT INTO public.learning_submissions (id, owner_sub, source_key, mime_type, criteria)"
    " VALUES (%s, %s, %s, %s, %s)"
)


def _insert_batch(dsn: str, batch_id: str, owner: str,
                  submitted: list[tuple[str, str, str, str]], criteria: list[str]) -> None:
    """The submissions, the batch and its pdf jobs: all or nothing."""
    from psycopg.types.json import Jsonb

    from supervisor_app import cli_learning as learning

    max_attempts = learning._max_attempts("pdf")
    jobs = [queue.NewJob("pdf", {"submission_id": sid, "owner_sub": owner},
                         key=f"pdf:{sid}", max_attempts=max_attempts)
            for sid, _name, _key, _mime in submitted]
    with psycopg.connect(dsn) as conn, learning._domain_errors(), conn.transaction():
        # The policy's WITH CHECK holds every role but a superuser to this subject.
        conn.execute("SELECT set_config('app.current_sub', %s, true)", (owner,))
        with conn.cursor() as cur:
            cur.executemany(_INSERT_SUBMISSION, [
                (sid, owner, key, mime, Jsonb(criteria)) for sid, _name, key, mime in submitted])
        queue.enqueue_batch(conn, batch_id, jobs)


def _wait_submissions(dsn: str, batch_id: str, owner: str,
                      submitted: list[tuple[str, str, str, str]], timeout: float) -> int:
    from supervisor_app import cli_learning as learning

    with psycopg.connect(dsn, autocommit=True) as conn:
        wait_for_batch(conn, batch_id, timeout=timeout,
                       expected_total=SUBMISSION_STAGES * len(submitted))
        outcomes = [(sid, name, learning._read(conn, sid, owner))
                    for sid, name, _key, _mime in submitted]
    not_completed = 0
    for sid, name, row in outcomes:
        status = row["analysis_status"] if row else "missing"
        code = (row or {}).get("error_code")
        print(f"{sid}\t{name}\t{status}" + (f"\t{code}" if code else ""))
        not_completed += status != "completed"
    if not_completed:
        raise Failed(f"batch {batch_id}: {not_completed} of {len(outcomes)} submissions did "
                     "not complete (`jobvisor submissions show ID` says why)")
    return EXIT_OK
