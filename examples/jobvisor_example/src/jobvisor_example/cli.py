"""`jobvisor example-totals [--json]`: what the example_wordcount jobs have counted so far.

The plug-in's `commands` (plugin.py): the CLI calls `register(subparsers, kit)` while it
builds its parser; each command gets the kit back as `args.kit`.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import psycopg

from workers.core.commands import EXIT_OK, CommandKit, Failed

_TOTALS = """
SELECT count(*), coalesce(sum(lines), 0), coalesce(sum(words), 0), max(counted_at)
FROM jobvisor_example.wordcounts
"""


def register(subparsers: Any, kit: CommandKit) -> None:
    sp = kit.add("example-totals", cmd_totals,
                 "totals of the example_wordcount jobs counted so far (jobs, lines, words)",
                 subparsers)
    sp.add_argument("--json", action="store_true", help="one JSON object")


def cmd_totals(args: argparse.Namespace) -> int:
    # kit.dsn raises BadInput (exit 2) when the database can't be reached.
    with psycopg.connect(args.kit.dsn("owner"), autocommit=True) as conn:
        try:
            jobs, lines, words, last = conn.execute(_TOTALS).fetchone()
        except psycopg.errors.UndefinedTable:
            raise Failed("jobvisor_example.wordcounts does not exist: run "
                         "`jobvisor migrate` with the example installed") from None
    totals = {"jobs": jobs, "lines": lines, "words": words,
              "last_counted_at": last.isoformat() if last else None}
    if args.json:
        print(json.dumps(totals))
    else:
        width = max(map(len, totals))
        for name, value in totals.items():
            print(f"{name:>{width}}: {'-' if value is None else value}")
    return EXIT_OK
