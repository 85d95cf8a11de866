"""Where the model gate's limits live: a row per (endpoint, model) in
`jobvisor.model_limits` and session advisory locks as tokens (`DbStore`), or the same
inside one process when no database is configured (`LocalStore`). The control law that
moves the limits is in `workers.core.model_gate`."""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

import psycopg

log = logging.getLogger("jobvisor.model_gate")

PROBE_BACKOFF_MIN_S = 2.0
PROBE_BACKOFF_MAX_S = 60.0
PROBE_BACKOFF_GROWTH = 4.0  # 2, 8, 32, 60 s after probes taken back in a row
RECONNECT_S = 5.0


@dataclass
class Row:
    limit: int
    version: int


ENSURE = """
INSERT INTO jobvisor.model_limits AS m (endpoint, model, lock_id, lim, fixed, max_lim)
VALUES (%(e)s, %(m)s, %(k)s, %(lim)s, %(fixed)s, %(max)s)
ON CONFLICT (endpoint, model) DO UPDATE
SET fixed = EXCLUDED.fixed, max_lim = EXCLUDED.max_lim,
    lim = CASE WHEN EXCLUDED.fixed THEN EXCLUDED.lim ELSE least(m.lim, EXCLUDED.max_lim) END,
    version = m.version + CASE
        WHEN (m.fixed, m.max_lim, m.lim) IS DISTINCT FROM
             (EXCLUDED.fixed, EXCLUDED.max_lim,
              CASE WHEN EXCLUDED.fixed THEN EXCLUDED.lim ELSE least(m.lim, EXCLUDED.max_lim) END)
        THEN 1 ELSE 0 END
RETURNING lim, version
"""
READ = "SELECT lim, version FROM jobvisor.model_limits WHERE endpoint = %(e)s AND model = %(m)s"
# A probe taken back (the last change was a rise) makes the next probe wait 4x longer; a
# fall from a limit that had held (noise, a busier server) probes again soon.
DOWN = """
UPDATE jobvisor.model_limits
SET lim = greatest(1, least(lim - 1, %(target)s)), version = version + 1,
    next_probe_at = now() + make_interval(secs => CASE WHEN last_change = 'up'
                                                       THEN probe_backoff_s ELSE %(bmin)s END),
    probe_backoff_s = CASE WHEN last_change = 'up' THEN least(%(bmax)s, probe_backoff_s * %(growth)s)
                           ELSE probe_backoff_s END,
    last_change = 'down', changed_at = now()
WHERE endpoint = %(e)s AND model = %(m)s AND version = %(v)s AND NOT fixed AND lim > 1
RETURNING lim, version
"""
UP = """
UPDATE jobvisor.model_limits
SET lim = lim + 1, version = version + 1,
    probe_backoff_s = CASE WHEN last_change = 'up' THEN %(bmin)s ELSE probe_backoff_s END,
    last_change = 'up', changed_at = now()
WHERE endpoint = %(e)s AND model = %(m)s AND version = %(v)s AND NOT fixed
  AND lim < max_lim AND now() >= next_probe_at
RETURNING lim, version
"""
PROBE_SOON = """
UPDATE jobvisor.model_limits SET probe_backoff_s = %(bmin)s, next_probe_at = now()
WHERE endpoint = %(e)s AND model = %(m)s AND (probe_backoff_s > %(bmin)s OR next_probe_at > now())
"""
STATS = """
UPDATE jobvisor.model_limits
SET requests = requests + %(n)s, busy = busy + %(busy)s, timeouts = timeouts + %(timeouts)s,
    latency_s = coalesce(%(latency)s, latency_s), baseline_s = coalesce(%(base)s, baseline_s),
    wait_share = coalesce(%(q)s, wait_share), observed_at = now()
WHERE endpoint = %(e)s AND model = %(m)s
"""
# The limit and a free slot in one statement. CASE, not AND: a slot this process already
# holds must not be taken again (a session may hold one advisory lock several times), and
# AND's operands may run in any order.
TAKE = """
SELECT m.lim, m.version, t.s
FROM jobvisor.model_limits m
LEFT JOIN LATERAL (
    SELECT s FROM generate_series(0, m.lim - 1) AS s
    WHERE CASE WHEN s = ANY(%(held)s::int[]) THEN false
               ELSE pg_try_advisory_lock(%(k)s::int, s) END
    LIMIT 1
) t ON true
WHERE m.endpoint = %(e)s AND m.model = %(m)s
"""
GIVE = "SELECT pg_advisory_unlock(%(k)s::int, %(slot)s::int)"


class LocalStore:
    """The shared row and tokens, inside this process only (no database configured)."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, str], dict[str, Any]] = {}
        self.clock = time.monotonic  # when the next probe may come is read on this clock

    def ensure(self, e: str, m: str, k: int, policy: Any) -> Row:
        row = self.rows.setdefault((e, m), {"lim": policy.initial, "version": 0,
                                             "next_probe": 0.0, "backoff": PROBE_BACKOFF_MIN_S,
                                             "last": None})
        row["fixed"] = policy.fixed is not None
        row["max"] = policy.max_limit
        row["lim"] = policy.fixed if policy.fixed is not None else min(row["lim"], policy.max_limit)
        return Row(row["lim"], row["version"])

    def read(self, e: str, m: str) -> Row:
        row = self.rows[(e, m)]
        return Row(row["lim"], row["version"])

    def down(self, e: str, m: str, v: int, target: int) -> Row | None:
        row = self.rows[(e, m)]
        if row["version"] != v or row["fixed"] or row["lim"] <= 1:
            return None
        row["lim"] = max(1, min(row["lim"] - 1, target))
        row["version"] += 1
        probe_back = row["last"] == "up"
        row["next_probe"] = self.clock() + (row["backoff"] if probe_back
                                                else PROBE_BACKOFF_MIN_S)
        if probe_back:
            row["backoff"] = min(PROBE_BACKOFF_MAX_S, row["backoff"] * PROBE_BACKOFF_GROWTH)
        row["last"] = "down"
        return Row(row["lim"], row["version"])

    def probe_soon(self, e: str, m: str) -> None:
        row = self.rows[(e, m)]
        row["backoff"], row["next_probe"] = PROBE_BACKOFF_MIN_S, 0.0

    def up(self, e: str, m: str, v: int) -> Row | None:
        row = self.rows[(e, m)]
        if (row["version"] != v or row["fixed"] or row["lim"] >= row["max"]
                or self.clock() < row["next_probe"]):
            return None
        row["lim"] += 1
        row["version"] += 1
        if row["last"] == "up":
            row["backoff"] = PROBE_BACKOFF_MIN_S
        row["last"] = "up"
        return Row(row["lim"], row["version"])


class DbStore:
    """The shared row and tokens in PostgreSQL, on one connection of this process."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.conn: psycopg.Connection | None = None
        self.epoch = 0  # bumped when the connection (and with it every token) is lost
        self.retry_at = 0.0

    def connection(self) -> psycopg.Connection | None:
        if self.conn is not None and not self.conn.closed:
            return self.conn
        if time.monotonic() < self.retry_at:
            return None
        try:
            self.conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=5,
                                        options="-c statement_timeout=5000")
        except psycopg.Error as exc:
            self.retry_at = time.monotonic() + RECONNECT_S
            log.warning("model_gate_db_unavailable", extra={"error_class": type(exc).__name__})
            return None
        return self.conn

    def lost(self, exc: BaseException) -> None:
        log.warning("model_gate_db_lost", extra={"error_class": type(exc).__name__})
        if self.conn is not None:
            with contextlib.suppress(Exception):
                self.conn.close()
        self.conn = None
        self.epoch += 1
        self.retry_at = time.monotonic() + RECONNECT_S

    def run(self, sql: str, params: dict[str, Any]) -> tuple[Any, ...] | None:
        """One statement; its first row. Raises psycopg.Error (the caller falls back)."""
        conn = self.connection()
        if conn is None:
            raise psycopg.OperationalError("no connection")
        try:
            cur = conn.execute(sql, params)
            return cur.fetchone() if cur.description is not None else None
        except psycopg.Error as exc:
            if conn.closed or conn.broken:
                self.lost(exc)
            raise


_ENDPOINTS = """
SELECT m.endpoint, m.model, m.lim, m.max_lim, m.fixed, m.latency_s, m.baseline_s,
       m.wait_share, m.requests, m.busy, m.timeouts, m.changed_at, m.observed_at,
       (SELECT count(*) FROM pg_locks l
        WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
          AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
          AND l.classid = m.lock_id::oid) AS in_flight
FROM jobvisor.model_limits m
ORDER BY m.endpoint, m.model
"""
_ENDPOINT_KEYS = ("endpoint", "model", "limit", "max_limit", "fixed", "latency_s",
                  "baseline_s", "wait_share", "requests", "busy", "timeouts", "changed_at",
                  "observed_at", "in_flight")


def endpoints(conn: psycopg.Connection) -> list[dict[str, Any]]:
    """Every model endpoint's limit, requests in flight (tokens held now, by any process),
    and what was last observed: for the dashboard, `/metrics` and `jobvisor status`."""
    rows = conn.execute(_ENDPOINTS).fetchall()
    return [dict(zip(_ENDPOINT_KEYS, r, strict=True)) for r in rows]
