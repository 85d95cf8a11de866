"""What the supervisor's periodic queries cost with 10⁶ retained finished jobs.

    python -m benchmarks.periodic_queries [--finished 1000000] [--queued 2000]
        [--leased 200] [--types 6] [--repeats 300]

A scratch database is filled with `--finished` finished jobs in bulk (`INSERT … SELECT
generate_series`: 90 % completed and 5 % cancelled over the last 7 days, 5 % failed over
the last 30, the shipped retention) across `--types` job types, then `--queued` queued
and `--leased` leased jobs (leases an hour long: none expires). The finished counts are
recomputed once (`jobvisor.recount_jobs()`: the bulk insert bypasses the queue's
statements), then VACUUM ANALYZE, as autovacuum would have done.

Each query the supervisor repeats is then timed `--repeats` times on one autocommit
connection (after a warm-up), client clock around the call, loopback round trip included:
`status_counts` (every 2 s, every host), `publish` + `live_supervisors` (every 2 s, every
host), `rescue` with nothing expired and `prune` / `prune_batches` with nothing old
enough (the elected host). For
comparison, the full-scan GROUP BY that `status_counts` used before sql/007 is timed a
few times. Each statement's plan is checked for a sequential scan of jobvisor.jobs.

Progress goes to stderr; the figures are the last stdout line, one JSON object: per
query `<name>_median_ms` and `<name>_p95_ms` (`prune_<status>` is one statement, `prune`
the round of all three), `seq_scans_on_jobs` (the queries whose plan scans the whole
jobs table) and `met`: every single statement's median under 5 ms and no such scan. The
timed calls run on one connection, so psycopg prepares each statement from its 5th run
and the server may switch to a generic plan: the figures include whichever it chose.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python benchmarks/periodic_queries.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg  # noqa: E402

from benchmarks._common import (  # noqa: E402
    BenchFailed,
    bench_database,
    emit,
    main_guard,
    positive_int,
    progress,
    r3,
)
from supervisor_app import registry_table  # noqa: E402
from workers.core import queue  # noqa: E402

TARGET_MS = 5.0
RETENTION = {"completed": 7 * 86400.0, "failed": 30 * 86400.0, "cancelled": 7 * 86400.0}
CHUNK = 250_000  # finished rows per INSERT … SELECT

_FILL = """
INSERT INTO jobvisor.jobs (job_type, status, attempts, visible_at, created_at, started_at,
                           finished_at, result, error_code)
SELECT 'type_' || (i %% %(types)s), s, 1, f - interval '2 s', f - interval '2 s',
       f - interval '1 s', f,
       CASE WHEN s = 'completed' THEN '{"ok": true}'::jsonb END,
       CASE WHEN s <> 'completed' THEN 'bench_error' END
FROM generate_series(%(first)s::bigint, %(last)s::bigint) AS g(i),
     LATERAL (SELECT CASE WHEN i %% 20 = 0 THEN 'failed' WHEN i %% 20 = 1 THEN 'cancelled'
                          ELSE 'completed' END AS s) st,
     LATERAL (SELECT now() - make_interval(
                  secs => (hashint8(i) & 2147483647) %% (CASE WHEN s = 'failed'
                                                              THEN 29 ELSE 6 END * 86400)
                          + 60) AS f) fin
"""

# What status_counts read before sql/007: every job, every 2 s.
_OLD_COUNTS = """
SELECT job_type, status, count(*),
       extract(epoch FROM now() - min(visible_at) FILTER (
           WHERE status = 'queued' AND visible_at <= now()))
FROM jobvisor.jobs GROUP BY job_type, status
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.periodic_queries",
                                description=__doc__.splitlines()[0])
    p.add_argument("--finished", type=positive_int, default=1_000_000,
                   help="retained finished jobs")
    p.add_argument("--queued", type=positive_int, default=2000, help="queued jobs")
    p.add_argument("--leased", type=positive_int, default=200, help="leased jobs")
    p.add_argument("--types", type=positive_int, default=6, help="job types")
    p.add_argument("--repeats", type=positive_int, default=300, help="timed calls per query")
    p.add_argument("--old-repeats", type=int, default=5,
                   help="timed calls of the pre-007 full-scan count (0: skip)")
    return p


def _fill(conn: psycopg.Connection, args: argparse.Namespace) -> None:
    t = time.perf_counter()
    for first in range(1, args.finished + 1, CHUNK):
        last = min(args.finished, first + CHUNK - 1)
        conn.execute(_FILL, {"types": args.types, "first": first, "last": last})
        progress(f"finished jobs: {last:,} of {args.finished:,} "
                 f"({time.perf_counter() - t:.1f}s)")
    conn.execute("SELECT jobvisor.recount_jobs()")
    types = [f"type_{i}" for i in range(args.types)]
    queue.enqueue_many(conn, [queue.NewJob(types[i % len(types)], {"i": i})
                              for i in range(args.queued + args.leased)])
    leased = 0
    for job_type in types:
        want = args.leased // len(types) + (1 if types.index(job_type) < args.leased
                                            % len(types) else 0)
        leased += len(queue.lease(conn, job_type, want, worker_id="bench:1:w",
                                  lease_seconds=3600))
    queue.create_batch(conn, "bench-open")
    progress(f"{args.queued:,} queued and {leased} leased jobs; VACUUM ANALYZE")
    conn.execute("VACUUM (ANALYZE) jobvisor.jobs")
    conn.execute("VACUUM (ANALYZE) jobvisor.job_counts")
    (size,) = conn.execute(
        "SELECT pg_size_pretty(pg_total_relation_size('jobvisor.jobs'))").fetchone()
    progress(f"jobvisor.jobs: {size} with indexes; filled in {time.perf_counter() - t:.1f}s")


def _time(call: Callable[[], Any], repeats: int, warmup: int = 10) -> list[float]:
    for _ in range(warmup):
        call()
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        call()
        out.append((time.perf_counter() - t) * 1000.0)
    return out


def _p95(values: list[float]) -> float:
    ranked = sorted(values)
    return ranked[max(0, -(-95 * len(ranked) // 100) - 1)]  # nearest rank


def _scans(plan: Any) -> list[tuple[str, str]]:
    """(node type, relation) of every scan in a JSON plan."""
    found: list[tuple[str, str]] = []

    def walk(node: dict[str, Any]) -> None:
        if "Relation Name" in node:
            found.append((node["Node Type"], node["Relation Name"]))
        for child in node.get("Plans", []):
            walk(child)

    walk(plan[0]["Plan"])
    return found


def _plan(conn: psycopg.Connection, sql: str, params: dict[str, Any]) -> list[tuple[str, str]]:
    (plan,) = conn.execute("EXPLAIN (FORMAT JSON) " + sql, params).fetchone()
    if isinstance(plan, str):
        plan = json.loads(plan)
    return _scans(plan)


def run(args: argparse.Namespace) -> None:
    load_at_start = round(os.getloadavg()[0], 2)
    with bench_database() as db:
        if not db.scratch:
            raise BenchFailed("this benchmark adds 10⁶ rows: it needs a scratch database "
                              "(a role that may CREATE DATABASE)")
        with psycopg.connect(db.dsn, autocommit=True) as conn:
            _fill(conn, args)
            figures = _measure(conn, args)
    figures |= {"finished": args.finished, "queued": args.queued, "leased": args.leased,
                "types": args.types, "repeats": args.repeats, "target_ms": TARGET_MS,
                "server": db.where, "server_version": db.server_version,
                "load_1m_at_start": load_at_start}
    emit(figures)


def _measure(conn: psycopg.Connection, args: argparse.Namespace) -> dict[str, Any]:
    sup_id = f"bench-{uuid.uuid4().hex[:8]}"
    state = {"types": [f"type_{i}" for i in range(args.types)], "workers": [], "plan": {}}
    calls: dict[str, Callable[[], Any]] = {
        "status_counts": lambda: queue.status_counts(conn),
        "publish": lambda: registry_table.publish(conn, sup_id, "bench", os.getpid(), state),
        "live_supervisors": lambda: registry_table.live_supervisors(conn),
        "rescue_expired": lambda: queue.rescue(conn),
        # One statement per status; `prune` is a round of all three.
        **{f"prune_{status}": (lambda status=status, age=age: queue.prune(
            conn, {status: age}, limit=5000)) for status, age in RETENTION.items()},
        "prune": lambda: queue.prune(conn, RETENTION, limit=5000),
        "prune_batches": lambda: queue.prune_batches(conn, max(RETENTION.values())),
    }
    # The statements behind them, for their plans.
    statements: dict[str, tuple[str, dict[str, Any]]] = {
        "status_counts": (queue._COUNTS, {}),
        "rescue_expired": (queue._RESCUE, {"code": "x", "message": "x"}),
        "prune_batches": (queue._PRUNE_BATCHES, {"age": max(RETENTION.values()),
                                                 "limit": 5000}),
    }
    for status, age in RETENTION.items():
        statements[f"prune_{status}"] = (queue._PRUNE, {"status": status, "age": age,
                                                        "limit": 5000})
    figures: dict[str, Any] = {}
    seq_scans = []
    for name, (sql, params) in statements.items():
        scans = _plan(conn, sql, params)
        figures[f"{name}_plan"] = sorted({f"{k} on {r}" for k, r in scans})
        if ("Seq Scan", "jobs") in scans:
            seq_scans.append(name)
    for name, call in calls.items():
        ms = _time(call, args.repeats)
        figures[f"{name}_median_ms"] = r3(statistics.median(ms))
        figures[f"{name}_p95_ms"] = r3(_p95(ms))
        progress(f"{name}: median {statistics.median(ms):.3f} ms, p95 {_p95(ms):.3f} ms "
                 f"over {args.repeats} calls")
    if args.old_repeats > 0:
        ms = _time(lambda: conn.execute(_OLD_COUNTS).fetchall(), args.old_repeats, warmup=1)
        figures["old_full_scan_counts_median_ms"] = r3(statistics.median(ms))
        progress(f"pre-007 full-scan count: median {statistics.median(ms):.1f} ms "
                 f"over {args.old_repeats} calls")
    with conn.transaction():
        kept = queue.status_counts(conn)
        scanned = conn.execute(_OLD_COUNTS).fetchall()
    finished = {(t, s): n for t, s, n, _ in scanned if s in queue.FINISHED}
    if finished != {(t, s): c[s] for t, c in kept.items() for s in queue.FINISHED if c[s]}:
        raise BenchFailed("status_counts disagrees with a full scan")
    # The target is per statement: `prune` (three statements) is left out of it.
    single = [k for k in calls if k != "prune"]
    worst_median = max(figures[f"{k}_median_ms"] for k in single)
    worst_p95 = max(figures[f"{k}_p95_ms"] for k in single)
    figures |= {"seq_scans_on_jobs": seq_scans, "worst_median_ms": worst_median,
                "worst_p95_ms": worst_p95,
                "met": worst_median < TARGET_MS and not seq_scans}
    return figures


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return main_guard(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
