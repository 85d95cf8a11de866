"""The embedded PostgreSQL (pgserver) every role uses when no database variable is set.

Data lives under `$JOBVISOR_HOME/pgdata` (default `./.jobvisor/pgdata`) and is kept
between runs. Its lifetime (README, "The embedded database"):

- Every process that asks for it (`jobvisor run`, a CLI command, a bare
  `python -m workers`) starts it if needed and *holds* it while it lives. pgserver
  records holders by pid in the data dir and the last holder to exit stops the server.
- `jobvisor db start` (and `db-url --keep-running`) *pins* it: one more entry in that
  list that no process owns, so no holder is ever the last one. It then runs until
  `jobvisor db stop` (or until it goes down by itself: a reboot drops the pin).
- A holder killed with -9 never takes its pid out; such dead pids are dropped whenever a
  process attaches, exits, or looks (`status`, `stop`), so they don't keep the server up.
- Stopping (`stop`, or the last holder's exit) is a fast shutdown: clients are
  disconnected, the server checkpoints and exits.

Lives in workers.core so a bare worker can use it; supervisor_app.embedded re-exports it.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import subprocess
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from workers.core.commands import BadInput

log = logging.getLogger("jobvisor.embedded")

DEFAULT_HOME = Path(".jobvisor")
# pgserver's own holder list (a JSON list of pids in the data dir, utils.DiskList).
HANDLES = ".handle_pids.json"
PIN = 0  # the pin's entry in that list: no process has pid 0

_exit_hooks: set[Path] = set()


class EmbeddedUnavailable(BadInput):
    """The embedded server could not be started or stopped (exit 2, one line)."""


class ServerHeld(Exception):
    """`stop` found live processes holding the server; `pids` names them."""

    def __init__(self, pids: list[int]) -> None:
        super().__init__(", ".join(str(p) for p in pids))
        self.pids = pids


@dataclass(frozen=True)
class Status:
    data_dir: Path
    running: bool
    pid: int | None  # the postmaster's
    dsn: str | None
    kept_running: bool  # pinned by `jobvisor db start` / `db-url --keep-running`
    holders: list[int]  # live processes holding it (they stop it when the last exits)

    def as_dict(self) -> dict[str, object]:
        return {"running": self.running, "dsn": self.dsn, "data_dir": str(self.data_dir),
                "pid": self.pid, "kept_running": self.kept_running, "holders": self.holders}


def home() -> Path:
    return Path(os.environ.get("JOBVISOR_HOME") or DEFAULT_HOME).resolve()


def data_dir(path: Path | None = None) -> Path:
    return Path(path or home() / "pgdata").resolve()


def start(path: Path | None = None, *, keep_running: bool = False) -> str:
    """Start the embedded server (or attach to it), hold it, and return its DSN.

    `keep_running` pins it: it then outlives this process and every other holder.
    """
    pg = _pgserver()
    pgdata = data_dir(path)
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    with _lock(pg):
        _tidy(pg, pgdata)
    try:
        server = pg.get_server(pgdata, cleanup_mode="stop")
        uri = server.get_uri()
    except (subprocess.SubprocessError, OSError, RuntimeError, AssertionError) as exc:
        raise EmbeddedUnavailable(
            f"the embedded PostgreSQL in {pgdata} did not start ({type(exc).__name__}; "
            f"see {pgdata / 'log'})") from exc
    if pgdata not in _exit_hooks:
        # atexit runs last-registered first: this runs before pgserver's own exit hook.
        atexit.register(_release, pgdata)
        _exit_hooks.add(pgdata)
    if keep_running:
        with _lock(pg):
            _handles(pg, pgdata).get_and_add(PIN)
    log.info("embedded_postgres_ready", extra={"data_dir": str(pgdata),
                                                "kept_running": keep_running})
    return uri


def status(path: Path | None = None) -> Status:
    """Whether the embedded server runs, and who keeps it up; starts nothing."""
    pgdata = data_dir(path)
    if not (pgdata / "PG_VERSION").exists():
        return Status(pgdata, False, None, None, False, [])
    pg = _pgserver()
    with _lock(pg):
        _tidy(pg, pgdata)
        info = _postmaster(pg, pgdata)
        entries = _handles(pg, pgdata).get()
    running = info is not None
    return Status(pgdata, running, info.pid if info else None,
                  info.get_uri() if info else None, PIN in entries,
                  [p for p in entries if p != PIN])


def stop(path: Path | None = None, *, force: bool = False) -> bool:
    """Stop the embedded server and drop its pin: True if it ran, False if it did not.

    Refused (ServerHeld) while other live processes hold it, unless `force`.
    """
    import psutil

    pgdata = data_dir(path)
    if not (pgdata / "PG_VERSION").exists():
        return False
    pg = _pgserver()
    with _lock(pg):
        _tidy(pg, pgdata)
        handles = _handles(pg, pgdata)
        info = _postmaster(pg, pgdata)
        if info is None:
            return False
        others = [p for p in handles.get() if p not in (PIN, os.getpid())]
        if others and not force:
            raise ServerHeld(others)
        try:
            _shut_down(info.process)
        except psutil.NoSuchProcess:
            pass  # it exited by itself meanwhile
        except psutil.Error as exc:
            raise EmbeddedUnavailable(f"could not stop the embedded PostgreSQL in {pgdata} "
                                      f"({type(exc).__name__})") from exc
        handles.put([])
    log.info("embedded_postgres_stopped", extra={"data_dir": str(pgdata)})
    return True


def psql_path() -> str | None:
    """The psql that ships with pgserver, else the first on PATH."""
    import shutil

    with contextlib.suppress(ImportError):
        bundled = Path(_pgserver().__file__).parent / "pginstall" / "bin" / "psql"
        if os.access(bundled, os.X_OK):
            return str(bundled)
    return shutil.which("psql")


def _pgserver() -> ModuleType:
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI): harmless.
        warnings.simplefilter("ignore")
        import pgserver  # only needed without a database variable

    return pgserver


@contextlib.contextmanager
def _lock(pg: ModuleType) -> Iterator[None]:
    """pgserver's inter-process lock (the same file), around every change of the list."""
    import fasteners

    with fasteners.InterProcessLock(pg.PostgresServer.lock_path):
        yield


def _handles(pg: ModuleType, pgdata: Path):  # -> pgserver.utils.DiskList
    return pg.utils.DiskList(pgdata / HANDLES)


def _postmaster(pg: ModuleType, pgdata: Path):  # -> pgserver.utils.PostmasterInfo | None
    """The running postmaster's info, None when none runs (or it is still writing it)."""
    try:
        info = pg.utils.PostmasterInfo.read_from_pgdata(pgdata)
    except (OSError, ValueError, AssertionError):
        return None
    return info if info is not None and info.is_running() else None


def _tidy(pg: ModuleType, pgdata: Path) -> None:
    """Drop dead holders; drop the pin of a server that is no longer running. Locked."""
    import psutil  # a pgserver dependency; a worker on a DATABASE_URL never needs it

    handles = _handles(pg, pgdata)
    if not handles.path.exists():
        return
    entries = handles.get()
    keep = [p for p in entries if p == PIN or psutil.pid_exists(p)]
    if PIN in keep and _postmaster(pg, pgdata) is None:
        keep.remove(PIN)
    if keep != entries:
        handles.put(keep)


def _release(pgdata: Path) -> None:
    """At exit: if this process is the last holder and nothing pins the server, stop it.

    pgserver's own exit hook would do the same, but it counts dead holders as live ones,
    and as root it stops the server through pg_ctl running as `pgserver`, who may no
    longer traverse the data dir's parents (then it kills the postmaster). Having taken
    our pid out here, its hook finds nothing left to do.
    """
    with contextlib.suppress(Exception):  # at exit: never let this mask the exit status
        pg = _pgserver()
        with _lock(pg):
            _tidy(pg, pgdata)
            handles = _handles(pg, pgdata)
            if handles.get() != [os.getpid()]:
                return  # other holders, or the pin: pgserver's hook just removes our pid
            info = _postmaster(pg, pgdata)
            if info is not None:
                _shut_down(info.process)
            handles.put([])


def _shut_down(postmaster) -> None:  # postmaster: psutil.Process
    """Fast shutdown (what `pg_ctl -m fast stop` asks for): clients are disconnected,
    the server checkpoints and exits. A signal, not pg_ctl: as root, pg_ctl would run as
    the `pgserver` user, who may no longer traverse the data dir's parents."""
    import psutil

    postmaster.send_signal(signal.SIGINT)
    try:
        postmaster.wait(timeout=60)
    except psutil.TimeoutExpired:
        postmaster.send_signal(signal.SIGQUIT)  # immediate shutdown: recovery at next start
        postmaster.wait(timeout=30)
