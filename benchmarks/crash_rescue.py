"""kill -9 a child mid-job: seconds until the job runs again (target ≤ 2 s).

A real `jobvisor run` serves a `sleep` type (concurrency 1) with the supervisor and queue
settings of the shipped config. Each repetition enqueues a long `sleep` job, waits until
a child leases it, reads the database clock, SIGKILLs the child named in `leased_by`,
and polls the row until attempt 2 is leased: rescue = started_at(attempt 2) − kill time,
both on the database's clock. The supervisor's `leases_rescued` log line splits that
into "supervisor noticed and requeued" and "requeued until leased again".

Two cases, each with its own supervisor:

- `idle_peer`: 2 children; the other one is idle and LISTENing, so the rescue's NOTIFY
  wakes it at once.
- `only_child`: 1 child; the job waits for the supervisor to restart the slot, i.e.
  `supervisor.restart.backoff` (the first restart after a healthy run) plus the start
  of a fresh child.

Before each kill every child has been up for `restart.healthy_after`, so each kill is
a "first crash after a healthy run" and the restart delay is the plain backoff.

    python -m benchmarks.crash_rescue [--repeats 10] [--cases idle_peer,only_child]
        [--restart-backoff 1s] [--config config/jobvisor.yaml] [--keep-logs DIR]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg

from benchmarks._common import (
    BenchDatabase,
    BenchFailed,
    bench_database,
    emit,
    main_guard,
    positive_int,
    progress,
    r3,
    wait_until,
)
from benchmarks.supervisor_handlers import SHIPPED_CONFIG, config_with, parse_ts, supervisor
from supervisor_app.units import parse_duration
from workers.core import queue as q

CASES = {"idle_peer": 2, "only_child": 1}  # case -> processes of the type
TARGET_S = 2.0
JOB_SECONDS = 120  # far longer than a repetition; the job is cancelled afterwards


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.crash_rescue",
                                description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=positive_int, default=10, help="kills per case")
    p.add_argument("--cases", default=",".join(CASES),
                   help=f"comma-separated, of {', '.join(CASES)}")
    p.add_argument("--config", type=Path, default=SHIPPED_CONFIG,
                   help="supervisor/queue settings from this file (default: shipped)")
    p.add_argument("--restart-backoff", type=parse_duration, default=None,
                   help="override supervisor.restart.backoff (default: the config's)")
    p.add_argument("--timeout", type=float, default=60.0, help="bound of every wait (s)")
    p.add_argument("--keep-logs", type=Path, default=None,
                   help="write the supervisors' logs under this directory (kept)")
    return p


def _db_now(conn: psycopg.Connection) -> Any:
    return conn.execute("SELECT clock_timestamp()").fetchone()[0]


def _row(conn: psycopg.Connection, job_id: int) -> tuple[str, int, Any, str | None]:
    row = conn.execute("SELECT status, attempts, started_at, leased_by FROM jobvisor.jobs"
                       " WHERE id = %s", (job_id,)).fetchone()
    if row is None:
        raise BenchFailed(f"job {job_id} vanished")
    return row[0], row[1], row[2], row[3]


def one_kill(sup: Any, conn: psycopg.Connection, job_type: str, processes: int,
             healthy_after: float, timeout: float) -> dict[str, Any]:
    # A view published before this moment may still list the last victim as running.
    running = sup.wait_running({job_type: processes}, timeout=healthy_after + timeout,
                               fresh_after=_db_now(conn))
    pids = {w["pid"] for w in running if w["job_type"] == job_type}
    job_id = q.enqueue(conn, q.NewJob(job_type, {"seconds": JOB_SECONDS}, max_attempts=5))

    def leased() -> tuple[str, int, Any, str | None] | None:
        sup.check_alive()
        row = _row(conn, job_id)
        return row if row[0] == "leased" and row[1] == 1 else None

    _, _, started_1, owner = wait_until(leased, timeout=timeout, what=f"job {job_id} leased",
                                        interval=0.01)
    assert owner is not None
    victim = int(owner.split(":")[1])
    if victim not in pids:
        raise BenchFailed(f"job {job_id} leased by {owner}, not one of the children {pids}")
    time.sleep(0.2)  # mid-job: the handler is sleeping
    kill_db = _db_now(conn)
    kill_wall = time.time()
    os.kill(victim, signal.SIGKILL)

    def again() -> tuple[str, int, Any, str | None] | None:
        sup.check_alive()
        row = _row(conn, job_id)
        return row if row[0] == "leased" and row[1] >= 2 else None

    _, attempts, started_2, owner_2 = wait_until(again, timeout=timeout,
                                                 what=f"job {job_id} leased again",
                                                 interval=0.005)
    rescue_s = (started_2 - kill_db).total_seconds()
    rescued = [e for e in sup.events("leases_rescued") if e.get("child_pid") == victim]
    detect_s = parse_ts(rescued[0]["ts"]) - kill_wall if rescued else None
    new_pid = int(str(owner_2).split(":")[1])
    if q.cancel(conn, job_id) is None:
        raise BenchFailed(f"job {job_id} could not be cancelled")
    wait_until(lambda: _row(conn, job_id)[0] in ("cancelled", "completed", "failed"),
               timeout=timeout, what=f"job {job_id} cancelled", interval=0.05)
    return {"job_id": job_id, "victim": victim, "rescuer": new_pid, "attempts": attempts,
            "rescue_s": rescue_s, "detect_s": detect_s,
            "rescuer_was_peer": new_pid in pids}


def run_case(db: BenchDatabase, case: str, args: argparse.Namespace,
             workdir: Path) -> dict[str, Any]:
    processes = CASES[case]
    job_type = db.job_type("sleep")
    types = {job_type: {"handler": "workers.core.builtin:sleep",
                        "processes": {"min": processes, "max": processes},
                        "concurrency": 1, "memory_per_job": "16MiB", "priority": 0,
                        "timeout": "300s"}}
    restart = {} if args.restart_backoff is None else {"backoff": args.restart_backoff}
    cfg = config_with(types, args.config, restart=restart)
    backoff = parse_duration(cfg["supervisor"].get("restart", {}).get("backoff", "1s"))
    healthy_after = parse_duration(cfg["supervisor"].get("restart", {}).get("healthy_after",
                                                                            "10s"))
    progress(f"case {case}: {processes} child(ren), restart backoff {backoff:g}s, "
             f"healthy_after {healthy_after:g}s, {args.repeats} kills")
    samples: list[dict[str, Any]] = []
    with supervisor(db.dsn, cfg, workdir / case) as sup, \
            psycopg.connect(db.dsn, autocommit=True) as conn:
        for i in range(args.repeats):
            s = one_kill(sup, conn, job_type, processes, healthy_after, args.timeout)
            samples.append(s)
            detect = "?" if s["detect_s"] is None else f"{s['detect_s']:.3f}"
            progress(f"  {case} #{i + 1}: rescue {s['rescue_s']:.3f}s (requeued after "
                     f"{detect}s), pid {s['victim']} -> {s['rescuer']}"
                     f"{' (peer)' if s['rescuer_was_peer'] else ' (restarted)'}")
    times = [s["rescue_s"] for s in samples]
    detects = [s["detect_s"] for s in samples if s["detect_s"] is not None]
    return {
        "processes": processes,
        "restart_backoff_s": backoff,
        "median_s": r3(statistics.median(times)),
        "min_s": r3(min(times)),
        "max_s": r3(max(times)),
        "requeue_median_s": r3(statistics.median(detects)) if detects else None,
        "requeue_max_s": r3(max(detects)) if detects else None,
        "by_peer": sum(1 for s in samples if s["rescuer_was_peer"]),
        "n": len(samples),
    }


def main() -> int:
    args = _parser().parse_args()
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown or not cases:
        print(f"benchmark: --cases: unknown {unknown or cases} (use {', '.join(CASES)})",
              file=sys.stderr)
        return 2

    def body() -> None:
        figures: dict[str, Any] = {"target_s": TARGET_S, "repeats": args.repeats}
        with bench_database() as db, tempfile.TemporaryDirectory(prefix="jv-crash-") as tmp:
            figures["postgres"] = db.server_version
            for case in cases:
                figures[case] = run_case(db, case, args, args.keep_logs or Path(tmp))
        figures["target_met"] = all(figures[c]["max_s"] <= TARGET_S for c in cases)
        emit(figures)

    return main_guard(body)


if __name__ == "__main__":
    raise SystemExit(main())
