"""The sub-worker: one process serving one job type with N threads.

One loop owns the control connection and does, in turn: flush batched completions,
heartbeat the leases it holds, store progress, enforce timeouts, lease more work, and
sleep until a thread, a NOTIFY, a signal or the poll timer wakes it. Threads run
handlers; a handler that touches the database gets its own pooled connection and
transaction, committed together with the job's fenced completion.
"""

from __future__ import annotations

import json
import logging
import os
import queue as stdqueue
import random
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool

from workers import queue
from workers.context import Job, JobContext
from workers.errors import Cancelled, JobError, PermanentError, TransientError
from workers.registry import Handler

log = logging.getLogger("jobvisor.worker")

EXIT_OK = 0
EXIT_JOB_TIMEOUT = 3  # a job overran its hard timeout: the supervisor starts a fresh child
STATUS_INTERVAL = 1.0


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
    options: dict[str, Any] = field(default_factory=dict)
    # Follow-up jobs get their own type's max attempts (pdf → vision → feedback).
    attempts_by_type: dict[str, int] = field(default_factory=dict)
    worker_id: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")


def backoff_delay(attempt: int, base: float, cap: float) -> float:
    """Exponential backoff with "equal jitter": in [d/2, d] for d = min(cap, base·2^(attempt−1)).

    Half the delay is fixed, so successive retries never come sooner than the last.
    """
    d = min(cap, base * (2 ** max(0, attempt - 1)))
    return d / 2 + random.uniform(0, d / 2)


# Job duration buckets (seconds), shared with the supervisor's histogram.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                    60.0, 120.0, 300.0, 600.0)


@dataclass
class _Running:
    leased: queue.LeasedJob
    ctx: JobContext
    started: float | None = None
    cancel_reason: str | None = None  # operator | lease_lost | shutdown | timeout


class Runtime:
    def __init__(self, dsn: str, settings: WorkerSettings, handler: Handler) -> None:
        self.dsn = dsn
        self.s = settings
        self.handler = handler
        self.pool = ConnectionPool(
            dsn, min_size=1, max_size=settings.concurrency + 1, open=False,
            kwargs={"autocommit": False}, name=f"jobvisor-{settings.job_type}",
        )
        self.held: dict[int, _Running] = {}
        self.todo: stdqueue.SimpleQueue[_Running | None] = stdqueue.SimpleQueue()
        self.acks: list[tuple[int, Any, Any]] = []
        self.acks_lock = threading.Lock()
        self.wake = threading.Event()
        self.notified = False
        self.stopping = False
        self.exit_code = EXIT_OK
        self.closing = False
        self.control: psycopg.Connection | None = None
        self.threads: list[threading.Thread] = []
        # (outcome, code) -> [count, seconds, bucket counts...]; sent to the supervisor.
        self.tally: dict[tuple[str, str | None], list[float]] = {}
        self.tally_lock = threading.Lock()
        self.status_fd = _status_fd()

    # --- lifecycle ------------------------------------------------------------------
    def run(self) -> int:
        self._install_signals()
        self.pool.open(wait=True, timeout=30)
        self.control = psycopg.connect(self.dsn, autocommit=True)
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

    def stop(self, code: int = EXIT_OK) -> None:
        """Begin draining; safe to call from a signal handler."""
        if not self.stopping:
            self.exit_code = code
        self.stopping = True
        # Event.set takes a lock the interrupted main thread may hold: set it elsewhere.
        threading.Thread(target=self.wake.set, daemon=True).start()

    def _install_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        signal.signal(signal.SIGTERM, lambda *_: self.stop())
        signal.signal(signal.SIGINT, lambda *_: self.stop())

    # --- the loop ----------------------------------------------------------------------
    def _loop(self) -> None:
        s = self.s
        capacity = s.concurrency + s.prefetch
        next_poll = 0.0
        next_heartbeat = time.monotonic() + s.heartbeat
        next_status = 0.0
        want_more = True
        drain_deadline: float | None = None
        while True:
            now = time.monotonic()
            try:
                self._flush_acks()
                if now >= next_heartbeat:
                    self._heartbeat()
                    next_heartbeat = now + s.heartbeat
                self._flush_progress(now)
                self._enforce_timeouts(now)
                if self.stopping:
                    if drain_deadline is None:
                        drain_deadline = now + s.grace
                        self._put_back_unstarted()
                        log.info("worker_draining", extra={"held": len(self.held)})
                    if not self.held:
                        break
                    if now >= drain_deadline:
                        self._put_back_all()
                        break
                elif self.notified or want_more or now >= next_poll:
                    free = capacity - len(self.held)
                    if free > 0:
                        self.notified = False
                        got = self._lease(free)
                        want_more = len(got) == free
                        next_poll = now + s.poll
            except psycopg.OperationalError as exc:
                log.warning("control_connection_lost", extra={"exc_type": type(exc).__name__})
                self._reconnect()
            if now >= next_status:
                self._report_status()
                next_status = now + STATUS_INTERVAL
            deadline = min(next_heartbeat, next_status, now + 1.0)
            if not self.stopping and not self.notified and not want_more:
                deadline = min(deadline, next_poll)
            if drain_deadline is not None:
                deadline = min(deadline, drain_deadline)
            self.wake.wait(max(0.0, deadline - time.monotonic()))
            self.wake.clear()

    def _reconnect(self) -> None:
        delay = 0.5
        while not self.closing:
            try:
                if self.control is not None:
                    self.control.close()
                self.control = psycopg.connect(self.dsn, autocommit=True)
                return
            except psycopg.OperationalError:
                time.sleep(delay)
                delay = min(delay * 2, 10.0)
                if self.stopping and delay >= 10.0:
                    return

    def _lease(self, n: int) -> list[queue.LeasedJob]:
        assert self.control is not None
        jobs = queue.lease(
            self.control, self.s.job_type, n, worker_id=self.s.worker_id,
            lease_seconds=self.s.lease, global_limit=self.s.global_concurrency,
        )
        for lj in jobs:
            job = Job(lj.id, lj.job_type, lj.payload, lj.attempt, lj.max_attempts,
                      lj.priority, lj.batch_id)
            ctx = JobContext(job, lj.lease_key, self.s.options, self.pool,
                             self._max_attempts_for)
            run = _Running(lj, ctx)
            self.held[lj.id] = run
            self.todo.put(run)
        return jobs

    def _max_attempts_for(self, job_type: str) -> int:
        return self.s.attempts_by_type.get(job_type, self.s.max_attempts)

    def _flush_acks(self) -> None:
        with self.acks_lock:
            acks, self.acks = self.acks, []
        if not acks:
            return
        assert self.control is not None
        try:
            done = queue.complete_many(self.control, acks)
        except psycopg.OperationalError:
            with self.acks_lock:  # keep them for the next round; their leases still hold
                self.acks[:0] = acks
            raise
        for job_id, _key, _result in acks:
            self.held.pop(job_id, None)
            if job_id not in done:
                log.warning("lease_lost", extra={"job_id": job_id, "stage": "complete"})

    def _heartbeat(self) -> None:
        runs = list(self.held.values())
        if not runs:
            return
        assert self.control is not None
        alive = queue.heartbeat(
            self.control, [(r.leased.id, r.leased.lease_key) for r in runs], self.s.lease
        )
        for r in runs:
            if r.leased.id not in alive:
                self._cancel(r, "lease_lost")
            elif alive[r.leased.id]:
                self._cancel(r, "operator")

    def _flush_progress(self, now: float) -> None:
        items = []
        for r in list(self.held.values()):
            p = r.ctx.take_progress(now)
            if p is not None:
                items.append((r.leased.id, r.leased.lease_key, p[0], p[1]))
        if items:
            assert self.control is not None
            queue.save_progress(self.control, items)

    def _enforce_timeouts(self, now: float) -> None:
        for r in list(self.held.values()):
            if r.started is None or r.cancel_reason == "timeout":
                continue
            if now - r.started <= self.s.timeout:
                continue
            assert self.control is not None
            code = f"{self.s.job_type}_timeout"
            status = queue.retry(
                self.control, r.leased.id, r.leased.lease_key, code=code,
                message=f"job ran longer than its {self.s.timeout:g}s timeout",
                delay=backoff_delay(r.leased.attempt, self.s.backoff, self.s.max_backoff),
            )
            self._cancel(r, "timeout")
            self.held.pop(r.leased.id, None)
            self._record("timeout", r, code)
            log.error("job_timeout", extra={"job_id": r.leased.id, "code": code,
                                            "new_status": status})
            # Its thread may never return: hand over to a fresh process.
            self.stop(EXIT_JOB_TIMEOUT)

    def _put_back_unstarted(self) -> None:
        back = []
        while True:
            try:
                run = self.todo.get_nowait()
            except stdqueue.Empty:
                break
            if run is not None and run.started is None:
                self.held.pop(run.leased.id, None)
                back.append((run.leased.id, run.leased.lease_key))
        if back:
            assert self.control is not None
            queue.put_back(self.control, back)
            log.info("jobs_put_back", extra={"count": len(back), "reason": "unstarted"})

    def _put_back_all(self) -> None:
        runs = list(self.held.values())
        for r in runs:
            self._cancel(r, "shutdown")
        self._flush_acks()
        runs = [r for r in runs if r.leased.id in self.held]
        if runs and self.control is not None:
            back = queue.put_back(self.control, [(r.leased.id, r.leased.lease_key) for r in runs])
            log.warning("jobs_put_back", extra={"count": len(back), "reason": "grace_expired"})
        self.held.clear()

    def _shutdown(self) -> None:
        self.closing = True
        try:
            if self.control is not None and not self.control.closed:
                self._flush_acks()
                if self.held:
                    self._put_back_all()
        except psycopg.Error as exc:
            log.error("shutdown_flush_failed", extra={"exc_type": type(exc).__name__})
        self._report_status()
        for _ in self.threads:
            self.todo.put(None)
        stuck = False
        for t in self.threads:
            t.join(timeout=1.0)
            stuck = stuck or t.is_alive()
        log.info("worker_stopped", extra={"exit_code": self.exit_code, "stuck_threads": stuck})
        if stuck:
            # A handler ignores cancellation; its job is already back in the queue.
            logging.shutdown()
            os._exit(self.exit_code)
        self.pool.close()
        if self.control is not None:
            self.control.close()

    def _cancel(self, run: _Running, reason: str) -> None:
        if run.cancel_reason is None or reason in ("lease_lost", "timeout"):
            run.cancel_reason = reason
        run.ctx.request_cancel(lost=reason in ("lease_lost", "timeout"))

    # --- notifications ---------------------------------------------------------------------
    def _listen_loop(self) -> None:
        delay = 0.5
        while not self.closing:
            try:
                with psycopg.connect(self.dsn, autocommit=True) as conn:
                    conn.execute(f"LISTEN {queue.JOBS_CHANNEL}")
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
                delay = min(delay * 2, 10.0)

    def _on_notify(self, channel: str, payload: str) -> None:
        if channel == queue.JOBS_CHANNEL and payload == self.s.job_type:
            self.notified = True
            self.wake.set()
        elif channel == queue.CANCEL_CHANNEL:
            try:
                run = self.held.get(int(payload))
            except ValueError:
                return
            if run is not None:
                self._cancel(run, "operator")

    # --- threads ---------------------------------------------------------------------------
    def _work_loop(self) -> None:
        while True:
            run = self.todo.get()
            if run is None:
                return
            if run.leased.id not in self.held:
                continue
            if self.stopping:  # draining: hand it back unstarted, attempt not counted
                self._give_back_unstarted(run)
                continue
            try:
                self._execute(run)
            except Exception:  # noqa: BLE001 - the thread must survive any bookkeeping error
                log.exception("job_bookkeeping_failed", extra={"job_id": run.leased.id})
                self.held.pop(run.leased.id, None)
            finally:
                self.wake.set()

    def _execute(self, run: _Running) -> None:
        job, ctx = run.ctx.job, run.ctx
        run.started = time.monotonic()
        result: Any = None
        error: BaseException | None = None
        try:
            result = self.handler(job, ctx)
        except BaseException as exc:  # noqa: BLE001 - every failure becomes an outcome
            error = exc
        else:
            try:
                json.dumps(result)
            except (TypeError, ValueError):  # a result that can't be stored is a bug
                error = PermanentError("invalid_result", "handler returned a non-JSON result")
        if isinstance(error, KeyboardInterrupt | SystemExit):
            error = TransientError("worker_interrupted", type(error).__name__)
        if run.cancel_reason in ("lease_lost", "timeout"):
            self._discard(run)
            return
        if error is None:
            self._succeed(run, result)
        else:
            self._failed(run, error)

    def _succeed(self, run: _Running, result: Any) -> None:
        ctx, lj = run.ctx, run.leased
        if not ctx.touched_db:
            with self.acks_lock:
                self.acks.append((lj.id, lj.lease_key, result))
            self._record("completed", run)
            return
        conn = ctx.release_connection()
        assert conn is not None
        try:
            if queue.complete(conn, lj.id, lj.lease_key, result):
                conn.commit()
                self._record("completed", run)
            else:
                conn.rollback()
                log.warning("lease_lost", extra={"job_id": lj.id, "stage": "complete"})
        except BaseException:
            conn.rollback()
            raise
        finally:
            self.pool.putconn(conn)
            self.held.pop(lj.id, None)

    def _failed(self, run: _Running, error: BaseException) -> None:
        ctx, lj = run.ctx, run.leased
        conn = ctx.release_connection()
        if conn is not None:
            conn.rollback()  # the job's own writes never commit with a failure
        else:
            conn = self.pool.getconn()
        try:
            self._write_failure(conn, run, error)
            conn.commit()
        except BaseException:
            conn.rollback()
            raise
        finally:
            self.pool.putconn(conn)
            self.held.pop(lj.id, None)

    def _write_failure(self, conn: psycopg.Connection, run: _Running, error: BaseException) -> None:
        lj = run.leased
        if run.cancel_reason == "shutdown":
            queue.put_back(conn, [(lj.id, lj.lease_key)])
            return
        if run.cancel_reason == "operator" or isinstance(error, Cancelled):
            queue.fail(conn, lj.id, lj.lease_key, code="cancelled",
                       message="cancelled by request", status="cancelled")
            self._record("cancelled", run, "cancelled")
            log.info("job_cancelled", extra={"job_id": lj.id})
            return
        if isinstance(error, PermanentError):
            code, message, permanent = error.code, error.message, True
        elif isinstance(error, JobError):
            code, message, permanent = error.code, error.message, False
        else:
            # Unexpected: transient until attempts run out. The exception's text may hold
            # payload content, so only its type is kept.
            code, message, permanent = "unexpected_error", type(error).__name__, False
        if permanent:
            queue.fail(conn, lj.id, lj.lease_key, code=code, message=message)
            new_status = "failed"
        else:
            delay = backoff_delay(lj.attempt, self.s.backoff, self.s.max_backoff)
            new_status = queue.retry(conn, lj.id, lj.lease_key, code=code, message=message,
                                     delay=delay)
        self._record("failed" if new_status == "failed" else "retried", run, code)
        log.log(
            logging.WARNING if new_status == "failed" else logging.INFO,
            "job_failed" if new_status == "failed" else "job_retry",
            extra={"job_id": lj.id, "job_type": lj.job_type, "code": code,
                   "attempt": lj.attempt, "new_status": new_status},
        )

    def _give_back_unstarted(self, run: _Running) -> None:
        with self.pool.connection() as conn:
            queue.put_back(conn, [(run.leased.id, run.leased.lease_key)])
        self.held.pop(run.leased.id, None)

    def _discard(self, run: _Running) -> None:
        conn = run.ctx.release_connection()
        if conn is not None:
            conn.rollback()
            self.pool.putconn(conn)
        self.held.pop(run.leased.id, None)
        log.warning("lease_lost", extra={"job_id": run.leased.id, "stage": "handler"})

    # --- reporting -----------------------------------------------------------------------
    def _record(self, outcome: str, run: _Running, code: str | None = None) -> None:
        duration = time.monotonic() - run.started if run.started else 0.0
        with self.tally_lock:
            row = self.tally.get((outcome, code))
            if row is None:
                row = self.tally[(outcome, code)] = [0.0] * (2 + len(DURATION_BUCKETS))
            row[0] += 1
            row[1] += duration
            for i, bound in enumerate(DURATION_BUCKETS):
                if duration <= bound:
                    row[2 + i] += 1

    def _report_status(self) -> None:
        """Tell the supervisor we are alive, and what finished since the last report."""
        with self.tally_lock:
            tally, self.tally = self.tally, {}
        if self.status_fd is None:
            return
        line = json.dumps({
            "pid": os.getpid(),
            "job_type": self.s.job_type,
            "inflight": sum(1 for r in self.held.values() if r.started is not None),
            "held": len(self.held),
            "draining": self.stopping,
            "outcomes": [[o, c, *row] for (o, c), row in tally.items()],
        }) + "\n"
        try:
            os.write(self.status_fd, line.encode())
        except BlockingIOError:
            pass  # the supervisor is busy; the next report carries on
        except OSError:
            self.status_fd = None  # the supervisor is gone; carry on alone


def _status_fd() -> int | None:
    """The pipe the supervisor reads our heartbeats from, made non-blocking so a slow
    reader can never stall this loop."""
    value = os.environ.get("JOBVISOR_STATUS_FD")
    if not value:
        return None
    fd = int(value)
    os.set_blocking(fd, False)
    return fd
