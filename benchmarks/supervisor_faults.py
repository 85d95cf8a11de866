"""The supervisor under faults: database outages, a hostile body, 200 scrapers.

Three measurements against a real `jobvisor run` (shipped supervisor/queue settings,
HTTP on a free local port):

- `outage_<s>s`: the supervisor and its children reach PostgreSQL through a TCP proxy
  that is cut for <s> seconds while a backlog of short jobs runs (2 processes × 2
  threads, 0.1 s per job). Figures: seconds from the cut until /healthz says 503, from
  the restore until it says 200 again and until every job is done; children killed as
  silent; jobs whose side effect committed other than exactly once.
- `hostile_body`: an unauthenticated chunked POST streams up to 400 MiB; figures: MiB the
  server read before refusing, its answer, supervisor RSS before and after.
- `scrapers`: 200 concurrent `/metrics` scrapes (each a fresh connection) while /healthz
  is probed; latency percentiles of both.

    python -m benchmarks.supervisor_faults [--outages 15,75] [--jobs 400]
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import statistics
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import psycopg

from benchmarks._common import bench_database, emit, main_guard, progress, r3, wait_until
from benchmarks.supervisor_handlers import config_with, supervisor
from tests.tcp_proxy import TcpProxy
from workers.core import queue as q

EFFECTS = """CREATE TABLE IF NOT EXISTS effects (
    job_id bigint NOT NULL, attempt int NOT NULL, pid int, at timestamptz DEFAULT now())"""


def _status(port: int, path: str = "/healthz") -> int | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as err:
        return err.code
    except OSError:
        return None


def outage(dsn: str, seconds: float, jobs: int, workdir: Path) -> dict[str, Any]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(EFFECTS)
        conn.execute("TRUNCATE effects")
        conn.execute("GRANT ALL ON effects TO PUBLIC")
    proxy = TcpProxy.in_front_of(dsn)
    types = {"rec": {"handler": "tests.handlers:record", "concurrency": 2,
                     "processes": {"min": 2, "max": 2}, "memory_per_job": "16MiB"}}
    cfg = config_with(types)
    port = cfg["supervisor"]["http"]["port"]
    try:
        with supervisor(dsn, cfg, workdir, env_extra={"DATABASE_URL": proxy.dsn(dsn)}) as sup, \
                psycopg.connect(dsn, autocommit=True) as conn:
            sup.wait_running({"rec": 2}, timeout=60)
            ids = q.enqueue_many(conn, [q.NewJob("rec", {"seconds": 0.1})
                                        for _ in range(jobs)])
            wait_until(lambda: _done(conn, ids) >= jobs // 10, timeout=60, what="work going")
            proxy.cut()
            cut = time.monotonic()
            wait_until(lambda: _status(port) == 503, timeout=30, what="503", interval=0.05)
            noticed = time.monotonic() - cut
            time.sleep(max(0.0, cut + seconds - time.monotonic()))
            proxy.restore()
            back = time.monotonic()
            wait_until(lambda: _status(port) == 200, timeout=60, what="200", interval=0.05)
            healthy = time.monotonic() - back
            wait_until(lambda: _done(conn, ids) == jobs, timeout=120, what="all done",
                       interval=0.05)
            drained = time.monotonic() - back
            dupes = conn.execute("SELECT count(*) FROM (SELECT job_id FROM effects GROUP BY 1"
                                 " HAVING count(*) <> 1) d").fetchone()[0]
            missing = jobs - conn.execute("SELECT count(DISTINCT job_id) FROM effects"
                                          ).fetchone()[0]
            silent = len(sup.events("child_silent"))
    finally:
        proxy.close()
    progress(f"outage {seconds:g}s: 503 after {noticed:.2f}s, 200 {healthy:.2f}s and all "
             f"done {drained:.2f}s after the restore")
    return {"outage_s": seconds, "jobs": jobs, "unhealthy_after_s": r3(noticed),
            "healthy_after_restore_s": r3(healthy), "all_done_after_restore_s": r3(drained),
            "children_killed_silent": silent, "effects_not_exactly_once": dupes + missing}


def _done(conn: psycopg.Connection, ids: list[int]) -> int:
    return conn.execute("SELECT count(*) FROM jobvisor.jobs WHERE id = ANY(%s) AND status ="
                        " 'completed'", (ids,)).fetchone()[0]


def hostile(dsn: str, workdir: Path) -> dict[str, Any]:
    types = {"noop": {"processes": {"min": 1, "max": 1}, "memory_per_job": "16MiB"}}
    cfg = config_with(types)
    port = cfg["supervisor"]["http"]["port"]
    with supervisor(dsn, cfg, workdir) as sup:
        proc = psutil.Process(sup.pid)
        before = proc.memory_info().rss
        sent = 0
        answer = b""
        with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
            c.sendall(b"POST /ui/api/jobs/1/cancel HTTP/1.1\r\nHost: x\r\n"
                      b"Transfer-Encoding: chunked\r\n\r\n")
            chunk = b"%x\r\n%s\r\n" % (1 << 20, b"x" * (1 << 20))
            try:
                for _ in range(400):
                    c.sendall(chunk)
                    sent += 1
            except OSError:
                pass
            with contextlib.suppress(OSError):
                answer = c.recv(200)
        after = proc.memory_info().rss
    status = answer.split(b" ", 2)[1].decode() if answer.startswith(b"HTTP/") else "closed"
    progress(f"hostile body: {sent} MiB accepted by the socket, answer {status}, RSS "
             f"{before / 2**20:.0f} -> {after / 2**20:.0f} MiB")
    return {"mib_sent_before_refusal": sent, "answer": status,
            "rss_before_mib": r3(before / 2**20), "rss_after_mib": r3(after / 2**20)}


def scrapers(dsn: str, workdir: Path, n: int = 200) -> dict[str, Any]:
    types = {"noop": {"processes": {"min": 1, "max": 1}, "memory_per_job": "16MiB"}}
    cfg = config_with(types)
    port = cfg["supervisor"]["http"]["port"]
    with supervisor(dsn, cfg, workdir):
        scrape_ms: list[float] = []
        probe_ms: list[float] = []
        failures = 0
        lock = threading.Lock()
        start = threading.Barrier(n + 1)

        def scrape() -> None:
            nonlocal failures
            start.wait()
            t = time.perf_counter()
            ok = _status(port, "/metrics") == 200
            with lock:
                scrape_ms.append((time.perf_counter() - t) * 1000)
                failures += not ok

        threads = [threading.Thread(target=scrape) for _ in range(n)]
        for t in threads:
            t.start()
        start.wait()
        while any(t.is_alive() for t in threads):
            t0 = time.perf_counter()
            _status(port)
            probe_ms.append((time.perf_counter() - t0) * 1000)
        for t in threads:
            t.join()

    def pct(values: list[float], p: float) -> float:
        values = sorted(values)
        return r3(values[min(len(values) - 1, int(p * len(values)))])

    figures = {"scrapers": n, "failed": failures,
               "scrape_ms": {"p50": r3(statistics.median(scrape_ms)),
                             "p99": pct(scrape_ms, 0.99), "max": r3(max(scrape_ms))},
               "healthz_probes": len(probe_ms),
               "healthz_ms": {"p50": r3(statistics.median(probe_ms)) if probe_ms else None,
                              "p99": pct(probe_ms, 0.99) if probe_ms else None}}
    progress(f"scrapers: {figures}")
    return figures


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.supervisor_faults",
                                description=__doc__.splitlines()[0])
    p.add_argument("--outages", default="15,75", help="outage lengths in seconds")
    p.add_argument("--jobs", type=int, default=400)
    args = p.parse_args()

    def body() -> None:
        figures: dict[str, Any] = {}
        with bench_database() as db, tempfile.TemporaryDirectory(prefix="jv-faults-") as tmp:
            figures["postgres"] = db.server_version
            for s in (float(x) for x in args.outages.split(",") if x.strip()):
                figures[f"outage_{s:g}s"] = outage(db.dsn, s, args.jobs,
                                                   Path(tmp) / f"outage{s:g}")
            figures["hostile_body"] = hostile(db.dsn, Path(tmp) / "hostile")
            figures["scrapers"] = scrapers(db.dsn, Path(tmp) / "scrapers")
        emit(figures)

    return main_guard(body)


if __name__ == "__main__":
    raise SystemExit(main())
