"""Where a benchmark run's time goes: before/after snapshots of one PostgreSQL server, and
a throwaway PostgreSQL cluster to take them on.

A `Window` is one or more intervals, each from one `Accountant.snapshot()` to the next;
over its intervals it adds up

* server CPU: user + system seconds of the postmaster's process tree, read from /proc
  with psutil: the postmaster's own times, its `children_user`/`children_system` (the
  backends that exited and were reaped count there) and each live descendant's own
  times. The postmaster is found through `postmaster.pid` in `SHOW data_directory` (when
  this user may read it), else as the process listening on the server's port; either
  way its start time must match `pg_postmaster_start_time()`, so a server that is not on
  this machine (another container, a proxy on the port) gives null, not someone
  else's figures. Cluster-wide: whatever else the server does meanwhile counts too.
* WAL: `pg_stat_wal` (wal_records, wal_bytes), also cluster-wide. A backend publishes
  its WAL counts when it goes idle, at most once a second, and when it exits: a snapshot
  taken while a run's sessions are still connected must follow a second or so of their
  idleness (`STATS_SETTLE_S`) to include all they did.
* statements: `pg_stat_statements`, top-level statements only (nested ones, with
  `pg_stat_statements.track = all`, are not round trips), in the run's own databases:
  those it names (`Window.include_database`, while they exist), else those that did
  not exist when the window opened (its scratch databases, but also anyone else's made
  meanwhile). A database's entries stay after it is dropped. These are split by their normalized text into the benchmark
  harness's own (its polls and clock reads: `HARNESS_MARK`, or the shapes in `_HARNESS`),
  schema setup (DDL, migration bookkeeping) and the rest, the system's own: its enqueue,
  lease and acknowledgement statements, BEGIN/COMMIT, LISTEN. Per job, that last count
  is about the number of round trips per job. Their own WAL (`wal_bytes` of those
  statements) is the part of pg_stat_wal's that the queue's statements wrote, without the
  setup's (a CREATE DATABASE alone logs its template's ~4 MB on PostgreSQL 15), commit
  records, checkpoints' or autovacuum's. The view is read from an observer
  database that the accountant makes and drops (`jobvisor_acct_<random>`), so its own
  reads count nowhere. Where `pg_stat_statements` is not in `shared_preload_libraries`
  (or the observer database or the extension cannot be created) the statement figures
  are null and `notes` says why.

Client CPU (the system's own worker processes) is the caller's to measure and pass in:
`process_tree_cpu()` reads live processes; resource.getrusage(RUSAGE_CHILDREN) covers
subprocesses that were waited for.

`throwaway_cluster()` is an `initdb`-made PostgreSQL on a free port under a temporary
directory, stopped and removed when the block ends, however it ends.
"""

from __future__ import annotations

import os
import pwd
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import psycopg
from psycopg.conninfo import make_conninfo

# How long a run's connected sessions must sit idle before a snapshot sees all their WAL
# counts: PostgreSQL (15) flushes a backend's pending statistics when it goes idle, at
# most once per second (PGSTAT_MIN_INTERVAL), retrying later where the shared entry was
# busy.
STATS_SETTLE_S = 1.5
# After a run's sessions have all disconnected: their backends publish their counts as
# they exit, which happens just after the client has gone.
EXIT_SETTLE_S = 0.3

# A comment the harnesses put in their own statements (pg_stat_statements keeps it in the
# normalized text), so that their polls are not counted as the system's round trips.
HARNESS_MARK = "/* bench harness */"

# The statements of benchmarks/_common.py and queue_throughput.py that only watch the
# queue: reads of pg_stat_activity, bare clock reads, the phase reads by id range and the
# "anything live" probe. Only statements that begin with SELECT are matched.
_HARNESS = (
    re.compile(r"pg_stat_activity"),
    re.compile(r"^SELECT clock_timestamp\(\)$"),
    re.compile(r"\bWHERE id BETWEEN\b"),
    re.compile(r"\) OR EXISTS \(SELECT"),
)
_SETUP_KEYWORDS = {"CREATE", "ALTER", "DROP", "COMMENT", "GRANT", "REVOKE", "DO",
                   "TRUNCATE", "REINDEX", "VACUUM", "ANALYZE", "CHECKPOINT"}
_SETUP = re.compile(r"migrations\b", re.IGNORECASE)  # jobvisor's, graphile-worker's


def _one_line(query: str) -> str:
    return re.sub(r"\s+", " ", query).strip()


def _strip_comments(query: str) -> str:
    text = re.sub(r"/\*.*?\*/", " ", query, flags=re.S)
    return re.sub(r"--[^\n]*", " ", text).strip()


def classify(query: str) -> str:
    """'harness', 'setup' or 'system' for one normalized statement text."""
    if HARNESS_MARK in query:
        return "harness"
    text = _one_line(_strip_comments(query))
    first = text.split(" ", 1)[0].upper() if text else ""
    if first == "SELECT" and any(p.search(text) for p in _HARNESS):
        return "harness"
    if first in _SETUP_KEYWORDS or _SETUP.search(text):
        return "setup"
    return "system"


# --- processes ---------------------------------------------------------------------------

def process_tree_cpu(pids: Iterable[int], *, settle: bool = True) -> float:
    """User + system seconds of processes, their reaped children (children_user/system)
    and their live descendants. Consistent against a child being reaped meanwhile: the
    read is repeated (a few times at most) until no parent's children times moved
    during it."""
    pids = list(pids)
    for _ in range(5 if settle else 1):
        total, stable = 0.0, True
        for pid in pids:
            try:
                proc = psutil.Process(pid)
                before = proc.cpu_times()
                total += before.user + before.system
                total += before.children_user + before.children_system
                for child in proc.children(recursive=True):
                    with suppress(psutil.NoSuchProcess, psutil.ZombieProcess,
                                  psutil.AccessDenied):
                        t = child.cpu_times()
                        total += t.user + t.system + t.children_user + t.children_system
                after = proc.cpu_times()
            except (psutil.NoSuchProcess, psutil.ZombieProcess):
                continue
            if (after.children_user, after.children_system) != (
                    before.children_user, before.children_system):
                stable = False
        if stable:
            return total
    return total


def _pid_from_pidfile(conn: psycopg.Connection) -> tuple[int | None, str]:
    try:
        datadir = str(conn.execute("SHOW data_directory").fetchone()[0])
    except psycopg.Error as exc:
        return None, f"SHOW data_directory refused ({exc.diag.sqlstate})"
    path = Path(datadir) / "postmaster.pid"
    try:
        return int(path.read_text().split()[0]), str(path)
    except (OSError, ValueError, IndexError) as exc:
        return None, f"{path} unreadable ({type(exc).__name__})"


def _pid_listening(port: int, host: str | None) -> tuple[int | None, str]:
    try:
        if host and host.startswith("/"):
            suffix = f".s.PGSQL.{port}"
            for c in psutil.net_connections(kind="unix"):
                if c.pid and isinstance(c.laddr, str) and c.laddr.endswith(suffix):
                    return c.pid, f"listening on {c.laddr}"
        else:
            for c in psutil.net_connections(kind="inet"):
                if c.pid and c.status == psutil.CONN_LISTEN and c.laddr and \
                        c.laddr.port == port:
                    return c.pid, f"listening on port {port}"
    except psutil.AccessDenied:
        return None, "listening sockets unreadable"
    return None, f"no visible process listening on port {port}"


def find_postmaster(conn: psycopg.Connection) -> tuple[psutil.Process | None, str]:
    """The server's postmaster as a local process, and how it was found (or why not)."""
    started = float(conn.execute(
        "SELECT extract(epoch FROM pg_postmaster_start_time())::float8").fetchone()[0])
    port = int(conn.execute("SHOW port").fetchone()[0])
    host = conn.info.host
    reasons = []
    for pid, how in (_pid_from_pidfile(conn), _pid_listening(port, host)):
        if pid is None:
            reasons.append(how)
            continue
        try:
            proc = psutil.Process(pid)
            name = proc.name()
            created = proc.create_time()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            reasons.append(f"pid {pid} from {how}: not a process here")
            continue
        # pg_postmaster_start_time() is stamped just after the postmaster starts.
        if ("postgres" in name or "postmaster" in name) and abs(created - started) < 10:
            return proc, f"pid {pid} ({how})"
        reasons.append(f"pid {pid} from {how}: {name!r}, not this server's postmaster")
    return None, "; ".join(reasons)


# --- snapshots ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Statement:
    calls: int
    exec_ms: float
    wal_bytes: float
    query: str


@dataclass(frozen=True)
class Snapshot:
    at: float
    server_cpu_s: float | None
    wal: tuple[int, int] | None  # (records, bytes)
    statements: dict[tuple[Any, ...], Statement] | None
    databases: frozenset[int]
    dealloc: int | None


class Accountant:
    """Snapshots of one server. Use as a context manager (it drops its observer database)."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.notes: list[str] = []
        self._observer: str | None = None
        self._observer_oid: int | None = None
        base = psycopg.connect(dsn, autocommit=True)
        try:
            self.postmaster, how = find_postmaster(base)
            self.postmaster_how = how
            if self.postmaster is None:
                self.notes.append(f"server CPU: postmaster not found ({how})")
            self.conn = self._statements_connection(base)
        except BaseException:
            base.close()
            raise
        if self.conn is not base:
            base.close()
        self.wal_ok = self._try("SELECT wal_records, wal_bytes FROM pg_stat_wal",
                                "pg_stat_wal")

    def _try(self, query: str, what: str) -> bool:
        try:
            self.conn.execute(query).fetchall()
            return True
        except psycopg.Error as exc:
            self.notes.append(f"{what}: {type(exc).__name__}: {str(exc).strip()}")
            return False

    def _statements_connection(self, base: psycopg.Connection) -> psycopg.Connection:
        """A connection to a database where pg_stat_statements can be read: an observer
        database of our own when we may make one, else the given one (if the extension
        is already there). Sets self.pgss (bool) and the columns to read."""
        self.pgss = False
        self.conn_dealloc = False
        preload = str(base.execute("SHOW shared_preload_libraries").fetchone()[0])
        if "pg_stat_statements" not in [p.strip() for p in preload.split(",")]:
            self.notes.append("pg_stat_statements: not in shared_preload_libraries "
                              f"({preload!r}); statement figures are null")
            return base
        name = f"jobvisor_acct_{secrets.token_hex(4)}"
        try:
            base.execute(f'CREATE DATABASE "{name}"')
        except psycopg.Error as exc:
            self.notes.append(f"observer database refused ({type(exc).__name__}); "
                              "reading pg_stat_statements in the given database")
            conn = base
        else:
            self._observer = name
            conn = psycopg.connect(make_conninfo(self.dsn, dbname=name), autocommit=True)
            self._observer_oid = int(conn.execute(
                "SELECT oid FROM pg_database WHERE datname = current_database()"
            ).fetchone()[0])
        try:
            if conn is base:  # someone else's database: only an extension already there
                if conn.execute("SELECT NOT EXISTS (SELECT FROM pg_extension"
                                " WHERE extname = 'pg_stat_statements')").fetchone()[0]:
                    self.notes.append("pg_stat_statements: no extension in the given "
                                      "database; statement figures are null")
                    return conn
            else:
                conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            cols = {str(r[0]) for r in conn.execute(
                "SELECT attname FROM pg_attribute WHERE attrelid = "
                "'pg_stat_statements'::regclass AND attnum > 0").fetchall()}
        except psycopg.Error as exc:
            self.notes.append(f"pg_stat_statements unavailable: {type(exc).__name__}: "
                              f"{str(exc).strip()}; statement figures are null")
            return conn
        exec_col = "total_exec_time" if "total_exec_time" in cols else "total_time"
        self._pgss_query = (
            "SELECT userid, dbid, queryid, "
            + ("toplevel" if "toplevel" in cols else "true")
            + f", calls, {exec_col}, "
            + ("wal_bytes" if "wal_bytes" in cols else "0")
            + ", query FROM pg_stat_statements"
        )
        if "toplevel" not in cols:
            self.notes.append("pg_stat_statements has no toplevel column (PostgreSQL < 14): "
                              "nested statements are counted too")
        self.pgss = True
        try:
            self.conn_dealloc = bool(conn.execute(
                "SELECT dealloc FROM pg_stat_statements_info").fetchone() is not None)
        except psycopg.Error:
            self.conn_dealloc = False
        return conn

    def snapshot(self) -> Snapshot:
        at = time.monotonic()
        server = process_tree_cpu([self.postmaster.pid]) if self.postmaster else None
        wal = None
        if self.wal_ok:
            records, nbytes = self.conn.execute(
                "SELECT wal_records, wal_bytes FROM pg_stat_wal").fetchone()
            wal = (int(records), int(nbytes))
        statements = None
        dealloc = None
        if self.pgss:
            statements = {}
            for uid, dbid, qid, top, calls, exec_ms, walb, query in self.conn.execute(
                    self._pgss_query).fetchall():
                if dbid == self._observer_oid:
                    continue
                statements[(uid, dbid, qid, top)] = Statement(
                    int(calls), float(exec_ms), float(walb or 0), str(query or ""))
            if self.conn_dealloc:
                dealloc = int(self.conn.execute(
                    "SELECT dealloc FROM pg_stat_statements_info").fetchone()[0])
        databases = frozenset(int(r[0]) for r in self.conn.execute(
            "SELECT oid FROM pg_database").fetchall())
        return Snapshot(at, server, wal, statements, databases, dealloc)

    def window(self) -> Window:
        return Window(self)

    def close(self) -> None:
        self.conn.close()
        if self._observer:
            with psycopg.connect(self.dsn, autocommit=True) as base:
                base.execute(f'DROP DATABASE IF EXISTS "{self._observer}" WITH (FORCE)')
            self._observer = None

    def __enter__(self) -> Accountant:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def describe(self) -> dict[str, Any]:
        return {"postmaster": self.postmaster_how if self.postmaster else None,
                "pg_stat_wal": self.wal_ok, "pg_stat_statements": self.pgss,
                "notes": list(self.notes)}


@dataclass
class Window:
    """Intervals between snapshots, added up. start() … stop(), any number of times."""

    acct: Accountant
    intervals: list[tuple[Snapshot, Snapshot]] = field(default_factory=list)
    # The run's own databases, when it names them (include_database); else the ones
    # that did not exist when the window opened.
    databases: set[int] = field(default_factory=set)
    _open: Snapshot | None = None

    def include_database(self, name: str) -> bool:
        """Count the statements of database `name` (which must exist now) as the run's;
        once one is named, only the named ones count. False if there is none by that
        name."""
        row = self.acct.conn.execute("SELECT oid FROM pg_database WHERE datname = %s",
                                     (name,)).fetchone()
        if row is None:
            return False
        self.databases.add(int(row[0]))
        return True

    def start(self) -> None:
        assert self._open is None, "window already open"
        self._open = self.acct.snapshot()

    def stop(self) -> None:
        assert self._open is not None, "window not open"
        self.intervals.append((self._open, self.acct.snapshot()))
        self._open = None

    @property
    def is_open(self) -> bool:
        return self._open is not None

    def _sum(self, part: str) -> float | None:
        total = 0.0
        for a, b in self.intervals:
            va, vb = getattr(a, part), getattr(b, part)
            if va is None or vb is None:
                return None
            total += vb - va
        return total

    def _wal(self) -> tuple[int, int] | None:
        rec = byt = 0
        for a, b in self.intervals:
            if a.wal is None or b.wal is None:
                return None
            rec += b.wal[0] - a.wal[0]
            byt += b.wal[1] - a.wal[1]
        return rec, byt

    def _statements(self) -> dict[str, Any] | None:
        if not self.intervals or any(a.statements is None or b.statements is None
                                     for a, b in self.intervals):
            return None
        known = self.intervals[0][0].databases  # databases older than the window

        def ours(dbid: int) -> bool:
            return dbid in self.databases if self.databases else dbid not in known

        by_kind = {k: {"calls": 0, "exec_ms": 0.0, "wal_bytes": 0.0}
                   for k in ("system", "harness", "setup")}
        per_query: dict[str, list[float]] = {}
        evicted = False
        for a, b in self.intervals:
            assert a.statements is not None and b.statements is not None
            if a.dealloc is not None and b.dealloc is not None and b.dealloc != a.dealloc:
                evicted = True
            for key, st in b.statements.items():
                if not ours(key[1]) or not key[3]:  # not the run's, or a nested statement
                    continue
                prev = a.statements.get(key)
                calls = st.calls - (prev.calls if prev else 0)
                if calls <= 0:
                    continue
                exec_ms = st.exec_ms - (prev.exec_ms if prev else 0.0)
                walb = st.wal_bytes - (prev.wal_bytes if prev else 0.0)
                kind = classify(st.query)
                agg = by_kind[kind]
                agg["calls"] += calls
                agg["exec_ms"] += exec_ms
                agg["wal_bytes"] += walb
                if kind == "system":
                    text = _one_line(st.query)
                    slot = per_query.setdefault(text, [0, 0.0])
                    slot[0] += calls
                    slot[1] += exec_ms
        top = sorted(per_query.items(), key=lambda kv: -kv[1][0])[:6]
        return {"by_kind": by_kind, "evicted": evicted,
                "top": [(q, int(c), e) for q, (c, e) in top]}

    def figures(self, jobs: int, client_cpu_s: float | None, *,
                client_scope: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """The per-job figures (flat, for the run's JSON line) and the details under
        "account"."""
        assert self._open is None, "window still open"
        server = self._sum("server_cpu_s")
        wal = self._wal()
        st = self._statements()
        system = st["by_kind"]["system"] if st else None

        def per_job(value: float | None, scale: float = 1.0, digits: int = 2) -> float | None:
            return None if value is None or jobs <= 0 else round(value * scale / jobs, digits)

        flat: dict[str, Any] = {
            "client_cpu_us_per_job": per_job(client_cpu_s, 1e6, 1),
            "server_cpu_us_per_job": per_job(server, 1e6, 1),
            "wal_bytes_per_job": per_job(wal[1] if wal else None, 1, 1),
            "wal_records_per_job": per_job(wal[0] if wal else None, 1, 3),
            "statements_per_job": per_job(system["calls"] if system else None, 1, 4),
            "exec_us_per_job": per_job(system["exec_ms"] if system else None, 1e3, 1),
            "statement_wal_bytes_per_job": per_job(system["wal_bytes"] if system else None,
                                                   1, 1),
        }
        detail: dict[str, Any] = {
            "jobs": jobs,
            "window_s": round(sum(b.at - a.at for a, b in self.intervals), 3),
            "intervals": len(self.intervals),
            "client_cpu_s": None if client_cpu_s is None else round(client_cpu_s, 3),
            "client_cpu_scope": client_scope,
            "server_cpu_s": None if server is None else round(server, 3),
            "wal_records": wal[0] if wal else None, "wal_bytes": wal[1] if wal else None,
        }
        if st:
            detail["statements"] = {
                k: {"calls": v["calls"], "exec_ms": round(v["exec_ms"], 1),
                    "wal_bytes": int(v["wal_bytes"])}
                for k, v in st["by_kind"].items()}
            detail["top_statements"] = [
                {"calls": c, "per_job": round(c / jobs, 4) if jobs else None,
                 "exec_ms": round(e, 1), "query": q[:110]} for q, c, e in st["top"]]
            if st["evicted"]:
                detail["statements_note"] = ("pg_stat_statements evicted entries during "
                                             "the window (raise pg_stat_statements.max)")
        else:
            detail["statements"] = None
        if self.acct.notes:
            detail["notes"] = list(self.acct.notes)
        if extra:
            detail |= extra
        return flat | {"account": detail}


ACCOUNT_KEYS = ("client_cpu_us_per_job", "server_cpu_us_per_job", "wal_bytes_per_job",
                "wal_records_per_job", "statements_per_job", "exec_us_per_job",
                "statement_wal_bytes_per_job")


# --- a throwaway cluster ------------------------------------------------------------------

PG_BINDIR = "/usr/lib/postgresql/15/bin"
CLUSTER_SETTINGS = {"shared_preload_libraries": "pg_stat_statements",
                    "track_commit_timestamp": "on"}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _as_postgres(cmd: list[str]) -> list[str]:
    """initdb and postgres refuse to run as root: as root, run them as `postgres`."""
    if os.geteuid() != 0:
        return cmd
    if shutil.which("runuser"):
        return ["runuser", "-u", "postgres", "--", *cmd]
    return ["su", "postgres", "-s", "/bin/sh", "-c", shlex.join(cmd)]


def _log(message: str) -> None:
    print(f"[cluster] {message}", file=sys.stderr, flush=True)


@contextmanager
def throwaway_cluster(bindir: str = PG_BINDIR, settings: dict[str, str] | None = None,
                      ) -> Iterator[str]:
    """initdb a cluster in a temporary directory, start it on a free port of 127.0.0.1
    (trust authentication, user postgres), yield its postgresql:// URL, then stop it and
    remove the directory, also when the block fails or is interrupted (SIGTERM is turned
    into SystemExit meanwhile, so that it too gets here)."""
    conf = CLUSTER_SETTINGS | (settings or {})
    initdb, pg_ctl = str(Path(bindir) / "initdb"), str(Path(bindir) / "pg_ctl")
    if not Path(initdb).exists():
        raise FileNotFoundError(f"{initdb}: no PostgreSQL binaries there (--pg-bindir)")
    tmp = Path(tempfile.mkdtemp(prefix="jobvisor-pg-"))
    if os.geteuid() == 0:
        pw = pwd.getpwnam("postgres")
        os.chown(tmp, pw.pw_uid, pw.pw_gid)
    data, logfile = tmp / "data", tmp / "postgres.log"
    port = free_port()
    previous = signal.getsignal(signal.SIGTERM)

    def on_term(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    started = False
    try:
        subprocess.run(_as_postgres([initdb, "-D", str(data), "-U", "postgres",
                                     "--auth=trust", "-E", "UTF8", "--locale=C",
                                     "--no-sync"]),
                       check=True, stdout=subprocess.DEVNULL)
        opts = ["-p", str(port), "-k", str(tmp), "-c", "listen_addresses=127.0.0.1"]
        for key, value in conf.items():
            opts += ["-c", f"{key}={value}"]
        started = True  # from here on, stop whatever came up
        proc = subprocess.run(_as_postgres([pg_ctl, "-D", str(data), "-l", str(logfile),
                                            "-w", "-t", "60", "-o", shlex.join(opts),
                                            "start"]),
                              stdout=subprocess.DEVNULL)
        if proc.returncode != 0:
            tail = logfile.read_text(errors="replace")[-2000:] if logfile.exists() else ""
            raise RuntimeError(f"pg_ctl start exited {proc.returncode}: {tail}")
        url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        _log(f"throwaway cluster {data} on port {port} ({', '.join(f'{k}={v}' for k, v in conf.items())})")
        yield url
    finally:
        try:
            if started:
                stop = [pg_ctl, "-D", str(data), "-w", "-t", "60", "stop"]
                if subprocess.run(_as_postgres(stop + ["-m", "fast"]),
                                  stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL).returncode != 0:
                    subprocess.run(_as_postgres(stop + ["-m", "immediate"]),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                _log(f"stopped the cluster on port {port}")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            signal.signal(signal.SIGTERM, previous)
