"""`jobvisor run`, `reload`, `migrate` and `db-url`: the supervisor and its database."""

from __future__ import annotations

import argparse
from typing import Any

from supervisor_app import database
from workers.core.commands import EXIT_OK, CommandKit


def register(sub: Any, kit: CommandKit) -> None:
    sp = kit.add("run", cmd_run, "migrate, then supervise sub-workers for every configured type",
                 sub)
    sp.add_argument("--config", help="quotas YAML (default: $JOBVISOR_CONFIG, "
                    "./config/jobvisor.yaml, /etc/jobvisor/jobvisor.yaml)")
    sp.add_argument("--types", help="comma-separated subset of configured types to run")
    sp.set_defaults(service=True)  # logs at INFO, like its children (cli.main.log_level)

    kit.add("reload", cmd_reload, "send SIGHUP to the running supervisor (pid file)", sub)

    kit.add("migrate", cmd_migrate, "apply missing SQL migrations, the core's and each "
            "plug-in's (no-op when up to date)", sub)

    sp = kit.add("db-url", cmd_db_url, "print the DSN in use (starts the embedded server if "
                 "needed)", sub)
    sp.add_argument("--keep-running", action="store_true",
                    help="leave the embedded server running after this command")


def cmd_db_url(args: argparse.Namespace) -> int:
    print(database.resolve_dsn(keep_embedded_running=args.keep_running))
    return EXIT_OK


def cmd_migrate(args: argparse.Namespace) -> int:
    from supervisor_app.migrate import migrate

    applied = migrate(args.kit.dsn("owner"))
    print("applied: " + ", ".join(applied) if applied else "up to date")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from supervisor_app.main import run

    return run(args)


def cmd_reload(args: argparse.Namespace) -> int:
    from supervisor_app.main import reload

    return reload(args)
