"""Which database a process talks to, and how to name it without its secrets."""

from __future__ import annotations

import os

from psycopg.conninfo import conninfo_to_dict

# The worker's own least-privilege role comes first (seeds' runbook), then the app DSN.
DSN_VARIABLES = ("LEARNING_DATABASE_URL", "DATABASE_URL")


def dsn_from_env() -> str | None:
    for name in DSN_VARIABLES:
        value = os.environ.get(name, "").strip()
        if value:
            return value
    return None


def describe(dsn: str) -> str:
    """`host:port/dbname` for messages: never the password or the user."""
    try:
        info = conninfo_to_dict(dsn)
    except Exception:  # noqa: BLE001 - a malformed DSN must not leak through the error
        return "<unparseable DSN>"
    host = info.get("host") or info.get("hostaddr") or "localhost"
    port = info.get("port") or "5432"
    return f"{host}:{port}/{info.get('dbname') or info.get('user') or ''}".rstrip("/")
