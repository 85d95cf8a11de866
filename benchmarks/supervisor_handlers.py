"""What the supervisor benchmarks share: a real `jobvisor run` in a scratch directory,
its published view (`jobvisor.supervisors`), its JSON log, and a cleanup that leaves no
child behind.

Children run in their own sessions (the supervisor starts them so, for Ctrl-C), so
killing the supervisor does not reach them: `stop()` ends every child pid it ever saw
in the view that is still a `python -m workers` process.

(No job handlers live here: the benchmarks use the built-in `sleep` and `noop`.)
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil
import yaml

from benchmarks._common import REPO, BenchFailed, progress, wait_until

SHIPPED_CONFIG = REPO / "config" / "jobvisor.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def load_yaml(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise BenchFailed(f"{path}: not a YAML mapping")
    return data


def config_with(types: dict[str, Any], base: Path = SHIPPED_CONFIG,
                **supervisor: Any) -> dict[str, Any]:
    """`base`'s supervisor and queue sections (HTTP on a free local port), given types."""
    cfg = load_yaml(base)
    sup = dict(cfg.get("supervisor") or {})
    sup["http"] = {"host": "127.0.0.1", "port": free_port()}
    for key, value in supervisor.items():
        if isinstance(value, dict) and isinstance(sup.get(key), dict):
            sup[key] = {**sup[key], **value}
        else:
            sup[key] = value
    return {"supervisor": sup, "queue": dict(cfg.get("queue") or {}), "types": types}


def parse_ts(text: str) -> float:
    """A log line's `ts` (UTC, milliseconds) as epoch seconds."""
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _is_worker(pid: int) -> bool:
    try:
        cmd = psutil.Process(pid).cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False
    return "-m" in cmd and "workers" in cmd


@dataclass
class RunningSupervisor:
    proc: subprocess.Popen[bytes]
    workdir: Path
    config_path: Path
    log_path: Path
    conn: Any  # psycopg.Connection (autocommit), imported lazily by the caller's mode
    seen_children: set[int] = field(default_factory=set)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise BenchFailed(f"supervisor exited with code {self.proc.returncode}; "
                              f"log tail:\n{self.log_tail()}")

    def view(self, fresh_after: Any = None) -> dict[str, Any] | None:
        """The state the supervisor last published (every 2 s); with `fresh_after` (a
        database timestamp), None unless it was published after that moment."""
        row = self.conn.execute(
            "SELECT state, heartbeat_at FROM jobvisor.supervisors WHERE pid = %s",
            (self.pid,)).fetchone()
        if row is None or (fresh_after is not None and row[1] <= fresh_after):
            return None
        view = row[0]
        self.seen_children.update(w["pid"] for w in view.get("workers", []) if w.get("pid"))
        return view

    def workers(self, job_type: str | None = None, state: str | None = None,
                fresh_after: Any = None) -> list[dict[str, Any]]:
        view = self.view(fresh_after) or {"workers": []}
        return [w for w in view["workers"]
                if (job_type is None or w["job_type"] == job_type)
                and (state is None or w["state"] == state) and w.get("pid")]

    def wait_running(self, counts: dict[str, int], timeout: float,
                     fresh_after: Any = None) -> list[dict[str, Any]]:
        """Wait until each type has that many live children in state `running`, as
        published after `fresh_after` (a database timestamp) when given."""
        def ready() -> list[dict[str, Any]] | None:
            self.check_alive()
            running = [w for w in self.workers(state="running", fresh_after=fresh_after)
                       if _is_worker(w["pid"])]
            for job_type, n in counts.items():
                if sum(1 for w in running if w["job_type"] == job_type) < n:
                    return None
            return running
        return wait_until(ready, timeout=timeout, what=f"children running {counts}",
                          interval=0.1)

    def events(self, name: str) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and rec.get("event") == name:
                out.append(rec)
        return out

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM (drain), then SIGKILL; then end any child that outlived it."""
        with contextlib.suppress(Exception):
            self.view()  # learn the latest child pids while the row is still there
        code: int | None = None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            progress(f"supervisor {self.pid} did not drain in {timeout:g}s: killing it")
            self.proc.kill()
            self.proc.wait()
        for pid in sorted(self.seen_children):
            if _is_worker(pid):
                progress(f"child {pid} outlived the supervisor: killing it")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        return code


@contextmanager
def supervisor(dsn: str, config: dict[str, Any], workdir: Path,
               env_extra: dict[str, str] | None = None,
               start_timeout: float = 60.0) -> Iterator[RunningSupervisor]:
    """`python -m supervisor_app run --config <workdir>/jobvisor.yaml` against `dsn`."""
    import psycopg

    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "jobvisor.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    log_path = workdir / "supervisor.log"
    env = {k: v for k, v in os.environ.items()
           if k not in ("LEARNING_DATABASE_URL", "DATABASE_URL")}
    env.update({
        "DATABASE_URL": dsn,  # environment, never argv
        "PYTHONPATH": str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
        "PYTHONUNBUFFERED": "1",
        "JOBVISOR_PID_FILE": str(workdir / "jobvisor.pid"),
        "JOBVISOR_HOME": str(workdir),
    })
    env.update(env_extra or {})
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "supervisor_app", "run", "--config", str(config_path)],
            env=env, cwd=REPO, stdin=subprocess.DEVNULL, stdout=log_file,
            stderr=subprocess.STDOUT)
    conn = psycopg.connect(dsn, autocommit=True)
    sup = RunningSupervisor(proc, workdir, config_path, log_path, conn)
    try:
        def published() -> bool:
            sup.check_alive()
            return sup.view() is not None
        started = time.monotonic()
        wait_until(published, timeout=start_timeout, what="supervisor publishing its state",
                   interval=0.1)
        progress(f"supervisor {proc.pid} up in {time.monotonic() - started:.1f}s "
                 f"(log {log_path})")
        yield sup
    finally:
        code = sup.stop()
        progress(f"supervisor stopped, exit code {code}")
        conn.close()
