"""Fair share's cost (issue #16): no-op throughput with `fair_by` off and on, at 10⁴ and
10⁵ distinct keys.

    python -m benchmarks.fairness [--n 200000] [--keys 10000,100000] [--rounds 1]
                                  [--processes 2] [--concurrency 8] [--prefetch 200]
                                  [--spread hash|round-robin]

Each run has a scratch database of its own (benchmarks/_common.bench_database). For
fair share on, the type is configured `fair_by: owner` first (jobvisor.fair_types, as the
supervisor writes it), so the insert trigger keys and tags every job. Then `--n` no-op
jobs are filled on the server in one statement, each naming one of K owners spread over
the queue in no order (`hashtext(i) mod K`: about n/K jobs per owner, so the fair order
is not the insertion order and the lease's heap reads are as scattered as they get;
`--spread round-robin`: owner i mod K, where the fair order is the insertion order);
VACUUM ANALYZE and a CHECKPOINT follow (timed, as benchmarks/backlog.py does). P
processes × C threads (prefetch F; queue_throughput's defaults; `--fair` when on) then
drain the queue: `jobs_per_s` = n / (first lease → last `finished_at`), the database's
clock; `steady_jobs_per_s` between the 10% and the 90% completion.

Fair share off runs the same jobs (payloads and all) through the plain lease. The
figures: one JSON line per run on stdout, and last the summary with the on/off ratio per
key count (the issue's target: >= 0.8). Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python benchmarks/fairness.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg  # noqa: E402

from benchmarks._common import (  # noqa: E402
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
from benchmarks.backlog import _nth_finished, _timed  # noqa: E402
from workers.core import queue  # noqa: E402

HANDLER = "workers.core.builtin:noop"
TARGET = 0.8

_FILL = """
WITH ins AS (
    INSERT INTO jobvisor.jobs (job_type, payload)
    SELECT %(t)s, jsonb_build_object('owner', 'o' || (CASE WHEN %(spread)s = 'hash'
                                                      THEN hashtext(i::text) & 2147483647
                                                      ELSE i END %% %(k)s))
    FROM generate_series(1, %(n)s) AS i
    RETURNING id, fair_key
)
SELECT min(id), max(id), count(*), count(DISTINCT fair_key) FROM ins
"""


@dataclass
class _Workers(WorkerGroup):
    """benchmarks/_common's worker group, with `--fair` when fair share is on."""

    fair: bool = False

    def command(self) -> list[str]:
        return super().command() + (["--fair"] if self.fair else [])


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.fairness",
                                description=__doc__.splitlines()[0])
    p.add_argument("--n", type=positive_int, default=200_000, help="jobs per run")
    p.add_argument("--keys", default="10000,100000",
                   help="comma-separated counts of distinct keys (owners)")
    p.add_argument("--rounds", type=positive_int, default=1,
                   help="run every (keys, off/on) pair this many times, in turn; medians")
    p.add_argument("--processes", type=positive_int, default=2, help="worker processes")
    p.add_argument("--concurrency", type=positive_int, default=8, help="threads per process")
    p.add_argument("--prefetch", type=non_negative_int, default=200,
                   help="jobs leased ahead of free threads, per process")
    p.add_argument("--spread", choices=("hash", "round-robin"), default="hash",
                   help="owners in no order (hash of the job's number) or in turn")
    p.add_argument("--timeout", type=float, default=900.0,
                   help="give up (exit 1) when a run's drain takes longer than this (s)")
    return p


def _fill(conn: psycopg.Connection, job_type: str, n: int, keys: int, spread: str) -> tuple[
        tuple[int, int], dict[str, Any]]:
    fill: dict[str, Any] = {}
    insert_s, (first, last, count, distinct) = _timed(conn, _FILL,
                                                      {"t": job_type, "n": n, "k": keys,
                                                       "spread": spread})
    if count != n:
        raise BenchFailed(f"fill: {count} rows, expected {n}")
    fill["insert_s"] = r3(insert_s)
    fill["insert_jobs_per_s"] = round(n / insert_s)
    fill["keys_tagged"] = distinct  # 0 with fair share off: the trigger left them alone
    fill["vacuum_analyze_s"] = r3(_timed(conn, "VACUUM ANALYZE jobvisor.jobs")[0])
    try:
        fill["checkpoint_s"] = r3(_timed(conn, "CHECKPOINT")[0])
    except psycopg.errors.InsufficientPrivilege:
        fill["checkpoint_s"] = None
    progress(f"fill: {n:,} jobs over {keys:,} keys in {insert_s:.3f}s ({fill})")
    return (int(first), int(last)), fill


def one_run(args: argparse.Namespace, keys: int, fair: bool) -> dict[str, Any]:
    with bench_database() as db, psycopg.connect(db.dsn, autocommit=True) as conn:
        if not db.scratch:
            raise BenchFailed("this benchmark writes 10⁵+ rows: it needs a scratch database")
        job_type = db.job_type("noop")
        if fair:
            queue.configure_fair_share(conn, {job_type: queue.FairShare("owner")}, [job_type])
        ids, fill = _fill(conn, job_type, args.n, keys, args.spread)
        if fair and not fill["keys_tagged"]:
            raise BenchFailed("fill: no job was keyed (is sql/009 applied?)")
        group = _Workers(db, job_type, args.processes, args.concurrency, args.prefetch,
                         handler=HANDLER, fair=fair)
        with running(group):
            startup_s = group.wait_started(timeout=60)
            wait_done(conn, group, ids, args.n, args.timeout, interval=0.2)
        first_lease, last_done = conn.execute(
            "SELECT min(started_at), max(finished_at) FROM jobvisor.jobs"
            " WHERE id BETWEEN %s AND %s", ids).fetchone()
        lo, hi = max(1, args.n // 10), args.n - args.n // 10
        steady = (hi - lo) / max(1e-6, (_nth_finished(conn, job_type, hi, ids)
                                        - _nth_finished(conn, job_type, lo, ids)).total_seconds())
        span = (last_done - first_lease).total_seconds()
        fig = {"keys": keys, "fair_share": fair, "spread": args.spread, "n": args.n,
               "jobs_per_s": round(args.n / span),
               "steady_jobs_per_s": round(steady), "process_s": r3(span),
               "startup_s": r3(startup_s), "fill": fill, "server_version": db.server_version}
    progress(f"keys {keys:,}, fair share {'on' if fair else 'off'}: {fig['jobs_per_s']:,}/s "
             f"(steady {fig['steady_jobs_per_s']:,}/s)")
    emit(fig)
    return fig


def run(args: argparse.Namespace) -> None:
    try:
        key_counts = [positive_int(k) for k in args.keys.split(",") if k]
    except ValueError:
        raise BenchFailed(f"--keys: comma-separated positive integers, got {args.keys!r}") \
            from None
    load_at_start = round(os.getloadavg()[0], 2)
    runs: dict[tuple[int, bool], list[dict[str, Any]]] = {}
    for r in range(args.rounds):
        for keys in key_counts:
            for fair in (False, True):
                progress(f"round {r + 1}/{args.rounds}: {keys:,} keys, fair share "
                         f"{'on' if fair else 'off'}")
                runs.setdefault((keys, fair), []).append(one_run(args, keys, fair))

    def median(keys: int, fair: bool, what: str) -> float:
        return statistics.median(f[what] for f in runs[(keys, fair)])

    summary: dict[str, Any] = {}
    for keys in key_counts:
        off, on = (median(keys, f, "jobs_per_s") for f in (False, True))
        s_off, s_on = (median(keys, f, "steady_jobs_per_s") for f in (False, True))
        summary[str(keys)] = {
            "off_jobs_per_s": round(off), "on_jobs_per_s": round(on),
            "ratio": round(on / off, 3),
            "steady_off_jobs_per_s": round(s_off), "steady_on_jobs_per_s": round(s_on),
            "steady_ratio": round(s_on / s_off, 3),
            # The enqueue side: the fill's INSERT, with and without the trigger's tagging.
            "off_insert_jobs_per_s": round(statistics.median(
                f["fill"]["insert_jobs_per_s"] for f in runs[(keys, False)])),
            "on_insert_jobs_per_s": round(statistics.median(
                f["fill"]["insert_jobs_per_s"] for f in runs[(keys, True)])),
        }
    emit({"fairness": summary, "target_ratio": TARGET,
          "meets_target": all(v["ratio"] >= TARGET for v in summary.values()),
          "n": args.n, "processes": args.processes, "concurrency": args.concurrency,
          "prefetch": args.prefetch, "handler": HANDLER, "rounds": args.rounds,
          "load_1m_at_start": load_at_start, "load_1m_at_end": round(os.getloadavg()[0], 2)})


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return main_guard(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
