"""Shared pieces of the benchmarks: a scratch database, a group of sub-worker
processes, bounded waits, progress on stderr and the one JSON line on stdout.

Benchmarks never touch real queues: each run creates `jobvisor_bench_<random>` on the
server that DATABASE_URL (else the embedded PostgreSQL) points at, migrates it and
drops it at the end. Where creating a database isn't permitted, the run falls back to
the given database, says so, and uses a job type of its own that it deletes afterwards.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psycopg
from psycopg.conninfo import make_conninfo

from supervisor_app.database import DatabaseUnavailable, check, resolve_dsn
from supervisor_app.migrate import migrate
from workers.core.dsn import describe

REPO = Path(__file__).resolve().parent.parent
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2

T = TypeVar("T")


class BenchFailed(Exception):
    """The run could not produce figures (a wait timed out, a job or worker failed)."""


def progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def emit(figures: dict[str, Any]) -> None:
    """The figures: last, as one JSON line on stdout."""
    print(json.dumps(figures, sort_keys=False), flush=True)


def wait_until(predicate: Callable[[], T], *, timeout: float, what: str,
               interval: float = 0.05) -> T:
    """Poll until `predicate()` is truthy; BenchFailed after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise BenchFailed(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(text)
    return value


def main_guard(run: Callable[[], None]) -> int:
    """Run a benchmark body and map its failures to the contract's exit codes."""
    try:
        run()
    except DatabaseUnavailable as exc:
        print(f"benchmark: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except BenchFailed as exc:
        print(f"benchmark: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return 0


# --- the scratch database -------------------------------------------------------------

@dataclass(frozen=True)
class BenchDatabase:
    dsn: str
    name: str
    scratch: bool  # False: creating a database was refused, the given one is used
    where: str  # host:port/dbname, no secrets
    server_version: str
    tag: str  # random suffix shared by the database, the job type and application_name

    def job_type(self, preferred: str) -> str:
        """`preferred` in a scratch database; a type of our own in a shared one."""
        return preferred if self.scratch else f"bench_{self.tag}"


@contextmanager
def bench_database() -> Iterator[BenchDatabase]:
    base = resolve_dsn()
    check(base)
    tag = secrets.token_hex(4)
    name = f"jobvisor_bench_{tag}"
    with psycopg.connect(base, autocommit=True) as conn:
        version = str(conn.execute("SHOW server_version").fetchone()[0])
        given = str(conn.execute("SELECT current_database()").fetchone()[0])
        try:
            conn.execute(f'CREATE DATABASE "{name}"')
            scratch = True
        except psycopg.errors.InsufficientPrivilege:
            scratch = False
    if scratch:
        dsn = make_conninfo(base, dbname=name)
        progress(f"scratch database {name} on {describe(base)} (PostgreSQL {version})")
    else:
        dsn, name = base, given
        progress(f"NOTE: not permitted to create a database; using the given database "
                 f"{describe(base)} with job type bench_{tag}, whose rows are deleted at "
                 f"the end")
    try:
        migrate(dsn)
        yield BenchDatabase(dsn, name, scratch, describe(dsn), version, tag)
    finally:
        if scratch:
            with psycopg.connect(base, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            progress(f"dropped {name}")
        else:
            with psycopg.connect(dsn, autocommit=True) as conn, conn.transaction():
                conn.execute("DELETE FROM jobvisor.jobs WHERE job_type = %s",
                             (f"bench_{tag}",))
                # Every row of the type is gone, so are its finished counts (sql/007).
                conn.execute("DELETE FROM jobvisor.job_counts WHERE job_type = %s",
                             (f"bench_{tag}",))


# --- sub-worker processes -------------------------------------------------------------

@dataclass
class WorkerGroup:
    """P sub-worker processes of one type, their stderr read by one thread each."""

    db: BenchDatabase
    job_type: str
    processes: int
    concurrency: int
    prefetch: int = 0
    handler: str | None = None
    poll: float = 2.0
    keep_completed: bool = True
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    started_at: float = 0.0
    _started: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _readers: list[threading.Thread] = field(default_factory=list)

    @property
    def app_name(self) -> str:
        return f"jobvisor_bench_{self.db.tag}"

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "workers", "--type", self.job_type,
               "--concurrency", str(self.concurrency), "--prefetch", str(self.prefetch),
               "--poll", f"{self.poll:g}"]
        if self.handler:
            cmd += ["--handler", self.handler]
        if not self.keep_completed:
            cmd.append("--no-keep-completed")
        return cmd

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if k not in ("LEARNING_DATABASE_URL", "DATABASE_URL")}
        env["DATABASE_URL"] = self.db.dsn  # environment, never argv
        # libpq tags every connection, so pg_stat_activity shows which ones are ours.
        env["PGAPPNAME"] = self.app_name
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        return env

    def start(self) -> None:
        env = self._env()
        self.started_at = time.monotonic()
        for _ in range(self.processes):
            proc = subprocess.Popen(self.command(), env=env, cwd=REPO,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            self.procs.append(proc)
            reader = threading.Thread(target=self._read_log, args=(proc,), daemon=True)
            reader.start()
            self._readers.append(reader)

    def _read_log(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stderr is not None
        for raw in proc.stderr:
            line = raw.decode(errors="replace").rstrip()
            try:
                record = json.loads(line)
            except ValueError:
                record = {"level": "error", "event": line}
            if not isinstance(record, dict):
                continue
            if record.get("event") == "worker_started":
                with self._lock:
                    self._started += 1
            elif record.get("level") in ("warning", "error", "critical"):
                progress(f"worker {proc.pid}: {line}")

    def started(self) -> int:
        with self._lock:
            return self._started

    def check_alive(self) -> None:
        for proc in self.procs:
            if proc.poll() is not None:
                raise BenchFailed(f"worker {proc.pid} exited early with code {proc.returncode}")

    def wait_started(self, timeout: float) -> float:
        """Wait for every process to log `worker_started`; returns seconds since start()."""
        def all_started() -> bool:
            self.check_alive()
            return self.started() >= self.processes
        wait_until(all_started, timeout=timeout, what="workers logging worker_started",
                   interval=0.005)
        return time.monotonic() - self.started_at

    def listening(self, conn: psycopg.Connection) -> int:
        """How many of our connections sit in `LISTEN jobvisor_cancel` (the last LISTEN
        a worker sends before it waits for notifications)."""
        return int(conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s"
            " AND query = 'LISTEN jobvisor_cancel' AND state = 'idle'",
            (self.app_name,),
        ).fetchone()[0])

    def wait_listening(self, conn: psycopg.Connection, timeout: float) -> None:
        def all_listening() -> bool:
            self.check_alive()
            return self.listening(conn) >= self.processes
        wait_until(all_listening, timeout=timeout, what="workers listening (pg_stat_activity)",
                   interval=0.01)

    def stop(self, timeout: float = 30.0) -> list[int | None]:
        """SIGTERM every worker and wait; SIGKILL the ones still there at the deadline."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        codes: list[int | None] = []
        for proc in self.procs:
            try:
                codes.append(proc.wait(timeout=max(0.0, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                progress(f"worker {proc.pid} ignored SIGTERM for {timeout:g}s: killing it")
                proc.kill()
                proc.wait()
                codes.append(None)
        for reader in self._readers:
            reader.join(timeout=1.0)
        return codes


@contextmanager
def running(group: WorkerGroup) -> Iterator[WorkerGroup]:
    group.start()
    try:
        yield group
    finally:
        codes = group.stop()
        progress(f"workers stopped, exit codes {codes}")


# --- reading the queue ------------------------------------------------------------------

def live_jobs(conn: psycopg.Connection, job_type: str) -> bool:
    """Is any job of this type still queued or leased? Cheap: both are partial indexes."""
    return bool(conn.execute(
        "SELECT EXISTS (SELECT 1 FROM jobvisor.jobs WHERE job_type = %(t)s"
        " AND status = 'queued')"
        " OR EXISTS (SELECT 1 FROM jobvisor.jobs WHERE job_type = %(t)s"
        " AND status = 'leased')",
        {"t": job_type},
    ).fetchone()[0])


def counts_between(conn: psycopg.Connection, first_id: int, last_id: int) -> dict[str, int]:
    """Jobs by status among ids first_id..last_id (one benchmark phase).

    Phases are told apart by id, not by batch id: a batch id makes the queue keep batch
    counters per job, which is not what a no-op benchmark means to measure.
    """
    rows = conn.execute(
        "SELECT status, count(*) FROM jobvisor.jobs WHERE id BETWEEN %s AND %s GROUP BY status",
        (first_id, last_id),
    ).fetchall()
    return {str(s): int(c) for s, c in rows}


def wait_done(conn: psycopg.Connection, group: WorkerGroup, ids: tuple[int, int], n: int,
              timeout: float, interval: float = 0.05) -> None:
    """Wait until no job of the group's type is live, then check all `n` of the phase's
    jobs (ids `ids[0]..ids[1]`) completed."""
    def drained() -> bool:
        group.check_alive()
        return not live_jobs(conn, group.job_type)
    wait_until(drained, timeout=timeout, what=f"{n} jobs to finish", interval=interval)
    counts = counts_between(conn, *ids)
    if counts.get("completed", 0) != n:
        raise BenchFailed(f"expected {n} completed jobs with ids {ids[0]}..{ids[1]}, "
                          f"found {counts}")


def r3(value: float) -> float:
    return round(value, 3)
