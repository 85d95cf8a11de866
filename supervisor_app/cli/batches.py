"""`jobvisor batches show ID`, and the batch progress bar other commands follow a batch
with (the kit's `wait_for_batch`: the learning plug-in's `submit DIR --wait`).

A batch's totals and counts are kept by the database (sql/004_batches.sql); this module
only reads them and draws a progress bar over them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, TextIO

import psycopg

from workers.core import queue, webhooks
from workers.core.commands import EXIT_OK, BadInput, CommandKit, Failed

POLL_S = 0.5
DEFAULT_WAIT = "10m"


def register(sub: Any, kit: CommandKit) -> None:
    bsub = kit.group("batches", "inspect batches of jobs", sub, "batches_command")
    sp = kit.add("show", cmd_batches_show, "show a batch: total, counts by status, progress, "
                 "finished, webhook delivery", bsub)
    sp.add_argument("id", metavar="ID")
    sp.add_argument("--json", action="store_true", help="one JSON object")
    sp.add_argument("--wait", action="store_true",
                    help="first follow the batch with a progress bar on stderr until it "
                         "has finished (exit 1 if a job failed or the wait timed out)")
    sp.add_argument("--timeout", type=kit.duration, default=kit.duration(DEFAULT_WAIT),
                    help=f"how long --wait waits (default {DEFAULT_WAIT})")


def check_callback_url(url: str | None) -> str | None:
    """For `enqueue --callback-url`: the URL, or BadInput naming why it is refused."""
    if url is None:
        return None
    try:
        return webhooks.check_url(url)
    except webhooks.WebhookURLError as exc:
        raise BadInput(f"--callback-url: {exc}") from None


# --- batches show ------------------------------------------------------------------------------

def cmd_batches_show(args: argparse.Namespace) -> int:
    with psycopg.connect(args.kit.dsn("owner"), autocommit=True) as conn:
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
    """One bar redrawn in place where a person watches (a terminal); on a pipe or a log
    file nothing at all: a script reads the outcome, not the waiting."""

    def __init__(self, stream: TextIO | None = None, width: int = 30) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last_len = 0
        self._last_line = ""

    def update(self, fraction: float, label: str = "") -> None:
        if not self.tty:
            return
        line = f"{render_bar(fraction, self.width)} {label}".rstrip()
        if line == self._last_line:
            return
        self.stream.write("\r" + line.ljust(self._last_len))
        self._last_len = len(line)
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
