"""The model gate finds a server's parallelism it is not told (issue #16).

    python -m benchmarks.model_adaptive [--slots 1,2,4,8] [--latency 0.5]
                                        [--processes 4] [--concurrency 4]
                                        [--warmup 20] [--seconds 40]
                                        [--restart 2:8:1] [--follow-limit 30]

**Per slot count S** (`--slots`): the fake Ollama (`python -m tests.fakes.ollama`, its own
process) serves S requests at once, each for `--latency` s; more wait in its line, as in
Ollama. P worker processes × C threads (`--processes`, `--concurrency`: 16 possible
requests, more than any S here) run a backlog of jobs that each make one `/api/chat` call
(`benchmarks.handlers:model_call`) through the real client and so through the gate
(`AI_MODEL_LIMIT` unset: adaptive). Nobody tells them S. After `--warmup` s the fake's
counters are read twice, `--seconds` apart:

* `utilisation` = busy slot-seconds / (S × window) (target ≥ 0.95);
* `wait_share` = seconds requests spent in the fake's line / busy slot-seconds (≤ 0.10);
* `busy_503` = requests the fake turned away (it has no `--max-queue` here, like Ollama's
  default of 512 that a 16-request client cannot reach: the figure is the gate's, not a
  cap's), `max_queued` = the longest line it saw;
* `limit_*`: the shared limit (`jobvisor.model_limits`, sampled every 0.25 s): when it
  first reached S (`reached_s_after`), and the share of the window's samples at S.

**Restart** (`--restart A:B:...`): the fake starts with A slots; after the warm-up it is
stopped and started again on the same port with B slots, then with the next count, and so
on. `follow_s` = seconds from the restart until the shared limit equals the new count
(target ≤ `--follow-limit`).

Each case is one JSON line on stdout; progress goes to stderr; the last line is a summary
object with every case.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python benchmarks/model_adaptive.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg  # noqa: E402

from benchmarks._common import (  # noqa: E402
    BenchDatabase,
    BenchFailed,
    WorkerGroup,
    bench_database,
    emit,
    main_guard,
    positive_int,
    progress,
    r3,
    running,
)
from benchmarks.model_utilization import VISION, FakeServer  # noqa: E402
from workers.core import model_gate  # noqa: E402
from workers.core import queue as q  # noqa: E402

UTILISATION_TARGET = 0.95
WAIT_SHARE_TARGET = 0.10


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.model_adaptive",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--slots", default="1,2,4,8", help="slot counts, one case each")
    p.add_argument("--latency", type=float, default=0.5, help="seconds per request")
    p.add_argument("--processes", type=positive_int, default=4)
    p.add_argument("--concurrency", type=positive_int, default=4)
    p.add_argument("--warmup", type=float, default=20.0, help="seconds before the window")
    p.add_argument("--seconds", type=float, default=40.0, help="the measured window")
    p.add_argument("--restart", default="2:8:1",
                   help="slot counts the fake restarts through (A:B:...), '' for none")
    p.add_argument("--follow-limit", type=float, default=30.0,
                   help="seconds the limit may take to follow a restart")
    return p


def _counts(text: str, what: str) -> list[int]:
    try:
        values = [int(x) for x in text.replace(":", ",").split(",") if x.strip()]
        # "1,2,4,8" (cases) and "2:8:1" (a sequence) are both lists of counts
    except ValueError:
        raise BenchFailed(f"{what}: comma-separated whole numbers, got {text!r}") from None
    if any(v < 1 for v in values):
        raise BenchFailed(f"{what}: slot counts are at least 1, got {text!r}")
    return values


class LimitWatch:
    """The shared limit of one endpoint, read from jobvisor.model_limits."""

    def __init__(self, conn: psycopg.Connection, url: str) -> None:
        self.conn = conn
        self.endpoint = model_gate.endpoint_label(url)
        self.samples: list[tuple[float, int]] = []

    def read(self) -> int | None:
        row = self.conn.execute("SELECT lim FROM jobvisor.model_limits WHERE endpoint = %s "
                                "AND model = %s", (self.endpoint, VISION)).fetchone()
        if row is not None:
            self.samples.append((time.monotonic(), int(row[0])))
        return None if row is None else int(row[0])

    def sleep(self, seconds: float, interval: float = 0.25) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.read()
            time.sleep(min(interval, max(0.0, end - time.monotonic())))


def _backlog(conn: psycopg.Connection, job_type: str, url: str, n: int) -> None:
    jobs = [q.NewJob(job_type, {"base_url": url, "model": VISION}, max_attempts=20)
            for _ in range(n)]
    q.enqueue_copy(conn, jobs)


def _group(db: BenchDatabase, job_type: str, args: argparse.Namespace) -> WorkerGroup:
    return WorkerGroup(db, job_type, args.processes, args.concurrency,
                       handler="benchmarks.handlers:model_call", poll=0.5)


def _steady(args: argparse.Namespace, db: BenchDatabase, slots: int) -> dict[str, Any]:
    job_type = f"adaptive_s{slots}"
    fake = FakeServer(slots, args.latency, model_latency={})
    fake.start()
    try:
        with psycopg.connect(db.dsn, autocommit=True) as conn, \
                running(_group(db, job_type, args)) as group:
            group.wait_listening(conn, timeout=60)
            rate = slots / args.latency
            _backlog(conn, job_type, fake.url,
                     math.ceil(rate * (args.warmup + args.seconds) * 1.5) + 50)
            started = time.monotonic()
            watch = LimitWatch(conn, fake.url)
            watch.sleep(args.warmup)
            a, ta = fake.stats(), time.monotonic()
            watch.sleep(args.seconds)
            b, tb = fake.stats(), time.monotonic()
            group.check_alive()
    finally:
        fake.stop()
    busy = b["busy_slot_seconds"] - a["busy_slot_seconds"]
    wait = b["wait_seconds"] - a["wait_seconds"]
    reached = next((t - started for t, lim in watch.samples if lim >= slots), None)
    window = [lim for t, lim in watch.samples if ta <= t <= tb]
    return {
        "case": "steady", "slots": slots, "latency_s": args.latency,
        "processes": args.processes, "concurrency": args.concurrency,
        "window_s": r3(tb - ta), "requests": b["completed"] - a["completed"],
        "utilisation": r3(busy / (slots * (tb - ta))),
        "wait_share": r3(wait / busy) if busy else None,
        "busy_503": b["rejected_busy"], "max_queued": b["max_queued"],
        "limit_reached_s_after": None if reached is None else r3(reached),
        "limit_at_slots_share": r3(sum(1 for x in window if x == slots) / len(window))
        if window else None,
        "limit_min": min(window) if window else None, "limit_max": max(window) if window else None,
        "targets": {"utilisation": UTILISATION_TARGET, "wait_share": WAIT_SHARE_TARGET},
    }


def _restart(args: argparse.Namespace, db: BenchDatabase, counts: list[int]) -> dict[str, Any]:
    job_type = "adaptive_restart"
    fake = FakeServer(counts[0], args.latency, model_latency={})
    fake.start()
    port = int(fake.url.rsplit(":", 1)[1])
    follows: list[dict[str, Any]] = []
    busy_503 = 0
    try:
        with psycopg.connect(db.dsn, autocommit=True) as conn, \
                running(_group(db, job_type, args)) as group:
            group.wait_listening(conn, timeout=60)
            total = args.warmup + (len(counts) - 1) * (args.follow_limit + args.warmup)
            _backlog(conn, job_type, fake.url,
                     math.ceil(max(counts) / args.latency * total * 1.5) + 50)
            watch = LimitWatch(conn, fake.url)
            watch.sleep(args.warmup)
            for new in counts[1:]:
                before = watch.read()
                busy_503 += fake.stats()["rejected_busy"]
                fake.stop()
                fake = FakeServer(new, args.latency, model_latency={}, port=port)
                fake.start()
                restarted = time.monotonic()
                progress(f"fake restarted with {new} slots (limit was {before})")
                followed = None
                while time.monotonic() - restarted < args.follow_limit * 2:
                    if watch.read() == new:
                        followed = time.monotonic() - restarted
                        break
                    time.sleep(0.1)
                follows.append({"from_slots": before, "to_slots": new,
                                "follow_s": None if followed is None else r3(followed)})
                watch.sleep(args.warmup)
            busy_503 += fake.stats()["rejected_busy"]
            group.check_alive()
    finally:
        fake.stop()
    return {"case": "restart", "slots": counts, "latency_s": args.latency,
            "processes": args.processes, "concurrency": args.concurrency,
            "follows": follows, "busy_503": busy_503,
            "target_follow_s": args.follow_limit}


def run(args: argparse.Namespace) -> None:
    slots = _counts(args.slots, "--slots")
    restart = _counts(args.restart, "--restart") if args.restart.strip() else []
    if restart and len(restart) < 2:
        raise BenchFailed("--restart: at least two slot counts (A:B)")
    results = []
    with bench_database() as db:
        for s in slots:
            progress(f"case: {s} slots, {args.processes} x {args.concurrency} workers")
            result = _steady(args, db, s)
            emit(result)
            results.append(result)
        if restart:
            progress(f"case: restarts through {restart} slots")
            result = _restart(args, db, restart)
            emit(result)
            results.append(result)
    emit({"summary": results, "postgres": db.server_version})


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return main_guard(lambda: run(args))


if __name__ == "__main__":
    raise SystemExit(main())
