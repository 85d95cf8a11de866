"""`jobvisor` command line. Exit codes: 0 ok, 1 the operation failed, 2 bad input or
unreachable database (with one line on stderr naming the problem).

The core's command groups and each plug-in's (`Plugin.commands`) register the same way:
`register(subparsers, kit)` with the kit of workers.core.commands.

Data commands print their data and nothing else: their logs show only with `-v`. The
supervisor (`jobvisor run`, marked `service` by its parser) logs at INFO.
"""

from __future__ import annotations

import argparse
import logging
import sys

import psycopg
from psycopg import errors as pg_errors

from supervisor_app import database
from supervisor_app.cli import batches, common, db, jobs, server
from workers.core import logs, plugins
from workers.core.commands import EXIT_BAD_INPUT, EXIT_FAILED, BadInput, Failed
from workers.core.dsn import describe

# What a database jobvisor was never migrated on answers to its statements.
NOT_MIGRATED = (pg_errors.UndefinedTable, pg_errors.InvalidSchemaName,
                pg_errors.UndefinedFunction)


def build_parser() -> argparse.ArgumentParser:
    p = common.Parser(prog="jobvisor", description="Background jobs from one "
                                       "PostgreSQL queue under a single supervisor.")
    common.add_verbose(p)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND",
                           parser_class=common.Parser)
    kit = common.make_kit(sub)
    for group in (server, db, jobs, batches):
        group.register(sub, kit)
    for plugin in plugins.installed():
        if plugin.commands:
            plugins.resolve(plugin.commands, what=f"plug-in {plugin.name!r} commands")(sub, kit)
    return p


def log_level(args: argparse.Namespace) -> str | None:
    """The supervisor: JOBVISOR_LOG_LEVEL (default INFO), -v for DEBUG. Every other
    command: warnings only, -v for JOBVISOR_LOG_LEVEL (default INFO), -vv for DEBUG."""
    verbose = getattr(args, "verbose", 0)
    if getattr(args, "service", False):
        return "DEBUG" if verbose else None
    if verbose >= 2:
        return "DEBUG"
    return None if verbose else "WARNING"


def _database() -> str:
    return describe(common.used_dsns[-1]) if common.used_dsns else "in use"


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()
    except plugins.PluginError as exc:  # an installed plug-in can't load: name it
        print(f"jobvisor: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    args = parser.parse_args(argv)
    try:
        logs.configure(log_level(args))
    except ValueError as exc:  # JOBVISOR_LOG_FORMAT
        print(f"jobvisor: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        return args.func(args)
    except (BadInput, plugins.PluginError) as exc:
        print(f"jobvisor: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except database.DatabaseUnavailable as exc:
        print(f"jobvisor: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Failed as exc:
        print(f"jobvisor: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except NOT_MIGRATED as exc:
        # The primary message names the missing relation or function; never the
        # statement's CONTEXT, which may quote a payload.
        what = (exc.diag.message_primary or type(exc).__name__).replace("\n", " ")
        print(f"jobvisor: database {_database()} is not migrated ({what}): run "
              "`jobvisor migrate`", file=sys.stderr)
        return EXIT_BAD_INPUT
    except psycopg.OperationalError as exc:
        print(f"jobvisor: database error at {_database()} ({type(exc).__name__})",
              file=sys.stderr)
        return EXIT_BAD_INPUT
    except psycopg.Error as exc:
        # Anything else the database refused: the operation failed. Type and SQLSTATE
        # only; the message and its CONTEXT may quote payload content.
        logging.getLogger("jobvisor.cli").debug("database_error", exc_info=True)
        state = f" SQLSTATE {exc.sqlstate}" if exc.sqlstate else ""
        print(f"jobvisor: the database refused the operation ({type(exc).__name__}{state})",
              file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
