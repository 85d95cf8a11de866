"""Nightly `pg_dump` backups as a built-in jobvisor plug-in (docs/backups.md): the
`backup` job type and the `jobvisor backup` commands. No tables of its own: a backup's
record is its manifest next to the dump."""

from __future__ import annotations

from workers.core.plugins import Plugin

PLUGIN = Plugin(
    name="backup",
    handlers={"backup": "workers.backup.handler:handle"},
    commands="workers.backup.cli:register",
)
