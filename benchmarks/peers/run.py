"""jobvisor side by side with graphile-worker and PgQueuer: no-op throughput (and wake
latency), interleaved rounds on one PostgreSQL server.

    python -m benchmarks.peers.run [--rounds 3] [--n 20000] [--latency 200]
                                   [--systems jobvisor,graphile_batched,graphile_unbatched,pgqueuer]

Sets the peers up itself when they are missing, outside jobvisor's venv and package:
graphile-worker 0.17 from the npm registry into benchmarks/peers/node_modules (runs on
Node 20), PgQueuer from PyPI into the venv benchmarks/peers/.venv-pgqueuer.

Every system gets 2 processes × 8 concurrent jobs and its own scratch database on the
server DATABASE_URL points at (default postgresql://postgres@127.0.0.1:5432/postgres),
dropped afterwards:

* jobvisor: `benchmarks/queue_throughput.py` (prefetch 200) and, with --latency,
  `benchmarks/wake_latency.py` (same 2 × 8, prefetch 200, poll 60) as subprocesses; they
  make and drop their own `jobvisor_bench_*` databases. Their figures are used as they
  are (database clock: first lease → last `finished_at`).
* graphile_batched: localQueue.size 500, completeJobBatchDelay 0 (the batching the
  graphile-worker docs recommend for throughput); graphile_unbatched: neither.
* pgqueuer: QueueManager.run(batch_size=--pgq-batch-size), one asyncpg connection.

A peer's phases, against the same worker processes: cold (N jobs inserted in one
transaction before the workers start; `jobs_per_s` = N / (queue seen empty − first
handler start), also incl. start-up from just before spawning), warm (workers idle:
N more jobs in one transaction; N / (queue seen empty − just before COMMIT)), then
latency (single autocommitted enqueues 20 ms apart; handler start − time.time() just
before the enqueue call, like wake_latency.py). "Queue seen empty" is the database's
clock_timestamp() in the first poll (every --poll-ms) that finds no row left in the
peer's job table (both peers delete a job when they complete it), so it can be late by
up to one poll: a bias against the peers of ≤ 10 ms on runs of ~1 s. Handler stamps are
this machine's wall clock (the server must be on this machine).

Progress goes to stderr; stdout gets one JSON line per run, then one with the medians
(min–max) and the ratios jobvisor / graphile_batched and jobvisor / pgqueuer.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
PGQ_VENV = HERE / ".venv-pgqueuer"
PGQ_PY = PGQ_VENV / "bin" / "python"
GW_PKG = HERE / "node_modules" / "graphile-worker" / "package.json"
DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
ALL_SYSTEMS = ("jobvisor", "graphile_batched", "graphile_unbatched", "pgqueuer")


class Failed(Exception):
    pass


def progress(message: str) -> None:
    print(f"[peers] {message}", file=sys.stderr, flush=True)


def nearest_rank(values: list[float], q: float) -> float:
    import math
    return values[max(0, math.ceil(q * len(values)) - 1)]


# --- setting the peers up --------------------------------------------------------------

def ensure_peers(systems: list[str]) -> dict[str, str]:
    versions: dict[str, str] = {}
    if any(s.startswith("graphile") for s in systems):
        if not GW_PKG.exists():
            progress("installing graphile-worker@0.17 into benchmarks/peers/node_modules")
            subprocess.run(["npm", "install", "--no-save", "--no-package-lock",
                            "--no-audit", "--no-fund", "graphile-worker@0.17"],
                           cwd=HERE, check=True, stdout=sys.stderr)
        versions["graphile-worker"] = json.loads(GW_PKG.read_text())["version"]
        versions["node"] = subprocess.run(["node", "--version"], capture_output=True,
                                          text=True, check=True).stdout.strip()
    if "pgqueuer" in systems:
        if not PGQ_PY.exists():
            progress("creating benchmarks/peers/.venv-pgqueuer")
            base = getattr(sys, "_base_executable", sys.executable)
            subprocess.run([base, "-m", "venv", str(PGQ_VENV)], check=True)
        ok = subprocess.run([str(PGQ_PY), "-c", "import pgqueuer, asyncpg"],
                            capture_output=True).returncode == 0
        if not ok:
            progress("installing pgqueuer 1.6 and asyncpg from PyPI into .venv-pgqueuer")
            subprocess.run([str(PGQ_PY), "-m", "pip", "install", "-q", "pgqueuer>=1.6,<1.7",
                            "asyncpg"], check=True, stdout=sys.stderr)
        versions["pgqueuer"] = subprocess.run(
            [str(PGQ_PY), "-c", "import pgqueuer; print(pgqueuer.__version__)"],
            capture_output=True, text=True, check=True).stdout.strip()
    return versions


# --- scratch databases -----------------------------------------------------------------

@contextmanager
def scratch_db(base: str, system: str) -> Iterator[str]:
    name = f"peers_bench_{system}_{secrets.token_hex(4)}"
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    progress(f"scratch database {name}")
    try:
        yield make_conninfo(base, dbname=name)
    finally:
        with psycopg.connect(base, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        progress(f"dropped {name}")


def url_of(dsn: str) -> str:
    """A postgresql:// URL for node-postgres and asyncpg, from a libpq conninfo."""
    d = conninfo_to_dict(dsn)
    auth = d.get("user", "postgres") + (f":{d['password']}" if d.get("password") else "")
    host = d.get("host", "127.0.0.1")
    return f"postgresql://{auth}@{host}:{d.get('port', 5432)}/{d['dbname']}"


# --- peer worker processes -------------------------------------------------------------

class Peer:
    """One peer configuration: how to install its schema, enqueue and run workers."""

    def __init__(self, system: str, args: argparse.Namespace) -> None:
        self.system = system
        self.args = args

    def _cmd(self, mode: str) -> list[str]:
        if self.system == "pgqueuer":
            return [str(PGQ_PY), str(HERE / "pgqueuer_worker.py"), mode]
        return ["node", str(HERE / "graphile_worker.js"), mode]

    def env(self, dsn: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["DATABASE_URL"] = url_of(dsn)
        env["GW_CONCURRENCY"] = str(self.args.concurrency)
        env["GW_POLL_MS"] = "2000"
        if self.system == "graphile_batched":
            env["GW_LOCAL_QUEUE"] = str(self.args.gw_local_queue)
            env["GW_COMPLETE_BATCH_DELAY"] = "0"
        env["PGQ_BATCH_SIZE"] = str(self.args.pgq_batch_size)
        env["PGQ_DEQUEUE_TIMEOUT_S"] = "30"
        return env

    def install(self, dsn: str) -> None:
        subprocess.run(self._cmd("schema"), env=self.env(dsn), check=True, cwd=HERE)

    @property
    def table(self) -> str:
        return "pgqueuer" if self.system == "pgqueuer" else "graphile_worker._private_jobs"

    def enqueue_bulk(self, conn: psycopg.Connection, n: int) -> Any:
        """n no-op jobs in one transaction; the database time just before COMMIT."""
        with conn.transaction():
            if self.system == "pgqueuer":
                conn.execute("INSERT INTO pgqueuer (priority, entrypoint, payload, status)"
                             " SELECT 0, 'noop', NULL, 'queued' FROM generate_series(1, %s)",
                             (n,))
            else:
                conn.execute("SELECT count(*) FROM graphile_worker.add_jobs(ARRAY("
                             "SELECT ROW('noop', '{}'::json, NULL, NULL, NULL, NULL, NULL,"
                             " NULL)::graphile_worker.job_spec FROM generate_series(1, %s)))",
                             (n,))
            return conn.execute("SELECT clock_timestamp()").fetchone()[0]

    def enqueue_one(self, conn: psycopg.Connection, i: int) -> None:
        if self.system == "pgqueuer":
            conn.execute("INSERT INTO pgqueuer (priority, entrypoint, payload, status)"
                         " VALUES (0, 'stamp', %s, 'queued')",
                         (json.dumps({"i": i}).encode(),))
        else:
            conn.execute("SELECT graphile_worker.add_job('stamp', json_build_object('i', %s))",
                         (i,))

    def drained(self, conn: psycopg.Connection) -> Any | None:
        empty, now = conn.execute(
            f"SELECT NOT EXISTS (SELECT 1 FROM {self.table}), clock_timestamp()").fetchone()
        return now if empty else None


class Procs:
    def __init__(self, cmd: list[str], env: dict[str, str], count: int) -> None:
        self.procs: list[subprocess.Popen[str]] = []
        self.ready = 0
        self.stats: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.readers: list[threading.Thread] = []
        for _ in range(count):
            p = subprocess.Popen(cmd, env=env, cwd=HERE, stdout=subprocess.PIPE, text=True)
            self.procs.append(p)
            t = threading.Thread(target=self._read, args=(p,), daemon=True)
            t.start()
            self.readers.append(t)

    def _read(self, p: subprocess.Popen[str]) -> None:
        assert p.stdout is not None
        for line in p.stdout:
            try:
                rec = json.loads(line)
            except ValueError:
                progress(f"peer {p.pid}: {line.rstrip()}")
                continue
            with self.lock:
                if rec.get("event") == "ready":
                    self.ready += 1
                elif rec.get("event") == "stats":
                    self.stats.append(rec)

    def check_alive(self) -> None:
        for p in self.procs:
            if p.poll() is not None:
                raise Failed(f"peer worker {p.pid} exited early with code {p.returncode}")

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            with self.lock:
                if self.ready >= len(self.procs):
                    return
            if time.monotonic() > deadline:
                raise Failed("peer workers did not report ready")
            time.sleep(0.01)

    def stop(self, timeout: float = 30.0) -> list[int | None]:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        codes: list[int | None] = []
        deadline = time.monotonic() + timeout
        for p in self.procs:
            try:
                codes.append(p.wait(timeout=max(0.0, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
                codes.append(None)
        for t in self.readers:
            t.join(timeout=2)
        return codes


def wait_drained(peer: Peer, conn: psycopg.Connection, procs: Procs, timeout: float,
                 poll_s: float) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        procs.check_alive()
        now = peer.drained(conn)
        if now is not None:
            return now
        if time.monotonic() > deadline:
            raise Failed(f"{peer.system}: jobs not done after {timeout:g}s")
        time.sleep(poll_s)


def run_peer(system: str, args: argparse.Namespace, base: str) -> dict[str, Any]:
    peer = Peer(system, args)
    n = args.n
    load = round(os.getloadavg()[0], 2)
    with scratch_db(base, system) as dsn, psycopg.connect(dsn, autocommit=True) as conn:
        peer.install(dsn)
        t = time.perf_counter()
        peer.enqueue_bulk(conn, n)
        enqueue_s = time.perf_counter() - t
        spawned = conn.execute("SELECT extract(epoch FROM clock_timestamp())::float8"
                               ).fetchone()[0]
        procs = Procs(peer._cmd("work"), peer.env(dsn), args.processes)
        latency: dict[int, float] = {}
        try:
            procs.wait_ready(60)
            cold_end = wait_drained(peer, conn, procs, args.timeout, args.poll_ms / 1000)
            cold_end_s = cold_end.timestamp()
            progress(f"{system}: cold {n} done {cold_end_s - spawned:.3f}s after spawn")
            time.sleep(0.5)  # idle, listening
            visible = peer.enqueue_bulk(conn, n)
            warm_end = wait_drained(peer, conn, procs, args.timeout, args.poll_ms / 1000)
            warm_s = (warm_end - visible).total_seconds()
            progress(f"{system}: warm {n} done {warm_s:.3f}s after commit "
                     f"({n / warm_s:,.0f}/s)")
            if args.latency:
                time.sleep(0.5)
                interval = args.interval_ms / 1000
                t0 = time.monotonic() + interval
                for i in range(args.latency):
                    time.sleep(max(0.0, t0 + i * interval - time.monotonic()))
                    before = time.time()
                    peer.enqueue_one(conn, i)
                    latency[i] = before
                wait_drained(peer, conn, procs, args.timeout, args.poll_ms / 1000)
        finally:
            codes = procs.stop()
            progress(f"{system}: workers stopped, exit codes {codes}")
    stats = procs.stats
    if len(stats) != args.processes:
        raise Failed(f"{system}: {len(stats)} of {args.processes} workers reported stats")
    total = sum(s["count"] for s in stats)
    expected = 2 * n + args.latency
    if total != expected:
        raise Failed(f"{system}: handlers ran {total} times, expected {expected}")
    first_start = min(s["first_start"] for s in stats if s["first_start"] is not None)
    cold_s = cold_end_s - first_start
    incl = cold_end_s - spawned
    fig: dict[str, Any] = {
        "system": system, "jobs_per_s": round(n / cold_s), "process_s": round(cold_s, 3),
        "jobs_per_s_incl_startup": round(n / incl), "process_s_incl_startup": round(incl, 3),
        "first_start_after_spawn_s": round(first_start - spawned, 3),
        "warm_jobs_per_s": round(n / warm_s), "warm_process_s": round(warm_s, 3),
        "enqueue_s": round(enqueue_s, 3),
    }
    if args.latency:
        stamps: dict[str, float] = {}
        for s in stats:
            stamps.update(s["stamps"])
        ms = sorted((stamps[str(i)] - t) * 1000 for i, t in latency.items())
        fig |= {"latency_median_ms": round(statistics.median(ms), 3),
                "latency_p95_ms": round(nearest_rank(ms, 0.95), 3),
                "latency_max_ms": round(ms[-1], 3)}
    fig |= {"n": n, "processes": args.processes, "concurrency": args.concurrency,
            "load_1m_at_start": load}
    if system == "graphile_batched":
        fig |= {"local_queue_size": args.gw_local_queue, "complete_job_batch_delay": 0}
    if system == "pgqueuer":
        fig["batch_size"] = args.pgq_batch_size
    return fig


def _last_json(out: str, what: str) -> dict[str, Any]:
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    if not lines:
        raise Failed(f"{what} printed no figures")
    return json.loads(lines[-1])


def run_jobvisor(args: argparse.Namespace, base: str) -> dict[str, Any]:
    env = dict(os.environ, DATABASE_URL=base)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    load = round(os.getloadavg()[0], 2)
    tp = subprocess.run(
        [sys.executable, "-m", "benchmarks.queue_throughput", "--n", str(args.n),
         "--processes", str(args.processes), "--concurrency", str(args.concurrency),
         "--prefetch", str(args.prefetch), "--timeout", str(args.timeout)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    if tp.returncode != 0:
        raise Failed(f"queue_throughput exited {tp.returncode}")
    t = _last_json(tp.stdout, "queue_throughput")
    fig: dict[str, Any] = {
        "system": "jobvisor", "jobs_per_s": t["jobs_per_s"], "process_s": t["process_s"],
        "jobs_per_s_incl_startup": t["jobs_per_s_incl_startup"],
        "process_s_incl_startup": t["process_s_incl_startup"],
        "first_start_after_spawn_s": t["first_lease_after_spawn_s"],
        "warm_jobs_per_s": t["warm_jobs_per_s"], "warm_process_s": t["warm_process_s"],
        "enqueue_s": t["enqueue_s"],
    }
    if args.latency:
        wl = subprocess.run(
            [sys.executable, "-m", "benchmarks.wake_latency", "--n", str(args.latency),
             "--interval-ms", f"{args.interval_ms:g}", "--processes", str(args.processes),
             "--concurrency", str(args.concurrency), "--prefetch", str(args.prefetch),
             "--poll", "60"],
            cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
        if wl.returncode != 0:
            raise Failed(f"wake_latency exited {wl.returncode}")
        w = _last_json(wl.stdout, "wake_latency")
        fig |= {"latency_median_ms": w["median_ms"], "latency_p95_ms": w["p95_ms"],
                "latency_max_ms": w["max_ms"]}
    fig |= {"n": args.n, "processes": args.processes, "concurrency": args.concurrency,
            "prefetch": args.prefetch, "load_1m_at_start": load}
    return fig


# --- the rounds ------------------------------------------------------------------------

def summarize(runs: list[dict[str, Any]], systems: list[str]) -> dict[str, Any]:
    keys = ("jobs_per_s", "jobs_per_s_incl_startup", "warm_jobs_per_s",
            "latency_median_ms", "latency_p95_ms")
    med: dict[str, dict[str, Any]] = {}
    for s in systems:
        mine = [r for r in runs if r["system"] == s]
        med[s] = {}
        for k in keys:
            vals = [r[k] for r in mine if k in r]
            if vals:
                med[s][k] = {"median": round(statistics.median(vals), 3), "min": min(vals),
                             "max": max(vals)}
    ratios: dict[str, float] = {}
    for peer in ("graphile_batched", "graphile_unbatched", "pgqueuer"):
        if "jobvisor" in med and peer in med:
            for k in ("jobs_per_s", "warm_jobs_per_s"):
                if k in med["jobvisor"] and k in med[peer]:
                    ratios[f"jobvisor/{peer}:{k}"] = round(
                        med["jobvisor"][k]["median"] / med[peer][k]["median"], 3)
    return {"summary": med, "ratios": ratios, "rounds": len(runs) // max(1, len(systems))}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.peers.run",
                                description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--n", type=int, default=20_000, help="jobs per phase")
    p.add_argument("--systems", default=",".join(ALL_SYSTEMS))
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--prefetch", type=int, default=200, help="jobvisor's prefetch")
    p.add_argument("--gw-local-queue", type=int, default=500)
    p.add_argument("--pgq-batch-size", type=int, default=10,
                   help="PgQueuer's batch_size (its default 10)")
    p.add_argument("--latency", type=int, default=200,
                   help="single enqueues for wake latency per run (0: skip)")
    p.add_argument("--interval-ms", type=float, default=20.0)
    p.add_argument("--poll-ms", type=float, default=10.0, help="drained poll (peers)")
    p.add_argument("--timeout", type=float, default=300.0)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    systems = [s for s in args.systems.split(",") if s]
    bad = [s for s in systems if s not in ALL_SYSTEMS]
    if bad:
        print(f"unknown systems {bad}; choose from {ALL_SYSTEMS}", file=sys.stderr)
        return 2
    base = os.environ.get("DATABASE_URL") or DEFAULT_DSN
    with psycopg.connect(base, autocommit=True) as conn:
        version = str(conn.execute("SHOW server_version").fetchone()[0])
    versions = ensure_peers(systems)
    progress(f"PostgreSQL {version}; peers {versions}")
    runs: list[dict[str, Any]] = []
    try:
        for r in range(args.rounds):
            order = systems[r % len(systems):] + systems[:r % len(systems)]  # rotate
            for s in order:
                progress(f"round {r + 1}/{args.rounds}: {s}")
                fig = run_jobvisor(args, base) if s == "jobvisor" else run_peer(s, args, base)
                fig |= {"round": r + 1, "server_version": version}
                runs.append(fig)
                print(json.dumps(fig), flush=True)
    except (Failed, subprocess.CalledProcessError) as exc:
        print(f"benchmark: {exc}", file=sys.stderr)
        return 1
    out = summarize(runs, systems) | {"versions": versions, "server_version": version,
                                      "load_1m_at_end": round(os.getloadavg()[0], 2)}
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
