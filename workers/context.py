"""The two objects a handler sees: the job, and its context."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool

from workers import queue
from workers.errors import Cancelled

PROGRESS_INTERVAL = 1.0  # seconds: a chatty handler must not hammer the database


@dataclass(frozen=True)
class Job:
    id: int
    job_type: str
    payload: Any
    attempt: int
    max_attempts: int
    priority: int = 0
    batch_id: str | None = None

    @property
    def owner(self) -> str:
        """The subject row-level security isolates this job's writes by."""
        if isinstance(self.payload, dict):
            return str(self.payload.get("owner_sub") or self.payload.get("owner") or "")
        return ""


@dataclass
class JobContext:
    """Per-job services. Not shared between threads; one per running job.

    `db` opens the job's own transaction on a pooled connection on first use; the
    runtime commits it together with the job's fenced completion, or rolls it back.
    """

    job: Job
    lease_key: uuid.UUID
    options: dict[str, Any]
    _pool: ConnectionPool
    _default_max_attempts: Callable[[str], int] = field(default=lambda _t: 5)
    _conn: psycopg.Connection | None = None
    _cancel: threading.Event = field(default_factory=threading.Event)
    _lost: bool = False
    _progress: tuple[float, str | None] | None = None
    _progress_dirty: bool = False
    _progress_at: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # --- database -----------------------------------------------------------------
    @property
    def db(self) -> psycopg.Connection:
        if self._conn is None:
            conn = self._pool.getconn()
            try:
                conn.execute(
                    "SELECT set_config('app.current_sub', %s, true)", (self.job.owner,)
                )
            except BaseException:
                self._pool.putconn(conn)
                raise
            self._conn = conn
        return self._conn

    @property
    def touched_db(self) -> bool:
        return self._conn is not None

    def enqueue(
        self,
        job_type: str,
        payload: Any,
        *,
        priority: int = 0,
        delay: float = 0.0,
        key: str | None = None,
        max_attempts: int | None = None,
        batch_id: str | None = None,
    ) -> int:
        """Enqueue a follow-up job in this job's transaction: both commit or neither."""
        return queue.enqueue(
            self.db,
            queue.NewJob(
                job_type,
                payload,
                priority=priority,
                delay=delay,
                key=key,
                max_attempts=max_attempts or self._default_max_attempts(job_type),
                batch_id=batch_id if batch_id is not None else self.job.batch_id,
            ),
        )

    # --- progress & cancellation -----------------------------------------------------
    def progress(self, fraction: float, note: str | None = None) -> None:
        """Record progress; the runtime stores it at most once per second per job."""
        with self._lock:
            self._progress = (min(1.0, max(0.0, float(fraction))), note)
            self._progress_dirty = True

    def take_progress(self, now: float) -> tuple[float, str | None] | None:
        with self._lock:
            if not self._progress_dirty or now - self._progress_at < PROGRESS_INTERVAL:
                return None
            self._progress_dirty = False
            self._progress_at = now
            return self._progress

    @property
    def cancelled(self) -> bool:
        """True when an operator cancelled the job, its lease was lost, or shutdown's
        grace period ran out: stop at the next convenient point."""
        return self._cancel.is_set()

    def check_cancelled(self) -> None:
        if self._cancel.is_set():
            raise Cancelled(f"job {self.job.id} cancelled")

    def sleep(self, seconds: float) -> bool:
        """Sleep, waking early on cancellation; returns True when cancelled."""
        return self._cancel.wait(seconds)

    def request_cancel(self, *, lost: bool = False) -> None:
        self._lost = self._lost or lost
        self._cancel.set()

    @property
    def lease_lost(self) -> bool:
        return self._lost

    def release_connection(self) -> psycopg.Connection | None:
        conn, self._conn = self._conn, None
        return conn


