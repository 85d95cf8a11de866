"""Start a real `jobvisor run` against the test database and look at it from outside."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import psycopg
import yaml

from tests.helpers import log_events, stop, wait_for

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_config(port: int, types: dict[str, Any], **supervisor: Any) -> dict[str, Any]:
    sup = {"http": {"host": "127.0.0.1", "port": port}, "replan": "0.5s", "grace": "10s",
           "restart": {"backoff": "0.2s", "max_backoff": "5s", "healthy_after": "3s",
                       "max_quick_failures": 4},
           "reserve": {"memory": "0", "gpu_memory": "0"}}
    sup.update(supervisor)
    return {"supervisor": sup,
            "queue": {"lease": "10s", "heartbeat": "1s", "poll": "0.5s", "rescue_every": "0.5s"},
            "types": types}


class Supervisor:
    def __init__(self, tmp: Path, env: dict[str, str], config: dict[str, Any],
                 name: str = "sup") -> None:
        self.dir = tmp / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.dir / "jobvisor.yaml"
        self.log_path = self.dir / "out.log"
        self.write_config(config)
        self.port = config["supervisor"]["http"]["port"]
        self.env = dict(env, JOBVISOR_PID_FILE=str(self.dir / "pid"),
                        JOBVISOR_HOME=str(self.dir))
        self.proc: subprocess.Popen | None = None

    def write_config(self, config: dict[str, Any] | str) -> None:
        text = config if isinstance(config, str) else yaml.safe_dump(config)
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(self.config_path)

    def start(self) -> Supervisor:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "supervisor_app", "run", "--config",
             str(self.config_path)],
            env=self.env, cwd=REPO, stdout=open(self.log_path, "ab"),  # noqa: SIM115
            stderr=subprocess.STDOUT)
        # The port answers 503 "starting" while the supervisor migrates; up means checks.
        wait_for(lambda: self.proc.poll() is not None
                 or '"checks"' in ((self.get("/healthz") or (0, ""))[1]),
                 what="supervisor up")
        assert self.proc.poll() is None, self.log()
        return self

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        return stop(self.proc, sig)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def events(self, name: str) -> list[dict[str, Any]]:
        return log_events(self.log(), name)

    def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, Any, Any]:
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}",
                                     headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                return resp.status, resp.read().decode(), resp.headers
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode(), err.headers
        except OSError:
            return None  # type: ignore[return-value]

    def view(self, db: psycopg.Connection) -> dict[str, Any] | None:
        assert self.proc is not None
        row = db.execute("SELECT state FROM jobvisor.supervisors WHERE pid = %s",
                         (self.proc.pid,)).fetchone()
        return row[0] if row else None

    def pids(self, db: psycopg.Connection, job_type: str, state: str = "running") -> list[int]:
        view = self.view(db) or {"workers": []}
        return sorted(w["pid"] for w in view["workers"]
                      if w["job_type"] == job_type and w["state"] == state and w["pid"])
