"""Polling and process helpers: tests wait for conditions with a bound, never a sleep."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import psycopg

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], *, timeout: float = 60.0, interval: float = 0.05,
             what: str = "condition") -> T:
    """Poll until `predicate()` is truthy; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def start_worker(env: dict[str, str], job_type: str, *args: str,
                 log: Path | None = None) -> subprocess.Popen:
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - child owns it
    return subprocess.Popen(
        [sys.executable, "-m", "workers", "--type", job_type, *args],
        env=env, stdout=out, stderr=out, cwd=Path(__file__).resolve().parent.parent,
    )


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(
            f"process {proc.pid} did not exit {timeout:g}s after signal {sig}") from None


def counts(conn: psycopg.Connection, job_type: str | None = None) -> dict[str, int]:
    sql = "SELECT status, count(*) FROM jobvisor.jobs"
    params: tuple[Any, ...] = ()
    if job_type:
        sql += " WHERE job_type = %s"
        params = (job_type,)
    return dict(conn.execute(sql + " GROUP BY status", params).fetchall())


def log_events(text: str, name: str) -> list[dict[str, Any]]:
    """The JSON log records of event `name` in `text` (other lines are skipped)."""
    out = []
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and rec.get("event") == name:
            out.append(rec)
    return out


def core_migrations_before(version: int, folder: Path) -> Path:
    """A copy of the core's migrations numbered below `version` in `folder` (made), to
    migrate a database as an older jobvisor left it; copy the next one in to upgrade."""
    from supervisor_app.migrate import sql_dir

    folder.mkdir()
    for path in sorted(sql_dir().glob("*.sql")):
        if int(path.name[:3]) < version:
            shutil.copy(path, folder / path.name)
    return folder
