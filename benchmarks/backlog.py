"""Flat with backlog and history: no-op throughput with 10⁴ jobs queued, with 10⁶ queued,
and with 10⁶ finished rows retained; and bulk enqueue of 10⁶ jobs.

    python -m benchmarks.backlog [--small 10000] [--backlog 1000000] [--n 20000]
                                 [--history 1000000] [--enqueue 1000000]
                                 [--cases small,backlog,history,enqueue] [--rounds 1]
                                 [--processes 2] [--concurrency 8] [--prefetch 200]

Each case runs in a scratch database of its own (benchmarks/_common.bench_database;
this benchmark refuses a shared one: it writes millions of rows), filled on the server
in one statement (`INSERT … SELECT … FROM generate_series`), then VACUUM ANALYZE and a
CHECKPOINT (so no case starts with another's dirty pages or a checkpoint under way),
each timed (`fill`). Then P processes × C threads (prefetch F, handler
workers.core.builtin:noop) are started against the full queue:

* small: `--small` queued jobs, all processed; `jobs_per_s` = small / (first lease →
  last `finished_at`).
* backlog: `--backlog` queued jobs; the workers are stopped once `--n` have completed
  (polled, spaced by the rate seen so far); `jobs_per_s` = n / (first lease → the n-th
  `finished_at` in finished_at order: the moment n jobs had completed, exact whatever
  the order they completed in).
* history: `--history` completed jobs retained (rows inserted as finished: status
  'completed', attempts 1, finished_at spread over the last 7 days; lower ids than the
  queued ones, as history would be) and `--small` queued; `jobs_per_s` as for small, over
  the queued ones.

All three times are the database's (`started_at`, `finished_at`). Each case also gets
`steady_jobs_per_s`, the same way in all three: jobs per second between the k-th and the
m-th completion, k = 10% and m = 90% of min(small, n), so that neither the start-up of
the later process nor the last jobs' tail weigh differently in a case that measures 10⁴
jobs and one that measures 2 × 10⁴. The ratios backlog/small and history/small are given
for both (the issue's target: ≥ 0.9).

* enqueue: `--enqueue` jobs through the public API into an empty queue, in one
  transaction: `workers.core.queue.enqueue_many` in chunks of 10,000, and, where the
  queue has it, `enqueue_copy` (binary COPY) fed one generator of NewJob; times are this
  machine's clock, from the first NewJob built to the commit.

Progress goes to stderr; the figures are the last line on stdout, one JSON object (with
--rounds R > 1: medians, each case's runs under "runs").
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python benchmarks/backlog.py`
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
from supervisor_app.database import resolve_dsn  # noqa: E402
from workers.core import queue  # noqa: E402
from workers.core.dsn import describe  # noqa: E402
from workers.core.queue import NewJob  # noqa: E402

CASES = ("small", "backlog", "history", "enqueue")
CHUNK = 10_000  # enqueue_many's jobs per statement
HANDLER = "workers.core.builtin:noop"
TARGET = 0.9

_FILL_QUEUED = """
WITH ins AS (
    INSERT INTO jobvisor.jobs (job_type, payload)
    SELECT %(t)s, '{}'::jsonb FROM generate_series(1, %(n)s)
    RETURNING id
)
SELECT min(id), max(id), count(*) FROM ins
"""

# Finished as the queue finishes a completed job (progress 1, no lease), spread evenly
# over the last 7 days, oldest first.
_FILL_HISTORY = """
INSERT INTO jobvisor.jobs (job_type, payload, status, attempts, progress, created_at,
                           updated_at, started_at, finished_at)
SELECT %(t)s, '{}'::jsonb, 'completed', 1, 1, f - interval '2 seconds', f,
       f - interval '10 milliseconds', f
FROM (SELECT now() - interval '7 days' + i * (interval '7 days' / %(n)s) AS f
      FROM generate_series(1, %(n)s) AS i) s
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.backlog",
                                description=__doc__.splitlines()[0])
    p.add_argument("--small", type=positive_int, default=10_000,
                   help="queued jobs in the small and the history case")
    p.add_argument("--backlog", type=positive_int, default=1_000_000,
                   help="queued jobs in the backlog case")
    p.add_argument("--n", type=positive_int, default=20_000,
                   help="jobs measured in the backlog case (the first to complete)")
    p.add_argument("--history", type=positive_int, default=1_000_000,
                   help="completed jobs retained in the history case")
    p.add_argument("--enqueue", type=positive_int, default=1_000_000,
                   help="jobs enqueued in bulk in the enqueue case")
    p.add_argument("--cases", default=",".join(CASES),
                   help=f"comma-separated, from {','.join(CASES)}")
    p.add_argument("--rounds", type=positive_int, default=1,
                   help="run the cases this many times, in turn; medians reported")
    p.add_argument("--processes", type=positive_int, default=2, help="worker processes")
    p.add_argument("--concurrency", type=positive_int, default=8, help="threads per process")
    p.add_argument("--prefetch", type=non_negative_int, default=200,
                   help="jobs leased ahead of free threads, per process")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="give up (exit 1) when processing a case takes longer than this (s)")
    return p


# --- filling -----------------------------------------------------------------------------

def _timed(conn: psycopg.Connection, sql: str, params: dict[str, Any] | None = None,
           ) -> tuple[float, Any]:
    """Seconds one statement took, and its first row (None when it returns none)."""
    t = time.perf_counter()
    cur = conn.execute(sql, params)
    row = cur.fetchone() if cur.description else None
    return time.perf_counter() - t, row


def _fill(conn: psycopg.Connection, job_type: str, queued: int,
          history: int = 0) -> tuple[tuple[int, int], dict[str, Any]]:
    """History rows (if any), then `queued` jobs, then VACUUM ANALYZE and CHECKPOINT; the
    queued jobs' id range and the timings."""
    fill: dict[str, Any] = {}
    if history:
        progress(f"fill: inserting {history:,} completed rows")
        fill["history_insert_s"] = r3(_timed(conn, _FILL_HISTORY,
                                             {"t": job_type, "n": history})[0])
    progress(f"fill: inserting {queued:,} queued jobs")
    insert_s, (first, last, count) = _timed(conn, _FILL_QUEUED, {"t": job_type, "n": queued})
    if count != queued or last - first + 1 != queued:
        raise BenchFailed(f"fill: {count} rows with ids {first}..{last}, expected {queued}")
    fill["insert_s"] = r3(insert_s)
    fill["vacuum_analyze_s"] = r3(_timed(conn, "VACUUM ANALYZE jobvisor.jobs")[0])
    try:
        fill["checkpoint_s"] = r3(_timed(conn, "CHECKPOINT")[0])
    except psycopg.errors.InsufficientPrivilege:
        fill["checkpoint_s"] = None
        progress("fill: CHECKPOINT not permitted (needs pg_checkpoint); skipped")
    fill["fill_s"] = r3(sum(v for v in fill.values() if v))
    size = conn.execute("SELECT pg_total_relation_size('jobvisor.jobs')").fetchone()[0]
    fill["table_mb"] = round(int(size) / 2**20, 1)
    progress(f"fill: done in {fill['fill_s']:.3f}s ({fill}); table and indexes "
             f"{fill['table_mb']} MB")
    return (int(first), int(last)), fill


# --- measuring ---------------------------------------------------------------------------

def _group(args: argparse.Namespace, db: BenchDatabase, job_type: str) -> WorkerGroup:
    return WorkerGroup(db, job_type, args.processes, args.concurrency, args.prefetch,
                       handler=HANDLER)


def _steady_ranks(args: argparse.Namespace) -> tuple[int, int]:
    m = min(args.small, args.n)
    return max(1, m // 10), m - m // 10


def _nth_finished(conn: psycopg.Connection, job_type: str, rank: int,
                  ids: tuple[int, int] | None = None) -> datetime:
    """finished_at of the rank-th (1-based) completed job, in finished_at order: among
    ids `ids[0]..ids[1]` or, without ids, all the type's completed jobs (through the
    (status, finished_at) index)."""
    if ids is None:
        row = conn.execute(
            "SELECT finished_at FROM jobvisor.jobs WHERE status = 'completed'"
            " AND finished_at IS NOT NULL AND job_type = %s"
            " ORDER BY finished_at OFFSET %s LIMIT 1", (job_type, rank - 1)).fetchone()
    else:
        row = conn.execute(
            "SELECT finished_at FROM jobvisor.jobs WHERE id BETWEEN %s AND %s"
            " AND status = 'completed' ORDER BY finished_at OFFSET %s LIMIT 1",
            (ids[0], ids[1], rank - 1)).fetchone()
    if row is None:
        raise BenchFailed(f"fewer than {rank} completed jobs")
    return row[0]


def _steady(conn: psycopg.Connection, args: argparse.Namespace, job_type: str,
            ids: tuple[int, int] | None = None) -> float:
    lo, hi = _steady_ranks(args)
    a = _nth_finished(conn, job_type, lo, ids)
    b = _nth_finished(conn, job_type, hi, ids)
    return (hi - lo) / max((b - a).total_seconds(), 1e-6)


def _drain(conn: psycopg.Connection, args: argparse.Namespace, db: BenchDatabase,
           job_type: str, ids: tuple[int, int]) -> dict[str, Any]:
    """Workers against the queue until every job of `ids` completed (small, history)."""
    n = ids[1] - ids[0] + 1
    group = _group(args, db, job_type)
    spawned = conn.execute("SELECT clock_timestamp()").fetchone()[0]
    with running(group):
        startup_s = group.wait_started(timeout=60)
        wait_done(conn, group, ids, n, args.timeout)
    first_lease, last_done = conn.execute(
        "SELECT min(started_at), max(finished_at) FROM jobvisor.jobs WHERE id BETWEEN %s AND %s",
        ids).fetchone()
    span = (last_done - first_lease).total_seconds()
    return {"measured": n, "jobs_per_s": round(n / span), "process_s": r3(span),
            "steady_jobs_per_s": round(_steady(conn, args, job_type, ids)),
            "startup_s": r3(startup_s),
            "first_lease_after_spawn_s": r3((first_lease - spawned).total_seconds())}


def _completed_up_to(conn: psycopg.Connection, job_type: str, n: int) -> int:
    """How many of the type's jobs completed, counting no further than n (an index scan
    of (status, finished_at) that stops at n)."""
    return int(conn.execute(
        "SELECT count(*) FROM (SELECT 1 FROM jobvisor.jobs WHERE status = 'completed'"
        " AND finished_at IS NOT NULL AND job_type = %s LIMIT %s) s",
        (job_type, n)).fetchone()[0])


def _first_n(conn: psycopg.Connection, args: argparse.Namespace, db: BenchDatabase,
             job_type: str) -> dict[str, Any]:
    """Workers against the backlog until n jobs completed, then stopped (backlog)."""
    n = args.n
    group = _group(args, db, job_type)
    spawned = conn.execute("SELECT clock_timestamp()").fetchone()[0]
    with running(group):
        startup_s = group.wait_started(timeout=60)
        # Poll sparingly (each poll reads up to n index entries): wait for about half
        # of what is left at the rate seen so far, between 10 ms and 0.5 s.
        t0 = time.monotonic()
        deadline = t0 + args.timeout
        polls = 0
        while True:
            group.check_alive()
            done = _completed_up_to(conn, job_type, n)
            polls += 1
            if done >= n:
                break
            now = time.monotonic()
            if now > deadline:
                raise BenchFailed(f"{done} of {n} jobs completed after {args.timeout:g}s")
            rate = done / (now - t0) if done else 0.0
            wait = 0.5 if rate <= 0 else 0.5 * (n - done) / rate
            time.sleep(min(0.5, max(0.01, wait)))
        progress(f"backlog: {n} completed ({polls} polls); stopping the workers")
    first_lease = conn.execute(
        "SELECT min(started_at) FROM jobvisor.jobs WHERE job_type = %s", (job_type,)
    ).fetchone()[0]
    nth = _nth_finished(conn, job_type, n)
    failed = conn.execute(
        "SELECT count(*) FROM jobvisor.jobs WHERE job_type = %s AND status = 'failed'",
        (job_type,)).fetchone()[0]
    if failed:
        raise BenchFailed(f"backlog: {failed} jobs failed")
    span = (nth - first_lease).total_seconds()
    return {"measured": n, "jobs_per_s": round(n / span), "process_s": r3(span),
            "steady_jobs_per_s": round(_steady(conn, args, job_type)),
            "startup_s": r3(startup_s),
            "first_lease_after_spawn_s": r3((first_lease - spawned).total_seconds())}


# --- the cases ---------------------------------------------------------------------------

def _check_scratch(db: BenchDatabase) -> None:
    if not db.scratch:
        raise BenchFailed("this benchmark writes millions of rows: it needs a scratch "
                          "database (permission to CREATE DATABASE)")


def case_small(args: argparse.Namespace) -> dict[str, Any]:
    with bench_database() as db, psycopg.connect(db.dsn, autocommit=True) as conn:
        _check_scratch(db)
        job_type = db.job_type("noop")
        ids, fill = _fill(conn, job_type, args.small)
        fig = {"case": "small", "queued": args.small, "retained": 0}
        fig |= _drain(conn, args, db, job_type, ids)
    return fig | {"fill": fill}


def case_backlog(args: argparse.Namespace) -> dict[str, Any]:
    with bench_database() as db, psycopg.connect(db.dsn, autocommit=True) as conn:
        _check_scratch(db)
        job_type = db.job_type("noop")
        if args.n > args.backlog:
            raise BenchFailed(f"--n {args.n} is more than the --backlog {args.backlog}")
        _ids, fill = _fill(conn, job_type, args.backlog)
        fig = {"case": "backlog", "queued": args.backlog, "retained": 0}
        fig |= _first_n(conn, args, db, job_type)
    return fig | {"fill": fill}


def case_history(args: argparse.Namespace) -> dict[str, Any]:
    with bench_database() as db, psycopg.connect(db.dsn, autocommit=True) as conn:
        _check_scratch(db)
        job_type = db.job_type("noop")
        ids, fill = _fill(conn, job_type, args.small, history=args.history)
        fig = {"case": "history", "queued": args.small, "retained": args.history}
        fig |= _drain(conn, args, db, job_type, ids)
    return fig | {"fill": fill}


def _enqueue_with(args: argparse.Namespace, api: str) -> dict[str, Any]:
    total = args.enqueue
    with bench_database() as db, psycopg.connect(db.dsn, autocommit=True) as conn:
        _check_scratch(db)
        job_type = db.job_type("noop")
        progress(f"enqueue: {total:,} jobs through queue.{api}")
        t = time.perf_counter()
        with conn.transaction():
            if api == "enqueue_many":
                inserted = 0
                for start in range(0, total, CHUNK):
                    inserted += len(queue.enqueue_many(
                        conn, [NewJob(job_type, {}) for _ in range(min(CHUNK, total - start))]))
            else:
                inserted = queue.enqueue_copy(conn, (NewJob(job_type, {}) for _ in range(total)))
        seconds = time.perf_counter() - t
        count = conn.execute("SELECT count(*) FROM jobvisor.jobs WHERE job_type = %s"
                             " AND status = 'queued'", (job_type,)).fetchone()[0]
        if inserted != total or count != total:
            raise BenchFailed(f"enqueue ({api}): {inserted} reported, {count} queued, "
                              f"expected {total}")
    progress(f"enqueue: {total:,} in {seconds:.3f}s ({total / seconds:,.0f}/s) via {api}")
    return {"jobs": total, "s": r3(seconds), "jobs_per_s": round(total / seconds)}


def case_enqueue(args: argparse.Namespace) -> dict[str, Any]:
    fig: dict[str, Any] = {"case": "enqueue", "chunk": CHUNK}
    fig["enqueue_many"] = _enqueue_with(args, "enqueue_many")
    if hasattr(queue, "enqueue_copy"):
        fig["enqueue_copy"] = _enqueue_with(args, "enqueue_copy")
    else:
        fig["enqueue_copy"] = None
        progress("enqueue: workers.core.queue has no enqueue_copy; not measured")
    return fig


RUNNERS = {"small": case_small, "backlog": case_backlog, "history": case_history,
           "enqueue": case_enqueue}

# The figures whose median a case reports with --rounds > 1 (paths into its dict).
MEDIAN_OF = {
    "small": ("jobs_per_s", "steady_jobs_per_s", "process_s"),
    "backlog": ("jobs_per_s", "steady_jobs_per_s", "process_s"),
    "history": ("jobs_per_s", "steady_jobs_per_s", "process_s"),
    "enqueue": ("enqueue_many.jobs_per_s", "enqueue_copy.jobs_per_s"),
}


def _get(fig: dict[str, Any], path: str) -> Any:
    for part in path.split("."):
        if not isinstance(fig, dict):
            return None
        fig = fig.get(part)  # type: ignore[assignment]
    return fig


def _medians(case: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path in MEDIAN_OF[case]:
        vals = [v for r in runs if (v := _get(r, path)) is not None]
        if vals:
            out[path] = {"median": round(statistics.median(vals), 3), "min": min(vals),
                         "max": max(vals)}
    return out


def _ratios(figures: dict[str, dict[str, Any]]) -> dict[str, Any]:
    ratios: dict[str, Any] = {}
    small = figures.get("small")
    for case in ("backlog", "history"):
        other = figures.get(case)
        if not small or not other:
            continue
        for key in ("jobs_per_s", "steady_jobs_per_s"):
            a, b = small.get(key), other.get(key)
            if a and b:
                ratios[f"{case}/small:{key}"] = round(b / a, 3)
    return ratios


def run(args: argparse.Namespace) -> None:
    cases = [c for c in args.cases.split(",") if c]
    bad = [c for c in cases if c not in CASES]
    if bad:
        raise BenchFailed(f"unknown cases {bad}; choose from {','.join(CASES)}")
    load_at_start = round(os.getloadavg()[0], 2)
    with psycopg.connect(resolve_dsn(), autocommit=True) as conn:
        version = str(conn.execute("SHOW server_version").fetchone()[0])
    runs: dict[str, list[dict[str, Any]]] = {c: [] for c in cases}
    for r in range(args.rounds):
        for case in cases:
            progress(f"round {r + 1}/{args.rounds}: {case}")
            fig = RUNNERS[case](args)
            if case != "enqueue":
                progress(f"{case}: {fig['measured']} jobs at {fig['jobs_per_s']:,}/s "
                         f"(steady {fig['steady_jobs_per_s']:,}/s)")
            runs[case].append(fig)
    if args.rounds == 1:
        figures = {c: rs[0] for c, rs in runs.items()}
        ratio_src = figures
    else:
        figures = {c: _medians(c, rs) | {"runs": rs} for c, rs in runs.items()}
        ratio_src = {c: {k: v["median"] for k, v in m.items() if isinstance(v, dict)
                         and "median" in v}
                     for c, m in figures.items()}
    ratios = _ratios(ratio_src)
    lo, hi = _steady_ranks(args)
    emit({
        **figures,
        "ratios": ratios, "target_ratio": TARGET,
        "meets_target": (all(v >= TARGET for v in ratios.values()) if ratios else None),
        "steady_between_completions": [lo, hi],
        "processes": args.processes, "concurrency": args.concurrency,
        "prefetch": args.prefetch, "handler": HANDLER, "rounds": args.rounds,
        "server": describe(resolve_dsn()), "server_version": version,
        "load_1m_at_start": load_at_start,
        "load_1m_at_end": round(os.getloadavg()[0], 2),
    })


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return main_guard(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
