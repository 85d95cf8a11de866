"""No-op job throughput: N jobs enqueued in bulk, processed by P processes × C threads.

    python -m benchmarks.queue_throughput [--n 20000] [--processes 2] [--concurrency 8]
                                          [--prefetch 200]

Two phases, each with N fresh jobs (told apart by id), all timings from the
database's own clock (`clock_timestamp()`, `started_at`, `finished_at`):

* cold: the N jobs are enqueued first, then the workers are started against the full
  queue. `process_s_incl_startup` runs from just before the processes are spawned to
  the last `finished_at`; `process_s` runs from the first lease (`min(started_at)`) to
  the last `finished_at`, so it leaves the interpreter start-up of the first process
  out (a later process may still be starting meanwhile).
* warm: the same workers, now idle and LISTENing (checked in pg_stat_activity), get N
  more jobs in one committed transaction. `warm_process_s` runs from just before that
  COMMIT to the last `finished_at`: no start-up in it at all.
  `warm_first_lease_after_commit_s` is the part of it before the first lease (the
  COMMIT itself and the wake-up through NOTIFY).

`jobs_per_s` = n / process_s. With `--no-keep-completed` (a type with
`keep_completed: false`) the completed rows and their times are gone: the phase's ends
are polled instead (see `_deleted_span`), each late by at most 5 ms. Progress goes to stderr; the figures are the last line
on stdout, as one JSON object.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import datetime
from pathlib import Path

if __package__ in (None, ""):  # run as `python benchmarks/queue_throughput.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg  # noqa: E402

from benchmarks._common import (  # noqa: E402
    BenchDatabase,
    BenchFailed,
    WorkerGroup,
    bench_database,
    emit,
    main_guard,
    non_negative_int,
    positive_int,
    progress,
    r3,
    running,
    wait_done,
)
from workers.core.queue import NewJob, enqueue_many  # noqa: E402

CHUNK = 10_000  # jobs per INSERT round trip; all chunks of a phase commit together


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.queue_throughput",
                                description=__doc__.splitlines()[0])
    p.add_argument("--n", type=positive_int, default=20_000, help="jobs per phase")
    p.add_argument("--processes", type=positive_int, default=2, help="worker processes")
    p.add_argument("--concurrency", type=positive_int, default=8, help="threads per process")
    p.add_argument("--prefetch", type=non_negative_int, default=200,
                   help="jobs leased ahead of free threads, per process")
    p.add_argument("--keep-completed", action=argparse.BooleanOptionalAction, default=True,
                   help="keep completed jobs for retention (the default) or delete them as "
                        "they complete (a type with keep_completed: false)")
    p.add_argument("--warm", action=argparse.BooleanOptionalAction, default=True,
                   help="also time N jobs handed to the already running, idle workers")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="give up (exit 1) when a phase takes longer than this (s)")
    return p


def _enqueue(conn: psycopg.Connection, job_type: str, n: int) -> tuple[tuple[int, int], datetime]:
    """Insert n no-op jobs in chunks inside one transaction; returns (first id, last id)
    and the database time just before COMMIT (the jobs become visible at that commit)."""
    ids: list[int] = []
    with conn.transaction():
        for start in range(0, n, CHUNK):
            ids += enqueue_many(conn, [NewJob(job_type, {})
                                       for _ in range(min(CHUNK, n - start))])
        before_commit: datetime = conn.execute("SELECT clock_timestamp()").fetchone()[0]
    return (min(ids), max(ids)), before_commit


def _span(conn: psycopg.Connection, ids: tuple[int, int]) -> tuple[datetime, datetime, datetime]:
    first_lease, first_done, last_done = conn.execute(
        "SELECT min(started_at), min(finished_at), max(finished_at) FROM jobvisor.jobs"
        " WHERE id BETWEEN %s AND %s", ids).fetchone()
    return first_lease, first_done, last_done


POLL_S = 0.005  # how often a phase without kept rows looks at what is left


def _deleted_span(conn: psycopg.Connection, group: WorkerGroup, ids: tuple[int, int], n: int,
                  timeout: float) -> tuple[datetime, datetime, datetime]:
    """With `--no-keep-completed` the completed rows are gone, and so are their times: poll
    (every POLL_S) what is left of the phase's jobs, on the database's clock. The first poll
    that finds the phase's first job no longer queued stands for the first lease (jobs of
    one priority, enqueued in one transaction, are leased in id order), the first that
    finds it gone for the first completion, and the first that finds no row of the phase
    left for the last completion, each late by up to one poll (the peers harness times
    graphile-worker and PgQueuer the same way). The probes are EXISTS lookups: counting
    the phase's rows every 5 ms cost the server more than the workers' own statements
    (seen: 640 ms of execution against 70 ms for the same run keeping its rows). A failed
    job would stay: none may."""
    first_lease = first_done = None
    deadline = time.monotonic() + timeout
    while True:
        group.check_alive()
        first_queued, first_left, left, now = conn.execute(
            "SELECT EXISTS (SELECT 1 FROM jobvisor.jobs WHERE id = %(a)s AND status = 'queued'),"
            " EXISTS (SELECT 1 FROM jobvisor.jobs WHERE id = %(a)s),"
            " EXISTS (SELECT 1 FROM jobvisor.jobs WHERE id BETWEEN %(a)s AND %(b)s),"
            " clock_timestamp()", {"a": ids[0], "b": ids[1]}).fetchone()
        if first_lease is None and not first_queued:
            first_lease = now
        if first_done is None and not first_left:
            first_done = now
        if not left:
            return first_lease or now, first_done or now, now
        if time.monotonic() > deadline:
            remaining = conn.execute("SELECT count(*) FROM jobvisor.jobs WHERE id BETWEEN %s"
                                     " AND %s", ids).fetchone()[0]
            raise BenchFailed(f"{remaining} of {n} jobs not done after {timeout:g}s")
        time.sleep(POLL_S)


def _done_span(conn: psycopg.Connection, group: WorkerGroup, ids: tuple[int, int], n: int,
               args: argparse.Namespace) -> tuple[datetime, datetime, datetime]:
    """(first lease, first completion, last completion) of one phase's jobs."""
    if not args.keep_completed:
        return _deleted_span(conn, group, ids, n, args.timeout)
    wait_done(conn, group, ids, n, args.timeout)
    return _span(conn, ids)


def run(args: argparse.Namespace) -> None:
    with bench_database() as db, psycopg.connect(db.dsn, autocommit=True) as conn:
        figures = _measure(args, db, conn)
    emit(figures)


def _measure(args: argparse.Namespace, db: BenchDatabase,
             conn: psycopg.Connection) -> dict[str, object]:
    load_at_start = round(os.getloadavg()[0], 2)  # other work on the machine skews timings
    job_type = db.job_type("noop")
    group = WorkerGroup(db, job_type, args.processes, args.concurrency, args.prefetch,
                        handler=None if db.scratch else "workers.core.builtin:noop",
                        keep_completed=args.keep_completed)
    progress(f"cold: enqueueing {args.n} {job_type} jobs in chunks of {CHUNK}")
    t = time.perf_counter()
    cold, _ = _enqueue(conn, job_type, args.n)
    enqueue_s = time.perf_counter() - t
    progress(f"cold: enqueued in {enqueue_s:.3f}s; starting {args.processes} × "
             f"{args.concurrency} workers (prefetch {args.prefetch})")
    spawned = conn.execute("SELECT clock_timestamp()").fetchone()[0]
    with running(group):
        startup_s = group.wait_started(timeout=60)
        first_lease, first_done, last_done = _done_span(conn, group, cold, args.n, args)
        incl = (last_done - spawned).total_seconds()
        excl = (last_done - first_lease).total_seconds()
        progress(f"cold: all {group.processes} workers logged worker_started "
                 f"{startup_s:.3f}s after spawn; first lease "
                 f"{(first_lease - spawned).total_seconds():.3f}s after spawn")
        progress(f"cold: {args.n} done in {incl:.3f}s incl. start-up "
                 f"({args.n / incl:,.0f}/s), {excl:.3f}s from first lease "
                 f"({args.n / excl:,.0f}/s)")
        figures: dict[str, object] = {
            "jobs_per_s": round(args.n / excl), "n": args.n, "processes": args.processes,
            "concurrency": args.concurrency, "prefetch": args.prefetch,
            "keep_completed": args.keep_completed,
            "enqueue_s": r3(enqueue_s), "enqueue_jobs_per_s": round(args.n / enqueue_s),
            "process_s": r3(excl), "process_s_incl_startup": r3(incl),
            "jobs_per_s_incl_startup": round(args.n / incl),
            "startup_s": r3(startup_s),
            "first_lease_after_spawn_s": r3((first_lease - spawned).total_seconds()),
            "first_done_after_first_lease_s": r3((first_done - first_lease).total_seconds()),
        }
        if args.warm:
            group.wait_listening(conn, timeout=30)
            progress(f"warm: workers idle and listening; enqueueing {args.n} more")
            t = time.perf_counter()
            warm_ids, visible = _enqueue(conn, job_type, args.n)
            warm_enqueue_s = time.perf_counter() - t
            first_lease, _first_done, last_done = _done_span(conn, group, warm_ids, args.n,
                                                             args)
            warm = (last_done - visible).total_seconds()
            # The part of `warm` before any worker had a job: the COMMIT (its log flush)
            # and the wake-up through NOTIFY.
            figures["warm_first_lease_after_commit_s"] = r3(
                (first_lease - visible).total_seconds())
            progress(f"warm: enqueued in {warm_enqueue_s:.3f}s, {args.n} done "
                     f"{warm:.3f}s after commit ({args.n / warm:,.0f}/s)")
            figures |= {"warm_enqueue_s": r3(warm_enqueue_s), "warm_process_s": r3(warm),
                        "warm_jobs_per_s": round(args.n / warm)}
    figures |= {"database": "scratch" if db.scratch else "given", "server": db.where,
                "server_version": db.server_version,
                "load_1m_at_start": load_at_start}
    return figures


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return main_guard(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
