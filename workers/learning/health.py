"""The learning worker's health probe, as the platform's runbook knows it:
`public.learning_worker_health_probe()` run as the worker's own database role."""

from __future__ import annotations

from typing import Any

import psycopg


def probe(dsn: str) -> tuple[str | None, list[dict[str, Any]]]:
    """(the role the probe ran as, its checks); a failure is one failed check."""
    try:
        with psycopg.connect(dsn, connect_timeout=3, autocommit=True) as conn:
            conn.execute("SET statement_timeout = '3s'")
            (role,) = conn.execute("SELECT current_user").fetchone()
            rows = conn.execute(
                "SELECT check_name, ok, detail FROM learning_worker_health_probe()").fetchall()
    except psycopg.errors.UndefinedFunction:
        return None, [{"name": "db_probe", "ok": False, "detail": "probe function missing"}]
    except psycopg.Error as exc:
        return None, [{"name": "db_probe", "ok": False, "detail": type(exc).__name__}]
    return role, [{"name": n, "ok": bool(ok), "detail": d} for n, ok, d in rows]
