"""Which database the CLI and supervisor use, checked before anything else runs."""

from __future__ import annotations

import psycopg

from supervisor_app import embedded
from workers.dsn import describe, dsn_from_env


class DatabaseUnavailable(Exception):
    """The database can't be reached; the message names host and port, no secrets."""


def resolve_dsn(*, keep_embedded_running: bool = False) -> str:
    """LEARNING_DATABASE_URL, else DATABASE_URL, else the embedded server."""
    return dsn_from_env() or embedded.start(keep_running=keep_embedded_running)


def check(dsn: str, timeout: float = 5.0) -> None:
    try:
        with psycopg.connect(dsn, connect_timeout=max(1, int(timeout))) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        reason = type(exc).__name__
        raise DatabaseUnavailable(f"cannot reach PostgreSQL at {describe(dsn)} ({reason})") from exc
