"""`jobvisor run` and `jobvisor reload`."""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import logging
import os
import signal
from pathlib import Path

from supervisor_app import database, embedded
from supervisor_app.config import Config, ConfigError, load_config, resolve_config_path
from supervisor_app.errors import BadInput, Failed
from supervisor_app.http import Server
from supervisor_app.migrate import migrate
from supervisor_app.supervisor import Supervisor, send_reload
from workers.core.dsn import dsn_for
from workers.core.registry import HandlerError

log = logging.getLogger("jobvisor.main")


def pid_file() -> Path:
    return Path(os.environ.get("JOBVISOR_PID_FILE") or embedded.home() / "jobvisor.pid")


def lock_pid_file(pf: Path) -> int:
    """Hold `pf` locked (flock) for this process's life and write our pid into it.

    One supervisor per JOBVISOR_HOME: a second one finds the lock held and names the pid
    that holds it. The kernel drops the lock when the holder dies, however it dies.
    """
    pf.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(pf, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise BadInput(f"another supervisor (pid {holder}) is running with {pf}; "
                       "stop it or set JOBVISOR_HOME to another directory") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def lock_holder(pf: Path) -> str | None:
    """The pid (as the file says it) of a live supervisor holding the pid file's lock;
    None when none does (no file, or one left over from a supervisor that is gone)."""
    try:
        fd = os.open(pf, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return os.read(fd, 64).decode(errors="replace").strip() or "?"
    finally:
        os.close(fd)
    return None


def run(args: argparse.Namespace) -> int:
    path = resolve_config_path(args.config)
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        raise BadInput(str(exc)) from exc
    only = set(args.types.split(",")) if args.types else None
    if only and (missing := only - set(cfg.types)):
        raise BadInput(f"--types: not configured in {path}: {', '.join(sorted(missing))}")
    # Signals that arrive while starting up (binding, migrating) are kept for the
    # supervisor loop, which acts on them first: a SIGTERM then is a prompt, clean stop.
    early: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda s, _f: early.append(s))
    pf = pid_file()
    lock = lock_pid_file(pf)
    # Bind before touching the database: a taken port fails at once, before migrating.
    host = os.environ.get("JOBVISOR_HTTP_HOST", "").strip() or cfg.supervisor.http.host
    port = cfg.supervisor.http.port
    try:
        server = Server(host, port)
    except OSError as exc:
        os.close(lock)
        raise BadInput(f"cannot listen on {host}:{port}: {exc.strerror or exc} "
                       "(supervisor.http in the config)") from None
    try:
        return _supervise(cfg, path, only, server, early)
    finally:
        server.shutdown()
        with contextlib.suppress(OSError):
            pf.unlink()  # we hold the lock: the file is ours
        os.close(lock)


def _supervise(cfg: Config, path: Path, only: set[str] | None, server: Server,
               early: list[int]) -> int:
    # The supervisor migrates, rescues and prunes as the owner; children resolve the
    # worker role from the same environment (workers.core.dsn).
    from_env = dsn_for("owner")
    dsn = database.resolve_dsn("owner")
    database.check(dsn)
    applied = migrate(dsn)
    if applied:
        log.info("migrated", extra={"applied": applied})
    env = dict(os.environ)
    if not from_env:
        env["DATABASE_URL"] = dsn  # the embedded server: children find it here, not in argv
    sup = Supervisor(cfg, path, dsn, env, only_types=only)
    sup.signals = early  # the same list: the early handlers go on appending until replaced
    try:
        sup.check_handlers(cfg)
    except HandlerError as exc:
        raise BadInput(f"{path}: {exc}") from exc
    server.start(sup)
    from supervisor_app import dashboard

    dashboard.start_sampler(sup)  # jobs/min history from the start, not the first view
    return sup.run()


def reload(args: argparse.Namespace) -> int:
    pf = pid_file()
    if pf.exists() and lock_holder(pf) is None:
        raise Failed(f"no running supervisor: {pf} is left from one that is gone")
    try:
        pid = send_reload(pf)
    except FileNotFoundError as exc:
        raise Failed(f"no running supervisor: {pf} does not exist") from exc
    except ProcessLookupError as exc:
        raise Failed(f"no running supervisor: pid in {pf} is gone") from exc
    print(f"sent SIGHUP to supervisor {pid}")
    return 0
