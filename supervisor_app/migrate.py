"""Apply the numbered plain-SQL migrations, once each, race-free: the core's in `sql/`,
then those each plug-in ships (workers.core.plugins), recorded per component."""

from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import psycopg

from workers.core import plugins
from workers.core.plugins import CORE, Plugin

log = logging.getLogger("jobvisor.migrate")

_NAME = re.compile(r"^(\d{3,})_([a-z0-9_]+)\.sql$")
# Any constant works; it only has to be the same on every host.
_LOCK_ID = 0x6A6F6276  # "jobv"


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    path: Path

    @property
    def sql(self) -> str:
        return self.path.read_text(encoding="utf-8")

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()


def sql_dir() -> Path:
    if env := os.environ.get("JOBVISOR_SQL_DIR"):
        return Path(env)
    return Path(__file__).resolve().parent.parent / "sql"


def discover(directory: Path | None = None) -> list[Migration]:
    directory = directory or sql_dir()
    if not directory.is_dir():
        raise ValueError(f"{directory}: no migrations directory (set JOBVISOR_SQL_DIR)")
    found = []
    for path in sorted(directory.glob("*.sql")):
        m = _NAME.match(path.name)
        if not m:
            raise ValueError(f"{path}: migration files are named NNN_name.sql")
        found.append(Migration(int(m.group(1)), m.group(2), path))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise ValueError(f"{directory}: two migrations share a number")
    return found


def plugin_migrations() -> list[tuple[Plugin, list[Migration]]]:
    """Each installed plug-in's migrations, plug-ins in name order."""
    out = []
    for plugin in plugins.installed():
        folder = plugin.migrations_dir()
        if folder is not None:
            out.append((plugin, discover(folder)))
    return out


_BOOKKEEPING = """
CREATE TABLE IF NOT EXISTS jobvisor.schema_migrations (
    component text NOT NULL DEFAULT 'core',
    version integer NOT NULL,
    name text NOT NULL,
    checksum text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (component, version))
"""

# Databases from before plug-ins numbered every migration in one sequence.
_UPGRADE_BOOKKEEPING = """
ALTER TABLE jobvisor.schema_migrations
    ADD COLUMN IF NOT EXISTS component text NOT NULL DEFAULT 'core';
ALTER TABLE jobvisor.schema_migrations DROP CONSTRAINT IF EXISTS schema_migrations_pkey;
ALTER TABLE jobvisor.schema_migrations ADD PRIMARY KEY (component, version);
"""


def _bookkeeping(conn: psycopg.Connection) -> None:
    conn.execute("CREATE SCHEMA IF NOT EXISTS jobvisor")
    conn.execute(_BOOKKEEPING)
    (has_component,) = conn.execute(
        "SELECT count(*) = 2 FROM pg_index i JOIN pg_attribute a"
        " ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)"
        " WHERE i.indrelid = 'jobvisor.schema_migrations'::regclass AND i.indisprimary"
    ).fetchone()
    if not has_component:
        with conn.transaction():
            conn.execute(_UPGRADE_BOOKKEEPING)


def _adopt(conn: psycopg.Connection, plugin: Plugin, found: list[Migration]) -> None:
    """Re-record core migrations a plug-in took over (`Plugin.adopts`) as the plug-in's:
    what they created is there, so they are not applied again."""
    by_version = {m.version: m for m in found}
    for legacy, version in plugin.adopts.items():
        m = _NAME.match(legacy + ".sql")
        if not m or version not in by_version:
            raise ValueError(f"plug-in {plugin.name!r}: adopts {legacy!r} -> {version}: "
                             "expected 'NNN_name' and one of its own migration numbers")
        done = conn.execute(
            "UPDATE jobvisor.schema_migrations SET component = %s, version = %s,"
            " name = %s, checksum = %s"
            " WHERE component = %s AND version = %s AND name = %s"
            " AND NOT EXISTS (SELECT FROM jobvisor.schema_migrations"
            "                 WHERE component = %s AND version = %s)",
            (plugin.name, version, by_version[version].name, by_version[version].checksum,
             CORE, int(m.group(1)), m.group(2), plugin.name, version)).rowcount
        if done:
            log.info("migration_adopted", extra={"component": plugin.name, "version": version,
                                                 "migration": legacy})


def _apply(conn: psycopg.Connection, component: str, found: list[Migration]) -> list[str]:
    done = {row[0]: row[1] for row in conn.execute(
        "SELECT version, checksum FROM jobvisor.schema_migrations WHERE component = %s",
        (component,))}
    applied = []
    for m in found:
        if m.version in done:
            if done[m.version] != m.checksum:
                log.warning("migration_changed_after_apply",
                            extra={"component": component, "version": m.version})
            continue
        with conn.transaction():
            conn.execute(m.sql)
            conn.execute(
                "INSERT INTO jobvisor.schema_migrations (component, version, name, checksum)"
                " VALUES (%s, %s, %s, %s)", (component, m.version, m.name, m.checksum))
        label = f"{m.version:03d}_{m.name}"
        log.info("migration_applied", extra={"component": component, "version": m.version,
                                             "migration": m.name})
        applied.append(label if component == CORE else f"{component}/{label}")
    return applied


def migrate(dsn: str, directory: Path | None = None) -> list[str]:
    """Apply missing migrations: the core's in order, then each installed plug-in's in
    order (plug-ins by name). Returns the names applied (empty: no-op), a plug-in's as
    `name/NNN_migration`. With `directory`, only the core migrations found there.

    A session-level advisory lock makes a second host wait and then find nothing to do.
    Each migration runs in its own transaction together with its bookkeeping row.
    """
    core = discover(directory)
    extra = plugin_migrations() if directory is None else []
    applied: list[str] = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (_LOCK_ID,))
        try:
            _bookkeeping(conn)
            for plugin, found in extra:
                _adopt(conn, plugin, found)
            applied += _apply(conn, CORE, core)
            for plugin, found in extra:
                applied += _apply(conn, plugin.name, found)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (_LOCK_ID,))
    return applied
