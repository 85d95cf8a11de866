"""`jobvisor run` and `jobvisor reload`."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from supervisor_app import database, embedded
from supervisor_app.config import ConfigError, load_config, resolve_config_path
from supervisor_app.errors import BadInput, Failed
from supervisor_app.http import serve
from supervisor_app.migrate import migrate
from supervisor_app.supervisor import Supervisor, send_reload
from workers.dsn import dsn_from_env
from workers.registry import HandlerError

log = logging.getLogger("jobvisor.main")


def pid_file() -> Path:
    return Path(os.environ.get("JOBVISOR_PID_FILE") or embedded.home() / "jobvisor.pid")


def run(args: argparse.Namespace) -> int:
    path = resolve_config_path(args.config)
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        raise BadInput(str(exc)) from exc
    only = set(args.types.split(",")) if args.types else None
    if only and (missing := only - set(cfg.types)):
        raise BadInput(f"--types: not configured in {path}: {', '.join(sorted(missing))}")
    # The supervisor migrates and prunes, so it prefers the app DSN; children pick
    # LEARNING_DATABASE_URL (the least-privilege worker role) first when it is set.
    from_env = os.environ.get("DATABASE_URL", "").strip() or dsn_from_env()
    dsn = from_env or embedded.start()
    database.check(dsn)
    applied = migrate(dsn)
    if applied:
        log.info("migrated", extra={"applied": applied})
    env = dict(os.environ)
    if not from_env:
        env["DATABASE_URL"] = dsn  # the embedded server: children find it here, not in argv
    sup = Supervisor(cfg, path, dsn, env, only_types=only)
    try:
        sup.check_handlers(cfg)
    except HandlerError as exc:
        raise BadInput(f"{path}: {exc}") from exc
    server = serve(sup, cfg.supervisor.http.host, cfg.supervisor.http.port)
    from supervisor_app import dashboard

    dashboard.start_sampler(sup)  # jobs/min history from the start, not the first view
    pf = pid_file()
    pf.parent.mkdir(parents=True, exist_ok=True)
    pf.write_text(f"{os.getpid()}\n")
    try:
        return sup.run()
    finally:
        server.shutdown()
        if pf.exists() and pf.read_text().strip() == str(os.getpid()):
            pf.unlink()


def reload(args: argparse.Namespace) -> int:
    pf = pid_file()
    try:
        pid = send_reload(pf)
    except FileNotFoundError as exc:
        raise Failed(f"no running supervisor: {pf} does not exist") from exc
    except ProcessLookupError as exc:
        raise Failed(f"no running supervisor: pid in {pf} is gone") from exc
    print(f"sent SIGHUP to supervisor {pid}")
    return 0
