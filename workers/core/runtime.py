"""The sub-worker: one process serving one job type with N threads.

One control loop owns the runtime's bookkeeping (the jobs it holds, batched
acknowledgements, writes still owed to the database, the tally of outcomes) and its
control connection. In turn it: takes what the threads handed over, writes what is owed,
acknowledges finished jobs in batches, heartbeats the leases it holds, stores progress,
enforces timeouts, leases more work, reports to the supervisor, and sleeps until a
thread, a NOTIFY, a signal or the poll timer wakes it.

Threads run handlers and never touch the bookkeeping: each outcome goes to the loop
through one queue. A handler that touches the database gets its own pooled connection
and transaction, committed by its thread together with the job's fenced completion.
When the database is away, what a thread could not write is handed to the loop, which
writes it on a fresh connection as soon as the server answers; the loop never blocks on
reconnecting, so it keeps reporting to its supervisor through an outage.
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import logging
import os
import queue as stdqueue
import random
import secrets
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout
from psycopg_pool.base import AttemptWithBackoff

from workers.core import model_gate, plugins, queue
from workers.core.context import Job, JobContext
from workers.core.errors import Cancelled, JobError, PermanentError, TransientError
from workers.core.logs import frames
from workers.core.registry import Handler
from workers.core.status import StatusPipe

log = logging.getLogger("jobvisor.worker")

EXIT_OK = 0
EXIT_LOOP_FAILED = 1  # the control loop kept failing: the supervisor starts a fresh child
EXIT_JOB_TIMEOUT = 3  # a job overran its hard timeout: the supervisor starts a fresh child
STATUS_INTERVAL = 1.0
RECONNECT_MAX = 2.0  # seconds between reconnect tries: back within seconds of the server
CONNECT_TIMEOUT = 3  # seconds one reconnect try may block the loop
GETCONN_TIMEOUT = 5.0  # a thread waiting for a pooled connection hands its write over
ACK_BATCH = 100  # acknowledgements sent together at most this many…
ACK_WAIT = 0.002  # …or once the oldest has waited this long (seconds)
# Progress and timeouts look at every held job: at most this often (seconds), not on each
# of the loop's rounds, which under load come once per finished job.
SWEEP_INTERVAL = 0.1
LONG_TRANSACTION = 5.0  # a handler held its completing transaction open this long: warn
LOOP_ERRORS_MAX = 20  # consecutive unexpected loop failures before the child gives up

# Reasons after which a thread's own outcome no longer counts: the loop settled the job
# (timeout, grace expired) or the lease is gone.
LOST = ("lease_lost", "timeout", "shutdown", "memory", "orphaned")
# Without a supervisor nobody rescues what a child holds: it finishes what it can in this
# long (at most its grace), puts the rest back and exits.
ORPHAN_GRACE = 5.0


class _QuickAttempt(AttemptWithBackoff):
    """psycopg_pool retries a failed connection with a delay doubling without bound
    (1, 2, 4 … 64 s): after a 75 s outage its next try came ~50 s after the server was
    back. Capped, a pooled connection returns within RECONNECT_MAX of the server."""

    def update_delay(self, now: float) -> None:
        super().update_delay(now)
        self.delay = min(self.delay, RECONNECT_MAX)


class _Pool(ConnectionPool):
    # Relies on psycopg_pool's internal _add_connection(attempt, growing): pinned <3.4.
    def _add_connection(self, attempt: AttemptWithBackoff | None,
                        growing: bool = False) -> None:
        if attempt is None:
            attempt = _QuickAttempt(timeout=self.reconnect_timeout)
        super()._add_connection(attempt, growing=growing)


def new_worker_id() -> str:
    """A lease owner id unique to this process, `host:pid:nonce`: host and pid alone are
    not (two containers with host networking share a hostname and may share a pid). The
    supervisor hands its child the nonce (JOBVISOR_WORKER_NONCE) so it knows the name."""
    nonce = os.environ.get("JOBVISOR_WORKER_NONCE") or secrets.token_hex(6)
    return f"{socket.gethostname()}:{os.getpid()}:{nonce}"


@dataclass
class WorkerSettings:
    job_type: str
    concurrency: int = 1
    prefetch: int = 0
    lease: float = 60.0
    heartbeat: float = 15.0
    poll: float = 2.0
    listen: bool = True
    timeout: float = 300.0
    grace: float = 30.0
    max_attempts: int = 5
    backoff: float = 5.0
    max_backoff: float = 600.0
    global_concurrency: int | None = None
    # The type has fair_by: lease by fair share between keys (docs/fair_share.md).
    fair: bool = False
    max_running_per_key: int | None = None
    # False: completed jobs are deleted as they complete (no history; see queue.complete_many).
    keep_completed: bool = True
    options: dict[str, Any] = field(default_factory=dict)
    # Follow-up jobs get their own type's max attempts (pdf → vision → feedback).
    attempts_by_type: dict[str, int] = field(default_factory=dict)
    worker_id: str = field(default_factory=new_worker_id)


def backoff_delay(attempt: int, base: float, cap: float) -> float:
    """Exponential backoff with "equal jitter": in [d/2, d] for d = min(cap, base·2^(attempt−1)).

    Half the delay is fixed, so successive retries never come sooner than the last.
    """
    d = min(cap, base * (2 ** max(0, attempt - 1)))
    return d / 2 + random.uniform(0, d / 2)


# Job duration buckets (seconds), shared with the supervisor's histogram.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                    60.0, 120.0, 300.0, 600.0)

# A write the loop owes the database for one job: returns (outcome, code) for the tally.
Write = Callable[[psycopg.Connection], tuple[str | None, str | None]]


@dataclass
class _Running:
    leased: queue.LeasedJob
    ctx: JobContext
    lease_until: float  # monotonic: the lease holds at least until then
    started: float | None = None
    duration: float = 0.0
    cancel_reason: str | None = None  # operator | lease_lost | shutdown | timeout | memory

    @property
    def id(self) -> int:
        return self.leased.id


class Runtime:
    def __init__(self, dsn: str, settings: WorkerSettings, handler: Handler) -> None:
        self.dsn = dsn
        self.s = settings
        self.handler = handler
        self.job_settings = plugins.job_settings(settings.job_type)
        self.pool = _Pool(
            dsn, min_size=1, max_size=settings.concurrency + 1, open=False,
            # Never give up on the server: an outage ends, and the pool must be there.
            reconnect_timeout=365 * 86400.0,
            kwargs={"autocommit": False}, name=f"jobvisor-{settings.job_type}",
            # A connection the server dropped (restart, failover) is replaced, not handed out.
            check=ConnectionPool.check_connection,
        )
        # --- owned by the control loop only ---
        self.held: dict[int, _Running] = {}
        self.acks: list[tuple[_Running, str | None]] = []
        self.acks_since: float | None = None  # when the oldest waiting ack arrived
        self.suspects_held = 0  # held jobs that are suspects (then nothing else is leased)
        # The last lease got fewer jobs than asked because keys were at max_running_per_key:
        # each job this process finishes may free its key, so it leases again at once.
        self.capped = False
        self.owed: list[tuple[_Running, Write]] = []
        self.unstarted: list[_Running] = []
        self.control: psycopg.Connection | None = None
        self.reconnect_at = 0.0
        self.reconnect_delay = 0.25
        # (outcome, code) -> [count, seconds, bucket counts...]; sent to the supervisor.
        self.tally: dict[tuple[str, str | None], list[float]] = {}
        # --- shared, each safe on its own ---
        self.inbox: stdqueue.SimpleQueue[tuple[Any, ...]] = stdqueue.SimpleQueue()
        self.todo: stdqueue.SimpleQueue[_Running | None] = stdqueue.SimpleQueue()
        self.wake = threading.Event()
        self.notified = False
        self.stopping = False
        self.stop_reason = "shutdown"  # or "memory": recycled over its memory limit
        self.exit_code = EXIT_OK
        self.closing = False
        self.threads: list[threading.Thread] = []
        self.status = StatusPipe.from_env()
        parent = os.environ.get("JOBVISOR_PARENT_PID", "")
        self.parent_pid = int(parent) if parent.isdigit() else None

    # --- lifecycle ------------------------------------------------------------------
    def run(self) -> int:
        self._install_signals()
        # Model endpoint limits are shared through this database (workers/core/model_gate.py).
        model_gate.configure(self.dsn)
        self.pool.open(wait=True, timeout=30)
        self.control = psycopg.connect(self.dsn, autocommit=True, connect_timeout=10)
        for i in range(self.s.concurrency):
            t = threading.Thread(target=self._work_loop, name=f"job-{i}", daemon=True)
            t.start()
            self.threads.append(t)
        if self.s.listen:
            threading.Thread(target=self._listen_loop, name="listen", daemon=True).start()
        log.info(
            "worker_started",
            extra={"job_type": self.s.job_type, "concurrency": self.s.concurrency,
                   "worker_id": self.s.worker_id, "listen": self.s.listen},
        )
        try:
            self._loop()
        finally:
            self._shutdown()
        return self.exit_code

    def stop(self, code: int = EXIT_OK, reason: str = "shutdown") -> None:
        """Begin draining; safe to call from a signal handler."""
        if not self.stopping:
            self.exit_code = code
            self.stop_reason = reason
        self.stopping = True
        # Event.set takes a lock the interrupted main thread may hold: set it elsewhere.
        threading.Thread(target=self.wake.set, daemon=True).start()

    def _install_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        signal.signal(signal.SIGTERM, lambda *_: self.stop())
        signal.signal(signal.SIGINT, lambda *_: self.stop())
        # The supervisor recycles a child over its memory limit with SIGUSR1: a job still
        # running when the grace ends is charged for it (see _give_up).
        signal.signal(signal.SIGUSR1, lambda *_: self.stop(reason="memory"))
        # The kernel sends SIGUSR2 when the supervisor dies (PR_SET_PDEATHSIG, set by
        # workers.__main__): stop leasing, finish or put back what is held, exit.
        signal.signal(signal.SIGUSR2, lambda *_: self.stop(reason="orphaned"))

    # --- the loop ----------------------------------------------------------------------
    def _loop(self) -> None:
        s = self.s
        capacity = s.concurrency + s.prefetch
        next_poll = 0.0
        next_heartbeat = time.monotonic() + s.heartbeat
        next_status = 0.0
        next_sweep = 0.0
        want_more = True
        drain_deadline: float | None = None
        errors = 0
        clearing = False  # a suspect waits: take nothing more until empty, then lease alone
        next_suspect_check = 0.0
        while True:
            now = time.monotonic()
            self._take_inbox()
            if not self.stopping and self._orphaned():
                log.warning("supervisor_gone", extra={"held": len(self.held)})
                self.stop(reason="orphaned")
            try:
                if self._connected(now):
                    self._write_owed()
                    self._put_back_unstarted()
                    if self._acks_due(now):
                        self._flush_acks()
                    if now >= next_heartbeat:
                        self._heartbeat(now)
                        next_heartbeat = now + s.heartbeat
                    if now >= next_sweep:
                        self._flush_progress(now)
                if now >= next_sweep:
                    self._enforce_timeouts(now)
                    next_sweep = now + SWEEP_INTERVAL
                if self.stopping:
                    if drain_deadline is None:
                        grace = s.grace if self.stop_reason != "orphaned" \
                            else min(s.grace, ORPHAN_GRACE)
                        drain_deadline = now + grace
                        self._drain_todo()
                        log.info("worker_draining", extra={"held": len(self.held),
                                                           "reason": self.stop_reason})
                    if not self.held and not self.owed:
                        break
                    if now >= drain_deadline and (self._give_up()
                                                  or now >= drain_deadline + s.grace):
                        break
                elif self.notified or want_more or now >= next_poll:
                    free = capacity - len(self.held)
                    if self._holding_suspect() or (clearing and self.held):
                        want_more = True  # lease again as soon as it is done
                    elif free > 0 and self._connected(now):
                        self.notified = False
                        got = self._lease(free)
                        want_more = len(got) == free or any(j.suspect for j in got)
                        next_poll = now + s.poll
                        clearing = False
                # Under a steady backlog a process is never empty, so a suspect (which
                # runs only alone) would wait for the backlog to end: every few seconds a
                # busy process asks, and when one waits it takes no more until it is
                # empty, then leases alone.
                if not self.stopping and self.held and not clearing \
                        and now >= next_suspect_check and self._connected(now):
                    next_suspect_check = now + max(s.poll, 2.0)
                    clearing = not self._holding_suspect() \
                        and queue.suspect_waiting(self.db, s.job_type)
                errors = 0
            except psycopg.OperationalError as exc:
                self._control_lost(exc)
            except Exception as exc:  # noqa: BLE001 - the loop must outlive any one failure
                errors += 1
                log.error("worker_loop_error", extra={
                    "exc_type": type(exc).__name__, "traceback": frames(exc),
                    "consecutive": errors})
                if errors >= LOOP_ERRORS_MAX and drain_deadline is not None:
                    break
                if errors >= LOOP_ERRORS_MAX:
                    self.stop(EXIT_LOOP_FAILED)
            if now >= next_status:
                self._report_status()
                next_status = now + STATUS_INTERVAL
            deadline = min(next_heartbeat, next_status, now + 1.0)
            if self.acks_since is not None:
                deadline = min(deadline, self.acks_since + ACK_WAIT)
            if self.control is None:
                deadline = min(deadline, self.reconnect_at)
            if not self.stopping and not self.notified and not want_more:
                deadline = min(deadline, next_poll)
            if drain_deadline is not None:
                deadline = min(deadline, drain_deadline)
            self.wake.wait(max(0.0, deadline - time.monotonic()))
            self.wake.clear()

    def _orphaned(self) -> bool:
        """The supervisor is gone: its end of the status pipe closed, or we were
        re-parented (the check that needs no signal, for a death before prctl)."""
        if self.status.parent_gone:
            return True
        return self.parent_pid is not None and os.getppid() != self.parent_pid

    # --- the control connection ------------------------------------------------------------
    def _connected(self, now: float) -> bool:
        """True with a usable control connection; else one bounded reconnect try when due."""
        c = self.control
        if c is not None and not c.closed and not c.broken:
            return True
        if c is not None:
            self._control_lost(None)
        if now < self.reconnect_at:
            return False
        try:
            self.control = psycopg.connect(self.dsn, autocommit=True,
                                           connect_timeout=CONNECT_TIMEOUT)
        except psycopg.Error:
            self.reconnect_at = time.monotonic() + self.reconnect_delay
            self.reconnect_delay = min(self.reconnect_delay * 2, RECONNECT_MAX)
            return False
        self.reconnect_delay = 0.25
        self.notified = True  # jobs may have been enqueued while we were away
        log.info("control_connection_restored", extra={"held": len(self.held),
                                                       "owed": len(self.owed)})
        return True

    def _control_lost(self, exc: BaseException | None) -> None:
        if self.control is not None:
            log.warning("control_connection_lost",
                        extra={"exc_type": type(exc).__name__ if exc else "closed"})
            with contextlib.suppress(psycopg.Error):
                self.control.close()
        self.control = None
        self.reconnect_at = time.monotonic()

    @property
    def db(self) -> psycopg.Connection:
        assert self.control is not None
        return self.control

    # --- what the threads hand over --------------------------------------------------------
    def _take_inbox(self) -> None:
        while True:
            try:
                msg = self.inbox.get_nowait()
            except stdqueue.Empty:
                return
            kind, run = msg[0], msg[1]
            if kind == "cancel":
                held = self.held.get(run)
                if held is not None:
                    self._cancel(held, "operator")
            elif kind == "ack":
                self.acks.append((run, msg[2]))
            elif kind == "done":
                self._settle(run, msg[2], msg[3])
            elif kind == "owe":
                self.owed.append((run, msg[2]))
            elif kind == "unstarted":
                self.unstarted.append(run)

    def _settle(self, run: _Running, outcome: str | None, code: str | None = None) -> None:
        """The job's outcome is written (or it is no longer ours): forget it."""
        held = self.held.pop(run.id, None)
        if held is not None and run.leased.suspect:
            self.suspects_held -= 1
        if held is not None and self.capped:
            self.notified = True
        if outcome == "lost":
            log.warning("lease_lost", extra={"job_id": run.id, "stage": "complete"})
        elif outcome is not None and outcome != "put_back":
            self._record(outcome, run, code)

    def _write_owed(self) -> None:
        while self.owed:
            run, write = self.owed[0]
            try:
                outcome, code = write(self.db)
            except psycopg.OperationalError:
                raise
            except psycopg.Error as exc:  # this write can't succeed: the lease decides
                log.error("owed_write_failed", extra={"job_id": run.id,
                                                      "exc_type": type(exc).__name__})
                outcome, code = None, None
            self.owed.pop(0)
            self._settle(run, outcome, code)

    def _put_back_unstarted(self) -> None:
        if not self.unstarted:
            return
        runs = self.unstarted
        queue.put_back(self.db, [(r.id, r.leased.lease_key) for r in runs])
        self.unstarted = []
        for r in runs:
            self._settle(r, "put_back")
        log.info("jobs_put_back", extra={"count": len(runs), "reason": "unstarted"})

    def _acks_due(self, now: float) -> bool:
        """Acknowledge when ACK_BATCH are waiting or the oldest has waited ACK_WAIT: under
        load the loop would otherwise send one statement per finished job."""
        if not self.acks:
            return False
        if self.acks_since is None:
            self.acks_since = now
        return (len(self.acks) >= ACK_BATCH or self.stopping
                or now - self.acks_since >= ACK_WAIT)

    def _flush_acks(self) -> None:
        if not self.acks:
            return
        self.acks_since = None
        acks, self.acks = self.acks, []
        try:
            done = queue.complete_many(
                self.db, [(r.id, r.leased.lease_key, text) for r, text in acks], encoded=True,
                keep=self.s.keep_completed)
        except psycopg.OperationalError:
            self.acks[:0] = acks  # kept for the next connection; their leases still hold
            raise
        except psycopg.Error as exc:
            # One bad row must not take the batch with it: acknowledge one by one.
            log.warning("ack_batch_failed", extra={"count": len(acks),
                                                   "exc_type": type(exc).__name__})
            self._ack_one_by_one(acks)
            return
        for r, _ in acks:
            self._settle(r, "completed" if r.id in done else "lost")

    def _ack_one_by_one(self, acks: list[tuple[_Running, str | None]]) -> None:
        for i, (r, text) in enumerate(acks):
            try:
                ok = queue.complete(self.db, r.id, r.leased.lease_key, text, encoded=True,
                                    keep=self.s.keep_completed)
            except psycopg.OperationalError:
                self.acks[:0] = acks[i:]
                raise
            except psycopg.Error as exc:
                code = "result_invalid"
                ok = queue.fail(self.db, r.id, r.leased.lease_key, code=code,
                                message=f"the result could not be stored: {type(exc).__name__}")
                log.warning("job_failed", extra={"job_id": r.id, "job_type": r.leased.job_type,
                                                 "code": code, "attempt": r.leased.attempt,
                                                 "new_status": "failed"})
                self._settle(r, "failed" if ok else "lost", code)
                continue
            self._settle(r, "completed" if ok else "lost")

    # --- leases ----------------------------------------------------------------------------
    def _holding_suspect(self) -> bool:
        return self.suspects_held > 0

    def _lease(self, n: int) -> list[queue.LeasedJob]:
        jobs = queue.lease(
            self.db, self.s.job_type, n, worker_id=self.s.worker_id,
            lease_seconds=self.s.lease, global_limit=self.s.global_concurrency,
            alone=not self.held, fair=self.s.fair, per_key_limit=self.s.max_running_per_key,
        )
        self.capped = self.s.max_running_per_key is not None and len(jobs) < n
        until = time.monotonic() + self.s.lease
        for lj in jobs:
            if lj.payload_error is not None:
                self._refuse_payload(lj)
                continue
            job = Job(lj.id, lj.job_type, lj.payload, lj.attempt, lj.max_attempts,
                      lj.priority, lj.batch_id)
            ctx = JobContext(job, lj.lease_key, self.s.options, self.pool,
                             self._max_attempts_for, self.job_settings)
            run = _Running(lj, ctx, lease_until=until)
            self.held[lj.id] = run
            self.suspects_held += lj.suspect
            self.todo.put(run)
        return jobs

    def _refuse_payload(self, lj: queue.LeasedJob) -> None:
        """A payload the worker can't decode fails its own job, naming why."""
        code = "payload_invalid"
        queue.fail(self.db, lj.id, lj.lease_key, code=code, message=lj.payload_error)
        self._tally_add("failed", code, 0.0)
        log.warning("job_failed", extra={"job_id": lj.id, "job_type": lj.job_type, "code": code,
                                         "attempt": lj.attempt, "new_status": "failed"})

    def _max_attempts_for(self, job_type: str) -> int:
        return self.s.attempts_by_type.get(job_type, self.s.max_attempts)

    def _heartbeat(self, now: float) -> None:
        runs = list(self.held.values())
        if not runs:
            return
        alive = queue.heartbeat(self.db, [(r.id, r.leased.lease_key) for r in runs],
                                self.s.lease)
        for r in runs:
            if r.id not in alive:
                self._cancel(r, "lease_lost")
            else:
                r.lease_until = now + self.s.lease
                if alive[r.id]:
                    self._cancel(r, "operator")

    def _flush_progress(self, now: float) -> None:
        items = []
        for r in self.held.values():
            p = r.ctx.take_progress(now)
            if p is not None:
                items.append((r.id, r.leased.lease_key, p[0], p[1]))
        if items:
            queue.save_progress(self.db, items)

    def _enforce_timeouts(self, now: float) -> None:
        for r in list(self.held.values()):
            if r.started is None or r.cancel_reason in LOST:
                continue
            if now - r.started <= self.s.timeout:
                continue
            code = f"{self.s.job_type}_timeout"
            self._cancel(r, "timeout")
            self.owed.append((r, self._charge(r, code,
                                              f"job ran longer than its {self.s.timeout:g}s "
                                              "timeout", outcome="timeout")))
            log.error("job_timeout", extra={"job_id": r.id, "code": code})
            # Its thread may never return: hand over to a fresh process.
            self.stop(EXIT_JOB_TIMEOUT)

    def _charge(self, run: _Running, code: str, message: str,
                outcome: str | None = None) -> Write:
        """A write that counts the running attempt as failed with `code`."""
        def write(conn: psycopg.Connection) -> tuple[str | None, str | None]:
            delay = backoff_delay(run.leased.attempt, self.s.backoff, self.s.max_backoff)
            status = queue.retry(conn, run.id, run.leased.lease_key, code=code,
                                 message=message, delay=delay)
            if status is None:
                return "lost", code
            return outcome or ("failed" if status == "failed" else "retried"), code
        return write

    # --- draining --------------------------------------------------------------------------
    def _drain_todo(self) -> None:
        """Jobs no thread has picked up yet go back, their attempt not counted."""
        while True:
            try:
                run = self.todo.get_nowait()
            except stdqueue.Empty:
                return
            if run is not None and run.started is None:
                self.unstarted.append(run)

    def _give_up(self) -> bool:
        """The grace is over: settle what is still running. True when nothing is owed.

        On shutdown the jobs go back uncounted. When the child is recycled over its memory
        limit, one job running alone is charged `<type>_memory_exceeded` (and fails once
        its attempts are used up); several running together go back uncounted as
        suspects, each to run alone next time, so the one that needs the memory is found.
        """
        if self.control is None and not self._connected(time.monotonic()):
            return False
        for r in list(self.held.values()):
            self._cancel(r, self.stop_reason)
        self._take_inbox()
        self._write_owed()
        self._flush_acks()
        runs = [r for r in self.held.values()]
        started = [r for r in runs if r.started is not None]
        charge_one = self.stop_reason == "memory" and len(started) == 1
        if charge_one:
            code = f"{self.s.job_type}_memory_exceeded"
            write = self._charge(started[0], code,
                                 "the worker was recycled over its memory limit while it "
                                 "ran this job")
            self._settle(started[0], *write(self.db))
            log.warning("job_memory_exceeded", extra={"job_id": started[0].id, "code": code})
            runs.remove(started[0])
        as_suspects = self.stop_reason == "memory" and len(started) > 1
        back = queue.put_back(self.db, [(r.id, r.leased.lease_key) for r in runs],
                              suspect=as_suspects)
        if runs:
            log.warning("jobs_put_back", extra={"count": len(back), "reason": "grace_expired",
                                                "suspects": as_suspects})
        self.held.clear()
        self.suspects_held = 0
        return True

    def _shutdown(self) -> None:
        self.closing = True
        try:
            if self.control is not None and not self.control.closed:
                self._take_inbox()
                self._write_owed()
                self._flush_acks()
        except psycopg.Error as exc:
            log.error("shutdown_flush_failed", extra={"exc_type": type(exc).__name__})
        self._report_status()
        for _ in self.threads:
            self.todo.put(None)
        stuck = False
        for t in self.threads:
            t.join(timeout=1.0)
            stuck = stuck or t.is_alive()
        log.info("worker_stopped", extra={"exit_code": self.exit_code, "stuck_threads": stuck,
                                          "left_held": len(self.held)})
        if stuck:
            # A handler ignores cancellation; its job is already back in the queue.
            logging.shutdown()
            os._exit(self.exit_code)
        self.pool.close()
        if self.control is not None:
            self.control.close()

    def _cancel(self, run: _Running, reason: str) -> None:
        if run.cancel_reason is None or reason in LOST:
            run.cancel_reason = reason
        run.ctx.request_cancel(lost=reason in LOST)

    # --- notifications ---------------------------------------------------------------------
    def _listen_loop(self) -> None:
        delay = 0.5
        channel = queue.jobs_channel(self.s.job_type)
        while not self.closing:
            try:
                with psycopg.connect(self.dsn, autocommit=True,
                                     connect_timeout=CONNECT_TIMEOUT) as conn:
                    conn.execute(f'LISTEN "{channel}"')
                    conn.execute(f"LISTEN {queue.CANCEL_CHANNEL}")
                    delay = 0.5
                    self.notified = True  # jobs may have arrived while we were away
                    self.wake.set()
                    while not self.closing:
                        for n in conn.notifies(timeout=1.0):
                            self._on_notify(n.channel, n.payload)
            except psycopg.Error as exc:
                if self.closing:
                    return
                log.warning("listen_connection_lost", extra={"exc_type": type(exc).__name__})
                time.sleep(delay)
                delay = min(delay * 2, RECONNECT_MAX)

    def _on_notify(self, channel: str, payload: str) -> None:
        if channel == queue.CANCEL_CHANNEL:
            try:
                job_id = int(payload)
            except ValueError:
                return
            self.inbox.put(("cancel", job_id))
        else:
            self.notified = True
        self.wake.set()

    # --- threads ---------------------------------------------------------------------------
    def _work_loop(self) -> None:
        while True:
            run = self.todo.get()
            if run is None:
                return
            # Never start a job whose lease is gone, cancelled, or due back (draining).
            if self.stopping or run.cancel_reason is not None \
                    or time.monotonic() >= run.lease_until:
                self.inbox.put(("unstarted", run))
                self.wake.set()
                continue
            try:
                self._execute(run)
            except BaseException as exc:  # noqa: BLE001 - the thread must survive anything
                log.error("job_bookkeeping_failed", extra={
                    "job_id": run.id, "exc_type": type(exc).__name__, "traceback": frames(exc)})
                self._release(run.ctx)
                self.inbox.put(("owe", run, self._put_back_write(run)))
            finally:
                self.wake.set()

    def _execute(self, run: _Running) -> None:
        job, ctx = run.ctx.job, run.ctx
        run.started = time.monotonic()
        text: str | None = None
        error: BaseException | None = None
        try:
            result = self.handler(job, ctx)
        except BaseException as exc:  # noqa: BLE001 - every failure becomes an outcome
            error = exc
        else:
            try:
                text = queue.encode_result(result)
            except queue.ResultError as exc:  # a result jsonb can't hold fails this job only
                error = PermanentError("result_invalid", str(exc))
        run.duration = time.monotonic() - run.started
        self._warn_long_transaction(run)
        if isinstance(error, KeyboardInterrupt | SystemExit):
            error = TransientError("worker_interrupted", type(error).__name__)
        if run.cancel_reason in LOST:  # the loop settled it, or the lease is gone
            self._release(ctx)
            self.inbox.put(("done", run, None, None))
            if run.cancel_reason == "lease_lost":
                log.warning("lease_lost", extra={"job_id": run.id, "stage": "handler"})
            return
        if error is None:
            self._succeed(run, text)
        else:
            self._failed(run, error)

    def _warn_long_transaction(self, run: _Running) -> None:
        opened = getattr(run.ctx, "db_opened_at", None)
        if opened is not None and time.monotonic() - opened > LONG_TRANSACTION:
            log.warning("job_transaction_held", extra={
                "job_id": run.id, "seconds": round(time.monotonic() - opened, 3)})

    def _succeed(self, run: _Running, text: str | None) -> None:
        ctx, lj = run.ctx, run.leased
        if not ctx.touched_db:
            self.inbox.put(("ack", run, text))
            return
        conn = ctx.release_connection()
        assert conn is not None
        try:
            ok = queue.complete(conn, lj.id, lj.lease_key, text, encoded=True,
                                keep=self.s.keep_completed)
            if ok:
                conn.commit()
            else:
                conn.rollback()
        except psycopg.OperationalError:
            # The connection died with the job's writes: they are gone, so the job goes
            # back (uncounted) once the server answers again.
            self._putconn(conn)
            self.inbox.put(("owe", run, self._put_back_write(run)))
            return
        except psycopg.Error as exc:
            self._rollback(conn)
            self._putconn(conn)
            error: JobError = (PermanentError("result_invalid", "the result could not be stored")
                               if isinstance(exc, psycopg.DataError) else
                               TransientError("commit_failed", type(exc).__name__))
            self._failed(run, error)
            return
        self._putconn(conn)
        self.inbox.put(("done", run, "completed" if ok else "lost", None))

    def _failed(self, run: _Running, error: BaseException) -> None:
        conn = run.ctx.release_connection()
        if conn is not None:
            self._rollback(conn)  # the job's own writes never commit with a failure
            if conn.broken:
                self._putconn(conn)
                conn = None
        write = self._failure_write(run, error)
        try:
            if conn is None:
                conn = self.pool.getconn(timeout=GETCONN_TIMEOUT)
            outcome, code = write(conn)
            conn.commit()
        except (psycopg.Error, PoolTimeout):
            if conn is not None:
                self._rollback(conn)
            # The loop writes it on its own connection once the server answers.
            self.inbox.put(("owe", run, write))
        else:
            self.inbox.put(("done", run, outcome, code))
        finally:
            if conn is not None:
                self._putconn(conn)

    def _failure_write(self, run: _Running, error: BaseException) -> Write:
        lj = run.leased
        if run.cancel_reason == "operator" or isinstance(error, Cancelled):
            def cancel(conn: psycopg.Connection) -> tuple[str | None, str | None]:
                ok = queue.fail(conn, lj.id, lj.lease_key, code="cancelled",
                                message="cancelled by request", status="cancelled")
                log.info("job_cancelled", extra={"job_id": lj.id})
                return ("cancelled" if ok else "lost"), "cancelled"
            return cancel
        if isinstance(error, psycopg.OperationalError | PoolTimeout):
            # The database went away under the handler: not the job's fault. It goes back
            # uncounted (written once the server answers, if need be).
            return self._put_back_write(run)
        if isinstance(error, JobError):
            code, message = error.code, error.message
            permanent = isinstance(error, PermanentError)
        else:
            # Unexpected: transient until attempts run out. Its text may quote payload
            # content, so the record keeps the type and where it was raised; the log gets
            # the frames (code locations, no values).
            where = frames(error)
            code, permanent = "unexpected_error", False
            message = type(error).__name__ + (f" at {where[-1]}" if where else "")
            log.error("job_unexpected_error", extra={
                "job_id": lj.id, "job_type": lj.job_type, "exc_type": type(error).__name__,
                "attempt": lj.attempt, "traceback": where})

        def write(conn: psycopg.Connection) -> tuple[str | None, str | None]:
            if permanent:
                new_status = "failed" if queue.fail(conn, lj.id, lj.lease_key, code=code,
                                                    message=message) else None
            else:
                delay = backoff_delay(lj.attempt, self.s.backoff, self.s.max_backoff)
                new_status = queue.retry(conn, lj.id, lj.lease_key, code=code,
                                         message=message, delay=delay)
            if new_status is None:
                return "lost", code
            outcome = {"failed": "failed", "cancelled": "cancelled"}.get(new_status, "retried")
            log.log(
                logging.WARNING if new_status == "failed" else logging.INFO,
                "job_failed" if new_status == "failed" else "job_retry",
                extra={"job_id": lj.id, "job_type": lj.job_type, "code": code,
                       "attempt": lj.attempt, "new_status": new_status},
            )
            return outcome, code
        return write

    def _put_back_write(self, run: _Running) -> Write:
        def write(conn: psycopg.Connection) -> tuple[str | None, str | None]:
            queue.put_back(conn, [(run.id, run.leased.lease_key)])
            log.info("jobs_put_back", extra={"count": 1, "reason": "connection_lost",
                                             "job_id": run.id})
            return "put_back", None
        return write

    def _release(self, ctx: JobContext) -> None:
        conn = ctx.release_connection()
        if conn is not None:
            self._rollback(conn)
            self._putconn(conn)

    @staticmethod
    def _rollback(conn: psycopg.Connection) -> None:
        with contextlib.suppress(psycopg.Error):  # broken: the pool discards it on return
            conn.rollback()

    def _putconn(self, conn: psycopg.Connection) -> None:
        try:
            self.pool.putconn(conn)
        except Exception:  # noqa: BLE001 - a closing pool: the connection goes with it
            conn.close()

    # --- reporting -----------------------------------------------------------------------
    def _record(self, outcome: str, run: _Running, code: str | None = None) -> None:
        self._tally_add(outcome, code, run.duration)

    def _tally_add(self, outcome: str, code: str | None, duration: float) -> None:
        row = self.tally.get((outcome, code))
        if row is None:
            row = self.tally[(outcome, code)] = [0.0] * (2 + len(DURATION_BUCKETS))
        row[0] += 1
        row[1] += duration
        # Counted in the first bucket that holds it; made cumulative when reported.
        i = bisect.bisect_left(DURATION_BUCKETS, duration)
        if i < len(DURATION_BUCKETS):
            row[2 + i] += 1

    @staticmethod
    def _cumulative(row: list[float]) -> list[float]:
        """[count, seconds, per-bucket counts...] with each bucket counting all below it."""
        return row[:2] + list(itertools.accumulate(row[2:]))

    def _report_status(self) -> None:
        """Tell the supervisor we are alive, and what finished since the last report."""
        tally, self.tally = self.tally, {}
        self.status.send({
            "pid": os.getpid(),
            "job_type": self.s.job_type,
            "worker_id": self.s.worker_id,
            "inflight": sum(1 for r in self.held.values() if r.started is not None),
            "held": len(self.held),
            "draining": self.stopping,
            "db_ok": self.control is not None,
            "outcomes": [[o, c, *self._cumulative(row)] for (o, c), row in tally.items()],
        })
