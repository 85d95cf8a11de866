"""`jobvisor` command line. Exit codes: 0 ok, 1 the operation failed, 2 bad input or
unreachable database (with one line on stderr naming the problem).

The core's command groups and each plug-in's (`Plugin.commands`) register the same way:
`register(subparsers, kit)` with the kit of workers.core.commands.
"""

from __future__ import annotations

import argparse
import sys

import psycopg

from supervisor_app import database
from supervisor_app.cli import batches, common, jobs, server
from workers.core import logs, plugins
from workers.core.commands import EXIT_BAD_INPUT, EXIT_FAILED, BadInput, Failed


def build_parser() -> argparse.ArgumentParser:
    p = common.Parser(prog="jobvisor", description="Background jobs from one "
                                       "PostgreSQL queue under a single supervisor.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND",
                           parser_class=common.Parser)
    kit = common.make_kit(sub)
    for group in (server, jobs, batches):
        group.register(sub, kit)
    for plugin in plugins.installed():
        if plugin.commands:
            plugins.resolve(plugin.commands, what=f"plug-in {plugin.name!r} commands")(sub, kit)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logs.configure()
    try:
        return args.func(args)
    except BadInput as exc:
        print(f"jobvisor: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except database.DatabaseUnavailable as exc:
        print(f"jobvisor: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Failed as exc:
        print(f"jobvisor: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except psycopg.OperationalError as exc:
        print(f"jobvisor: database error ({type(exc).__name__})", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return 130

