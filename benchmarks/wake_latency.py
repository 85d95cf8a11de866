"""Wake-up latency: idle workers, single enqueues spaced apart, time to handler start.

    python -m benchmarks.wake_latency [--n 200] [--interval-ms 20] [--processes 1]
                                      [--concurrency 1] [--prefetch 0] [--poll 60]

The workers run `benchmarks.handlers:stamp`, which returns `{"t": time.time()}` as the
job's result. They are started with a long `--poll`, so only NOTIFY wakes them, and the
first job is enqueued only after pg_stat_activity shows every worker's listening
connection idle in `LISTEN jobvisor_cancel`. Each job is enqueued alone (one
`enqueue_many` call, autocommit) and `time.time()` is taken just before the call;
latency = handler start − that moment. `after_commit_*` count from the call's return
instead: the producer's durable commit left out, the wake path alone. Both clocks are
this machine's wall clock, so the database must be on this machine (loopback or unix
socket).

Reports median, p95 (nearest rank), p99, min, max and mean in ms. Progress goes to
stderr; the figures are the last line on stdout, as one JSON object.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python benchmarks/wake_latency.py`
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
    running,
    wait_done,
)
from workers.core.queue import NewJob, enqueue_many  # noqa: E402

SETTLE_S = 0.2  # after LISTEN: let the lease round that LISTEN triggers finish


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.wake_latency",
                                description=__doc__.splitlines()[0])
    p.add_argument("--n", type=positive_int, default=200, help="jobs, enqueued one by one")
    p.add_argument("--interval-ms", type=float, default=20.0, help="spacing of enqueues")
    p.add_argument("--processes", type=positive_int, default=1, help="worker processes")
    p.add_argument("--concurrency", type=positive_int, default=1, help="threads per process")
    p.add_argument("--prefetch", type=non_negative_int, default=0,
                   help="jobs leased ahead of free threads, per process")
    p.add_argument("--poll", type=float, default=60.0,
                   help="workers' fallback poll (s): long, so only NOTIFY wakes them")
    p.add_argument("--timeout", type=float, default=120.0,
                   help="give up (exit 1) when the jobs take longer than this to finish (s)")
    return p


def nearest_rank(sorted_values: list[float], q: float) -> float:
    return sorted_values[max(0, math.ceil(q * len(sorted_values)) - 1)]


def run(args: argparse.Namespace) -> None:
    with bench_database() as db, psycopg.connect(db.dsn, autocommit=True) as conn:
        figures = _measure(args, db, conn)
    emit(figures)


def _measure(args: argparse.Namespace, db: BenchDatabase,
             conn: psycopg.Connection) -> dict[str, object]:
    load_at_start = round(os.getloadavg()[0], 2)  # other work on the machine skews timings
    job_type = db.job_type("stamp")
    group = WorkerGroup(db, job_type, args.processes, args.concurrency, args.prefetch,
                        handler="benchmarks.handlers:stamp", poll=args.poll)
    progress(f"starting {args.processes} × {args.concurrency} {job_type} workers "
             f"(prefetch {args.prefetch}, poll {args.poll:g}s)")
    with running(group):
        group.wait_started(timeout=60)
        group.wait_listening(conn, timeout=30)
        time.sleep(SETTLE_S)
        progress(f"workers listening; enqueueing {args.n} jobs {args.interval_ms:g} ms apart")
        enqueued: dict[int, float] = {}
        returned: dict[int, float] = {}  # the enqueue's commit has been acknowledged
        call_ms: list[float] = []
        interval = args.interval_ms / 1000
        t0 = time.monotonic() + interval
        for i in range(args.n):
            time.sleep(max(0.0, t0 + i * interval - time.monotonic()))
            before = time.time()
            (job_id,) = enqueue_many(conn, [NewJob(job_type, {"i": i})])
            returned[job_id] = time.time()
            enqueued[job_id] = before
            call_ms.append((returned[job_id] - before) * 1000)
        wait_done(conn, group, (min(enqueued), max(enqueued)), args.n, args.timeout)
    rows = conn.execute(
        "SELECT id, (result->>'t')::float8, extract(epoch FROM started_at)::float8"
        " FROM jobvisor.jobs WHERE id = ANY(%s)", (list(enqueued),)).fetchall()
    if len(rows) != args.n:
        raise BenchFailed(f"expected {args.n} results, found {len(rows)}")
    ms = sorted((t - enqueued[job_id]) * 1000 for job_id, t, _ in rows)
    # Where the time goes: enqueue call → lease statement start (`started_at`, the
    # server's clock) → handler start.
    to_lease = sorted((leased - enqueued[job_id]) * 1000 for job_id, _, leased in rows)
    to_handler = sorted((t - leased) * 1000 for _, t, leased in rows)
    # From the enqueue call's return (its commit acknowledged): the wake path alone. Below
    # zero where a handler started before the producer read the commit's reply.
    after = sorted((t - returned[job_id]) * 1000 for job_id, t, _ in rows)
    figures: dict[str, object] = {
        "median_ms": round(statistics.median(ms), 3), "p95_ms": round(nearest_rank(ms, 0.95), 3),
        "p99_ms": round(nearest_rank(ms, 0.99), 3), "min_ms": round(ms[0], 3),
        "max_ms": round(ms[-1], 3), "mean_ms": round(statistics.fmean(ms), 3),
        "enqueue_call_median_ms": round(statistics.median(call_ms), 3),
        "after_commit_median_ms": round(statistics.median(after), 3),
        "after_commit_p95_ms": round(nearest_rank(after, 0.95), 3),
        "to_lease_median_ms": round(statistics.median(to_lease), 3),
        "to_lease_p95_ms": round(nearest_rank(to_lease, 0.95), 3),
        "lease_to_handler_median_ms": round(statistics.median(to_handler), 3),
        "lease_to_handler_p95_ms": round(nearest_rank(to_handler, 0.95), 3),
        "n": args.n, "interval_ms": args.interval_ms, "processes": args.processes,
        "concurrency": args.concurrency, "prefetch": args.prefetch, "poll_s": args.poll,
        "database": "scratch" if db.scratch else "given", "server": db.where,
        "server_version": db.server_version, "load_1m_at_start": load_at_start,
    }
    progress(f"latency ms: median {figures['median_ms']}, p95 {figures['p95_ms']}, "
             f"max {figures['max_ms']}")
    return figures


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return main_guard(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
