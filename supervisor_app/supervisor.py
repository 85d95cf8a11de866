"""The supervisor loop, in the manner of gunicorn's arbiter.

Signal handlers only queue the signal and wake the loop through a pipe. One loop does:
handle a signal → read children's heartbeats → reap the dead → kill the silent and the
stuck → re-plan → top up or shrink the pools → periodic duties. Each is a short method.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue as stdqueue
import select
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from supervisor_app import children, model_servers
from supervisor_app.capacity import Readings, gpu_memory_by_pid, read_capacity
from supervisor_app.children import Slot
from supervisor_app.config import Config, ConfigError, diff_types, load_config
from supervisor_app.duties import Duties
from supervisor_app.planner import PlanEntry, Planner
from workers.core import queue
from workers.core.dsn import dsn_for
from workers.core.logs import frames
from workers.core.registry import HandlerError, load

log = logging.getLogger("jobvisor.supervisor")

TICK = 0.5  # longest sleep of the loop: bounds how stale readings of children get
PUBLISH_EVERY = 2.0  # how often the loop hands the duties thread a fresh view to publish
EXIT_LOOP_FAILED = 1  # the supervisor loop failed; its children were drained first


class Supervisor:
    def __init__(self, cfg: Config, cfg_path: Path, dsn: str, env: dict[str, str],
                 *, only_types: set[str] | None = None) -> None:
        self.cfg = cfg
        self.cfg_path = cfg_path
        self.dsn = dsn
        self.env = env
        # What children connect with: the operator health probe runs as this role, so it
        # reports what the workers really can do.
        self.worker_dsn = dsn_for("worker", env) or dsn
        self.only_types = only_types
        self.slots: dict[str, list[Slot]] = {}
        self.planner = Planner(cfg.supervisor.reserve.memory, cfg.supervisor.reserve.gpu_memory)
        self.plan: dict[str, PlanEntry] = {}
        self.readings: Readings | None = None
        self.model_servers = model_servers.ModelServerWatch()
        self.fingerprints = cfg.worker_fingerprints()
        self.host = socket.gethostname()
        self.sup_id = f"{self.host}:{os.getpid()}"
        self.signals: list[int] = []
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        self.draining = False
        self.forced = False
        self.due: dict[str, float] = {}
        self.queue_stats: dict[str, dict[str, float]] = {}  # written by the duties thread
        # Each model endpoint's shared limit, in flight and latency (the duties thread).
        self.model_endpoints: list[dict[str, Any]] = []
        self.duties = Duties(self)
        # (job_type, outcome, code) -> [count, seconds, bucket counts...] from children.
        self.outcomes: dict[tuple[str, str, str | None], list[float]] = {}
        self.restarts: dict[str, int] = {}
        self.last_tick = time.monotonic()
        self.started = time.time()
        self.reload_error: str | None = None
        self.paused: set[str] = set()  # drained by an operator: planned at 0 until resumed

    # --- lifecycle ------------------------------------------------------------------------
    def run(self) -> int:
        self._install_signals()
        log.info("supervisor_started", extra={"types": sorted(self._types()),
                                              "config": str(self.cfg_path)})
        self.duties.start()
        try:
            self._supervise()
        except Exception as exc:  # noqa: BLE001 - never leave children behind
            log.critical("supervisor_loop_failed", extra={
                "exc_type": type(exc).__name__, "traceback": frames(exc)})
            self._emergency_stop()
            self._finish()
            return EXIT_LOOP_FAILED
        self._finish()
        return 130 if self.forced else 0

    def _supervise(self) -> None:
        while True:
            now = time.monotonic()
            self.last_tick = now
            self._handle_signals()
            if self.draining and not self._alive():
                break
            self._read_children(now)
            self._reap(now)
            self._settle_rescues(now)
            self._kill_silent_and_stuck(now)
            if not self.draining:
                if self._due("replan", self.cfg.supervisor.replan, now):
                    self._replan()
                self._resize(now)
                self._roll_changed(now)
                self._start_due(now)
            self._duties(now)
            self._sleep()

    def _types(self) -> dict[str, Any]:
        return {n: t for n, t in self.cfg.types.items()
                if self.only_types is None or n in self.only_types}

    def _alive(self) -> bool:
        return any(s.proc is not None for slots in self.slots.values() for s in slots)

    def check_handlers(self, cfg: Config) -> None:
        """Import every configured handler once, so a typo fails at start, naming the type."""
        for name, t in cfg.types.items():
            if self.only_types is None or name in self.only_types:
                load(name, t.handler)

    # --- signals ------------------------------------------------------------------------------
    def _install_signals(self) -> None:
        for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(sig, self._queue_signal)

    def _queue_signal(self, sig: int, _frame: Any) -> None:
        self.signals.append(sig)
        with contextlib.suppress(BlockingIOError):
            os.write(self.wake_w, b".")

    def _handle_signals(self) -> None:
        while self.signals:
            sig = self.signals.pop(0)
            if sig == signal.SIGHUP:
                self.reload()
            elif sig in (signal.SIGTERM, signal.SIGINT):
                if self.draining and sig == signal.SIGINT:
                    self._force_stop()
                else:
                    self._drain()

    def reload(self) -> None:
        try:
            new = load_config(self.cfg_path)
            self.check_handlers(new)
        except (ConfigError, HandlerError) as exc:
            self.reload_error = str(exc)
            log.error("reload_rejected", extra={"error": str(exc)})
            return
        diff = diff_types(self.cfg, new)
        self.cfg = new
        self.fingerprints = new.worker_fingerprints()
        self.planner.reserve_memory = new.supervisor.reserve.memory
        self.planner.reserve_gpu_memory = new.supervisor.reserve.gpu_memory
        self.reload_error = None
        self.due.pop("replan", None)  # plan the new quotas on this very tick
        for slots in self.slots.values():  # an operator reload gives fatal slots a new try
            for s in slots:
                if s.state == "fatal":
                    s.state, s.quick_failures, s.restart_at = "backoff", 0, 0.0
        log.info("reloaded", extra={"added": sorted(diff.added), "removed": sorted(diff.removed),
                                    "replaced": sorted(diff.settings_changed),
                                    "resized": sorted(diff.processes_changed)})

    def pause(self, job_type: str) -> None:
        """Drain one type's children and start none until `resume` (operator action)."""
        self.paused.add(job_type)
        log.info("type_paused", extra={"job_type": job_type})
        self.wake()

    def resume(self, job_type: str) -> None:
        self.paused.discard(job_type)
        log.info("type_resumed", extra={"job_type": job_type})
        self.wake()

    def wake(self) -> None:
        """Wake the loop from another thread (HTTP actions)."""
        with contextlib.suppress(BlockingIOError):
            os.write(self.wake_w, b".")

    def _drain(self) -> None:
        if self.draining:
            return
        self.draining = True
        log.info("supervisor_draining", extra={"children": sum(
            1 for slots in self.slots.values() for s in slots if s.proc)})
        now = time.monotonic()
        for slots in self.slots.values():
            for s in slots:
                if s.proc is not None:
                    children.terminate(s, now, self.cfg.supervisor.grace)
                elif s.state != "fatal":
                    s.state = "stopping"

    def _force_stop(self) -> None:
        self.forced = True
        log.warning("supervisor_forced_stop")
        for slots in self.slots.values():
            for s in slots:
                children.kill(s)

    # --- children -----------------------------------------------------------------------------
    def _read_children(self, now: float) -> None:
        for slots in self.slots.values():
            for s in slots:
                for report in children.read_status(s, now):
                    self._tally(s.job_type, report.get("outcomes", ()))

    def _tally(self, job_type: str, outcomes: Any) -> None:
        for outcome, code, *row in outcomes:
            acc = self.outcomes.get((job_type, outcome, code))
            if acc is None:
                self.outcomes[(job_type, outcome, code)] = list(row)
            else:
                for i, v in enumerate(row):
                    acc[i] += v

    def _reap(self, now: float) -> None:
        for job_type, slots in list(self.slots.items()):
            for s in list(slots):
                if s.proc is None or (code := s.proc.poll()) is None:
                    continue
                pid = s.proc.pid
                self._read_children(now)  # its last report may still be in the pipe
                worker_id, recycled = s.worker_id, s.recycled
                restarts = s.restarts
                # A crash waits for its rescue's answer: whether it held jobs decides who
                # pays (see children.settle_exit).
                children.after_exit(s, code, now, self.cfg.supervisor.restart)
                self.restarts[job_type] = self.restarts.get(job_type, 0) + s.restarts - restarts
                if worker_id is not None:
                    reason = f"{job_type}_memory_exceeded" if recycled else queue.WORKER_DIED
                    self.duties.rescue_child(s, worker_id, pid, code, reason)
                if s.retire or self.draining or job_type not in self._types():
                    slots.remove(s)
            if not slots and (self.draining or job_type not in self._types()):
                del self.slots[job_type]

    def _settle_rescues(self, now: float) -> None:
        """Apply the answers to dead children's rescues (from the duties thread)."""
        while True:
            try:
                r = self.duties.results.get_nowait()
            except stdqueue.Empty:
                return
            children.settle_exit(r.slot, r.held or 0, now, self.cfg.supervisor.restart)

    def _kill_silent_and_stuck(self, now: float) -> None:
        timeout = self.cfg.supervisor.child_heartbeat_timeout
        healthy_after = self.cfg.supervisor.restart.healthy_after
        for slots in self.slots.values():
            for s in slots:
                if s.proc is None:
                    continue
                if s.state == "stopping":
                    if now > s.stop_deadline:
                        log.warning("child_stop_timeout", extra={"job_type": s.job_type,
                                                                 "slot": s.index})
                        children.kill(s)
                elif now - s.last_seen > (timeout if s.reported
                                          else max(timeout, children.START_GRACE)):
                    log.error("child_silent", extra={"job_type": s.job_type, "slot": s.index,
                                                     "child_pid": s.pid,
                                                     "silent_s": round(now - s.last_seen, 1)})
                    children.kill(s)
                    s.last_seen = now  # once per silence: give the kill time to land
                elif s.state == "starting" and now - s.started_at >= healthy_after:
                    s.state = "running"
                    s.quick_failures = 0

    def _replan(self) -> None:
        types = self._types()
        running: dict[str, list[int]] = {}
        for job_type, slots in self.slots.items():
            for s in slots:
                if s.proc is not None:
                    children.measure(s, with_uss=True)
                    running.setdefault(job_type, []).append(s.rss)
        self.readings = read_capacity()
        sup = self.cfg.supervisor
        self.readings.model_servers = self.model_servers.read(
            model_servers.targets(sup.model_servers, self.env), sup.model_servers_memory_ttl)
        held_gpu = 0
        if self.readings.gpus:
            by_pid = gpu_memory_by_pid()
            held_gpu = sum(by_pid.get(s.pid or -1, 0) for slots in self.slots.values()
                           for s in slots)
        self.plan = self.planner.replan(types, self.readings, running, held_gpu)
        self._recycle_over_memory()

    def _recycle_over_memory(self) -> None:
        now = time.monotonic()
        for job_type, slots in self.slots.items():
            limit = getattr(self.cfg.types.get(job_type), "memory_limit", None)
            for s in slots:
                if limit and s.state == "running" and s.uss > limit:
                    log.warning("child_recycled", extra={"job_type": job_type, "slot": s.index,
                                                         "uss": s.uss, "limit": limit})
                    children.terminate(s, now, self.cfg.supervisor.grace, recycle=True)

    def _resize(self, now: float) -> None:
        types = self._types()
        for job_type in list(self.slots):
            if job_type not in types:
                for s in self.slots[job_type]:
                    self._retire(s, now)
        for job_type in types:
            target = self.plan.get(job_type, PlanEntry(0, "not planned")).processes
            if job_type in self.paused:
                target = 0
            slots = self.slots.setdefault(job_type, [])
            active = [s for s in slots if not s.retire]
            for s in sorted(active, key=lambda s: s.index)[target:]:
                self._retire(s, now)
            used = {s.index for s in slots}
            index = 0
            while len([s for s in slots if not s.retire]) < target:
                while index in used:
                    index += 1
                slots.append(Slot(job_type, index, self.fingerprints[job_type], restart_at=now))
                used.add(index)
            self.slots[job_type] = [s for s in slots if s.proc is not None or not s.retire]

    def _retire(self, s: Slot, now: float) -> None:
        s.retire = True
        children.terminate(s, now, self.cfg.supervisor.grace)

    def _roll_changed(self, now: float) -> None:
        """Replace children whose settings changed, one slot of a type at a time."""
        for job_type, slots in self.slots.items():
            current = self.fingerprints.get(job_type)
            if current is None:
                continue
            for s in slots:
                if s.proc is None and s.fingerprint != current:
                    s.fingerprint = current  # it will start with the new settings
            if any(s.state == "stopping" and not s.retire for s in slots):
                continue
            stale = [s for s in slots if s.proc is not None and s.fingerprint != current
                     and not s.retire]
            if stale:
                log.info("child_replacing", extra={"job_type": job_type, "slot": stale[0].index})
                children.terminate(stale[0], now, self.cfg.supervisor.grace)

    def _start_due(self, now: float) -> None:
        for job_type, slots in self.slots.items():
            for s in slots:
                if s.proc is None and s.state in ("backoff", "fatal") and not s.retire \
                        and now >= s.restart_at:
                    s.fingerprint = self.fingerprints[job_type]
                    try:
                        children.spawn(s, self.cfg, self.env, now)
                    except OSError as exc:
                        log.error("child_spawn_failed", extra={"job_type": job_type,
                                                               "error": type(exc).__name__})
                        s.started_at = now
                        children.after_exit(s, -1, now, self.cfg.supervisor.restart,
                                            awaiting_rescue=False)

    # --- periodic duties --------------------------------------------------------------------
    def _due(self, name: str, every: float, now: float) -> bool:
        if now >= self.due.get(name, 0.0):
            self.due[name] = now + every
            return True
        return False

    def _duties(self, now: float) -> None:
        """Database work runs in the duties thread; the loop only hands it a snapshot."""
        if self._due("publish", PUBLISH_EVERY, now):
            self.duties.state = self.view()

    def served_types(self) -> set[str]:
        return set(self._types())

    def served_config(self) -> dict[str, Any]:
        return self._types()

    # --- waiting --------------------------------------------------------------------------
    def _sleep(self) -> None:
        fds = [self.wake_r] + [s.status_fd for slots in self.slots.values() for s in slots
                               if s.status_fd is not None]
        # Wake exactly when a restart's backoff ends: a job whose child died waits on it.
        now = time.monotonic()
        restarts = [s.restart_at for slots in self.slots.values() for s in slots
                    if s.proc is None and s.state in ("backoff", "fatal") and not s.retire]
        timeout = max(0.0, min([TICK, *(r - now for r in restarts)]))
        try:
            ready, _, _ = select.select(fds, [], [], timeout)
        except InterruptedError:
            return
        if self.wake_r in ready:
            try:
                while os.read(self.wake_r, 4096):
                    pass
            except BlockingIOError:
                pass

    def _finish(self) -> None:
        for slots in self.slots.values():
            for s in slots:
                children.close_status(s)
        self.duties.stop()  # answers outstanding rescues, withdraws our row
        self.model_servers.close()
        log.info("supervisor_stopped", extra={"forced": self.forced})

    def _emergency_stop(self) -> None:
        """The loop failed: drain every child (grace, then kill) and rescue what they held."""
        live = [s for slots in self.slots.values() for s in slots if s.proc is not None]
        now = time.monotonic()
        for s in live:
            children.terminate(s, now, self.cfg.supervisor.grace)
        deadline = now + self.cfg.supervisor.grace + 5.0
        while any(s.proc.poll() is None for s in live) and time.monotonic() < deadline:
            time.sleep(0.1)
        for s in live:
            children.kill(s)
            with contextlib.suppress(Exception):
                s.proc.wait(5)
            if s.worker_id is not None:
                self.duties.rescue_child(s, s.worker_id, s.proc.pid, s.proc.returncode or -9,
                                         queue.WORKER_DIED)

    # --- views (status, metrics, health) -------------------------------------------------------
    def view(self) -> dict[str, Any]:
        now = time.monotonic()
        r = self.readings
        b = self.planner.last_budget
        return {
            "supervisor": {"id": self.sup_id, "host": self.host, "pid": os.getpid(),
                           "started_at": self.started, "draining": self.draining},
            "workers": [s.view(now) for slots in self.slots.values() for s in slots],
            "plan": {t: {"processes": 0 if t in self.paused else e.processes,
                         "reason": "paused by operator" if t in self.paused else e.reason}
                     for t, e in self.plan.items()},
            "paused": sorted(self.paused),
            # The types this supervisor serves: queues no live supervisor serves are
            # flagged (jobvisor_queue_unserved), never failed — see docs/runbook.md.
            "types": sorted(self._types()),
            # The elected supervisor runs every live host's schedules (duties._cron).
            "schedules": {n: {"schedule": t.schedule, "max_attempts": t.retry.max_attempts}
                          for n, t in self._types().items() if t.schedule},
            "unserved": sorted(self.duties.unserved),
            "readings": None if r is None else {
                "memory_available": r.memory_available, "memory_total": r.memory_total,
                "cpu_count": r.cpu_count,
                "gpus": [{"index": g.index, "name": g.name, "vendor": g.vendor,
                          "total_bytes": g.total_bytes, "free_bytes": g.free_bytes}
                         for g in r.gpus],
                # Model servers on our GPUs: what their loaded models hold (already not
                # free) and what is kept for models they unloaded (off the GPU budget).
                "model_servers": [s.as_dict() for s in r.model_servers],
                "model_memory_held_bytes": r.model_memory_held,
                "model_memory_reserved_bytes": r.model_memory_reserved,
            },
            "budget": None if b is None else {
                "ram_bytes": b.ram, "gpu_bytes": b.gpu, "has_gpu": b.has_gpu,
                "gpu_reserved_for_models_bytes": b.model_reserved},
            "reserve": {"memory": self.cfg.supervisor.reserve.memory,
                        "gpu_memory": self.cfg.supervisor.reserve.gpu_memory},
        }

    def health_checks(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        # Degraded while a slot is past its quick-failure limit, whether it is waiting
        # to retry or trying again, until a run lasts `healthy_after`.
        limit = self.cfg.supervisor.restart.max_quick_failures
        fatal = sorted({s.job_type + (f" (retry in {max(0.0, s.restart_at - now):.0f}s)"
                                      if s.state == "fatal" else " (retrying)")
                        for slots in self.slots.values() for s in slots
                        if s.quick_failures >= limit})
        loop_age = now - self.last_tick
        return [
            {"name": "supervisor_loop", "ok": loop_age < 30, "detail": f"{loop_age:.1f}s"},
            {"name": "database", "ok": self.duties.db_ok,
             "detail": "reachable" if self.duties.db_ok
             else f"unreachable ({self.duties.db_error or 'no answer yet'})"},
            {"name": "children", "ok": not fatal,
             "detail": "no fatal slots" if not fatal else "fatal: " + ",".join(fatal)},
        ]


def send_reload(pid_file: Path, send: Callable[[int, int], None] = os.kill) -> int:
    pid = int(pid_file.read_text().strip())
    send(pid, signal.SIGHUP)
    return pid
