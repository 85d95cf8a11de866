"""A learning job's failure, retry or requeue reaches its submission in the transaction
that changes the job (the plug-in's outcomes hook; the SQL is 003_outcomes)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from workers.core.plugins import JobEvent


def record(conn: Any, events: Sequence[JobEvent]) -> None:
    conn.execute("SELECT public.learning_record_outcomes(%s::bigint[], %s::text[])",
                 ([e.id for e in events], [e.was for e in events]))
