"""Supervisors publish their state into `jobvisor.supervisors` for `jobvisor status`."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

LIVE_WITHIN_S = 15.0


def publish(conn: psycopg.Connection, sup_id: str, host: str, pid: int,
            state: dict[str, Any]) -> None:
    conn.execute(
        """INSERT INTO jobvisor.supervisors (id, host, pid, state) VALUES (%s, %s, %s, %s)
           ON CONFLICT (id) DO UPDATE SET heartbeat_at = now(), state = EXCLUDED.state""",
        (sup_id, host, pid, Jsonb(state)),
    )


def withdraw(conn: psycopg.Connection, sup_id: str) -> None:
    conn.execute("DELETE FROM jobvisor.supervisors WHERE id = %s", (sup_id,))


def served_types(states: Iterable[dict[str, Any]]) -> set[str]:
    """The job types that these published states say their supervisors serve."""
    return {t for state in states for t in state.get("types") or []}


def live_supervisors(conn: psycopg.Connection) -> list[dict[str, Any]]:
    rows = conn.execute(
        "SELECT state FROM jobvisor.supervisors "
        "WHERE heartbeat_at > now() - make_interval(secs => %s) ORDER BY id",
        (LIVE_WITHIN_S,),
    ).fetchall()
    return [r[0] for r in rows]


def remove_stale(conn: psycopg.Connection, older_than_s: float) -> list[str]:
    """Delete the rows of supervisors silent for `older_than_s` (crashed hosts)."""
    rows = conn.execute(
        "DELETE FROM jobvisor.supervisors "
        "WHERE heartbeat_at < now() - make_interval(secs => %s) RETURNING id",
        (older_than_s,),
    ).fetchall()
    return [r[0] for r in rows]
