"""`jobvisor db start|stop|status` and `jobvisor psql`: the embedded PostgreSQL's lifetime.

The `db` commands always mean the embedded server under $JOBVISOR_HOME, whatever
DATABASE_URL says; `psql` connects to the database the CLI uses (DATABASE_URL, else the
embedded one). Lifetime rules: workers.core.embedded and the README.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import psutil
from psycopg.conninfo import conninfo_to_dict

from supervisor_app import database, embedded
from workers.core.commands import EXIT_FAILED, EXIT_OK, BadInput, CommandKit, Failed
from workers.core.dsn import PG_VARIABLE_FOR, variables_set

# libpq reads these instead of a conninfo string: psql gets the DSN here, never in argv
# (/proc/<pid>/cmdline is world-readable; a process's environment is not).
PSQL_VARIABLE_FOR = {**PG_VARIABLE_FOR, "password": "PGPASSWORD"}


def register(sub: Any, kit: CommandKit) -> None:
    group = kit.group("db", "the embedded PostgreSQL under $JOBVISOR_HOME: start, stop, status",
                      sub, "db_action")
    kit.add("start", cmd_start, "start the embedded PostgreSQL and keep it running until "
            "`jobvisor db stop`; print its DSN (idempotent)", group)
    sp = kit.add("stop", cmd_stop, "stop the embedded PostgreSQL (refused while a supervisor "
                 "or another process uses it)", group)
    sp.add_argument("--force", action="store_true",
                    help="stop it even while a supervisor or other processes use it")
    sp = kit.add("status", cmd_status, "whether the embedded PostgreSQL runs, its DSN and "
                 "data dir (exit 0 running, 1 not)", group)
    sp.add_argument("--json", action="store_true", help="one JSON object")

    # psql's own options (-c, -X, --help) must reach psql: this parser treats no argument
    # as an option of its own (no '-' prefix), so everything after `psql` passes through.
    help_ = "run psql on the database in use (DATABASE_URL, else the embedded server)"
    sp = sub.add_parser("psql", help=help_, description=help_, add_help=False,
                        prefix_chars="\0")
    sp.set_defaults(func=cmd_psql, kit=kit)
    sp.add_argument("args", nargs=argparse.REMAINDER, help="passed to psql as they are")


def cmd_start(args: argparse.Namespace) -> int:
    print(embedded.start(keep_running=True))
    return EXIT_OK


def cmd_stop(args: argparse.Namespace) -> int:
    where = embedded.data_dir()
    if not args.force and (sup := supervisor_pid()):
        pid, pf = sup
        raise Failed(f"a `jobvisor run` supervisor (pid {pid}, {pf}) is using the embedded "
                     f"PostgreSQL in {where}: stop it first (or --force)")
    try:
        stopped = embedded.stop(force=args.force)
    except embedded.ServerHeld as exc:
        raise Failed(f"the embedded PostgreSQL in {where} is in use by pid "
                     f"{_named(exc.pids)}: stop {'them' if len(exc.pids) > 1 else 'it'} "
                     "first (or --force)") from None
    print(f"stopped the embedded PostgreSQL in {where}" if stopped
          else f"the embedded PostgreSQL in {where} was not running")
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    st = embedded.status()
    if args.json:
        print(json.dumps(st.as_dict()))
        return EXIT_OK if st.running else EXIT_FAILED
    if st.running:
        print(f"embedded PostgreSQL: running (pid {st.pid})")
        print(f"dsn: {st.dsn}")
    else:
        print("embedded PostgreSQL: not running")
    print(f"data dir: {st.data_dir}")
    if st.running:
        print("lifetime: " + ("kept running until `jobvisor db stop`" if st.kept_running
                              else "stops when the last process holding it exits"))
        print("held by pid: " + (", ".join(map(str, st.holders)) or "none"))
    if named := variables_set():
        print(f"note: {', '.join(named)} set: jobvisor commands here use that database, "
              "not this one")
    return EXIT_OK if st.running else EXIT_FAILED


def cmd_psql(args: argparse.Namespace) -> int:
    exe = embedded.psql_path()
    if not exe:
        raise BadInput("psql not found: neither pgserver's nor one on PATH")
    # With the embedded server this process holds it while psql runs (and stops it after,
    # if it started it and nothing pins it): psql runs as a child, not in our place.
    if args.args[:1] in (["--help"], ["-?"], ["--version"], ["-V"]):
        env = dict(os.environ)  # psql's own help: no database to start or name
    else:
        env = libpq_env(database.resolve_dsn("owner"), os.environ)
    child: list[subprocess.Popen] = []

    def pass_on(signum: int, _frame: Any) -> None:
        # Ctrl-C reaches psql itself (its process group), which cancels the query: we
        # only must not die of it. A SIGTERM sent to us alone is passed on.
        if child and signum != signal.SIGINT:
            child[0].send_signal(signum)

    # A handler, unlike SIG_IGN, is reset by exec: psql keeps its own signal handling.
    previous = {s: signal.signal(s, pass_on) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        child.append(subprocess.Popen([exe, *args.args], env=env))
        rc = child[0].wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return rc if rc >= 0 else 128 - rc


def libpq_env(dsn: str, environ: Any) -> dict[str, str]:
    """`environ` plus the PG* variables that make libpq connect as `dsn` does."""
    try:
        params = conninfo_to_dict(dsn)
    except Exception:  # noqa: BLE001 - the DSN itself must not reach the message
        raise BadInput("the database URL is not a valid PostgreSQL DSN") from None
    unknown = sorted(k for k in params if k not in PSQL_VARIABLE_FOR)
    if unknown:
        raise BadInput(f"psql: DSN keyword(s) {', '.join(unknown)} have no PG* variable; "
                       "they would have to go in psql's arguments, which others can read")
    env = {k: v for k, v in environ.items() if k != "PGSERVICE"}  # a service beats PG* vars
    env.update({PSQL_VARIABLE_FOR[k]: str(v) for k, v in params.items() if v not in (None, "")})
    return env


def supervisor_pid() -> tuple[str, Path] | None:
    """(pid, pid file) of a live `jobvisor run` here: the one holding its pid file's lock."""
    from supervisor_app.main import lock_holder, pid_file

    pf = pid_file()
    pid = lock_holder(pf)
    return (pid, pf) if pid is not None else None


def _named(pids: list[int]) -> str:
    def one(pid: int) -> str:
        try:
            return f"{pid} ({psutil.Process(pid).name()})"
        except psutil.Error:
            return str(pid)

    return ", ".join(one(p) for p in pids)
