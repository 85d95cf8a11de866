"""`jobvisor enqueue`, `jobvisor status` and `jobvisor jobs show|retry|cancel`."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg

from supervisor_app.cli.batches import check_callback_url
from supervisor_app.cli.common import (
    check_type,
    connect,
    json_payload,
    known_types,
    max_attempts,
)
from workers.core import queue
from workers.core.commands import EXIT_OK, BadInput, CommandKit, Failed

ENQUEUE_CHUNK = 5000
MAX_DELAY = 3650 * 86400.0  # 10 years: far past any real schedule, well within timestamptz


def register(sub: Any, kit: CommandKit) -> None:
    add = kit.add
    sp = add("enqueue", cmd_enqueue, "enqueue one job (--payload) or many (--file, JSON lines)", sub)
    sp.add_argument("job_type", metavar="TYPE")
    sp.add_argument("--payload", help="the job's JSON payload")
    sp.add_argument("--file", help="JSON lines, one payload per line ('-' for stdin)")
    sp.add_argument("--priority", type=int, default=0, help="higher runs first (default 0)")
    sp.add_argument("--delay", type=kit.duration, default=0.0,
                    help="run after this delay (e.g. 30s)")
    sp.add_argument("--key", help="idempotency key: a live job with it is returned instead")
    sp.add_argument("--max-attempts", type=int, help="attempts before failing (default: type's)")
    sp.add_argument("--batch", help="batch id for all jobs")
    sp.add_argument("--callback-url", metavar="URL",
                    help="POST a signed notification here when the job finishes (with "
                         "--batch: once, when the whole batch has); see docs/webhooks.md")

    sp = add("status", cmd_status, "queue counts per type, plus workers and plan of a "
             "running supervisor", sub)
    sp.add_argument("--json", action="store_true", help="one JSON object")

    jsub = kit.group("jobs", "inspect and act on one job", sub, "jobs_command")
    sp = add("show", cmd_jobs_show, "show a job", jsub)
    sp.add_argument("id", type=int)
    sp.add_argument("--json", action="store_true")
    sp = add("retry", cmd_jobs_retry, "queue a failed or cancelled job again", jsub)
    sp.add_argument("id", type=int)
    sp = add("cancel", cmd_jobs_cancel, "cancel a queued job or ask a running one to stop", jsub)
    sp.add_argument("id", type=int)


def _payloads_from_file(path: Path) -> Iterator[Any]:
    """Each non-blank line's payload; BadInput naming the file and line of the first bad
    one (not UTF-8, not JSON, or not storable as jsonb)."""
    try:
        handle = sys.stdin.buffer if str(path) == "-" else path.open("rb")
    except OSError as exc:
        raise BadInput(f"{path}: {exc.strerror}") from exc
    with handle:
        for lineno, raw in enumerate(handle, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise BadInput(f"{path}:{lineno}: not UTF-8 text (invalid byte at column "
                               f"{exc.start + 1}); convert the file to UTF-8") from None
            if line.strip():
                yield json_payload(line, f"{path}:{lineno}")


def _in_range(option: str, value: int | float | None, low: float, high: float,
              shown: str) -> None:
    if value is not None and not low <= value <= high:
        raise BadInput(f"{option}: must be within {shown}, got {value}")


def _check_text(option: str, value: str | None) -> None:
    # Bytes that aren't UTF-8 reach argv as lone surrogates (surrogateescape).
    if value is not None:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise BadInput(f"{option}: not UTF-8 text") from None
        if "\x00" in value:
            raise BadInput(f"{option}: holds a NUL character")


def cmd_enqueue(args: argparse.Namespace) -> int:
    from supervisor_app.config import MAX_ATTEMPTS, PRIORITY_MAX, PRIORITY_MIN
    from supervisor_app.units import format_duration

    check_type(args.job_type)
    if (args.payload is None) == (args.file is None):
        raise BadInput("give exactly one of --payload JSON or --file PATH")
    # The columns are int4 and timestamptz: refuse here, with the range, what they can't hold.
    _in_range("--priority", args.priority, PRIORITY_MIN, PRIORITY_MAX,
              f"{PRIORITY_MIN}..{PRIORITY_MAX}")
    _in_range("--max-attempts", args.max_attempts, 1, MAX_ATTEMPTS, f"1..{MAX_ATTEMPTS}")
    if args.delay > MAX_DELAY:
        raise BadInput(f"--delay: at most {format_duration(MAX_DELAY)} (10 years)")
    _check_text("--key", args.key)
    _check_text("--batch", args.batch)
    if args.file is not None and args.key:
        raise BadInput("--key applies to one job; use --payload with --key")
    attempts = args.max_attempts or max_attempts(args.job_type)
    callback = check_callback_url(args.callback_url)  # a refused host: exit 2, nothing sent

    def new(payload: Any) -> queue.NewJob:
        return queue.NewJob(args.job_type, payload, priority=args.priority, delay=args.delay,
                            max_attempts=attempts, key=args.key, batch_id=args.batch,
                            callback_url=None if args.batch is not None else callback)

    payloads: Iterator[Any] = (
        iter([json_payload(args.payload, "--payload")]) if args.payload is not None
        else _payloads_from_file(Path(args.file))
    )
    # One transaction for all chunks: a bad line further down leaves nothing enqueued, and
    # a batch must not finish (and fire its webhook) between two chunks. The ids are
    # printed once it has committed.
    ids: list[int] = []
    with connect() as conn:
        with conn.transaction():
            if args.batch is not None:
                try:
                    queue.create_batch(conn, args.batch, callback_url=callback)
                except ValueError as exc:
                    raise BadInput(f"--batch: {exc}") from None
            chunk: list[queue.NewJob] = []
            counter = _Counter(args.file is not None)
            for payload in payloads:
                chunk.append(new(payload))
                if len(chunk) >= ENQUEUE_CHUNK:
                    ids.extend(queue.enqueue_many(conn, chunk))
                    chunk = []
                    counter.show(len(ids))
            if chunk:
                ids.extend(queue.enqueue_many(conn, chunk))
            counter.done(len(ids))
        unserved = not _served(conn, args.job_type)
    _print_ids(ids)
    if unserved:
        print(f"jobvisor: warning: no configured type and no running supervisor serves "
              f"{args.job_type!r}; the job(s) stay queued until one does", file=sys.stderr)
    return EXIT_OK


class _Counter:
    """`12000 jobs enqueued…` redrawn on stderr while a long --file is read, where a
    person watches (a terminal); nothing on a pipe."""

    def __init__(self, wanted: bool) -> None:
        self.on = wanted and sys.stderr.isatty()
        self.shown = False

    def show(self, n: int) -> None:
        if self.on:
            sys.stderr.write(f"\r{n} jobs enqueued (not committed yet)…")
            sys.stderr.flush()
            self.shown = True

    def done(self, n: int) -> None:
        if self.shown:
            sys.stderr.write(f"\r{n} jobs enqueued, committing…{' ' * 8}\n")
            sys.stderr.flush()


def _served(conn: psycopg.Connection, job_type: str) -> bool:
    """Whether the YAML configures `job_type` or a live supervisor says it serves it."""
    from supervisor_app.registry_table import live_supervisors, served_types

    return job_type in known_types() or job_type in served_types(live_supervisors(conn))


def _print_ids(ids: list[int]) -> None:
    sys.stdout.write("".join(f"{i}\n" for i in ids))


def cmd_status(args: argparse.Namespace) -> int:
    with connect() as conn:
        queues = queue.status_counts(conn)
        workers, plan, readings, served = _supervisor_view(conn)
        # Text only: the --json shape is a documented contract (DESIGN.md).
        running = [] if args.json else queue.running_jobs(conn, limit=20)
    # Queues with jobs waiting that no live supervisor serves (kept, never failed for it).
    unserved = sorted(t for t, c in queues.items() if c["queued"] and t not in served)
    out = {"queues": queues, "workers": workers, "plan": plan, "unserved": unserved,
           "model_servers": [{"host": host, **m} for host, r in readings
                             for m in r.get("model_servers") or []]}
    if args.json:
        print(json.dumps(out, sort_keys=True))
        return EXIT_OK
    for t in unserved:
        print(f"warning: {queues[t]['queued']} job(s) of type {t!r} are queued and no running "
              "supervisor serves that type", file=sys.stderr)
    print(f"{'type':<14}{'queued':>8}{'leased':>8}{'done':>9}{'failed':>8}{'cancel':>8}"
          f"{'oldest s':>10}")
    for job_type, c in sorted(queues.items()):
        print(f"{job_type:<14}{c['queued']:>8}{c['leased']:>8}{c['completed']:>9}"
              f"{c['failed']:>8}{c['cancelled']:>8}{c['oldest_queued_s']:>10.1f}")
    for host, r in readings:
        gpus = ", ".join(f"gpu{g['index']} {g['free_bytes'] // 2**20} MiB free"
                         for g in r.get("gpus", [])) or "no GPU"
        print(f"\n{host}: RAM {r['memory_available'] // 2**20} MiB available, "
              f"{r['cpu_count']} CPUs, {gpus}")
        for m in r.get("model_servers") or []:
            print(f"  {_model_server_line(m)}")
    if plan:
        print("plan: " + ", ".join(f"{t}={p['processes']} ({p['reason']})"
                                   for t, p in sorted(plan.items())))
    for w in workers:
        print(f"  {w['job_type']}[{w['slot']}] pid={w['pid']} {w['state']} "
              f"rss={w['rss_bytes'] // 2**20}MiB")
    if running:
        print("\nrunning (longest first):")
    for r in running:
        done = "" if r["progress"] is None else f" {r['progress']:.0%}"
        print(f"  job {r['id']} {r['job_type']}{done} attempt {r['attempts']}/"
              f"{r['max_attempts']} since {r['started_at']}")
    return EXIT_OK


def _model_server_line(m: dict[str, Any]) -> str:
    """One model server as `status` shows it: loaded models, held and reserved memory."""
    from supervisor_app.units import format_bytes

    head = f"model server {m['url']} ({m['source']}): "
    if not m["counted"]:
        return head + f"not read, {m['error']}"
    reserved = ", ".join(f"{x['name']} {format_bytes(x['size_vram'])}" for x in m["reserved"])
    kept = (f"; {format_bytes(m['reserved_bytes'])} kept for unloaded models ({reserved})"
            if m["reserved"] else "; nothing kept for unloaded models")
    if not m["reachable"]:
        return head + f"unreachable ({m['error']}), loaded models unknown" + kept
    loaded = ", ".join(f"{x['name']} {format_bytes(x['size_vram'])}" for x in m["models"])
    return (head + f"{len(m['models'])} loaded" + (f" ({loaded})" if loaded else "")
            + f", holding {format_bytes(m['held_bytes'])}" + kept)


def _supervisor_view(
    conn: psycopg.Connection,
) -> tuple[list[dict], dict[str, dict], list[tuple[str, dict]], set[str]]:
    """Workers, plan, machine readings and served types of live supervisors (published
    in the database)."""
    from supervisor_app.registry_table import live_supervisors, served_types

    workers: list[dict] = []
    plan: dict[str, dict] = {}
    readings: list[tuple[str, dict]] = []
    states = live_supervisors(conn)
    for state in states:
        workers.extend(state.get("workers", []))
        if state.get("readings"):
            readings.append((state["supervisor"]["host"], state["readings"]))
        for job_type, entry in state.get("plan", {}).items():
            merged = plan.setdefault(job_type, {"processes": 0, "reason": entry["reason"]})
            merged["processes"] += entry["processes"]
    return workers, plan, readings, served_types(states)


def _job_or_fail(conn: psycopg.Connection, job_id: int) -> dict[str, Any]:
    job = queue.get_job(conn, job_id)
    if job is None:
        raise BadInput(f"job {job_id}: no such job")
    return job


def cmd_jobs_show(args: argparse.Namespace) -> int:
    with connect() as conn:
        job = queue.jsonable(_job_or_fail(conn, args.id))
    if args.json:
        print(json.dumps(job, sort_keys=True, default=str))
    else:
        for key, value in job.items():
            if value is None or key == "errors":
                continue
            shown = json.dumps(value, default=str) if key in ("payload", "result") else value
            print(f"{key:>16}: {shown}")
        for e in job.get("errors") or []:  # each attempt's error, oldest first (last 10)
            print(f"{'attempt ' + str(e.get('attempt')):>16}: {e.get('code')} at {e.get('at')}"
                  f" — {e.get('message') or ''}")
    return EXIT_OK


def cmd_jobs_retry(args: argparse.Namespace) -> int:
    with connect() as conn:
        job = _job_or_fail(conn, args.id)
        if not queue.retry_failed(conn, args.id):
            raise Failed(f"job {args.id} is {job['status']}: only failed or cancelled jobs can "
                         "be retried (or its idempotency key is held by a newer job)")
    print(f"job {args.id} queued again")
    return EXIT_OK


def cmd_jobs_cancel(args: argparse.Namespace) -> int:
    with connect() as conn:
        job = _job_or_fail(conn, args.id)
        outcome = queue.cancel(conn, args.id)
    if outcome is None:
        raise Failed(f"job {args.id} is already {job['status']}")
    print(f"job {args.id}: {outcome.replace('_', ' ')}")
    return EXIT_OK


