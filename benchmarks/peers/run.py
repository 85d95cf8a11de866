"""jobvisor side by side with graphile-worker and PgQueuer: no-op throughput (and wake
latency), interleaved rounds on one PostgreSQL server.

    python -m benchmarks.peers.run [--rounds 3] [--n 20000] [--latency 200]
                                   [--systems jobvisor,graphile_batched,graphile_unbatched,pgqueuer]
                                   [--account] [--own-cluster [--pg-setting KEY=VALUE ...]]

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
before the enqueue call, like wake_latency.py; `after_commit_*` from the call's return,
the producer's durable commit left out). "Queue seen empty" is the database's
clock_timestamp() in the first poll (every --poll-ms) that finds no row left in the
peer's job table (both peers delete a job when they complete it), so it can be late by
up to one poll: a bias against the peers of ≤ 10 ms on runs of ~1 s. Handler stamps are
this machine's wall clock (the server must be on this machine).

Progress goes to stderr; stdout gets one JSON line per run, then one with the medians
(min–max) and the ratios jobvisor / graphile_batched and jobvisor / pgqueuer.

--account: where the time goes (benchmarks/_accounting.py). Each run of each system is
an accounting window over its throughput phases (cold + warm: 2 × N jobs; the latency
phase is left out), and the run's JSON line gets per job `client_cpu_us_per_job`,
`server_cpu_us_per_job`, `wal_bytes_per_job`, `wal_records_per_job`,
`statements_per_job`, `exec_us_per_job` and `statement_wal_bytes_per_job` (the
summary gets their medians), with the totals and the most frequent statements under
"account".

* jobvisor: the window is the queue_throughput subprocess, start to exit (its scratch
  database's creation, migration and drop included). Client CPU is its worker
  processes': the children times of the benchmark process when it logs "workers
  stopped" (by then it has waited for every worker); `client_cpu_incl_benchmark_s` is
  getrusage(RUSAGE_CHILDREN) around the whole subprocess, which adds the benchmark
  process itself (interpreter start, enqueueing in Python, its polls).
* a peer: the window runs from before its scratch database is made to the end of the
  warm phase plus STATS_SETTLE_S of idleness (so the sessions still connected have
  published their WAL counts), then again from after the latency phase (and as long an
  idle wait) to just after the database is dropped; client CPU is the worker processes'
  and their children's (psutil), read at the end of the warm phase.

Server CPU (the postmaster's process tree) and WAL (pg_stat_wal) are cluster-wide, so
nothing else should run on the server meanwhile; the rounds are sequential. Statements
(pg_stat_statements, top-level, in the run's own databases) leave out the harness's
polls and clock reads and the schema setup; where pg_stat_statements is not preloaded
they are null and the notes say so. Per job, statements ≈ round trips. Both windows hold
one CREATE DATABASE, which on PostgreSQL 15 logs its template (~4 MB of WAL: ~100 bytes
a job at N = 20,000) for every system alike; `statement_wal_bytes_per_job`, the WAL of
the system's own statements, is without it.

--own-cluster: initdb a throwaway PostgreSQL (binaries in --pg-bindir, default the
Debian PostgreSQL 15 ones; as root, initdb and pg_ctl run as user `postgres` through
runuser, else su) in a temporary directory, on a free port of 127.0.0.1 with
shared_preload_libraries=pg_stat_statements and track_commit_timestamp=on (plus any
--pg-setting), run everything against it instead of DATABASE_URL, and stop and remove
it at the end, also on failure, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
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

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
if __package__ in (None, ""):  # run as `python benchmarks/peers/run.py`
    sys.path.insert(0, str(REPO))

import psutil  # noqa: E402
import psycopg  # noqa: E402
from psycopg.conninfo import conninfo_to_dict, make_conninfo  # noqa: E402

from benchmarks._accounting import (  # noqa: E402
    ACCOUNT_KEYS,
    EXIT_SETTLE_S,
    HARNESS_MARK,
    PG_BINDIR,
    STATS_SETTLE_S,
    Accountant,
    Window,
    process_tree_cpu,
    throwaway_cluster,
)

PGQ_VENV = HERE / ".venv-pgqueuer"
PGQ_PY = PGQ_VENV / "bin" / "python"
GW_PKG = HERE / "node_modules" / "graphile-worker" / "package.json"
DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
ALL_SYSTEMS = ("jobvisor", "jobvisor_nohistory", "graphile_batched", "graphile_unbatched", "pgqueuer")


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
            return conn.execute(f"{HARNESS_MARK} SELECT clock_timestamp()").fetchone()[0]

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
            f"{HARNESS_MARK} SELECT NOT EXISTS (SELECT 1 FROM {self.table}),"
            " clock_timestamp()").fetchone()
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

    def cpu_seconds(self) -> float:
        """User + system CPU so far of the worker processes and their children (live or
        reaped)."""
        self.check_alive()  # an exited worker's CPU could no longer be read
        return process_tree_cpu(p.pid for p in self.procs)

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


def run_peer(system: str, args: argparse.Namespace, base: str,
             acct: Accountant | None = None) -> dict[str, Any]:
    peer = Peer(system, args)
    n = args.n
    load = round(os.getloadavg()[0], 2)
    window = acct.window() if acct else None
    client_cpu: float | None = None
    if window:
        window.start()  # before the scratch database exists
    with scratch_db(base, system) as dsn, psycopg.connect(dsn, autocommit=True) as conn:
        if window:
            window.include_database(conninfo_to_dict(dsn)["dbname"])
        peer.install(dsn)
        t = time.perf_counter()
        peer.enqueue_bulk(conn, n)
        enqueue_s = time.perf_counter() - t
        spawned = conn.execute(f"{HARNESS_MARK} SELECT extract(epoch FROM"
                               " clock_timestamp())::float8").fetchone()[0]
        procs = Procs(peer._cmd("work"), peer.env(dsn), args.processes)
        latency: dict[int, float] = {}
        returned: dict[int, float] = {}  # the enqueue's commit has been acknowledged
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
            if window:  # the throughput phases are over: close the first interval
                time.sleep(STATS_SETTLE_S)  # idle sessions publish their WAL counts
                client_cpu = procs.cpu_seconds()
                window.stop()
            if args.latency:
                time.sleep(0.5)
                interval = args.interval_ms / 1000
                t0 = time.monotonic() + interval
                for i in range(args.latency):
                    time.sleep(max(0.0, t0 + i * interval - time.monotonic()))
                    before = time.time()
                    peer.enqueue_one(conn, i)
                    latency[i] = before
                    returned[i] = time.time()
                wait_drained(peer, conn, procs, args.timeout, args.poll_ms / 1000)
                if window:
                    time.sleep(STATS_SETTLE_S)  # the latency phase's counts: not ours
            if window:
                window.start()  # the second interval: stopping the workers, the drop
        finally:
            codes = procs.stop()
            progress(f"{system}: workers stopped, exit codes {codes}")
    if window:
        time.sleep(EXIT_SETTLE_S)
        window.stop()
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
        after = sorted((stamps[str(i)] - t) * 1000 for i, t in returned.items())
        call = sorted((returned[i] - t) * 1000 for i, t in latency.items())
        fig |= {"latency_median_ms": round(statistics.median(ms), 3),
                "latency_p95_ms": round(nearest_rank(ms, 0.95), 3),
                "latency_max_ms": round(ms[-1], 3),
                **_split(call, after)}
    fig |= {"n": n, "processes": args.processes, "concurrency": args.concurrency,
            "load_1m_at_start": load}
    if system == "graphile_batched":
        fig |= {"local_queue_size": args.gw_local_queue, "complete_job_batch_delay": 0}
    if system == "pgqueuer":
        fig["batch_size"] = args.pgq_batch_size
    if window:
        fig |= window.figures(2 * n, client_cpu,
                              client_scope="the worker processes, at the end of the warm phase")
    return fig


def _last_json(out: str, what: str) -> dict[str, Any]:
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    if not lines:
        raise Failed(f"{what} printed no figures")
    return json.loads(lines[-1])


# queue_throughput logs this (benchmarks/_common.running) once it has waited for every
# worker process: their CPU is then all in its children times.
WORKERS_STOPPED = "workers stopped"
# ... and this (benchmarks/_common.bench_database) once it made its scratch database.
SCRATCH_MADE = re.compile(r"scratch database (jobvisor_bench_\w+) on ")


def _run_watched(cmd: list[str], env: dict[str, str],
                 window: Window) -> tuple[int, str, float | None]:
    """Run a jobvisor benchmark, its stderr passed on line by line; returns its exit
    code, its stdout and its children's CPU seconds (user + system) read when it logged
    WORKERS_STOPPED (None when it never did). The scratch database it names is the
    window's."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    workers: list[float] = []

    def relay() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            if made := SCRATCH_MADE.search(line):
                try:
                    window.include_database(made.group(1))
                except psycopg.Error as exc:  # keep relaying: the child would block
                    progress(f"accounting: {made.group(1)} not looked up ({exc})")
            if WORKERS_STOPPED in line and not workers:
                try:
                    t = psutil.Process(proc.pid).cpu_times()
                    workers.append(t.children_user + t.children_system)
                except psutil.NoSuchProcess:
                    pass
            sys.stderr.write(line)
            sys.stderr.flush()

    reader = threading.Thread(target=relay, daemon=True)
    reader.start()
    assert proc.stdout is not None
    try:
        out = proc.stdout.read()
        code = proc.wait()
    finally:
        if proc.poll() is None:  # interrupted: it stops its workers and drops its database
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    reader.join(timeout=5)
    return code, out, workers[0] if workers else None


def _rusage_children_s() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_jobvisor(args: argparse.Namespace, base: str,
                 acct: Accountant | None = None, system: str = "jobvisor") -> dict[str, Any]:
    """jobvisor as shipped, or (`jobvisor_nohistory`) a type with `keep_completed: false`,
    which deletes each job as it completes, as both peers do."""
    env = dict(os.environ, DATABASE_URL=base)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    load = round(os.getloadavg()[0], 2)
    cmd = [sys.executable, "-m", "benchmarks.queue_throughput", "--n", str(args.n),
           "--processes", str(args.processes), "--concurrency", str(args.concurrency),
           "--prefetch", str(args.prefetch), "--timeout", str(args.timeout)]
    if system == "jobvisor_nohistory":
        cmd.append("--no-keep-completed")
    window: Window | None = acct.window() if acct else None
    if window:
        window.start()
        before = _rusage_children_s()
        code, out, workers_cpu = _run_watched(cmd, env, window)
        whole = _rusage_children_s() - before
        time.sleep(EXIT_SETTLE_S)  # its sessions' backends exit and publish their counts
        window.stop()
    else:
        tp = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
        code, out = tp.returncode, tp.stdout
    if code != 0:
        raise Failed(f"queue_throughput exited {code}")
    t = _last_json(out, "queue_throughput")
    fig: dict[str, Any] = {
        "system": system, "jobs_per_s": t["jobs_per_s"], "process_s": t["process_s"],
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
                "latency_max_ms": w["max_ms"],
                "enqueue_call_median_ms": w["enqueue_call_median_ms"],
                "after_commit_median_ms": w["after_commit_median_ms"],
                "after_commit_p95_ms": w["after_commit_p95_ms"]}
    fig |= {"n": args.n, "processes": args.processes, "concurrency": args.concurrency,
            "prefetch": args.prefetch, "load_1m_at_start": load}
    if window:
        jobs = 2 * args.n if "warm_jobs_per_s" in t else args.n
        if workers_cpu is not None:
            client, scope = workers_cpu, "the worker processes (children of queue_throughput)"
        else:
            client, scope = whole, "queue_throughput and its worker processes"
            progress(f"jobvisor: no {WORKERS_STOPPED!r} line seen; client CPU includes "
                     "the benchmark process")
        fig |= window.figures(jobs, client, client_scope=scope,
                              extra={"client_cpu_incl_benchmark_s": round(whole, 3)})
    return fig


def _split(call_ms: list[float], after_ms: list[float]) -> dict[str, float]:
    """The latency in two parts: the enqueue call (the producer's insert and its durable
    commit, the same for every system but for the insert itself) and what follows its
    return: the system's own wake path. The second can be below zero: the server tells
    the listeners at commit, and a handler may start before the producer reads its reply."""
    return {"enqueue_call_median_ms": round(statistics.median(call_ms), 3),
            "after_commit_median_ms": round(statistics.median(after_ms), 3),
            "after_commit_p95_ms": round(nearest_rank(after_ms, 0.95), 3)}


# --- the rounds ------------------------------------------------------------------------

def summarize(runs: list[dict[str, Any]], systems: list[str]) -> dict[str, Any]:
    keys = ("jobs_per_s", "jobs_per_s_incl_startup", "warm_jobs_per_s",
            "latency_median_ms", "latency_p95_ms", "enqueue_call_median_ms",
            "after_commit_median_ms", "after_commit_p95_ms", *ACCOUNT_KEYS)
    med: dict[str, dict[str, Any]] = {}
    for s in systems:
        mine = [r for r in runs if r["system"] == s]
        med[s] = {}
        for k in keys:
            vals = [r[k] for r in mine if r.get(k) is not None]
            if vals:
                digits = 4 if k in ACCOUNT_KEYS else 3
                med[s][k] = {"median": round(statistics.median(vals), digits),
                             "min": min(vals), "max": max(vals)}
    ratios: dict[str, float] = {}
    for mine in ("jobvisor", "jobvisor_nohistory"):
        for peer in ("graphile_batched", "graphile_unbatched", "pgqueuer"):
            if mine in med and peer in med:
                for k in ("jobs_per_s", "warm_jobs_per_s", "latency_median_ms",
                          "after_commit_median_ms"):
                    if k in med[mine] and k in med[peer]:
                        ratios[f"{mine}/{peer}:{k}"] = round(
                            med[mine][k]["median"] / med[peer][k]["median"], 3)
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
    p.add_argument("--account", action="store_true",
                   help="per job: client and server CPU, WAL, statements (see above)")
    p.add_argument("--own-cluster", action="store_true",
                   help="run against a throwaway cluster made for this run (see above)")
    p.add_argument("--pg-bindir", default=PG_BINDIR,
                   help="PostgreSQL binaries for --own-cluster")
    p.add_argument("--pg-setting", action="append", default=[], metavar="KEY=VALUE",
                   help="a server setting for --own-cluster (repeatable)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    systems = [s for s in args.systems.split(",") if s]
    bad = [s for s in systems if s not in ALL_SYSTEMS]
    if bad:
        print(f"unknown systems {bad}; choose from {ALL_SYSTEMS}", file=sys.stderr)
        return 2
    settings: dict[str, str] = {}
    for item in args.pg_setting:
        key, sep, value = item.partition("=")
        if not sep or not key:
            print(f"--pg-setting {item!r}: expected KEY=VALUE", file=sys.stderr)
            return 2
        settings[key.strip()] = value.strip()
    versions = ensure_peers(systems)  # before any cluster is up: npm and pip take a while
    try:
        if args.own_cluster:
            with throwaway_cluster(args.pg_bindir, settings) as base:
                return _rounds(args, systems, base, versions)
        return _rounds(args, systems, os.environ.get("DATABASE_URL") or DEFAULT_DSN,
                       versions)
    except (Failed, subprocess.CalledProcessError, RuntimeError, OSError) as exc:
        print(f"benchmark: {exc}", file=sys.stderr)
        return 1


def _rounds(args: argparse.Namespace, systems: list[str], base: str,
            versions: dict[str, str]) -> int:
    with psycopg.connect(base, autocommit=True) as conn:
        version = str(conn.execute("SHOW server_version").fetchone()[0])
    progress(f"PostgreSQL {version}; peers {versions}")
    acct = Accountant(base) if args.account else None
    if acct:
        progress(f"accounting: {acct.describe()}")
    runs: list[dict[str, Any]] = []
    try:
        for r in range(args.rounds):
            order = systems[r % len(systems):] + systems[:r % len(systems)]  # rotate
            for s in order:
                progress(f"round {r + 1}/{args.rounds}: {s}")
                fig = (run_jobvisor(args, base, acct, s) if s.startswith("jobvisor")
                       else run_peer(s, args, base, acct))
                fig |= {"round": r + 1, "server_version": version}
                runs.append(fig)
                print(json.dumps(fig), flush=True)
        out = summarize(runs, systems) | {"versions": versions, "server_version": version,
                                          "load_1m_at_end": round(os.getloadavg()[0], 2)}
        if acct:
            out["account"] = acct.describe()
    finally:
        if acct:
            acct.close()
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
