"""The two objects a handler sees: the job, and its context."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import psycopg
from psycopg_pool import ConnectionPool

from workers.core import queue
from workers.core.errors import Cancelled

PROGRESS_INTERVAL = 1.0  # seconds: a chatty handler must not hammer the database


class Job(NamedTuple):
    """The job a handler runs: read-only. A named tuple, as the runtime builds one per
    job it leases and a frozen dataclass cost three times as much to build."""

    id: int
    job_type: str
    payload: Any
    attempt: int
    max_attempts: int
    priority: int = 0
    batch_id: str | None = None


@dataclass
class JobContext:
    """Per-job services. Not shared between threads; one per running job.

    Database access comes in two kinds, so that no transaction stays open while the
    handler waits on slow work (a model, OCR, a render, pg_dump):

    * `read()`: a short READ ONLY transaction of its own, committed and handed back to
      the pool when the `with` block ends. Read what the work needs, then leave it.
    * `db` (and `enqueue`): the job's *completing* transaction, opened on first use; the
      runtime commits it together with the job's fenced completion, or rolls it back.
      Open it only after the slow work, to write the outcome.

    A handler that needs neither never takes a connection at all.
    """

    job: Job
    lease_key: str  # the lease's fence (a uuid as text)
    options: dict[str, Any]
    _pool: ConnectionPool
    _default_max_attempts: Callable[[str], int] = field(default=lambda _t: 5)
    # The plug-in's settings hook for this type (workers.core.plugins.job_settings).
    _settings: Callable[[Job], Mapping[str, str]] | None = None
    _conn: psycopg.Connection | None = None
    _db_opened_at: float | None = None
    # Cancellation: a flag, and an Event only once a handler sleeps on it (an Event per
    # job was a fifth of a no-op job's cost in the worker).
    _cancelled: bool = False
    _cancel: threading.Event | None = None
    _lost: bool = False
    _progress: tuple[float, str | None] | None = None
    _progress_dirty: bool = False
    _progress_at: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # --- database -----------------------------------------------------------------
    @property
    def db(self) -> psycopg.Connection:
        """The job's completing transaction: what is written here commits together with
        the job's fenced completion (rolled back on error or a lost lease).

        Open it only after the slow work: from its first use until the job finishes the
        connection is held in a transaction (`now()` is that transaction's start, and the
        backend's snapshot holds back vacuum). Read before the work with `read()`.
        """
        if self._conn is None:
            conn = self._pool.getconn()
            try:
                self._apply_job_settings(conn)
            except BaseException:
                self._pool.putconn(conn)
                raise
            self._conn = conn
            if self._db_opened_at is None:
                self._db_opened_at = time.monotonic()
        return self._conn

    @contextlib.contextmanager
    def read(self) -> Iterator[psycopg.Connection]:
        """A short READ ONLY transaction with the job's settings (its plug-in's hook).

        For reads before slow work: the transaction commits (or rolls back, when the block
        raises) and the connection goes back to the pool when the block ends, so none is
        held while the handler waits. A write inside raises
        `psycopg.errors.ReadOnlySqlTransaction`. Writes belong in `db`, after the work.

        Once `db` is open, read through `db`: this raises RuntimeError then (a second
        connection per job could exhaust the pool, and `db`'s reads see its own writes).
        """
        if self._conn is not None:
            raise RuntimeError("JobContext.read() after db was opened: read through ctx.db")
        conn = self._pool.getconn()
        try:
            conn.execute("SET TRANSACTION READ ONLY")
            self._apply_job_settings(conn)
            yield conn
            conn.commit()
        except BaseException:
            # A broken connection can't roll back; the pool discards it either way.
            with contextlib.suppress(psycopg.Error):
                conn.rollback()
            raise
        finally:
            self._pool.putconn(conn)

    def _apply_job_settings(self, conn: psycopg.Connection) -> None:
        """The settings every transaction of this job starts with, as its plug-in says
        (e.g. the subject row-level security isolates the job's reads and writes by)."""
        if self._settings is None:
            return
        settings = self._settings(self.job)
        if settings:
            names, values = zip(*settings.items(), strict=True)
            conn.execute("SELECT set_config(n, v, true) FROM unnest(%s::text[], %s::text[])"
                         " AS s(n, v)", (list(names), list(values)))

    @property
    def db_opened_at(self) -> float | None:
        """`time.monotonic()` when `db` was first opened (None: never). The runtime can
        tell from it how long a handler held its completing transaction."""
        return self._db_opened_at

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
        """Enqueue a follow-up job in this job's completing transaction (`db`): both
        commit or neither. Like `db`, call it after the slow work."""
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
        return self._cancelled

    def check_cancelled(self) -> None:
        if self._cancelled:
            raise Cancelled(f"job {self.job.id} cancelled")

    def sleep(self, seconds: float) -> bool:
        """Sleep, waking early on cancellation; returns True when cancelled."""
        with self._lock:
            if self._cancelled:
                return True
            if self._cancel is None:
                self._cancel = threading.Event()
            event = self._cancel
        return event.wait(seconds)

    def request_cancel(self, *, lost: bool = False) -> None:
        with self._lock:
            self._lost = self._lost or lost
            self._cancelled = True
            event = self._cancel
        if event is not None:
            event.set()

    @property
    def lease_lost(self) -> bool:
        return self._lost

    def release_connection(self) -> psycopg.Connection | None:
        conn, self._conn = self._conn, None
        return conn


