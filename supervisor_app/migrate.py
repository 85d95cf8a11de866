"""Apply the numbered plain-SQL migrations in `sql/`, once each, race-free."""

from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import psycopg

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


def migrate(dsn: str, directory: Path | None = None) -> list[str]:
    """Apply missing migrations in order; returns the names applied (empty: no-op).

    A session-level advisory lock makes a second host wait and then find nothing to do.
    Each migration runs in its own transaction together with its bookkeeping row.
    """
    migrations = discover(directory)
    applied: list[str] = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (_LOCK_ID,))
        try:
            conn.execute("CREATE SCHEMA IF NOT EXISTS jobvisor")
            conn.execute(
                """CREATE TABLE IF NOT EXISTS jobvisor.schema_migrations (
                       version integer PRIMARY KEY,
                       name text NOT NULL,
                       checksum text NOT NULL,
                       applied_at timestamptz NOT NULL DEFAULT now())"""
            )
            done = {
                row[0]: row[1]
                for row in conn.execute("SELECT version, checksum FROM jobvisor.schema_migrations")
            }
            for m in migrations:
                if m.version in done:
                    if done[m.version] != m.checksum:
                        log.warning("migration_changed_after_apply", extra={"version": m.version})
                    continue
                with conn.transaction():
                    conn.execute(m.sql)
                    conn.execute(
                        "INSERT INTO jobvisor.schema_migrations (version, name, checksum)"
                        " VALUES (%s, %s, %s)",
                        (m.version, m.name, m.checksum),
                    )
                log.info("migration_applied", extra={"version": m.version, "migration": m.name})
                applied.append(f"{m.version:03d}_{m.name}")
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (_LOCK_ID,))
    return applied
