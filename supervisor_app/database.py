"""Which database the CLI and supervisor use, checked before anything else runs. The role
rule is workers.core.dsn's; this adds the embedded server when no variable is set."""

from __future__ import annotations

import os

import psycopg

from supervisor_app import embedded
from workers.core.dsn import ROLE_VARIABLES, Role, describe, dsn_for


class DatabaseUnavailable(Exception):
    """The database can't be reached; the message names host and port, no secrets."""


def resolve_dsn(role: Role = "owner", *, keep_embedded_running: bool = False) -> str:
    """The DSN `role` uses (workers.core.dsn.dsn_for), else the embedded server.

    The embedded server stands in only when no database variable is set at all: with
    LEARNING_DATABASE_URL set and DATABASE_URL not, the owner would otherwise migrate a
    different database than the workers use. That is refused, naming both.
    """
    dsn = dsn_for(role)
    if dsn:
        return dsn
    named = sorted({v for vs in ROLE_VARIABLES.values() for v in vs if os.environ.get(v, "").strip()})
    if named:
        wanted = " or ".join(ROLE_VARIABLES[role])
        raise DatabaseUnavailable(
            f"{', '.join(named)} set but not {wanted}: the {role} role connects with "
            f"{wanted} (README, \"Database roles\")")
    return embedded.start(keep_running=keep_embedded_running)


def check(dsn: str, timeout: float = 5.0) -> None:
    try:
        with psycopg.connect(dsn, connect_timeout=max(1, int(timeout))) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        reason = type(exc).__name__
        raise DatabaseUnavailable(f"cannot reach PostgreSQL at {describe(dsn)} ({reason})") from exc
