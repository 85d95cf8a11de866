"""The supervisor's database duties, off the arbiter loop.

One thread with its own connection does everything the supervisor asks of PostgreSQL:
rescuing a dead child's leases (asked by the loop), a health probe, publishing this
supervisor's state, queue statistics, and — on the one elected host — the cluster-wide
duties: rescuing expired leases, pruning retention in bounded batches, cron schedules and
removing the rows of supervisors that went silent. The arbiter loop never waits on the
database, so a slow statement or an outage can't stall supervision.

Leadership is a session advisory lock held on this thread's connection (as River and
Oban elect a leader): whoever holds it runs the cluster duties; when its host dies, or
its connection drops, the lock goes with the session and the next host that tries takes
over. The lock needs a session-level connection: point the supervisor at PostgreSQL
directly, not through PgBouncer in transaction mode.

Every statement is bounded: `statement_timeout` and `lock_timeout` on the connection,
`connect_timeout` on connecting.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue as stdqueue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import psycopg
from croniter import croniter

from supervisor_app import registry_table
from workers.core import model_store, queue
from workers.core.logs import frames

if TYPE_CHECKING:
    from supervisor_app.supervisor import Supervisor

log = logging.getLogger("jobvisor.duties")

TICK = 0.25
PROBE_EVERY = 2.0  # /healthz reports the database down within two of these
PUBLISH_EVERY = 2.0
QUEUE_STATS_EVERY = 2.0
LEADER_EVERY = 5.0  # a follower tries to take over this often
STALE_EVERY = 30.0
STALE_AFTER_S = 60.0  # supervisor rows silent this long are removed
PRUNE_BATCH = 5000  # rows per prune statement; one statement per status per round
FAIR_RETRY_S = 5.0  # the fair-share configuration could not take its lock: try again then
CRON_CATCHUP_S = 3600.0  # a slot missed while no supervisor ran is caught up this long
CONNECT_TIMEOUT = 3
STATEMENT_TIMEOUT_MS = 10_000
LOCK_TIMEOUT_MS = 5_000
# pg_try_advisory_lock(int, int): "jobv", "lead". Any constants, the same on every host.
LEADER_LOCK = (0x6A6F6276, 0x6C656164)


@dataclass
class RescueResult:
    """The answer to a dead child's rescue: how many leases it held (None: not known,
    the database could not be asked)."""

    slot: Any
    pid: int
    exit_code: int
    held: int | None


class Duties:
    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup
        self.conn: psycopg.Connection | None = None
        self.requests: stdqueue.SimpleQueue[tuple[Any, ...]] = stdqueue.SimpleQueue()
        self.results: stdqueue.SimpleQueue[RescueResult] = stdqueue.SimpleQueue()
        self.wake = threading.Event()
        self.stopping = False
        self.thread: threading.Thread | None = None
        self.leader = False
        self.db_ok_at: float | None = None  # monotonic time of the last answered probe
        self.db_error: str | None = None
        self.due: dict[str, float] = {}
        self.cron_last: dict[tuple[str, str], datetime] = {}
        # (type, schedule) -> max attempts, as the live supervisors publish them.
        self.cluster_schedules: dict[tuple[str, str], int] = {}
        self.state: dict[str, Any] | None = None  # what to publish next (from the loop)
        self.unserved: set[str] = set()
        self.reconnect_at = 0.0
        self.reconnect_delay = 0.25
        # The configuration whose fair_by settings the database has (jobvisor.fair_types),
        # the types it served, and whether jobs queued before a type was fair need a key.
        self.fair_cfg: Any = None
        self.fair_served: set[str] = set()
        self.fair_backlog = False

    # --- lifecycle (called from the loop) -----------------------------------------------
    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="db-duties", daemon=True)
        self.thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop, withdrawing this supervisor's row when the database answers."""
        self.stopping = True
        self.wake.set()
        if self.thread is not None:
            self.thread.join(timeout)

    def rescue_child(self, slot: Any, worker_id: str, pid: int, exit_code: int,
                     code: str) -> None:
        self.requests.put(("rescue", slot, worker_id, pid, exit_code, code))
        self.wake.set()

    @property
    def db_ok(self) -> bool:
        return self.db_ok_at is not None and time.monotonic() - self.db_ok_at <= 2 * PROBE_EVERY

    # --- the thread -------------------------------------------------------------------------
    def _run(self) -> None:
        while not self.stopping:
            try:
                self._round(time.monotonic())
            except Exception as exc:  # noqa: BLE001 - a duty's bug must not end the duties
                # Frames only: an exception's text may quote row values.
                log.error("duty_failed", extra={"exc_type": type(exc).__name__,
                                                "traceback": frames(exc)})
                self._lost(exc)
            self.wake.wait(TICK)
            self.wake.clear()
        # Rescues asked for while stopping still get their answer.
        self._answer_requests(self._connect(time.monotonic()))
        self._withdraw()

    def _round(self, now: float) -> None:
        conn = self._connect(now)
        self._answer_requests(conn)
        if conn is None:
            return
        try:
            if self._due("probe", PROBE_EVERY, now):
                conn.execute("SELECT 1")
                self.db_ok_at = time.monotonic()
                self.db_error = None
            if self.state is not None and self._due("publish", PUBLISH_EVERY, now):
                s = self.sup
                registry_table.publish(conn, s.sup_id, s.host, os.getpid(), self.state)
            if self._due("queue_stats", QUEUE_STATS_EVERY, now):
                self._queue_stats(conn)
            self._fair_share(conn, now)
            if self._due("leader", LEADER_EVERY, now) or self.leader:
                self._leader_duties(conn, now)
        except psycopg.Error as exc:
            self._lost(exc)

    def _connect(self, now: float) -> psycopg.Connection | None:
        c = self.conn
        if c is not None and not c.closed and not c.broken:
            return c
        if c is not None:
            self._lost(None)
        if now < self.reconnect_at:
            return None
        try:
            c = psycopg.connect(self.sup.dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT)
            c.execute(f"SET statement_timeout = {STATEMENT_TIMEOUT_MS}")
            c.execute(f"SET lock_timeout = {LOCK_TIMEOUT_MS}")
        except psycopg.Error as exc:
            self.db_error = type(exc).__name__
            self.reconnect_at = time.monotonic() + self.reconnect_delay
            self.reconnect_delay = min(self.reconnect_delay * 2, PROBE_EVERY)
            return None
        self.conn = c
        self.reconnect_delay = 0.25
        self.due.pop("probe", None)
        self.due.pop("leader", None)
        return c

    def _lost(self, exc: BaseException | None) -> None:
        if self.conn is not None:
            if exc is not None:
                log.error("database_error", extra={"exc_type": type(exc).__name__})
            with contextlib.suppress(psycopg.Error):
                self.conn.close()
        self.conn = None
        if exc is not None:
            self.db_error = type(exc).__name__
        if self.leader:
            log.warning("leadership_lost")
        self.leader = False  # the advisory lock went with the session
        self.reconnect_at = time.monotonic()

    def _due(self, name: str, every: float, now: float) -> bool:
        if now >= self.due.get(name, 0.0):
            self.due[name] = now + every
            return True
        return False

    # --- asked by the loop -----------------------------------------------------------------
    def _answer_requests(self, conn: psycopg.Connection | None) -> None:
        while True:
            try:
                req = self.requests.get_nowait()
            except stdqueue.Empty:
                return
            _, slot, worker_id, pid, exit_code, code = req
            held: int | None = None
            if conn is not None:
                try:
                    rescued = queue.rescue_worker(conn, worker_id, code=code)
                    held = len(rescued)
                    if rescued:
                        log.warning("leases_rescued", extra={
                            "child_pid": pid, "exit_code": exit_code, "code": code,
                            "jobs": [r[0] for r in rescued],
                            "charged": [r[0] for r in rescued if r[3]],
                            "failed": [r[0] for r in rescued if r[2] == "failed"]})
                except psycopg.Error as exc:
                    # Its leases expire and the leader rescues them then.
                    log.error("child_rescue_failed", extra={"child_pid": pid,
                                                            "exc_type": type(exc).__name__})
                    self._lost(exc)
                    conn = None
            self.results.put(RescueResult(slot, pid, exit_code, held))
            self.sup.wake()

    # --- every host ------------------------------------------------------------------------
    def _queue_stats(self, conn: psycopg.Connection) -> None:
        stats = queue.status_counts(conn)
        self.sup.queue_stats = stats
        self.sup.model_endpoints = model_store.endpoints(conn)
        states = registry_table.live_supervisors(conn)
        served = registry_table.served_types(states) | self.sup.served_types()
        schedules: dict[tuple[str, str], int] = {}
        for state in states:
            for t, entry in (state.get("schedules") or {}).items():
                schedules[(t, entry["schedule"])] = int(entry.get("max_attempts") or 1)
        self.cluster_schedules = schedules
        unserved = {t for t, c in stats.items() if c.get("queued") and t not in served}
        for t in sorted(unserved - self.unserved):
            log.warning("queue_unserved", extra={"job_type": t, "queued": stats[t]["queued"]})
        self.unserved = unserved

    def _fair_share(self, conn: psycopg.Connection, now: float) -> None:
        """At start and after each reload: write the served types' fair_by settings
        (sql/009); then key, a batch per round, the jobs queued before a type was fair."""
        cfg = self.sup.cfg
        if cfg is not self.fair_cfg and now >= self.due.get("fair_retry", 0.0):
            served = self.sup.served_config()
            fair = {n: t.fair_share for n, t in served.items() if t.fair_by}
            try:
                changed = queue.configure_fair_share(conn, fair, set(served) | self.fair_served)
            except psycopg.errors.LockNotAvailable:
                # Writers held the jobs for 2 s (a bulk load?): the list of fair types is
                # unchanged until the next try; their jobs are keyed then.
                log.warning("fair_share_deferred", extra={"retry_in_s": FAIR_RETRY_S})
                self.due["fair_retry"] = now + FAIR_RETRY_S
                return
            except psycopg.errors.InsufficientPrivilege:
                # Not the role that migrated (the owner of sql/009's functions): said once,
                # tried again on the next reload; the database keeps what it had.
                log.error("fair_share_refused", extra={"types": sorted(fair)})
                self.fair_cfg = cfg
                return
            self.fair_cfg, self.fair_served = cfg, set(served)
            self.fair_backlog = bool(fair)
            if changed:
                log.info("fair_share_configured", extra={"types": sorted(fair)})
        if self.fair_backlog:
            keyed, self.fair_backlog = queue.key_fair_backlog(conn, limit=PRUNE_BATCH)
            if keyed:
                log.info("fair_share_backlog_keyed", extra={"count": keyed,
                                                            "more": self.fair_backlog})

    # --- the elected host ------------------------------------------------------------------
    def _leader_duties(self, conn: psycopg.Connection, now: float) -> None:
        if not self.leader:
            (got,) = conn.execute("SELECT pg_try_advisory_lock(%s, %s)", LEADER_LOCK).fetchone()
            if not got:
                return
            self.leader = True
            log.info("leadership_taken", extra={"supervisor": self.sup.sup_id})
        q = self.sup.cfg.queue
        for name, every, duty in (
            ("rescue", q.rescue_every, self._rescue_expired),
            ("prune", q.prune_every, self._prune),
            ("cron", 1.0, self._cron),
            ("stale", STALE_EVERY, self._remove_stale),
        ):
            if name == "prune" and self.due.get("prune_more"):
                duty(conn)  # the last round left rows: go on, one batch at a time
            elif self._due(name, every, now):
                duty(conn)

    def _rescue_expired(self, conn: psycopg.Connection) -> None:
        rescued = queue.rescue(conn)
        if rescued:
            log.warning("leases_expired", extra={"jobs": [r[0] for r in rescued]})

    def _prune(self, conn: psycopg.Connection) -> None:
        """One batch per status per round: a large backlog of old rows is worked off over
        rounds, with the probe, publishing and stats in between."""
        r = self.sup.cfg.queue.retention
        removed = queue.prune(conn, {"completed": r.completed, "failed": r.failed,
                                     "cancelled": r.cancelled}, limit=PRUNE_BATCH, rounds=1)
        # Batch rows outlive their jobs, then go too.
        removed_batches = queue.prune_batches(conn, max(r.completed, r.failed, r.cancelled),
                                              limit=PRUNE_BATCH, rounds=1)
        more = removed >= PRUNE_BATCH or removed_batches >= PRUNE_BATCH
        self.due["prune_more"] = 1.0 if more else 0.0
        if removed:
            log.info("jobs_pruned", extra={"count": removed, "more": more})

    def _cron(self, conn: psycopg.Connection,
              clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        now = clock()
        # Our own schedules and those every live supervisor publishes: in a mixed fleet
        # the leader may not serve a scheduled type itself.
        schedules = dict(self.cluster_schedules)
        for job_type, t in self.sup.served_config().items():
            if t.schedule:
                schedules[(job_type, t.schedule)] = t.retry.max_attempts
        for (job_type, schedule), max_attempts in sorted(schedules.items()):
            slot = croniter(schedule, now).get_prev(datetime)
            if self.cron_last.get((job_type, schedule)) == slot:
                continue
            if (now - slot).total_seconds() > CRON_CATCHUP_S:
                self.cron_last[(job_type, schedule)] = slot
                continue
            stamp = slot.strftime("%Y-%m-%dT%H:%MZ")
            # A sticky key: the slot stays taken after its job finished, so a new leader
            # (or a late one) never runs it again.
            job_id = queue.enqueue(conn, queue.NewJob(
                job_type, {"scheduled_for": stamp}, key=f"cron:{job_type}:{stamp}",
                sticky_key=True, max_attempts=max_attempts))
            # Only now, with the enqueue committed, is the slot taken: a database error
            # above leaves it for the next round.
            self.cron_last[(job_type, schedule)] = slot
            log.info("cron_enqueued", extra={"job_type": job_type, "slot": stamp,
                                             "job_id": job_id})

    def _remove_stale(self, conn: psycopg.Connection) -> None:
        removed = registry_table.remove_stale(conn, STALE_AFTER_S)
        if removed:
            log.info("stale_supervisors_removed", extra={"ids": removed})

    def _withdraw(self) -> None:
        conn = self._connect(time.monotonic())
        if conn is None:
            return
        try:
            registry_table.withdraw(conn, self.sup.sup_id)
        except psycopg.Error:
            pass
        finally:
            conn.close()
            self.conn = None
